"""e2e_instruments.py - op `instruments` (issue 24) through the HTTP API against torch.

Usage: /usr/bin/python3 tests/e2e_instruments.py build/curvd
Every instrument is recomputed here in float64 from the definitions of
docs/interface.md "Op instruments" (per-sample gradients g_i of the unreduced
losses l_i by a loop over samples, the dense Hessian of the batch loss), on an
MLP (tanh, CrossEntropy mean: the exact Hessian diagonal), a wider MLP (MSE
mean: Hutchinson's diagonal for tic_diag) and a CNN (Conv2d, ReLU, MaxPool,
CrossEntropy sum).  The cross-version instruments (update_size,
distance_from_init, alpha, alpha_fit as Cockpit fits it) are checked after two
parameter pushes (versions 1, 2, 3); the first version gives them null with
a reason.  Also include/exclude and the 400 errors.
"""
import copy
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from curvd_client import Client, CurvdError  # noqa: E402
from e2e_lib import Daemon, check, summary  # noqa: E402

torch.set_default_dtype(torch.float32)


def unreduced(loss_fn):
    """The loss of one sample, summed over its output entries (l_i)."""
    return type(loss_fn)(reduction="sum")


def per_sample(model, loss_fn, x, y):
    """(l_i, g_i) in float64: N losses and the N x D gradients of l_i."""
    lf, params = unreduced(loss_fn), list(model.parameters())
    ls, gs = [], []
    for i in range(x.shape[0]):
        li = lf(model(x[i:i + 1]), y[i:i + 1])
        g = torch.autograd.grad(li, params)
        ls.append(li.detach())
        gs.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(ls), torch.stack(gs)


def scale_of(loss_fn, N, C):
    """c of L = c sum_i l_i."""
    if loss_fn.reduction == "sum":
        return 1.0
    return 1.0 / (N * C) if isinstance(loss_fn, torch.nn.MSELoss) else 1.0 / N


def layer_ranges(model):
    """[(prefix, start, stop)] per module with parameters, in state_dict order."""
    out, off = [], 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0]
        if out and out[-1][0] == mod:
            out[-1] = (mod, out[-1][1], off + p.numel())
        else:
            out.append((mod, off, off + p.numel()))
        off += p.numel()
    return out


def gsnr(G):
    gb, var = G.mean(0), G.var(0, unbiased=True)
    keep = var > 0
    return (gb[keep] ** 2 / var[keep]).mean().item(), int((~keep).sum())


def first_order_reference(model, loss_fn, x, y):
    """The first-order instruments from the definitions (float64); also (m, x, y, ls, G)."""
    m = copy.deepcopy(model).double()
    x = x.double()
    y = y if y.dtype == torch.int64 else y.double()
    N = x.shape[0]
    L = loss_fn(m(x), y).item()
    ls, G = per_sample(m, loss_fn, x, y)
    gb = G.mean(0)
    g2 = (gb @ gb).item()
    nn = N * (N - 1)
    dots = G @ gb
    ref = {"loss": L, "gradient_norm": math.sqrt(g2),
           "norm_test": ((G - gb) ** 2).sum().item() / (nn * g2),
           "inner_product_test": ((dots - g2) ** 2).sum().item() / (nn * g2 * g2),
           "orthogonality_test": ((G - torch.outer(dots / g2, gb)) ** 2).sum().item() / (nn * g2)}
    norms = G.norm(dim=1)
    q = torch.quantile(norms, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    ref["batch_gradient_norms"] = {"min": norms.min().item(), "q1": q[0].item(),
                                   "median": q[1].item(), "q3": q[2].item(),
                                   "max": norms.max().item()}
    ref["mean_gsnr"], ref["gsnr_excluded"] = gsnr(G)
    ref["layers"] = [(name, math.sqrt((gb[a:b] @ gb[a:b]).item()), gsnr(G[:, a:b]))
                     for name, a, b in layer_ranges(model)]
    return ref, (m, x, y, ls, G)


def reference(model, loss_fn, x, y, C, bins):
    """Every single-version instrument from the definitions (float64)."""
    ref, (m, x, y, ls, G) = first_order_reference(model, loss_fn, x, y)
    N = x.shape[0]
    lo, hi = G.min().item(), G.max().item()
    idx = ((G.reshape(-1) - lo) * (bins / (hi - lo))).floor().long().clamp(0, bins - 1)
    ref["histogram"] = (lo, hi, torch.bincount(idx, minlength=bins).tolist())
    H = tr.dense_hessian(m, loss_fn, x, y)
    c = scale_of(loss_fn, N, C)
    hmean = 1.0 / (c * N)
    M = G.T @ G / N
    ref["H"], ref["trM"], ref["Mdiag"], ref["hmean"] = H, torch.trace(M).item(), torch.diag(M), hmean
    ref["hessian_trace"] = torch.trace(H).item()
    ref["lambda_max"] = torch.linalg.eigvalsh(H)[-1].item()
    ref["tic_diag_exact"] = (torch.diag(M) / (hmean * torch.diag(H) + 1e-7)).mean().item()
    ref["per_sample_losses"], ref["G"] = ls, G
    return ref


def near(a, b, rtol, atol=0.0):
    return a is not None and abs(a - b) <= atol + rtol * abs(b)


def check_single(tag, res, ref, tic_method, bins):
    for k in ("loss", "gradient_norm", "norm_test", "inner_product_test",
              "orthogonality_test", "mean_gsnr"):
        check("%s %s" % (tag, k), near(res.get(k), ref[k], 2e-4, 1e-9),
              "%s vs %s" % (res.get(k), ref[k]))
    check(tag + " gsnr_excluded", res.get("gsnr_excluded") == ref["gsnr_excluded"],
          "%s vs %s" % (res.get("gsnr_excluded"), ref["gsnr_excluded"]))
    bn = res.get("batch_gradient_norms") or {}
    check(tag + " batch_gradient_norms", all(near(bn.get(k), v, 2e-4, 1e-9)
                                            for k, v in ref["batch_gradient_norms"].items()),
          "%s vs %s" % (bn, ref["batch_gradient_norms"]))
    h = res.get("gradient_histogram") or {}
    lo, hi, counts = ref["histogram"]
    got = h.get("counts") or []
    total = sum(counts)
    check(tag + " histogram range", h.get("bins") == bins and
          near((h.get("range") or [0, 0])[0], lo, 1e-4, 1e-9) and
          near((h.get("range") or [0, 0])[1], hi, 1e-4, 1e-9), "%s vs %s" % (h.get("range"), (lo, hi)))
    check(tag + " histogram counts", len(got) == bins and sum(got) == total and
          sum(abs(a - b) for a, b in zip(got, counts)) <= max(2, total // 500),
          "%s vs %s" % (got, counts))
    # Hutchinson: within 5 standard errors of the exact trace; tic_trace from it
    t, se = res.get("hessian_trace"), res.get("hessian_trace_std_err")
    check(tag + " hessian_trace", t is not None and se is not None and se > 0 and
          abs(t - ref["hessian_trace"]) <= 5 * se + 1e-6, "%s +- %s vs %s" % (t, se, ref["hessian_trace"]))
    check(tag + " tic_trace", t is not None and
          near(res.get("tic_trace"), ref["trM"] / (ref["hmean"] * t), 2e-4),
          "%s vs %s" % (res.get("tic_trace"), t and ref["trM"] / (ref["hmean"] * t)))
    check(tag + " tic_diag_method", res.get("tic_diag_method") == tic_method, res.get("tic_diag_method"))
    if tic_method == "exact":
        check(tag + " tic_diag", near(res.get("tic_diag"), ref["tic_diag_exact"], 2e-3),
              "%s vs %s" % (res.get("tic_diag"), ref["tic_diag_exact"]))
    else:
        check(tag + " tic_diag finite", isinstance(res.get("tic_diag"), float), res.get("tic_diag"))
    lm = res.get("hessian_max_eigenvalue")
    check(tag + " hessian_max_eigenvalue (10 steps: a Ritz value below lambda_max)",
          lm is not None and lm <= ref["lambda_max"] * (1 + 1e-4) + 1e-6 and
          lm >= 0.5 * ref["lambda_max"], "%s vs %s" % (lm, ref["lambda_max"]))
    lays = res.get("layers") or []
    ok = len(lays) == len(ref["layers"])
    for got_l, (name, gn, (gs, ex)) in zip(lays, ref["layers"]):
        ok = ok and got_l.get("params", [""])[0].startswith(name) and \
            near(got_l.get("gradient_norm"), gn, 2e-4, 1e-9) and \
            near(got_l.get("mean_gsnr"), gs, 2e-4, 1e-9) and got_l.get("gsnr_excluded") == ex
    check(tag + " per-layer gradient_norm and mean_gsnr", ok, "%s vs %s" % (lays, ref["layers"]))


def setup(cl, name, model, input_shape, loss_fn, x, y):
    cl.register_model(name, tr.arch_json(model, input_shape, loss_fn),
                      tr.safetensors_bytes(model.state_dict()))
    cl.register_dataset(name, tr.safetensors_bytes({"x": x, "y": y}))


def job(cl, name, **opts):
    return cl.run(op="instruments", model=name, dataset=name, seed=3, options=opts, timeout=300)


def mlp_case(cl):
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), n=16, din=5,
                                   hidden=(7, 6), C=3, seed=1)
    lf = torch.nn.CrossEntropyLoss()
    setup(cl, "mlp", model, (5,), lf, x, y)
    res = job(cl, "mlp", bins=12, probes=200, lanczos_steps=10)
    ref = reference(model, lf, x, y, 3, 12)
    check_single("mlp", res, ref, "exact", 12)
    check("mlp first version: cross-version instruments null with a reason",
          all(res.get(k, 0) is None and "previous version" in res["unavailable"].get(k, "")
              for k in ("update_size", "distance_from_init", "alpha", "alpha_fit")),
          str(res.get("unavailable")))
    # enough Lanczos steps for the whole space: lambda_max itself
    D = sum(p.numel() for p in model.parameters())
    r2 = job(cl, "mlp", include=["hessian_max_eigenvalue"], lanczos_steps=D)
    check("mlp hessian_max_eigenvalue with D steps", near(r2.get("hessian_max_eigenvalue"),
                                                          ref["lambda_max"], 1e-4, 1e-6),
          "%s vs %s" % (r2.get("hessian_max_eigenvalue"), ref["lambda_max"]))
    return model, x, y, lf


def wide_case(cl):
    """MSE mean, Tanh units beyond the exact diagonal's walk limit: Hutchinson's diagonal."""
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.MSELoss(), n=10, din=4,
                                   hidden=(20, 20), C=2, seed=2)
    lf = torch.nn.MSELoss()
    setup(cl, "wide", model, (4,), lf, x, y)
    res = job(cl, "wide", bins=7, probes=400)
    check_single("wide", res, reference(model, lf, x, y, 2, 7), "hutchinson", 7)


def cnn_case(cl):
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x = torch.randn(12, 1, 6, 6)
    y = torch.randint(0, 4, (12,))
    lf = torch.nn.CrossEntropyLoss(reduction="sum")
    setup(cl, "cnn", model, (1, 6, 6), lf, x, y)
    res = job(cl, "cnn", bins=9, probes=300)
    check_single("cnn", res, reference(model, lf, x, y, 4, 9), "exact", 9)


def histogram_rows_case(cl):
    """gradient_histogram of Linear layers (binned from the per-sample factors: sorted
    inputs, runs of bins per row) against binning curvd's own per-sample gradient rows
    (op per_sample_gradients, CE sum: c = 1) entry by entry as the op's bin rule does;
    ReLU (zero inputs), N(0, 1) inputs (both signs), 7 to 400 bins (rows spanning many
    bins).  The rows' float products may round an entry across a bin edge: at most
    2 entries may differ (4 in counts), where a wrong run end would move whole runs."""
    model, x, y = tr.make_mlp_case(torch.nn.ReLU, torch.nn.CrossEntropyLoss(reduction="sum"),
                                   n=64, din=30, hidden=(40, 20), C=5, seed=5)
    lf = torch.nn.CrossEntropyLoss(reduction="sum")
    setup(cl, "hrows", model, (30,), lf, x, y)
    rows = cl.run(op="per_sample_gradients", model="hrows", dataset="hrows",
                  timeout=300)["per_sample_gradients"]
    G = torch.tensor(rows, dtype=torch.float64).reshape(-1)
    lo, hi = G.min().item(), G.max().item()
    for bins in (7, 50, 400):
        h = job(cl, "hrows", include=["gradient_histogram"], bins=bins)["gradient_histogram"]
        w = bins / (hi - lo)
        idx = ((G - lo) * w).trunc().long().clamp(0, bins - 1)
        ref = torch.bincount(idx, minlength=bins).tolist()
        got = h.get("counts") or []
        diff = sum(abs(a - b) for a, b in zip(got, ref))
        check("histogram rows, %d bins: counts as binning the rows" % bins,
              len(got) == bins and sum(got) == len(G) and diff <= 4,
              "L1 %s over %d entries: %s vs %s" % (diff, len(G), got, ref))
        check("histogram rows, %d bins: range" % bins,
              near(h["range"][0], lo, 1e-6, 1e-12) and near(h["range"][1], hi, 1e-6, 1e-12),
              "%s vs %s" % (h["range"], (lo, hi)))


def concentrated_case(cl):
    """Nearly equal samples (0.1% spread): per-sample gradients close to their mean, so
    GSNRs near 1e5 and ||g_i - gbar|| << ||gbar||.  The variances sum g^2 - n gbar^2
    and the deviations ||g_i||^2 - 2 g_i^T gbar + ||gbar||^2 cancel: summed in float
    (as the float GEMMs of the Linear path give them) mean_gsnr was 20% off with 4
    parameters wrongly excluded and norm_test 3e-3 off; the op redoes those in double."""
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.MSELoss(), n=256, din=30,
                                   hidden=(40, 20), C=3, seed=5)
    x = x[:1] + 1e-3 * torch.randn_like(x)
    y = y[:1] + 1e-3 * torch.randn_like(y)
    lf = torch.nn.MSELoss()
    setup(cl, "conc", model, (30,), lf, x, y)
    res = job(cl, "conc", include=["gradient_norm", "norm_test", "inner_product_test",
                                   "orthogonality_test", "mean_gsnr"])
    ref, _ = first_order_reference(model, lf, x, y)
    check("concentrated: mean_gsnr above 1e5", ref["mean_gsnr"] > 1e5, ref["mean_gsnr"])
    for k in ("gradient_norm", "norm_test", "inner_product_test", "orthogonality_test",
              "mean_gsnr"):
        check("concentrated %s" % k, near(res.get(k), ref[k], 1e-4),
              "%s vs %s" % (res.get(k), ref[k]))
    check("concentrated gsnr_excluded", res.get("gsnr_excluded") == ref["gsnr_excluded"],
          "%s vs %s" % (res.get("gsnr_excluded"), ref["gsnr_excluded"]))
    ok = len(res.get("layers") or []) == len(ref["layers"])
    for got_l, (name, gn, (gs, ex)) in zip(res.get("layers") or [], ref["layers"]):
        ok = ok and near(got_l.get("mean_gsnr"), gs, 1e-4) and got_l.get("gsnr_excluded") == ex
    check("concentrated per-layer mean_gsnr", ok, "%s vs %s" % (res.get("layers"), ref["layers"]))


def alpha_fit_ref(t, f, df, vf, vdf):
    """cockpit/quantities/alpha.py _fit_quadratic + _get_alpha, rewritten in torch."""
    Phi = torch.tensor([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]],
                       dtype=torch.float64).T
    var = [v if v != 0 else 1e-10 for v in vf + vdf]
    Li = torch.diag(1 / torch.tensor(var, dtype=torch.float64))
    mu = torch.linalg.inv(Phi @ Li @ Phi.T) @ Phi @ Li @ torch.tensor(f + df, dtype=torch.float64)
    mu = mu.tolist()
    return mu, (-1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1)


def cross_case(cl, model, x, y, lf):
    """Versions 2 and 3 pushed through PUT /v1/models/mlp/parameters."""
    versions = [copy.deepcopy(model).double()]
    m64 = versions[0]
    x64 = x.double()
    for lr in (0.5, 1.5):  # two SGD steps on the batch: v2, v3
        nxt = copy.deepcopy(versions[-1])
        loss = lf(nxt(x64), y)
        g = torch.autograd.grad(loss, list(nxt.parameters()))
        with torch.no_grad():
            for p, gp in zip(nxt.parameters(), g):
                p -= lr * gp
        nxt32 = copy.deepcopy(nxt).float()
        versions.append(copy.deepcopy(nxt32).double())
        info = cl.push_parameters("mlp", tr.safetensors_bytes(nxt32.state_dict()))
        check("push gives version %d" % len(versions), info.get("version") == len(versions),
              str(info.get("version")))
    del m64
    flat = [torch.cat([p.detach().reshape(-1) for p in v.parameters()]) for v in versions]
    res = job(cl, "mlp", include=["update_size", "distance_from_init", "alpha", "alpha_fit",
                                  "loss"])
    check("v3 versions", res.get("versions") == {"model": 3, "previous": 2, "first": 1},
          str(res.get("versions")))
    delta = flat[2] - flat[1]
    check("v3 update_size", near(res.get("update_size"), delta.norm().item(), 1e-6),
          "%s vs %s" % (res.get("update_size"), delta.norm().item()))
    check("v3 distance_from_init", near(res.get("distance_from_init"),
                                        (flat[2] - flat[0]).norm().item(), 1e-6),
          "%s vs %s" % (res.get("distance_from_init"), (flat[2] - flat[0]).norm().item()))
    lay_ok = True
    for got_l, (name, a, b) in zip(res.get("layers") or [], layer_ranges(model)):
        lay_ok = lay_ok and near(got_l.get("update_size"), delta[a:b].norm().item(), 1e-6) and \
            near(got_l.get("distance_from_init"), (flat[2] - flat[0])[a:b].norm().item(), 1e-6)
    check("v3 per-layer update_size and distance_from_init", lay_ok and res.get("layers"),
          str(res.get("layers")))
    # alpha from f0, f1, d0 of the batch loss
    prev, cur = versions[1], versions[2]
    f0 = lf(prev(x64), y)
    g0 = torch.cat([t.reshape(-1) for t in torch.autograd.grad(f0, list(prev.parameters()))])
    f1 = lf(cur(x64), y).item()
    f0 = f0.item()
    d0 = (g0 @ delta).item()
    a = f1 - f0 - d0
    if a > 0:
        want = 1 / (-d0 / (2 * a)) - 1
        check("v3 alpha", near(res.get("alpha"), want, 1e-3, 1e-5), "%s vs %s" % (res.get("alpha"), want))
    else:
        check("v3 alpha null (a <= 0)", res.get("alpha") is None, str(res.get("alpha")))
    # alpha_fit: Cockpit's fit on the mean losses and projected per-sample gradients
    t = delta.norm().item()
    fs, dfs, vfs, vdfs = [], [], [], []
    for v in (prev, cur):
        ls, G = per_sample(v, lf, x64, y)
        proj = G @ delta / t
        fs.append(ls.mean().item())
        dfs.append(proj.mean().item())
        vfs.append(ls.var().item())
        vdfs.append(proj.var().item())
    mu, want = alpha_fit_ref(t, fs, dfs, vfs, vdfs)
    check("v3 alpha_fit (Cockpit's fit)", near(res.get("alpha_fit"), want, 1e-3, 1e-5),
          "%s vs %s (mu %s vs %s)" % (res.get("alpha_fit"), want, res.get("alpha_fit_coefficients"), mu))
    check("v3 only the included instruments",
          not any(k in res for k in ("gradient_norm", "hessian_trace", "norm_test",
                                     "gradient_histogram")) and "loss" in res, str(sorted(res)))


def include_exclude(cl):
    res = job(cl, "cnn", include=["loss", "norm_test"])
    check("include: only loss and norm_test",
          "loss" in res and "norm_test" in res and
          not any(k in res for k in ("gradient_norm", "hessian_trace", "mean_gsnr", "tic_diag",
                                     "hessian_max_eigenvalue", "gradient_histogram")), str(sorted(res)))
    res = job(cl, "cnn", exclude=["hessian_trace", "tic_trace", "tic_diag",
                                  "hessian_max_eigenvalue", "gradient_histogram"])
    check("exclude: second-order and histogram left out",
          "gradient_norm" in res and "alpha" in res and
          not any(k in res for k in ("hessian_trace", "tic_trace", "tic_diag", "probes",
                                     "hessian_max_eigenvalue", "gradient_histogram")), str(sorted(res)))


def subsets(cl):
    """An instrument alone (the op then skips the GEMMs the others need) equals its value
    in the job with every first-order instrument (to float rounding: gbar alone is not
    refined where the variances cancel)."""
    full = job(cl, "mlp", include=["gradient_norm", "gradient_histogram", "norm_test",
                                   "inner_product_test", "orthogonality_test", "mean_gsnr",
                                   "tic_trace"], probes=5)
    for k in ("gradient_norm", "gradient_histogram", "norm_test", "mean_gsnr", "tic_trace",
              "orthogonality_test"):
        res = job(cl, "mlp", include=[k], probes=5)
        same = (res.get(k) == full.get(k) if k == "gradient_histogram"
                else near(res.get(k), full.get(k), 1e-6))
        check("%s alone = with the others" % k, same, "%s vs %s" % (res.get(k), full.get(k)))


def errors(cl):
    def err(opts, **kw):
        try:
            cl.submit(op="instruments", model="cnn", dataset="cnn", options=opts, **kw)
        except CurvdError as ex:
            return ex
        return None
    ex = err({"include": ["loss", "gradient_nrom"]})
    check("unknown instrument -> 400 with field", ex is not None and ex.status == 400 and
          ex.field == "options.include[1]" and "gradient_norm" in str(ex), str(ex))
    ex = err({"exclude": ["alpha", 3]})
    check("exclude entry not a name -> 400", ex is not None and ex.status == 400 and
          ex.field == "options.exclude[1]", str(ex))
    ex = err({"include": ["loss"], "exclude": ["loss"]})
    check("nothing left -> 400", ex is not None and ex.status == 400 and
          ex.field == "options.exclude", str(ex))
    ex = err({}, curvature="ggn")
    check("curvature ggn -> 400", ex is not None and ex.status == 400 and
          ex.field == "curvature", str(ex))
    ex = err({}, blocks=[["0.weight"]])
    check("a block group -> 400 (the whole model only)", ex is not None and ex.status == 400 and
          ex.field == "blocks", str(ex))
    ex = err({"bins": 0})
    check("bins 0 -> 400", ex is not None and ex.status == 400 and ex.field == "options.bins",
          str(ex))


def main():
    torch.manual_seed(0)
    with Daemon("--workers", "1") as d:
        cl = Client(d.url, timeout=300)
        model, x, y, lf = mlp_case(cl)
        wide_case(cl)
        cnn_case(cl)
        concentrated_case(cl)
        histogram_rows_case(cl)
        cross_case(cl, model, x, y, lf)
        include_exclude(cl)
        subsets(cl)
        errors(cl)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
