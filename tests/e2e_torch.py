"""e2e_torch.py - `curvd run` against torch.autograd on the same weights and batch.

Usage: /usr/bin/python3 tests/e2e_torch.py build/curvd
For MLPs with every supported activation and loss: loss, gradient, Hessian-
and GGN-vector products, dense Hessian/GGN, and the estimators (trace, diag,
eigen, density, solve, newton, per-layer blocks) against dense references
computed by torch in float64.  Ends with 'N passed, M failed'.
"""
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402
from torchref import make_mlp_case as make_case, rel  # noqa: E402


def double_model(model):
    import copy
    m = copy.deepcopy(model).double()
    return m


def y_double(y):
    return y if y.dtype == torch.int64 else y.double()


def check_core(tag, model, loss_fn, x, y, d):
    m64 = double_model(model)
    x64, y64 = x.double(), y_double(y)
    g = tr.check_products(tag, d, m64, loss_fn, x64, y64, loss_atol=1e-7)
    H = tr.dense_hessian(m64, loss_fn, x64, y64)
    G = tr.dense_ggn(m64, loss_fn, x64, y64)
    tr.check_dense(tag, d, "hessian", H)
    tr.check_dense(tag, d, "ggn", G)
    return H, G, g


def check_estimators(tag, model, loss_fn, x, y, d, H, G, g):
    D = H.shape[0]
    evals = torch.linalg.eigvalsh(H)
    # trace: Hutchinson within 4 standard errors, Hutch++ with the full budget exact-ish
    _, res = tr.curvd_run(CURVD, d, {"op": "trace", "seed": 3,
                                     "options": {"max_probes": 200, "tol": 0}})
    t = float(torch.trace(H))
    check(tag + " trace within error bars", abs(res["trace"] - t) <= 4 * res["stderr"] + 1e-6,
          f"{res['trace']} +- {res['stderr']} vs {t}")
    _, res = tr.curvd_run(CURVD, d, {"op": "trace", "options": {"method": "hutch++",
                                                                "max_probes": 3 * D}})
    check(tag + " hutch++ full budget", abs(res["trace"] - t) <= 1e-4 * abs(t) + 1e-5,
          f"{res['trace']} vs {t}")
    _, res = tr.curvd_run(CURVD, d, {"op": "diag", "options": {"method": "exact"}})
    e = rel(res["diag"], torch.diagonal(H))
    check(tag + " exact diag", e < 1e-4, f"rel err {e}")
    # eigen: top-3 / bottom-2 by Lanczos vs LAPACK on torch's dense Hessian
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "options": {"k": 3, "which": "largest"}})
    want = evals.flip(0)[:3]
    e = rel(res["eigenvalues"], want)
    check(tag + " top-3 eigenvalues", e < 1e-4, f"{res['eigenvalues']} vs {want.tolist()}")
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "options": {"k": 2, "which": "smallest",
                                                                "return_vectors": True}})
    want = evals[:2]
    e = rel(res["eigenvalues"], want)
    check(tag + " bottom-2 eigenvalues", e < 1e-4, f"{res['eigenvalues']} vs {want.tolist()}")
    vec = torch.tensor(res["eigenvectors"][0], dtype=torch.float64)
    r = float((H @ vec - res["eigenvalues"][0] * vec).norm() / evals.abs().max())
    check(tag + " eigenvector residual", r < 1e-3, f"{r}")
    # the same vectors through --vectors-out (safetensors, [k, D] F64)
    vf = os.path.join(d, "vectors.safetensors")
    _, res2 = tr.curvd_run(CURVD, d, {"op": "eigen", "options": {"k": 2, "which": "smallest",
                                                                 "return_vectors": True}},
                           extra=("--vectors-out", vf))
    ref = res2["eigenvectors"]
    saved = tr.read_safetensors(vf)[ref["tensor"]]
    check(tag + " vectors-out file", ref["shape"] == [2, D] and
          rel(saved, torch.tensor(res["eigenvectors"], dtype=torch.float64)) < 1e-12,
          str(ref))
    # density: with D steps the nodes of one run are H's eigenvalues; over many
    # runs the quadrature moments estimate tr(H^j)/D within their error bars
    _, res = tr.curvd_run(CURVD, d, {"op": "density", "seed": 5,
                                     "options": {"lanczos_steps": D, "runs": 30,
                                                 "grid_points": 200}})
    nodes0 = torch.tensor(sorted(res["nodes"][0]), dtype=torch.float64)
    e = rel(nodes0, evals)
    check(tag + " SLQ nodes = spectrum", e < 1e-4, f"rel err {e}")
    for j in (1, 2):
        per_run = []
        for nr, wr in zip(res["nodes"], res["weights"]):
            nr = torch.tensor(nr, dtype=torch.float64)
            wr = torch.tensor(wr, dtype=torch.float64)
            per_run.append(float((wr * nr ** j).sum()))
        pr = torch.tensor(per_run)
        mean, se = float(pr.mean()), float(pr.std() / math.sqrt(len(per_run)))
        m_true = float(torch.trace(torch.linalg.matrix_power(H, j)) / D)
        check(tag + f" SLQ moment {j}", abs(mean - m_true) <= 4 * se + 1e-6 * abs(m_true),
              f"{mean} +- {se} vs {m_true}")
    vals = res["density"]["values"]
    grid = res["density"]["grid"]
    area = sum(vals) * (grid[1] - grid[0])
    check(tag + " density area 1", abs(area - 1) < 1e-6, f"{area}")
    # below 2^16 parameters every Lanczos step reorthogonalizes (in double)
    check(tag + " SLQ full reorthogonalization", res["reorthogonalized_steps"] == 30 * D,
          str(res.get("reorthogonalized_steps")))
    # solve / newton on the PSD GGN with damping
    delta = 1e-1
    Gd = G + delta * torch.eye(D, dtype=torch.float64)
    _, res = tr.curvd_run(CURVD, d, {"op": "solve", "curvature": "ggn",
                                     "options": {"damping": delta, "tol": 1e-8,
                                                 "max_iter": 4 * D}})
    want = torch.linalg.solve(Gd, g)
    e = rel(res["solution"], want)
    check(tag + " CG solve", e < 1e-3, f"rel err {e}")
    _, res = tr.curvd_run(CURVD, d, {"op": "newton", "curvature": "ggn",
                                     "options": {"damping": delta, "tol": 1e-8,
                                                 "max_iter": 4 * D, "actual_change": True}})
    s = -want
    pred = float(0.5 * s @ G @ s + g @ s)
    e = rel(res["step"], s)
    check(tag + " newton step", e < 1e-3, f"rel err {e}")
    check(tag + " newton predicted change",
          abs(res["predicted_change"] - pred) <= 1e-3 * abs(pred) + 1e-7,
          f"{res['predicted_change']} vs {pred}")
    check(tag + " newton actual change present", "actual_change" in res)
    # a matvec restricted to one group of tensors is the submatrix product
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    lo = sum(sizes[:2])
    hi = lo + sizes[2]
    u = torch.linspace(-1, 1, sizes[2], dtype=torch.float64)
    _, res = tr.curvd_run(CURVD, d, {"op": "matvec", "blocks": [[names[2]]],
                                     "options": {"vector": u.tolist()}})
    e = rel(res["product"], H[lo:hi, lo:hi] @ u)
    check(tag + " block matvec", e < 1e-4, f"rel err {e}")
    # per-layer blocks: traces equal the traces of the diagonal blocks
    _, res = tr.curvd_run(CURVD, d, {"op": "diag", "blocks": "layer",
                                     "options": {"method": "exact"}})
    off = 0
    ok = True
    for b in res["blocks"]:
        n = b["dim"]
        want = float(torch.trace(H[off:off + n, off:off + n]))
        ok &= abs(b["trace"] - want) <= 1e-4 * abs(want) + 1e-6
        off += n
    check(tag + " per-layer traces", ok and off == D)


def check_determinism(d):
    """Same job, same seed, same thread count: bit-identical numbers."""
    job = {"op": "trace", "seed": 11, "curvature": "fisher_mc",
           "options": {"max_probes": 30, "tol": 0, "return_samples": True}}
    for threads in ("1", "2"):
        outs = [tr.curvd_run(CURVD, d, job, extra=("--blas-threads", threads))[1]
                for _ in range(2)]
        check(f"deterministic at {threads} threads",
              outs[0]["samples"] == outs[1]["samples"] and outs[0]["trace"] == outs[1]["trace"])
    other = tr.curvd_run(CURVD, d, dict(job, seed=12))[1]
    check("another seed, other probes", other["samples"] != outs[0]["samples"])


def check_errors(d):
    rc, err = tr.curvd_run(CURVD, d, {"op": "trace", "options": {"max_probs": 3}},
                           expect_ok=False)
    check("unknown option rejected", rc != 0 and err.get("error", {}).get("field") ==
          "options.max_probs", str(err))
    rc, err = tr.curvd_run(CURVD, d, {"op": "eigen", "options": {"k": 0}}, expect_ok=False)
    check("k=0 rejected", rc != 0 and "k" in err.get("error", {}).get("field", ""), str(err))
    rc, err = tr.curvd_run(CURVD, d, {"op": "matvec", "options": {"vector": [1, 2]}},
                           expect_ok=False)
    check("short vector rejected", rc != 0 and "dimension" in
          err.get("error", {}).get("message", ""), str(err))
    rc, err = tr.curvd_run(CURVD, d, {"op": "loss", "batch": {"offset": 10 ** 6}},
                           expect_ok=False)
    check("batch beyond data rejected", rc != 0 and "batch" in
          err.get("error", {}).get("field", ""), str(err))


def main():
    cases = [
        ("tanh-ce-mean", torch.nn.Tanh, torch.nn.CrossEntropyLoss()),
        ("relu-ce-sum", torch.nn.ReLU, torch.nn.CrossEntropyLoss(reduction="sum")),
        ("sigmoid-mse-mean", torch.nn.Sigmoid, torch.nn.MSELoss()),
        ("elu-mse-sum", torch.nn.ELU, torch.nn.MSELoss(reduction="sum")),
        ("gelu-bce-mean", torch.nn.GELU, torch.nn.BCEWithLogitsLoss()),
        ("gelutanh-ce", lambda: torch.nn.GELU(approximate="tanh"), torch.nn.CrossEntropyLoss()),
        ("softplus-bce-sum", lambda: torch.nn.Softplus(beta=2.0),
         torch.nn.BCEWithLogitsLoss(reduction="sum")),
        ("leaky-mse", lambda: torch.nn.LeakyReLU(0.2), torch.nn.MSELoss()),
        ("silu-ce-mean", torch.nn.SiLU, torch.nn.CrossEntropyLoss()),
    ]
    for i, (tag, act, loss_fn) in enumerate(cases):
        model, x, y = make_case(act, loss_fn, seed=i)
        with tempfile.TemporaryDirectory() as d:
            tr.write_case(d, model, [x.shape[1]], loss_fn, x, y)
            H, G, g = check_core(tag, model, loss_fn, x, y, d)
            if i < 3:
                check_estimators(tag, model, loss_fn, x, y, d, H, G, g)
            if i == 0:
                check_errors(d)
                check_determinism(d)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
