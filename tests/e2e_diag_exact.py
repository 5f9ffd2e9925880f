"""e2e_diag_exact.py - diag method exact by backpropagation (issue 26 item 1) through
`curvd run`.

Usage: /usr/bin/python3 tests/e2e_diag_exact.py build/curvd
BackPACK's definitions reproduced in torch (float64): DiagGGNExact = sum_n diag(J_n^T
Lambda_n J_n) (J_n the per-sample output Jacobian by autograd, Lambda_n the loss Hessian of
sample n's outputs: the columns of any square root S_n give the same diagonal), the
empirical Fisher's diagonal = c sum_n (J_n^T dl_n/dh)^2 (the squared per-sample gradients).
Every job runs with --dense-max 10, where the identity-column path is refused:
  - a Tanh MLP (N = 12), a CNN (Conv2d, grouped Conv2d, BatchNorm2d in eval, ReLU,
    MaxPool2d, AvgPool2d, Linear) and the test-size transformer LM (graph form: Embedding,
    positional nn.Parameter, MultiheadAttention, LayerNorm, Linear on [N, T, d]): ggn within
    1e-5 (relative to the largest entry) of torch's, with backprop: true, stderr zeros,
    probes 0, trace = sum; ef against torch's squared per-sample gradients; per_sample:
    true (per_sample_diag, N x D) against torch's per-sample diagonals (ggn, ef); fisher_mc
    (mc_samples 3) against the diagonal of curvd's own dense fisher_mc at the same seed;
    per-layer blocks = the full diagonal's pieces; micro_batch 1 = whole batch;
  - hessian (BackPACK's DiagHessian: the GGN part plus the residual phi''(z) dL/da of every
    elementwise activation, backpropagated): the Tanh MLP (also per_sample, against each
    sample's dense Hessian) and the CNN against torch's dense Hessian diagonal;
  - refusals: the LM with its head tied to the embedding above --dense-max (unsupported,
    options.method, naming the layer); within the dense limit it takes the identity
    columns (backprop: false) and equals the dense diagonal; the LM's Hessian (LayerNorm,
    attention: no residual kernels) refused naming a layer above --dense-max, identity
    columns within; per_sample refused there, and with a Kronecker curvature or another
    method (400 invalid_option, options.per_sample);
  - a ReLU MLP 6-96-80-6 (N = 10), wide enough for Linear's row-group kernel of ReLU
    zeros (engine/linear_sparse.h, on CPUs with AVX-512): ggn, ggn per_sample and hessian
    against torch's;
  - data-parallel: mpirun -np 2 gives the one-process diagonal (ggn, ef, ggn per_sample, hessian).
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
SMALL = ("--dense-max", "10")


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def curvd_order(d):
    r = tr.curvd_run(CURVD, d, {"op": "gradient", "blocks": "layer"})[1]
    return [n for b in r["blocks"] for n in b["params"]]


def torch_reference(model, x, y, order):
    """Per-sample (ggn, ef) diagonals (N x D) of CrossEntropyLoss (mean) in float64,
    parameters in curvd's order: their sums over samples are the diagonals."""
    m = copy.deepcopy(model).double()
    named = dict(m.named_parameters())
    params = [named[n] for n in order]
    xx = x.double() if x.dtype.is_floating_point else x
    out = m(xx)
    N = out.shape[0]
    C = out.shape[-1]
    lf = torch.nn.CrossEntropyLoss()

    def loss_of(o):
        return lf(o.reshape(-1, C), y.reshape(-1))
    o = out.detach().clone().requires_grad_(True)
    gh = torch.autograd.grad(loss_of(o), o, create_graph=True)[0]   # dL/dh, [N, ...]
    flat = out.reshape(N, -1)
    K = flat.shape[1]
    ggn = torch.zeros(N, sum(p.numel() for p in params), dtype=torch.float64)
    ef = torch.zeros_like(ggn)
    for n in range(N):
        rows = []
        for a in range(K):
            g = torch.autograd.grad(flat[n, a], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                   for gi, p in zip(g, params)]))
        J = torch.stack(rows)                                          # K x D
        ghn = gh.reshape(N, -1)[n]
        Lam = torch.stack([torch.autograd.grad(ghn[a], o, retain_graph=True)[0].reshape(N, -1)[n]
                           for a in range(K)])                        # K x K
        ggn[n] = torch.einsum("ap,ab,bp->p", J, Lam, J)
        ef[n] = (J.T @ ghn.detach()) ** 2
    # ghn = dL/dh_n = c dl_n/dh_n (c = the loss scale, 1/targets): ef = c sum (J^T dl_n)^2
    c = 1.0 / y.numel()
    return ggn.detach().numpy(), ef.detach().numpy() / c


def diag_job(curvature, seed=3, **opts):
    return {"op": "diag", "curvature": curvature, "seed": seed,
            "options": dict(method="exact", **opts)}


def check_model(name, d, ggn_rows, ef_rows, fm_blocks=None):
    ggn, ef = ggn_rows.sum(0), ef_rows.sum(0)
    for curv, want in (("ggn", ggn_rows), ("ef", ef_rows)):
        r = tr.curvd_run(CURVD, d, diag_job(curv, per_sample=True), extra=SMALL)[1]
        got = np.asarray(r.get("per_sample_diag", []))
        check(f"{name} {curv} per_sample: N x D rows = torch's per-sample diagonals, diag = "
              "their sum", got.shape == want.shape and rel(got, want) < TOL and
              rel(r["diag"], want.sum(0)) < TOL, f"{got.shape} {rel(got, want) if got.shape == want.shape else ''}")
    for curv, want in (("ggn", ggn), ("ef", ef)):
        r = tr.curvd_run(CURVD, d, diag_job(curv), extra=SMALL)[1]
        got = np.asarray(r["diag"])
        check(f"{name} {curv}: backpropagated diagonal = torch's BackPACK definition "
              f"(D = {len(want)} > --dense-max 10)",
              r.get("backprop") is True and rel(got, want) < TOL and r["probes"] == 0 and
              not any(r["stderr"]) and abs(r["trace"] - got.sum()) <= 1e-9 * abs(got.sum()),
              f"rel {rel(got, want):.2e} backprop {r.get('backprop')}")
    fm = diag_job("fisher_mc", mc_samples=3)
    dense = {"op": "dense", "curvature": "fisher_mc", "seed": 3, "options": {"mc_samples": 3}}
    if fm_blocks:
        fm["blocks"] = dense["blocks"] = fm_blocks
    r = tr.curvd_run(CURVD, d, fm, extra=SMALL)[1]
    M = tr.curvd_run(CURVD, d, dense, extra=("--dense-max", "100000"))[1]
    rb, Mb = (r["blocks"], M["blocks"]) if fm_blocks else ([r], [M])
    got = np.concatenate([b["diag"] for b in rb])
    want = np.concatenate([np.diag(np.asarray(b["matrix"])) for b in Mb])
    check(f"{name} fisher_mc (mc_samples 3) = diagonal of the dense fisher_mc, same seed"
          + (f" ({len(fm_blocks)} blocks)" if fm_blocks else ""),
          all(b.get("backprop") is True for b in rb) and rel(got, want) < TOL,
          f"{rel(got, want):.2e}")
    r = tr.curvd_run(CURVD, d, dict(diag_job("ggn"), blocks="layer"), extra=SMALL)[1]
    got = np.concatenate([b["diag"] for b in r["blocks"]])
    check(f"{name} ggn per-layer blocks = the full diagonal's pieces",
          all(b.get("backprop") for b in r["blocks"]) and rel(got, ggn) < TOL,
          f"{rel(got, ggn):.2e}")
    r = tr.curvd_run(CURVD, d, dict(diag_job("ggn"), micro_batch=1), extra=SMALL)[1]
    w = tr.curvd_run(CURVD, d, diag_job("ggn"), extra=SMALL)[1]
    check(f"{name} ggn micro_batch 1 = whole batch", r.get("micro_batches", 0) > 1 and
          rel(r["diag"], w["diag"]) < 1e-6, f"{rel(r['diag'], w['diag']):.2e} "
          f"{r.get('micro_batches')}")


def check_hessian(name, d, model, x, y, order, per_sample=False):
    """The Hessian's diagonal (GGN part + the activations' residual terms, BackPACK's
    DiagHessian) against torch's dense Hessian (float64); per_sample: each sample's own
    term (1/N l_n) against the dense Hessian of that term."""
    m64 = copy.deepcopy(model).double()
    named = dict(m64.named_parameters())
    lf = torch.nn.CrossEntropyLoss()
    N = x.shape[0]

    def hess_diag(xs, ys, w):
        params = [named[n] for n in order]
        loss = lf(m64(xs.double()), ys) * w
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params,
                                                                  create_graph=True)])
        out = []
        for i in range(g.numel()):
            hi = torch.autograd.grad(g[i], params, retain_graph=True)
            out.append(torch.cat([t.reshape(-1) for t in hi])[i])
        return torch.stack(out).detach().numpy()
    want = hess_diag(x, y, 1.0)
    r = tr.curvd_run(CURVD, d, diag_job("hessian"), extra=SMALL)[1]
    check(f"{name} hessian: backpropagated diagonal (GGN + residual) = torch's dense "
          "Hessian diagonal", r.get("backprop") is True and rel(r["diag"], want) < TOL,
          f"rel {rel(r['diag'], want):.2e} backprop {r.get('backprop')}")
    if per_sample:
        rows = np.stack([hess_diag(x[i:i + 1], y[i:i + 1], 1.0 / N) for i in range(N)])
        r = tr.curvd_run(CURVD, d, diag_job("hessian", per_sample=True), extra=SMALL)[1]
        got = np.asarray(r.get("per_sample_diag", []))
        check(f"{name} hessian per_sample = torch's per-sample Hessian diagonals",
              got.shape == rows.shape and rel(got, rows) < TOL,
              f"{got.shape} {rel(got, rows) if got.shape == rows.shape else ''}")


def mpi(d):
    mpirun = shutil.which("mpirun")
    if not mpirun or not os.path.exists(os.path.join(os.path.dirname(CURVD), "curvd-mpi.so")):
        skip("diag exact under mpirun", "mpirun or build/curvd-mpi.so missing")
        return
    for curv, ps in (("ggn", False), ("ef", False), ("ggn", True), ("hessian", False)):
        job = diag_job(curv, per_sample=True) if ps else diag_job(curv)
        key = "per_sample_diag" if ps else "diag"
        one = tr.curvd_run(CURVD, d, job, extra=SMALL)[1]
        with open(os.path.join(d, "job.json"), "w") as f:
            json.dump(job, f)
        p = subprocess.run([mpirun, "--oversubscribe", "--allow-run-as-root", "-np", "2", CURVD,
                            "run", "--arch", os.path.join(d, "arch.json"), "--params",
                            os.path.join(d, "params.safetensors"), "--data",
                            os.path.join(d, "data.safetensors"), "--job",
                            os.path.join(d, "job.json"), "--blas-threads", "1", *SMALL],
                           capture_output=True, text=True, timeout=300)
        try:
            two = json.loads(p.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            two = {}
        check(f"mpirun -np 2 diag exact {curv}{' per_sample' if ps else ''} = one process",
              key in two and rel(two[key], one[key]) < 1e-5 and two.get("ranks") == 2 and
              two.get("backprop") is True, (p.stdout + p.stderr)[-400:])


def refusals(d_tied):
    """The tied LM: the embedding's block (176 entries) holds the tensor the head uses too."""
    blk = {"blocks": [["tok_emb.weight"]]}
    rc, r = tr.curvd_run(CURVD, d_tied, dict(diag_job("ggn"), **blk), expect_ok=False,
                         extra=SMALL)
    err = r.get("error", {})
    check("tied head above --dense-max: 400 unsupported naming the layer",
          rc != 0 and err.get("code") == "unsupported" and err.get("field") == "options.method"
          and "layers[" in err.get("message", "") and "tied" in err.get("message", ""),
          str(r)[:300])
    big = ("--dense-max", "1000")
    r = tr.curvd_run(CURVD, d_tied, dict(diag_job("ggn"), **blk), extra=big)[1]["blocks"][0]
    M = tr.curvd_run(CURVD, d_tied, dict({"op": "dense", "curvature": "ggn"}, **blk),
                     extra=big)[1]["blocks"][0]
    want = np.diag(np.asarray(M["matrix"]))
    check("tied head within the dense limit: identity columns (backprop false) = dense",
          r.get("backprop") is False and rel(r["diag"], want) < TOL, f"{rel(r['diag'], want)}")
    rc, r = tr.curvd_run(CURVD, d_tied, dict(diag_job("hessian"), **blk), expect_ok=False,
                         extra=SMALL)
    err = r.get("error", {})
    check("hessian of the LM above --dense-max: unsupported, naming a layer without the "
          "residual term", rc != 0 and err.get("code") == "unsupported" and
          "layers[" in err.get("message", "") and "Hessian" in err.get("message", ""),
          str(r)[:300])
    r = tr.curvd_run(CURVD, d_tied, dict(diag_job("hessian"), **blk), extra=big)[1]["blocks"][0]
    check("hessian within the dense limit: identity columns, backprop false",
          r.get("backprop") is False and len(r["diag"]) == 176)
    rc, r = tr.curvd_run(CURVD, d_tied, diag_job("hessian", per_sample=True), expect_ok=False)
    check("hessian per_sample on the LM: unsupported (no identity-column fallback)",
          rc != 0 and r.get("error", {}).get("code") == "unsupported", str(r)[:200])
    for job in ({"op": "diag", "curvature": "kfac", "options": {"method": "exact",
                                                                "per_sample": True}},
                {"op": "diag", "curvature": "ggn", "options": {"per_sample": True}}):
        rc, r = tr.curvd_run(CURVD, d_tied, job, expect_ok=False)
        check(f"per_sample refused: {json.dumps(job)[:70]}", rc != 0 and
              r.get("error", {}).get("field") == "options.per_sample", str(r)[:200])


def relu_wide():
    """A ReLU MLP wide enough for Linear's row-group kernel (engine/linear_sparse.h: the 80
    units after the second ReLU, C - 1 = 5 vectors per sample in one walk): ggn, its
    per_sample rows and hessian (= ggn: phi'' = 0) against torch's."""
    model, x, y = tr.make_mlp_case(torch.nn.ReLU, torch.nn.CrossEntropyLoss(), n=10, din=6,
                                   hidden=(96, 80), C=6, seed=4)
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [x.shape[1]], torch.nn.CrossEntropyLoss(), x, y)
        ggn = torch_reference(model, x, y, curvd_order(d))[0]
        for job in (diag_job("ggn"), diag_job("ggn", per_sample=True), diag_job("hessian")):
            r = tr.curvd_run(CURVD, d, job, extra=SMALL)[1]
            rows = job["options"].get("per_sample")
            got = np.asarray(r.get("per_sample_diag" if rows else "diag", []))
            want = ggn if rows else ggn.sum(0)
            ok = got.shape == want.shape and r.get("backprop") is True and rel(got, want) < TOL
            check(f"relu mlp 6-96-80-6 {job['curvature']}{' per_sample' if rows else ''}: "
                  "backpropagated diagonal = torch's", ok,
                  f"{got.shape} {rel(got, want) if got.shape == want.shape else ''}")


def within_budget():
    """The exact GGN diagonal of a 1,000-class head keeps its peak within --job-memory: its
    walk takes all the output factor's vectors at once only as many as the memory plan's
    products measured (a first cut of the one-walk path ran 4 micro-batches of 4 samples
    at 37 MB against a 9 MB budget)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 1000))
    x, y = torch.randn(16, 64), torch.randint(0, 1000, (16,))
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [64], torch.nn.CrossEntropyLoss(), x, y)
        budget = 9_000_000
        r = tr.curvd_run(CURVD, d, diag_job("ggn"), extra=("--dense-max", "10", "--job-memory",
                                                            str(budget)))[1]
        check("1000 classes, --job-memory 9000000: micro-batches, peak_memory_bytes within the budget",
              r.get("backprop") is True and r.get("micro_batches", 0) > 1 and
              0 < r.get("peak_memory_bytes", 0) <= budget,
              {k: r.get(k) for k in ("micro_batches", "micro_batch_size", "peak_memory_bytes")})


def main():
    relu_wide()
    within_budget()
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), n=12)
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [x.shape[1]], torch.nn.CrossEntropyLoss(), x, y)
        order = curvd_order(d)
        ggn, ef = torch_reference(model, x, y, order)
        check_model("mlp", d, ggn, ef)
        check_hessian("mlp (Tanh)", d, model, x, y, order, per_sample=True)
        mpi(d)
    torch.manual_seed(3)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(4, 4, 2, groups=2, padding=1),
                              torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2)
        cnn[1].weight.uniform_(0.5, 1.5)
        cnn[1].bias.uniform_(-0.3, 0.3)
    cnn.eval()
    xc, yc = torch.randn(6, 2, 8, 8), torch.randint(0, 5, (6,))
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, cnn, [2, 8, 8], torch.nn.CrossEntropyLoss(), xc, yc)
        order = curvd_order(d)
        ggn, ef = torch_reference(cnn, xc, yc, order)
        check_model("cnn", d, ggn, ef)
        check_hessian("cnn", d, cnn, xc, yc, order)
    sys.path.insert(0, os.path.join(ROOT, "clients", "python", "examples"))
    import graph_models as gm
    from curvd_client.torch_export import write_files
    xl, yl = gm.lm_batch(n=3, **gm.SMALL_LM)
    for tied in (False, True):
        lm = gm.transformer_lm(**gm.SMALL_LM, attention="mha", tied=tied).eval()
        with tempfile.TemporaryDirectory() as d:
            write_files(lm, torch.nn.CrossEntropyLoss(), [gm.SMALL_LM["seq_len"]], xl, yl,
                        directory=d, class_dim=-1)
            if tied:
                refusals(d)
                continue
            order = curvd_order(d)
            ggn, ef = torch_reference(lm, xl, yl, order)
            # the dense fisher_mc of small blocks (the whole LM's is slow to form)
            check_model("lm", d, ggn, ef, [["head.weight"], ["ln_f.weight", "ln_f.bias"],
                                           ["pos_emb"], [order[0], order[2]]])
    return summary()


if __name__ == "__main__":
    sys.exit(main())
