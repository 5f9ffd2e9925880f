"""e2e_torch_vivit.py - `curvd run` snr / eigen (gram) / newton (vivit) against torch.

Usage: /usr/bin/python3 tests/e2e_torch_vivit.py build/curvd
References in float64 with torch.autograd: the dense GGN (torchref.dense_ggn)
and its eigh, per-sample gradients by a loop over samples, per-sample GGNs
J_n^T Lambda_n J_n, dense damped Newton steps.  Per-sample quantities follow
curvd's scaling: gamma_nk = N e_k^T grad L_n, lambda_nk = N e_k^T G_n e_k with
L_n the sample's contribution to the batch loss (so their means are e_k^T g
and lambda_k).  Ends with a timing line (gram vs Lanczos for the top GGN
eigenpairs at small N*C, with its speed and pass-count floors) and 'N passed, M failed'.
Also: per-layer block Newton vs diagonal-block solves, a CNN whose Gram comes from
the Conv2d/Linear kernels (gram_path), residuals without return_vectors.
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402
from torchref import close, make_mlp_case as make_case, rel  # noqa: E402


def to64(model, x, y):
    import copy
    return copy.deepcopy(model).double(), x.double(), (y if y.dtype == torch.int64 else y.double())


def sample_weight(loss_fn, N):
    """L_n = weight * loss_fn(one sample) is sample n's share of the batch loss."""
    return 1.0 / N if loss_fn.reduction == "mean" else 1.0


def per_sample_refs(m, loss_fn, x, y):
    """Per-sample gradients of L_n (N x D), Jacobians (N x C x D), Lambda_n (N x C x C)."""
    N, params = x.shape[0], list(m.parameters())
    w = sample_weight(loss_fn, N)
    grads, jacs, lams = [], [], []
    for n in range(N):
        xn, yn = x[n:n + 1], y[n:n + 1]
        out = m(xn)
        gn = torch.autograd.grad(w * loss_fn(out, yn), params, retain_graph=True)
        grads.append(torch.cat([t.reshape(-1) for t in gn]))
        rows = []
        for c in range(out.shape[1]):
            jc = torch.autograd.grad(out[0, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in jc]))
        jacs.append(torch.stack(rows))
        h0 = out.detach()[0]
        lams.append(torch.autograd.functional.hessian(
            lambda h: w * loss_fn(h.unsqueeze(0), yn), h0))
    return torch.stack(grads), torch.stack(jacs), torch.stack(lams)


def layer_slices(model):
    """[(names, start, stop)] per layer with parameters, in state_dict order."""
    out, off, cur = [], 0, None
    for name, p in model.named_parameters():
        layer = name.split(".")[0]
        if cur is None or cur[0] != layer:
            cur = [layer, [], off]
            out.append(cur)
        cur[1].append(name)
        off += p.numel()
        cur.append(off)
    return [(c[1], c[2], c[-1]) for c in out]


def check_eigen(tag, d, G, evals, evecs, model):
    D = G.shape[0]
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn",
                                     "options": {"method": "gram"}})
    K = res["rank"]
    check(tag + " gram built by the Linear kernels (V never formed)",
          res.get("gram_path") == "kernel", str(res.get("gram_path")))
    resid = res.get("residuals")
    # residuals without return_vectors (docs/interface.md, eigen).  float32 products: a floor
    # ~1e-6 lambda_max plus 1e-5 relative where lambda_k > 1e-3 lambda_max (as in
    # test_vivit.c); below that e_k = V g_k / sqrt(lambda_k) amplifies the
    # float32 error by sqrt(lambda_max / lambda_k) (measured 1.5e-5 lambda_max at
    # lambda_k ~ 1e-6 lambda_max), so only 1e-4 lambda_max holds there
    l0 = float(evals[0])
    check(tag + " gram residuals without return_vectors",
          resid is not None and len(resid) == len(res["eigenvalues"]) and
          "eigenvectors" not in res and
          all(r <= (1e-5 * lam + 2e-6 * l0 if lam > 1e-3 * l0 else 1e-4 * l0)
              for r, lam in zip(resid, res["eigenvalues"])),
          str(resid)[:200])
    want = evals[:K]
    e = rel(res["eigenvalues"], want)
    check(tag + " gram = nonzero GGN eigenvalues", e < 1e-5 and K <= D,
          f"rel err {e}, rank {K}")
    above = int((evals > 10 * res["threshold"]).sum())
    check(tag + " gram keeps every eigenvalue above the threshold", K >= above,
          f"rank {K} vs {above}")
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn",
                                     "options": {"method": "gram", "k": 3,
                                                 "return_vectors": True}})
    ok, checked = True, 0
    for k in range(3):
        gap = min(abs(evals[k] - evals[j]) for j in range(4) if j != k)
        if gap < 1e-3 * evals[0]:
            continue
        checked += 1
        v = torch.tensor(res["eigenvectors"][k], dtype=torch.float64)
        ok &= abs(abs(float(v @ evecs[:, k])) - 1) < 1e-4
        ok &= float((G @ v - res["eigenvalues"][k] * v).norm()) < 1e-4 * float(evals[0])
    check(tag + " gram eigenvectors", ok and checked >= 1, f"{checked} of 3 checked")
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn", "blocks": "layer",
                                     "options": {"method": "gram"}})
    ok = len(res["blocks"]) == len(layer_slices(model))
    for b, (names, a, z) in zip(res["blocks"], layer_slices(model)):
        w = torch.linalg.eigvalsh(G[a:z, a:z]).flip(0)
        ok &= b["params"] == names and rel(b["eigenvalues"], w[:b["rank"]]) < 1e-5
        ok &= b.get("gram_path") == "kernel"
    check(tag + " per-layer gram = diagonal blocks", ok)


def check_mc_and_subsample(tag, d, model, loss_fn, x, y):
    _, den = tr.curvd_run(CURVD, d, {"op": "dense", "curvature": "fisher_mc", "seed": 4})
    F = torch.tensor(den["matrix"], dtype=torch.float64)
    wf = torch.linalg.eigvalsh(0.5 * (F + F.T)).flip(0)
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "fisher_mc", "seed": 4,
                                     "options": {"method": "gram"}})
    e = rel(res["eigenvalues"], wf[:res["rank"]])
    check(tag + " MC gram = engine's fisher_mc", e < 1e-5 and res["columns"] == x.shape[0],
          f"rel err {e}")
    _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn", "seed": 9,
                                     "options": {"method": "gram", "subsample": 0.5}})
    idx = res["curvature_indices"]
    N, ns = x.shape[0], len(idx)
    m64, x64, y64 = to64(model, x, y)
    Gs = tr.dense_ggn(m64, loss_fn, x64[idx], y64[idx]).detach()
    if loss_fn.reduction == "sum":
        Gs = Gs * N / ns
    ws = torch.linalg.eigvalsh(Gs).flip(0)
    e = rel(res["eigenvalues"], ws[:res["rank"]])
    check(tag + " sub-sampled gram = sub-batch GGN", e < 1e-5 and ns == N // 2,
          f"rel err {e}, ns {ns}")


def check_snr(tag, d, model, loss_fn, x, y, evals, evecs, g):
    m64, x64, y64 = to64(model, x, y)
    PG, J, Lam = per_sample_refs(m64, loss_fn, x64, y64)
    N = x.shape[0]
    _, res = tr.curvd_run(CURVD, d, {"op": "snr", "curvature": "ggn",
                                     "options": {"return_raw": True}})
    dirs = res["directions"]
    check(tag + " snr: k defaults to C", len(dirs) == 3)
    ok_g, ok_l, ok_a, ok_raw, checked = True, True, True, True, 0
    for k, dk in enumerate(dirs):
        gap = min(abs(evals[k] - evals[j]) for j in range(4) if j != k)
        if gap < 1e-3 * evals[0]:
            continue
        checked += 1
        e = evecs[:, k]
        gam = N * PG @ e
        g_ok, l_ok, _, _, lam = tr.snr_direction_matches(dk, gam, J @ e, Lam, N)
        ok_g &= g_ok
        ok_l &= l_ok and close(dk["eigenvalue"], float(evals[k]), 1e-4)
        ok_a &= close(dk["alignment"], abs(float(e @ g)) / float(g.norm()), 1e-3, 1e-6)
        sign = 1.0 if float(gam @ torch.tensor([r[k] for r in res["gamma"]],
                                               dtype=torch.float64)) >= 0 else -1.0
        ok_raw &= rel([sign * r[k] for r in res["gamma"]], gam) < 1e-3
        ok_raw &= rel([r[k] for r in res["lambda"]], lam) < 1e-3
    check(tag + " snr: at least one separated direction checked", checked >= 1,
          f"{checked} of {len(dirs)}")
    check(tag + " gamma mean/var/snr", ok_g)
    check(tag + " lambda mean/var/snr", ok_l)
    check(tag + " gradient-eigenvector alignment", ok_a)
    check(tag + " raw gamma/lambda", ok_raw)
    ok = True
    for gl, (names, a, z) in zip(res["gsnr"], layer_slices(model)):
        mean, var = PG[:, a:z].mean(0), PG[:, a:z].var(0, unbiased=True)
        keep = var > 1e-30 * float(var.max())
        want = float((mean[keep] ** 2 / var[keep]).mean())
        ok &= gl["params"] == names and close(gl["gsnr"], want, 1e-3)
    check(tag + " per-layer gradient SNR", ok and len(res["gsnr"]) == 3)


def check_newton(tag, d, G, evals, evecs, g, model):
    D = G.shape[0]
    delta = 0.1 * float(evals[0])
    _, res = tr.curvd_run(CURVD, d, {"op": "newton", "curvature": "ggn",
                                     "options": {"method": "vivit", "mode": "full",
                                                 "damping": delta, "actual_change": True}})
    s = -torch.linalg.solve(G + delta * torch.eye(D, dtype=torch.float64), g)
    e = rel(res["step"], s)
    check(tag + " full damped Newton = dense solve", e < 1e-4, f"rel err {e}")
    pred = float(g @ s + 0.5 * s @ G @ s)
    check(tag + " full Newton predicted change", close(res["predicted_change"], pred, 1e-4),
          f"{res['predicted_change']} vs {pred}")
    check(tag + " actual change present", "actual_change" in res)
    _, res = tr.curvd_run(CURVD, d, {"op": "newton", "curvature": "ggn",
                                     "options": {"method": "vivit", "k": "all",
                                                 "damping": delta}})
    K = res["k"]
    U, lam = evecs[:, :K], evals[:K]
    s = -U @ ((U.T @ g) / (lam + delta))
    e = rel(res["step"], s)
    check(tag + " directional Newton (k all) = eigenspace formula", e < 1e-3, f"rel err {e}")
    # per-layer block Newton: blocks "layer" runs one vivit Newton per block,
    # against torch solves on the GGN's diagonal blocks with the block gradient
    _, res = tr.curvd_run(CURVD, d, {"op": "newton", "curvature": "ggn", "blocks": "layer",
                                     "options": {"method": "vivit", "mode": "full",
                                                 "damping": delta}})
    _, resd = tr.curvd_run(CURVD, d, {"op": "newton", "curvature": "ggn", "blocks": "layer",
                                      "options": {"method": "vivit", "k": "all",
                                                  "damping": delta}})
    slices = layer_slices(model)
    ok_f = ok_d = len(res["blocks"]) == len(slices) == len(resd["blocks"])
    errs = []
    for bf, bd, (names, a, z) in zip(res["blocks"], resd["blocks"], slices):
        Gb, gb = G[a:z, a:z], g[a:z]
        sb = -torch.linalg.solve(Gb + delta * torch.eye(z - a, dtype=torch.float64), gb)
        ef = rel(bf["step"], sb)
        wb, Ub = torch.linalg.eigh(Gb)
        wb, Ub = wb.flip(0)[:bd["k"]], Ub.flip(1)[:, :bd["k"]]
        ed = rel(bd["step"], -Ub @ ((Ub.T @ gb) / (wb + delta)))
        errs.append((round(ef, 8), round(ed, 8)))
        ok_f &= bf["params"] == names and ef < 1e-4
        ok_d &= bd["params"] == names and bd["k"] == bd["rank"] and ed < 1e-3
    check(tag + " per-layer full Newton = diagonal-block solves", ok_f, str(errs))
    check(tag + " per-layer directional Newton = diagonal-block eigenspace", ok_d, str(errs))
    job = {"op": "newton", "curvature": "ggn", "seed": 11,
           "options": {"method": "vivit", "k": 3, "damping": "bootstrap",
                       "grid": [1e-3, 1e-2, 1e-1, 1.0], "bootstrap_samples": 64}}
    _, r1 = tr.curvd_run(CURVD, d, job)
    _, r2 = tr.curvd_run(CURVD, d, job)
    ok = r1["step"] == r2["step"] and r1["dampings"] == r2["dampings"]
    ok &= all(x is None or x in job["options"]["grid"] for x in r1["dampings"])
    check(tag + " bootstrap damping deterministic, on the grid", ok, str(r1["dampings"]))


def check_errors(d, big):
    rc, err = tr.curvd_run(CURVD, d, {"op": "snr", "curvature": "hessian"}, expect_ok=False)
    check("snr refuses hessian", rc != 0 and err.get("error", {}).get("field") == "curvature",
          str(err))
    rc, err = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ef",
                                      "options": {"method": "gram"}}, expect_ok=False)
    check("gram refuses ef", rc != 0 and "ggn" in err.get("error", {}).get("message", ""),
          str(err))
    rc, err = tr.curvd_run(CURVD, d, {"op": "newton", "curvature": "ggn",
                                      "options": {"method": "vivit", "mode": "full",
                                                  "damping": "bootstrap"}}, expect_ok=False)
    check("full mode refuses bootstrap", rc != 0, str(err))
    rc, err = tr.curvd_run(CURVD, big, {"op": "eigen", "curvature": "ggn",
                                        "options": {"method": "gram"}}, expect_ok=False)
    check("N*C above the column limit refused",
          rc != 0 and err.get("error", {}).get("code") == "too_large" and
          "options.mc" in err.get("error", {}).get("message", ""), str(err))
    rc, res = tr.curvd_run(CURVD, big, {"op": "eigen", "curvature": "ggn",
                                        "options": {"method": "gram", "mc": True, "k": 5}})
    check("MC gram fits the limit", rc == 0 and len(res["eigenvalues"]) == 5, str(res)[:200])


# The timing runs' threads (BLAS and the engine's loops, which follow --blas-threads): the
# 2-vCPU machine's default, pinned so that the comparison does not change with the runner's
# cores (curvd run's default is one thread per core: under tests/tools/manycore.sh, 16 on 2
# cores, the eigenvalue speed-up fell to 1.1x).
TIMING_THREADS = ("--blas-threads", "2")


def best_elapsed(d, methods, options, repeats=3):
    """{method: (fastest elapsed_s, its result, every run's pass count)} over `repeats`
    rounds, the methods interleaved in each round (A B A B: a load change on the machine
    slows both alike).  elapsed_s is the job's own time (no process start, no JSON output);
    `matvecs` is deterministic for a fixed seed."""
    runs = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn",
                                             "options": dict(options, method=m)},
                                  extra=TIMING_THREADS)
            runs[m].append((res["elapsed_s"], res))
    out = {}
    for m, rs in runs.items():
        best = min(rs, key=lambda r: r[0])
        out[m] = (best[0], best[1], [r[1]["matvecs"] for r in rs])
    return out


def timing():
    """The speed claim: top-10 GGN eigenpairs at D = 85002, N*C = 160.  Work is
    counted deterministically: the gram method spends C = 10 passes on the Gram
    (one per factor column of every sample) and 3k = 30 on the eigenvector
    residuals (V y, V^T e, V V^T e); one Lanczos GGN matvec is a jvp plus a vjp
    (2 passes); the pass ratio (>= 3x) is the firm claim.  Wall time, the best of 3
    interleaved runs at 2 threads (TIMING_THREADS) whatever the cores, varies by up to 2x on a shared 2-vCPU machine, so its floors leave room:
    >= 1.3x for eigenvalues and not slower with the 10 x 85002 eigenvectors in the
    result (their JSON costs as much as the gram).  Measured: 7-14x and 2.4-4x while
    Lanczos' float32 basis faulted in 4 KiB pages; 1.85-2.0x and 1.6x since it is
    populated in huge pages (2026-12-06), with the pass ratio unchanged at 3.6x.  The benchmark proper lives in bench/."""
    C, k = 10, 10
    model, x, y = make_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), n=16, din=64,
                            hidden=(256, 256), C=C, seed=42)
    loss_fn = torch.nn.CrossEntropyLoss()
    D = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [64], loss_fn, x, y)
        for vectors, floor in ((False, 1.3), (True, 1.0)):
            opts = {"k": k, "return_vectors": vectors}
            best = best_elapsed(d, ("gram", "lanczos"), opts)
            (tg, rg, pg), (tl, rl, pl) = best["gram"], best["lanczos"]
            e = rel(rg["eigenvalues"], rl["eigenvalues"])
            what = "eigenpairs" if vectors else "eigenvalues"
            check(f"timing case: gram = lanczos top-10 {what}", e < 1e-4, f"rel err {e}")
            check(f"timing case: gram built by kernels ({what})", rg["gram_path"] == "kernel")
            ratio, work = tl / max(tg, 1e-9), 2 * pl[0] / max(pg[0], 1)
            print(f"timing (D={D}, N*C={16 * C}, top-{k} GGN {what}): gram {tg * 1e3:.1f} ms "
                  f"({pg[0]} passes), lanczos {tl * 1e3:.1f} ms ({pl[0]} matvecs = "
                  f"{2 * pl[0]} passes), speed-up {ratio:.1f}x (floor {floor}x), "
                  f"pass ratio {work:.1f}x")
            check(f"gram passes deterministic = C + 3k ({what})",
                  pg == [C + 3 * k] * 3, str(pg))
            check(f"lanczos matvecs deterministic ({what})", len(set(pl)) == 1, str(pl))
            check(f"gram needs >= 3x fewer passes than lanczos ({what})", work >= 3.0,
                  f"{2 * pl[0]} vs {pg[0]}")
            check(f"gram >= {floor}x faster than lanczos ({what})", ratio >= floor,
                  f"{tg} vs {tl}: {ratio:.2f}x")


def check_cnn():
    """Conv2d (and Linear) layers build the Gram through their kernels: the
    eigenvalues equal the torch GGN's, per block too, with gram_path "kernel"."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3))
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(10, 2, 8, 8), torch.randint(0, 3, (10,))
    m64, x64, y64 = to64(model, x, y)
    G = tr.dense_ggn(m64, loss_fn, x64, y64).detach()
    G = 0.5 * (G + G.T)
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, list(x.shape[1:]), loss_fn, x, y)
        _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn",
                                         "options": {"method": "gram"}})
        w = torch.linalg.eigvalsh(G).flip(0)
        e = rel(res["eigenvalues"], w[:res["rank"]])
        check("cnn gram = nonzero GGN eigenvalues, by the kernels",
              e < 1e-5 and res["gram_path"] == "kernel", f"rel err {e}, {res['gram_path']}")
        _, res = tr.curvd_run(CURVD, d, {"op": "eigen", "curvature": "ggn", "blocks": "layer",
                                         "options": {"method": "gram"}})
        ok, sizes, off = len(res["blocks"]) == 2, [], 0
        for b in res["blocks"]:
            a, off = off, off + b["dim"]
            wb = torch.linalg.eigvalsh(G[a:off, a:off]).flip(0)
            ok &= b["gram_path"] == "kernel" and rel(b["eigenvalues"], wb[:b["rank"]]) < 1e-5
            sizes.append((b["params"], b["gram_path"]))
        check("cnn per-layer gram (Conv2d, Linear) by the kernels", ok, str(sizes))


def main():
    cases = [
        ("tanh-ce-mean", torch.nn.Tanh, torch.nn.CrossEntropyLoss()),
        ("relu-mse-sum", torch.nn.ReLU, torch.nn.MSELoss(reduction="sum")),
        ("sigmoid-bce-mean", torch.nn.Sigmoid, torch.nn.BCEWithLogitsLoss()),
        ("elu-mse-mean", torch.nn.ELU, torch.nn.MSELoss()),
    ]
    for i, (tag, act, loss_fn) in enumerate(cases):
        model, x, y = make_case(act, loss_fn, seed=10 + i)
        m64, x64, y64 = to64(model, x, y)
        G = tr.dense_ggn(m64, loss_fn, x64, y64).detach()
        G = 0.5 * (G + G.T)
        evals, evecs = torch.linalg.eigh(G)
        evals, evecs = evals.flip(0), evecs.flip(1)
        _, g, _ = tr.loss_and_grad(m64, loss_fn, x64, y64)
        g = torch.cat([t.reshape(-1) for t in g]).detach()
        with tempfile.TemporaryDirectory() as d:
            tr.write_case(d, model, [x.shape[1]], loss_fn, x, y)
            check_eigen(tag, d, G, evals, evecs, model)
            check_snr(tag, d, model, loss_fn, x, y, evals, evecs, g)
            check_newton(tag, d, G, evals, evecs, g, model)
            if i < 2:
                check_mc_and_subsample(tag, d, model, loss_fn, x, y)
            if i == 0:
                bm, bx, by = make_case(torch.nn.Tanh, loss_fn, n=900, C=10, seed=1)
                with tempfile.TemporaryDirectory() as big:
                    tr.write_case(big, bm, [bx.shape[1]], loss_fn, bx, by)
                    check_errors(d, big)
    check_cnn()
    timing()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
