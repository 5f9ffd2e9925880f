"""e2e_jacobian.py - ops jvp, vjp and jacobian (issue 26) against torch.autograd (float64).

Usage: /usr/bin/python3 tests/e2e_jacobian.py build/curvd
J_n = d f(x_n) / d theta, f the model's output (before the loss), theta the job's block:
  - a Tanh MLP (CrossEntropyLoss, N = 5), a CNN with BatchNorm2d (eval) and MaxPool, and
    the test-size transformer LM (graph form, [T, C] output per sample, N = 2):
    jacobian = torch's per-sample Jacobian (1e-5 relative), with output_shape; jvp with a
    vector = J v; jvp with probe_seed = J r (r the seeded Rademacher vector matvec uses);
    vjp with cotangents = sum_n J_n^T c_n; vjp with cotangent_seed = J^T c for a +-1
    vector c (recovered by least squares where N C < D); per-layer blocks = the full
    Jacobian's columns;
  - refusals: a vector of the wrong length (400 invalid_vector at submission), both or
    neither of vector / probe_seed, cotangents of the wrong length (invalid_vector), a
    Jacobian above --dense-max (too_large);
  - data-parallel: mpirun -np 2 gives the same jvp and vjp as one process.
Ends with 'N passed, M failed'.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, ROOT, check, skip, summary  # noqa: E402

TOL = 1e-5


def curvd_order(d, extra=()):
    """The parameter names in curvd's order (its per-layer blocks, concatenated)."""
    r = tr.curvd_run(CURVD, d, {"op": "gradient", "blocks": "layer"}, extra=extra)[1]
    return [n for b in r["blocks"] for n in b["params"]]


def torch_jacobian(model, x, order=None):
    """(N, C, D) per-sample output Jacobians in float64, the parameters in order (names;
    default model.parameters()'s)."""
    m = copy.deepcopy(model).double()
    named = dict(m.named_parameters())
    params = [named[n] for n in order] if order else list(m.parameters())
    xx = x.double() if x.dtype.is_floating_point else x
    out = m(xx)
    N = out.shape[0]
    flat_out = out.reshape(N, -1)
    rows = []
    for i in range(flat_out.numel()):
        g = torch.autograd.grad(flat_out.reshape(-1)[i], params, retain_graph=True,
                                allow_unused=True)
        rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                               for gi, p in zip(g, params)]))
    J = torch.stack(rows).reshape(N, flat_out.shape[1], -1)
    return J.numpy(), list(out.shape[1:]), out.detach().numpy()


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def quad_lambda(jr, logits):
    """sum_n t_n^T Lambda_n t_n for CrossEntropyLoss mean: Lambda per target position =
    (diag p - p p^T) / (number of targets); t_n, logits row-major [N, ..., classes]."""
    C = logits.shape[-1]
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).reshape(-1, C).numpy()
    t = np.asarray(jr, dtype=float).reshape(-1, C)
    return float(np.sum(t * t * p) - np.sum(np.sum(t * p, 1) ** 2)) / p.shape[0]


def check_case(name, d, J, shape, logits, extra=()):
    N, C, D = J.shape
    r = tr.curvd_run(CURVD, d, {"op": "jacobian"}, extra=extra)[1]
    check(f"{name} jacobian = torch's ({N} x {C} x {D})", rel(r["jacobian"], J) < TOL and
          r["output_shape"] == shape, f"rel {rel(r['jacobian'], J):.2e} {r.get('output_shape')}")
    v = np.random.default_rng(1).standard_normal(D)
    r = tr.run(d, {"op": "jvp", "options": {"vector": v.tolist()}})
    check(f"{name} jvp vector = J v", rel(r["jvp"], J @ v) < TOL, f"{rel(r['jvp'], J @ v):.2e}")
    rv = tr.run(d, {"op": "matvec", "curvature": "ggn",
                    "options": {"probe_seed": 7}})["quadratic_form"]
    jr = np.asarray(tr.run(d, {"op": "jvp", "options": {"probe_seed": 7}})["jvp"])
    # the same Rademacher draws as matvec's probe_seed: r^T G r = sum_n (J_n r)^T Lambda_n J_n r
    check(f"{name} jvp probe_seed: matvec's draws (r^T G r = sum_n (J_n r)^T Lambda_n J_n r)",
          jr.shape == (N, C) and abs(quad_lambda(jr, logits) - rv) < 1e-5 * abs(rv),
          f"{quad_lambda(jr, logits)} vs {rv}")
    c = np.random.default_rng(2).standard_normal((N, C))
    r = tr.run(d, {"op": "vjp", "options": {"cotangents": c.ravel().tolist()}})
    want = np.einsum("nc,ncd->d", c, J)
    check(f"{name} vjp cotangents = sum_n J_n^T c_n", rel(r["vjp"], want) < TOL,
          f"{rel(r['vjp'], want):.2e}")
    if N * C < D:  # J^T has full column rank: the draws are recovered by least squares
        g = np.asarray(tr.run(d, {"op": "vjp", "options": {"cotangent_seed": 3}})["vjp"])
        Jt = J.reshape(N * C, D).T
        cs = np.linalg.lstsq(Jt, g, rcond=None)[0]
        check(f"{name} vjp cotangent_seed = J^T c for Rademacher c (+-1 entries)",
              rel(Jt @ cs, g) < TOL and np.abs(np.abs(cs) - 1).max() < 1e-3,
              f"residual {rel(Jt @ cs, g):.2e}, |c| - 1 up to {np.abs(np.abs(cs) - 1).max():.2e}")
    r = tr.curvd_run(CURVD, d, {"op": "jacobian", "blocks": "layer"}, extra=extra)[1]
    got = np.concatenate([np.asarray(b["jacobian"]) for b in r["blocks"]], axis=2)
    check(f"{name} per-layer jacobian blocks = the full Jacobian's columns", rel(got, J) < TOL)


def refusals(d, D):
    cases = [({"op": "jvp", "options": {"vector": [1.0, 2.0]}}, "invalid_vector",
              "options.vector"),
             ({"op": "jvp", "options": {}}, "invalid_option", "options.vector"),
             ({"op": "jvp", "options": {"vector": [0.0] * D, "probe_seed": 1}}, "invalid_option",
              "options.vector"),
             ({"op": "vjp", "options": {"cotangents": [1.0]}}, "invalid_vector",
              "options.cotangents"),
             ({"op": "vjp", "options": {}}, "invalid_option", "options.cotangents")]
    for job, code, field in cases:
        rc, r = tr.curvd_run(CURVD, d, job, expect_ok=False)
        err = r.get("error", {})
        check(f"refused: {json.dumps(job)[:60]} ({code})", rc != 0 and err.get("code") == code
              and err.get("field") == field, str(r)[:200])
    rc, r = tr.curvd_run(CURVD, d, {"op": "jacobian"}, expect_ok=False,
                         extra=("--dense-max", "10"))
    check("jacobian above --dense-max: too_large", rc != 0 and
          r.get("error", {}).get("code") == "too_large", str(r)[:200])


def mpi(d):
    mpirun = shutil.which("mpirun")
    if not mpirun or not os.path.exists(os.path.join(os.path.dirname(CURVD), "curvd-mpi.so")):
        skip("jvp/vjp under mpirun", "mpirun or build/curvd-mpi.so missing")
        return
    for job, key in (({"op": "jvp", "options": {"probe_seed": 3}}, "jvp"),
                     ({"op": "vjp", "options": {"cotangent_seed": 3}}, "vjp")):
        one = tr.run(d, job)
        with open(os.path.join(d, "job.json"), "w") as f:
            json.dump(job, f)
        p = subprocess.run([mpirun, "--oversubscribe", "--allow-run-as-root", "-np", "2", CURVD,
                            "run", "--arch", os.path.join(d, "arch.json"), "--params",
                            os.path.join(d, "params.safetensors"), "--data",
                            os.path.join(d, "data.safetensors"), "--job",
                            os.path.join(d, "job.json"), "--blas-threads", "1"],
                           capture_output=True, text=True, timeout=300)
        try:
            two = json.loads(p.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            two = {}
        check(f"mpirun -np 2 {key} = one process", key in two and
              rel(two[key], one[key]) < 1e-5 and two.get("ranks") == 2,
              (p.stdout + p.stderr)[-400:])


def main():
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), n=5)
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [x.shape[1]], torch.nn.CrossEntropyLoss(), x, y)
        J, shape, logits = torch_jacobian(model, x)
        check_case("mlp", d, J, shape, logits)
        refusals(d, J.shape[2])
        mpi(d)
    torch.manual_seed(3)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(12, 4))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2)
    cnn.eval()
    xc, yc = torch.randn(3, 2, 6, 6), torch.randint(0, 4, (3,))
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, cnn, [2, 6, 6], torch.nn.CrossEntropyLoss(), xc, yc)
        J, shape, logits = torch_jacobian(cnn, xc)
        check_case("cnn", d, J, shape, logits)
    sys.path.insert(0, os.path.join(ROOT, "clients", "python", "examples"))
    import graph_models as gm
    from curvd_client.torch_export import write_files
    xl, yl = gm.lm_batch(n=2, **gm.SMALL_LM)
    lm = gm.transformer_lm(**gm.SMALL_LM, attention="mha").eval()
    with tempfile.TemporaryDirectory() as d:
        write_files(lm, torch.nn.CrossEntropyLoss(), [gm.SMALL_LM["seq_len"]], xl, yl,
                    directory=d, class_dim=-1)
        J, shape, logits = torch_jacobian(lm, xl, curvd_order(d))
        check_case("lm", d, J, shape, logits, extra=("--dense-max", "8000"))
    return summary()


if __name__ == "__main__":
    sys.exit(main())
