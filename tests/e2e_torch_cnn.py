"""e2e_torch_cnn.py - `curvd run` on CNNs against torch.autograd (float64).

Usage: /usr/bin/python3 tests/e2e_torch_cnn.py build/curvd
(a) a small CNN with every layer type (Conv2d, BatchNorm2d in eval mode with
    non-trivial running statistics, ReLU, MaxPool2d, grouped/dilated Conv2d,
    AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, Linear): loss, gradient,
    Hessian/GGN products, dense Hessian/GGN, trace, top-2 eigenvalues (Lanczos,
    and the GGN's by the Conv2d Gram kernels), per-sample gradients; and a
    second one with strided/padded/ceil-mode pooling, a rectangular grouped
    dilated conv without bias and BatchNorm1d (MSELoss, sum); a third with dilated
    max pooling, ceil-mode AvgPool2d with and without count_include_pad,
    padding='same' (dilated, and even kernels: asymmetric) and 'valid' as strings
    through the exporter, BatchNorm1d on (N, C, L);
(b) the DeepOBS 2c2d net (Conv2d(1,32,5)-ReLU-MaxPool-Conv2d(32,64,5)-ReLU-
    MaxPool-Linear(3136,1024)-ReLU-Linear(1024,10), D = 3.27M) on 28x28 inputs,
    CrossEntropyLoss, batch 8: every op.  Loss, gradient, Hessian and GGN
    products on the full parameter vector, dense GGN/EF/MC-Fisher and
    per-sample gradients on conv blocks are compared with torch (1e-4); the
    estimators (on a block without the 3.2M Linear weight, to keep the JSON
    small) are checked through torch products (eigen residuals, CG residuals)
    or exact torch values (GGN trace).  On a block of biases (SB), where the
    Hessian equals the torch J^T Lambda J, every estimator against exact values:
    diag exact/Hutchinson, hutch++ and Hutchinson traces, power iteration,
    MINRES on the damped Hessian, Newton (ViViT full and directional, CG), snr
    (gamma/lambda statistics from torch per-sample gradients and Jacobians); the
    most negative Hessian eigenpair and snr on the full vector vs Lanczos.
Set CNN_WIDTH=k to divide the 2c2d channel/hidden widths by k (default 1),
VERBOSE=1 to print every check with its error.
Ends with 'N passed, M failed'.
"""
import copy
import math
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import VERBOSE, check, summary  # noqa: E402
from torchref import close, flat, gradient, ggn_vp, rel, run  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))
# torch's note that padding='same' with even kernels copies the input
warnings.filterwarnings("ignore", message=".*padding='same'.*")




def ef_vp(model, loss_fn, x, y, v):
    """EF v = c sum_n g_n (g_n . v), g_n the gradient of the unreduced loss l_n."""
    n = x.shape[0]
    c = 1.0 / n if loss_fn.reduction == "mean" else 1.0
    per = torch.nn.CrossEntropyLoss(reduction="sum")
    acc = torch.zeros_like(v)
    for i in range(n):
        gi = gradient(model, per, x[i:i + 1], y[i:i + 1])
        acc += gi * float(gi @ v)
    return c * acc


def per_sample_grads(model, x, y, names=None):
    """Per-sample contributions to the gradient of the CE (mean) loss, N x dim."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    per = torch.nn.CrossEntropyLoss(reduction="sum")
    n = x.shape[0]
    return torch.stack([flat(torch.autograd.grad(per(model(x[i:i + 1]), y[i:i + 1]), params))
                        for i in range(n)]) / n


# ---- (a) a small CNN with every layer type ---------------------------------------------

def randomize_bn(bn, mean=(-0.5, 0.5), var=(0.5, 2.0), tracked=None):
    """Uniform random affine weights and running statistics (drawn in this order), so
    that evaluation mode's BatchNorm is not the identity; tracked: num_batches_tracked."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(*mean)
        bn.running_var.uniform_(*var)
        if tracked is not None:
            bn.num_batches_tracked.fill_(tracked)


def small_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 4, 2, padding=1, dilation=2, groups=2),
        torch.nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        torch.nn.AdaptiveAvgPool2d((3, 2)),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(24, 3),
    )
    randomize_bn(model[1], tracked=7)
    model.eval()
    x = torch.randn(5, 2, 6, 6)
    y = torch.randint(0, 3, (5,))
    return model, x, y


def pooling_cnn():
    """Strided/padded/ceil-mode variants, grouped rectangular dilated conv, BatchNorm1d."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
        torch.nn.Conv2d(4, 6, (2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1), groups=2),
        torch.nn.Sigmoid(),
        torch.nn.Flatten(),
        torch.nn.Linear(36, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 4),
    )
    randomize_bn(model[8])
    model.eval()
    return model, torch.randn(4, 3, 11, 11), torch.randn(4, 4)


def pooling2_cnn():
    """Dilated max pooling, ceil-mode average pooling with and without padding in the
    divisor, padding='same' (odd dilated, and even kernels: the extra row/column of
    padding on the bottom/right) and 'valid' given as strings through the exporter,
    BatchNorm1d on (N, C, L)."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding="same", dilation=2),
        torch.nn.MaxPool2d(3, stride=1, padding=1, dilation=2),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True),
        torch.nn.Conv2d(4, 4, (2, 4), padding="same", dilation=(3, 1)),
        torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        torch.nn.Conv2d(4, 6, 2, padding="valid"),
        torch.nn.Sigmoid(),
        torch.nn.Flatten(start_dim=2),
        torch.nn.BatchNorm1d(6),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 3),
    )
    randomize_bn(model[9], mean=(0.3, 0.7), var=(0.01, 0.05), tracked=3)
    model.eval()
    return model, torch.randn(4, 3, 11, 11), torch.randint(0, 3, (4,))


def check_export_strings():
    """The exporter passes padding='same'/'valid' through; curvd reads them as PyTorch."""
    model, _, _ = pooling2_cnn()
    arch = tr.arch_json(model, [3, 11, 11], torch.nn.CrossEntropyLoss())
    pads = [arch["layers"][i]["padding"] for i in (0, 4, 6)]
    check("exporter keeps padding strings", pads == ["same", "same", "valid"], str(pads))
    shapes, h = [], torch.zeros(1, 3, 11, 11)
    for m in model:
        h = m(h)
        shapes.append(list(h.shape[1:]))
    check("pooling2 torch shapes", shapes[1] == [4, 9, 9] and shapes[3] == [4, 5, 5] and
          shapes[4] == [4, 5, 5] and shapes[5] == [4, 3, 3] and shapes[8] == [6, 4], str(shapes))


def check_small(tag, make, loss_fn, full):
    model, x, y = make()
    m64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    D = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, list(x.shape[1:]), loss_fn, x, y)
        y64 = y if y.dtype == torch.int64 else y.double()
        tr.check_products(tag, d, m64, loss_fn, x64, y64)
        H = tr.dense_hessian(m64, loss_fn, x64, y64)
        tr.check_dense(tag, d, "hessian", H)
        if not full:
            return
        G = tr.dense_ggn(m64, loss_fn, x64, y)
        tr.check_dense(tag, d, "ggn", G)
        tr.check_gram_top2(tag, d, G)
        t = float(torch.trace(H))
        res = run(d, {"op": "trace", "options": {"method": "hutch++", "max_probes": 3 * D}})
        check("small trace (hutch++, full budget)", abs(res["trace"] - t) <= 1e-4 * abs(t),
              f"{res['trace']} vs {t}")
        res = run(d, {"op": "eigen", "options": {"k": 2, "which": "largest"}})
        want = torch.linalg.eigvalsh(H).flip(0)[:2]
        e = rel(res["eigenvalues"], want)
        check("small top-2 eigenvalues", e < 1e-4, f"{res['eigenvalues']} vs {want.tolist()}")
        res = run(d, {"op": "per_sample_gradients"})
        e = rel(res["per_sample_gradients"], per_sample_grads(m64, x64, y))
        check("small per-sample gradients", e < 1e-4, f"rel err {e}")


# ---- (b) the DeepOBS 2c2d net ------------------------------------------------------------

# vector-heavy ops run on every parameter but the 3.2M-entry "7.weight" (JSON I/O)
BLOCK = ["0.weight", "0.bias", "3.weight", "3.bias", "7.bias", "9.weight", "9.bias"]


def net_2c2d(width):
    c1, c2, h = 32 // width, 64 // width, 1024 // width
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, c1, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c2 * 49, h), torch.nn.ReLU(), torch.nn.Linear(h, 10))
    model.eval()
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    return model, x, y


def block_run(d, job):
    """Runs job on the block BLOCK; returns that block's result."""
    job = dict(job, blocks=[BLOCK])
    return run(d, job)["blocks"][0]


def embed(vb, mask):
    v = torch.zeros(mask.numel(), dtype=torch.float64)
    v[mask] = vb
    return v


def ggn_trace(model, x, y):
    """tr G = sum_n sum_c |J_n^T s_nc|^2 with Lambda_n = sum_c s_nc s_nc^T (CE, mean)."""
    params = list(model.parameters())
    n, t = x.shape[0], 0.0
    for i in range(n):
        out = model(x[i:i + 1])[0]
        p = torch.softmax(out.detach(), 0)
        for c in range(p.numel()):
            s = (torch.eye(p.numel(), dtype=p.dtype)[c] - p) * math.sqrt(float(p[c]) / n)
            g = torch.autograd.grad(out, params, grad_outputs=s, retain_graph=True)
            t += float(sum((gi * gi).sum() for gi in g))
    return t


def small_block_refs(model, x, y, name):
    """Dense GGN and EF of the loss (CE, mean) on one parameter tensor, in torch."""
    p = dict(model.named_parameters())[name]
    n = x.shape[0]
    out = model(x)
    C = out.shape[1]
    J = torch.stack([torch.autograd.grad(out.reshape(-1)[i], p, retain_graph=True)[0].reshape(-1)
                     for i in range(out.numel())]).view(n, C, -1)
    prob = torch.softmax(out.detach(), 1)
    G = sum(J[i].T @ ((torch.diag(prob[i]) - torch.outer(prob[i], prob[i])) / n) @ J[i]
            for i in range(n))
    gs = per_sample_grads(model, x, y, [name]) * n
    EF = gs.T @ gs / n
    return G, EF


def check_2c2d_products(d, m64, loss_fn, x64, y, D):
    res = run(d, {"op": "loss"})
    want = float(loss_fn(m64(x64), y))
    check("2c2d loss", abs(res["loss"] - want) <= 1e-5 * abs(want), f"{res['loss']} {want}")
    res = run(d, {"op": "gradient"})
    g = gradient(m64, loss_fn, x64, y)
    e = rel(res["gradient"], g)
    check("2c2d gradient", e < 1e-4, f"rel err {e}")
    # products on the full parameter vector (small integers: cheap JSON)
    torch.manual_seed(3)
    v = torch.randint(-3, 4, (D,)).double()
    refs = {"hessian": lambda: tr.hvp(m64, loss_fn, x64, y, v),
            "ggn": lambda: ggn_vp(m64, loss_fn, x64, y, v)}
    for kind, ref in refs.items():
        res = run(d, {"op": "matvec", "curvature": kind,
                      "options": {"vector": v.long().tolist()}})
        e = rel(res["product"], ref())
        check(f"2c2d {kind} product", e < 1e-4, f"rel err {e}")
    # GGN, EF and MC Fisher as dense matrices on the first conv's bias: their
    # tangents and cotangents cross every layer of the net
    name = "0.bias"
    G, EF = small_block_refs(m64, x64, y, name)
    for kind, want, tol in (("ggn", G, 1e-4), ("ef", EF, 1e-4), ("fisher_mc", G, 0.1)):
        opts = {"mc_samples": 2000} if kind == "fisher_mc" else {}
        res = run(d, {"op": "dense", "curvature": kind, "blocks": [[name]], "options": opts})
        e = rel(torch.tensor(res["blocks"][0]["matrix"]).T, want)
        check(f"2c2d dense {kind} on {name}", e < tol, f"rel err {e}")
    convs = ["0.weight", "0.bias", "3.weight", "3.bias"]
    res = run(d, {"op": "per_sample_gradients", "blocks": [convs]})
    e = rel(res["blocks"][0]["per_sample_gradients"], per_sample_grads(m64, x64, y, convs))
    check("2c2d per-sample gradients (conv layers)", e < 1e-4, f"rel err {e}")
    return g


def check_2c2d_estimators(d, m64, loss_fn, x64, y, g, mask):
    hv = lambda u: tr.hvp(m64, loss_fn, x64, y, embed(u, mask))[mask]  # noqa: E731
    res = run(d, {"op": "trace", "curvature": "hessian", "seed": 1, "options": {"max_probes": 5}})
    check("2c2d hessian trace runs", math.isfinite(res["trace"]) and res["probes"] == 5, str(res))
    t = ggn_trace(m64, x64, y)
    res = run(d, {"op": "trace", "curvature": "ggn", "seed": 1,
                  "options": {"max_probes": 60, "tol": 0}})
    check("2c2d GGN trace vs exact (torch)", abs(res["trace"] - t) <= 4 * res["stderr"],
          f"{res['trace']} +- {res['stderr']} vs {t}")
    nb = int(mask.sum())
    res = block_run(d, {"op": "diag", "seed": 1,
                        "options": {"method": "hutchinson", "max_probes": 4}})
    dg = torch.tensor(res["diag"], dtype=torch.float64)
    check("2c2d diag hutchinson (block)", dg.numel() == nb and bool(torch.isfinite(dg).all()),
          f"{dg.numel()} entries")
    res = block_run(d, {"op": "eigen", "options": {"k": 2, "which": "largest", "max_iter": 60,
                                                   "return_vectors": True}})
    ok = len(res["eigenvalues"]) == 2 and res["eigenvalues"][0] >= res["eigenvalues"][1]
    for lam, u in zip(res["eigenvalues"], res["eigenvectors"]):
        u = torch.tensor(u, dtype=torch.float64)
        hu = hv(u)
        rq = float(u @ hu / (u @ u))
        r = float((hu - lam * u).norm() / abs(lam))
        ok &= abs(rq - lam) <= 1e-4 * abs(lam) and r < 1e-3
    check("2c2d top-2 eigenpairs (block; torch Rayleigh quotients, residuals)", ok,
          f"{res['eigenvalues']} residuals {res.get('residuals')}")
    lam_max = res["eigenvalues"][0]
    # the most negative eigenvalue: the block couples weights of different layers, so
    # its Hessian is indefinite (a bias-only block would be PSD: see SB)
    res = block_run(d, {"op": "eigen", "options": {"k": 1, "which": "smallest", "max_iter": 120,
                                                   "return_vectors": True}})
    lam = res["eigenvalues"][0]
    u = torch.tensor(res["eigenvectors"][0], dtype=torch.float64)
    hu = hv(u)
    rq = float(u @ hu / (u @ u))
    r = float((hu - lam * u).norm() / abs(lam))
    check("2c2d smallest eigenpair (block; torch Rayleigh quotient, residual)",
          lam < 0 and abs(rq - lam) <= 1e-4 * abs(lam) and r < 1e-3,
          f"{lam} vs Rayleigh quotient {rq}, residual {r}")
    # the GGN's top eigenvalues from the ViViT Gram matrix (Conv2d Gram kernels) and Lanczos
    gram = run(d, {"op": "eigen", "curvature": "ggn", "options": {"k": 3, "method": "gram"}})
    lcz = run(d, {"op": "eigen", "curvature": "ggn", "options": {"k": 3, "tol": 1e-8}})
    e = rel(gram["eigenvalues"], lcz["eigenvalues"])
    check("2c2d top-3 GGN eigenvalues: Gram = Lanczos", e < 1e-4,
          f"{gram['eigenvalues']} vs {lcz['eigenvalues']}")
    res = block_run(d, {"op": "density", "seed": 2,
                        "options": {"lanczos_steps": 8, "runs": 2, "grid_points": 100}})
    vals, grid = res["density"]["values"], res["density"]["grid"]
    area = sum(vals) * (grid[1] - grid[0])
    wsum = [sum(w) for w in res["weights"]]
    top = max(max(n) for n in res["nodes"])
    check("2c2d density (block)", abs(area - 1) < 1e-3 and all(abs(w - 1) < 1e-6 for w in wsum)
          and top <= lam_max * (1 + 1e-3), f"area {area} weights {wsum} top {top}")
    check_2c2d_full_extra(d, lcz)
    delta, gb = 0.1, g[mask]
    gv = lambda u: ggn_vp(m64, loss_fn, x64, y, embed(u, mask))[mask] + delta * u  # noqa: E731
    res = block_run(d, {"op": "solve", "curvature": "ggn",
                        "options": {"damping": delta, "tol": 1e-6, "max_iter": 300}})
    s = torch.tensor(res["solution"], dtype=torch.float64)
    r = rel(gv(s), gb)
    check("2c2d CG solve residual (block; torch GGN)", r < 1e-4, f"rel residual {r}")
    res = block_run(d, {"op": "newton", "curvature": "ggn",
                        "options": {"damping": delta, "tol": 1e-6, "max_iter": 300}})
    st = torch.tensor(res["step"], dtype=torch.float64)
    gst = gv(st)
    r = rel(gst, -gb)
    pred = float(0.5 * st @ (gst - delta * st) + gb @ st)
    check("2c2d newton step (block)", r < 1e-4 and abs(res["predicted_change"] - pred) <=
          1e-3 * abs(pred), f"residual {r}, predicted {res['predicted_change']} vs {pred}")


# a small block for exact torch references: the biases of every conv and the output
# layer (tangents cross every layer).  The 2c2d net is piecewise linear in its biases
# (ReLU, max pooling, fixed weights), so on this block the Hessian is the GGN
# J^T Lambda J: both come from torch Jacobians, and one torch double-backward HVP
# confirms it.
SB = ["0.bias", "3.bias", "9.bias"]


def block_refs(model, x, y, names):
    """Per-sample Jacobians J (N x C x b), Lambda_n (CE, mean), the GGN block and the
    per-sample gradients of l_n (N x b) on the parameters `names`, in torch."""
    P = dict(model.named_parameters())
    ps = [P[n] for n in names]
    out = model(x)
    n, C = out.shape
    J = torch.stack([flat(torch.autograd.grad(out.reshape(-1)[i], ps, retain_graph=True))
                     for i in range(out.numel())]).view(n, C, -1)
    prob = torch.softmax(out.detach(), 1)
    Lam = torch.stack([(torch.diag(p) - torch.outer(p, p)) / n for p in prob])
    G = torch.einsum("nca,ncd,ndb->ab", J, Lam, J)
    gs = per_sample_grads(model, x, y, names) * n
    return J, Lam, G, gs


def check_2c2d_block_exact(d, m64, loss_fn, x64, y, g, mask_of):
    """Every estimator on the block SB against exact torch values."""
    J, Lam, G, gs = block_refs(m64, x64, y, SB)
    H, mask, nb = G, mask_of(SB), G.shape[0]
    gb = g[mask]
    torch.manual_seed(7)
    u = torch.randn(nb, dtype=torch.float64)
    e = rel(tr.hvp(m64, loss_fn, x64, y, embed(u, mask))[mask], H @ u)
    check("2c2d block Hessian = J^T Lambda J (torch HVP)", e < 1e-8, f"rel err {e}")
    w, U = torch.linalg.eigh(H)
    w, U = w.flip(0), U.flip(1)
    lmax = float(w[0])
    sb = [SB]

    def brun(job):
        return run(d, dict(job, blocks=sb))["blocks"][0]

    # sub-blocks of SB where an op costs one matvec per dimension: "0.bias" (32), whose
    # Hessian's top eigenvalues are well separated, and "0.bias" + "9.bias" (42)
    sub = list(range(32)) + list(range(96, 106))
    H0, H09 = H[:32, :32], H[sub][:, sub]
    # diag: exact per tensor; Hutchinson against its own (Rademacher) variance
    res = run(d, {"op": "diag", "blocks": [["0.bias"], ["9.bias"]],
                  "options": {"method": "exact"}})
    e = rel(res["blocks"][0]["diag"] + res["blocks"][1]["diag"], torch.diag(H09))
    check("2c2d exact diag (0.bias, 9.bias) vs torch", e < 1e-4, f"rel err {e}")
    P = 40
    res = brun({"op": "diag", "seed": 3, "options": {"method": "hutchinson", "max_probes": P}})
    err2 = float(((torch.tensor(res["diag"], dtype=torch.float64) - torch.diag(H)) ** 2).sum())
    off2 = float((H ** 2).sum() - (torch.diag(H) ** 2).sum())  # E|err|^2 = off2 / P
    check("2c2d Hutchinson diag (block) within its Rademacher variance",
          err2 <= 9 * off2 / P and res["probes"] == P, f"|err|^2 {err2} vs E {off2 / P}")
    # trace: hutch++ with budget 3*dim is exact; Hutchinson within 4 stderr
    t09 = float(torch.trace(H09))
    res = run(d, {"op": "trace", "seed": 4, "blocks": [["0.bias", "9.bias"]],
                  "options": {"method": "hutch++", "max_probes": 3 * 42}})["blocks"][0]
    check("2c2d hutch++ trace (0.bias + 9.bias, full budget) = exact",
          close(res["trace"], t09, 1e-4), f"{res['trace']} vs {t09}")
    t = float(torch.trace(H))
    res = brun({"op": "trace", "seed": 5, "options": {"max_probes": 50, "tol": 0}})
    sd = math.sqrt(2 * off2 / 50)  # Rademacher: Var = 2 sum_{i != j} H_ij^2 / probes
    check("2c2d Hutchinson Hessian trace (block) vs exact",
          abs(res["trace"] - t) <= 4 * sd and close(res["stderr"], sd, 0.6),
          f"{res['trace']} +- {res['stderr']} vs {t} (sd {sd})")
    # eigen: power iteration (dominant eigenvalues); Lanczos smallest: on BLOCK above
    w0 = torch.linalg.eigvalsh(H0).flip(0)
    res = run(d, {"op": "eigen", "blocks": [["0.bias"]],
                  "options": {"k": 2, "method": "power", "max_iter": 200,
                              "tol": 1e-6}})["blocks"][0]
    e = rel(res["eigenvalues"], w0[:2])
    check("2c2d power iteration top-2 (0.bias Hessian) vs torch", e < 1e-4,
          f"{res['eigenvalues']} vs {w0[:2].tolist()}")
    # solve: MINRES on the damped Hessian; Newton: ViViT full mode and CG vs dense solves
    delta = 0.05 * lmax
    A = H + delta * torch.eye(nb, dtype=torch.float64)
    res = brun({"op": "solve", "options": {"method": "minres", "damping": delta,
                                           "tol": 1e-8, "max_iter": 500}})
    e = rel(res["solution"], torch.linalg.solve(A, gb))
    check("2c2d MINRES solve (block Hessian, damped) vs torch", e < 1e-4, f"rel err {e}")
    s = -torch.linalg.solve(A, gb)
    pred = float(gb @ s + 0.5 * s @ H @ s)
    res = brun({"op": "newton", "curvature": "ggn",
                "options": {"method": "vivit", "mode": "full", "damping": delta}})
    e = rel(res["step"], s)
    check("2c2d ViViT Newton, full mode (block) vs torch solve",
          e < 1e-4 and close(res["predicted_change"], pred, 1e-4),
          f"rel err {e}, predicted {res['predicted_change']} vs {pred}")
    res = brun({"op": "newton", "curvature": "ggn",
                "options": {"method": "vivit", "k": "all", "damping": delta}})
    K = res["k"]
    sd_ = -U[:, :K] @ ((U[:, :K].T @ gb) / (w[:K] + delta))
    e = rel(res["step"], sd_)
    check("2c2d ViViT Newton, directional k=all (block) vs torch eigenspace", e < 1e-3,
          f"rel err {e}, k {K}")
    res = brun({"op": "newton", "curvature": "ggn",
                "options": {"method": "cg", "damping": delta, "tol": 1e-8}})
    e = rel(res["step"], s)
    check("2c2d CG Newton (block) vs torch solve", e < 1e-4, f"rel err {e}")
    # snr: directions of the block GGN; gamma and lambda against torch per-sample values
    res = brun({"op": "snr", "curvature": "ggn", "options": {"k": 4, "return_raw": True}})
    dirs, N = res["directions"], x64.shape[0]
    ok, checked, info = len(dirs) == 4, 0, []
    for k, dk in enumerate(dirs):
        gap = min(abs(float(w[k] - w[j])) for j in range(6) if j != k)
        ok &= close(dk["eigenvalue"], float(w[k]), 1e-4)
        if gap < 1e-2 * lmax:
            continue
        checked += 1
        ek = U[:, k]
        ok_g, ok_l, gm, lm, _ = tr.snr_direction_matches(dk, gs @ ek, J @ ek, Lam, N)
        ok &= ok_g and ok_l
        ok &= close(abs(gm), abs(float(ek @ gb)), 1e-9, 1e-12)  # gamma_mean = e_k^T g
        info.append((k, dk["gamma_mean"], gm, dk["lambda_mean"], lm))
    check("2c2d snr (block): eigenvalues, gamma/lambda mean, var, snr vs torch",
          ok and checked >= 2, f"{checked} directions checked: {info}")


def check_2c2d_full_extra(d, lcz):
    """snr on the full 3.27M-parameter vector: its directions are the GGN's top eigenvectors."""
    res = run(d, {"op": "snr", "curvature": "ggn", "options": {"k": 3}})
    e = rel([dk["eigenvalue"] for dk in res["directions"]], lcz["eigenvalues"])
    check("2c2d snr (full) eigenvalues = GGN Lanczos", e < 1e-4 and len(res["gsnr"]) == 4,
          f"rel err {e}")


def mask_of(model, names):
    return torch.cat([torch.full((p.numel(),), n in names, dtype=torch.bool)
                      for n, p in model.named_parameters()])


def check_2c2d(width):
    model, x, y = net_2c2d(width)
    loss_fn = torch.nn.CrossEntropyLoss()
    m64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    D = sum(p.numel() for p in model.parameters())
    mask = torch.cat([torch.full((p.numel(),), name in BLOCK, dtype=torch.bool)
                      for name, p in model.named_parameters()])
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [1, 28, 28], loss_fn, x, y)
        g = check_2c2d_products(d, m64, loss_fn, x64, y, D)
        check_2c2d_estimators(d, m64, loss_fn, x64, y, g, mask)
        t0 = time.time()
        check_2c2d_block_exact(d, m64, loss_fn, x64, y, g, lambda names: mask_of(model, names))
        if VERBOSE:
            print(f"2c2d exact block checks {time.time() - t0:.1f} s")


def main():
    t0 = time.time()
    check_small("small", small_cnn, torch.nn.CrossEntropyLoss(), True)
    check_small("pooling", pooling_cnn, torch.nn.MSELoss(reduction="sum"), False)
    check_export_strings()
    check_small("pooling2", pooling2_cnn, torch.nn.CrossEntropyLoss(), False)
    t1 = time.time()
    check_2c2d(int(os.environ.get("CNN_WIDTH", "1")))
    t2 = time.time()
    print(f"small CNN {t1 - t0:.1f} s, 2c2d {t2 - t1:.1f} s")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
