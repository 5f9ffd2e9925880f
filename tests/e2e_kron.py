"""e2e_kron.py - the Kronecker-factored curvatures (issue 22) in every op: kfac (fisher_type
type-2, mc, empirical) and kflr on the MLP of tests/e2e_microbatch.py (Linear 6-12-8-3,
CrossEntropyLoss) at N = 1 and N = 8, full and blocks "layer", through `curvd run`.

Checks, against numpy on curvd's own dense Kronecker matrix (op dense; torch-built factors are
another test's): the matrix is block-diagonal over the layers (off-diagonal blocks exactly 0);
for N = 1 its diagonal blocks equal op dense on the matching exact curvature (ggn, fisher_mc
with the same seed and mc_samples, ef); kfac_approx reduce = expand (a Linear on [N, D] shares
no weights); the exact answers ("exact": true) equal the dense matrix's within 1e-6 relative:
trace (and logdet where the matrix is positive definite), diag (method hutchinson and exact),
eigen (largest, smallest, magnitude; eigenvectors), density (nodes = the spectrum, the density
normalized), solve (= numpy's damped solve); matvec = the dense product; newton cg runs on the
operator ("exact": false); per-layer blocks give the dense matrix's blocks; a block that cuts a
layer's (weight, bias) pair gets the principal sub-block (still Kronecker); block_kinds.
A model with a LayerNorm gets the exact (ggn) block there (block_kinds "exact") and the
estimators on the full vector ("exact": false).  Refusals (400): fisher_type with a
non-Kronecker curvature, kflr or kfra with fisher_type mc.  kfra (Botev's recursion: equal to
kflr at N = 1) and ekfac (type-2 and empirical: equal to kfac at N = 1) take every check
above too, and ekfac's exact trace at N = 8 equals the exact curvature's trace (its values
are diag(Q^T F Q) of the exact layer blocks).
newton methods kfac/ekfac/kfra (N = 8; check_newton_kron): damping_mode exact = numpy's solve
of (dense Kronecker matrix + lam I) s = -g, factored = the inverse of op kfac's damped factors'
Kronecker product, predicted_change, rescale's alpha against the dense exact curvature, the
curvature rule (omitted, own, kflr, ggn/fisher_mc/ef), per-layer blocks, refusals; with a
LayerNorm (exact slot solved by CG) = numpy's solve on the dense kfac matrix.
Usage: /usr/bin/python3 tests/e2e_kron.py build/curvd.  Ends with 'N passed, M failed'.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


def write_case(d, model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    arch, params = export_model(model, nn.CrossEntropyLoss(), [6], 1, x)
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(params)
    with open(os.path.join(d, "data.safetensors"), "wb") as f:
        f.write(export_dataset(x, y))


def run(d, job):
    """`curvd run` on the case in d: (rc, result or error)."""
    return tr.curvd_run(CURVD, d, job, expect_ok=False)


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def layer_slices(model):
    out, o = [], 0
    for m in model:
        if isinstance(m, nn.Linear):
            n = m.weight.numel() + m.bias.numel()
            out.append(slice(o, o + n))
            o += n
    return out


def curv_job(curv, ft, **kw):
    opts = dict(kw.pop("options", {}))
    if ft:
        opts["fisher_type"] = ft
    if ft == "mc":
        opts["mc_samples"] = 2
    return dict({"curvature": curv, "seed": 4, "options": opts}, **kw)


def ok_run(d, name, job):
    rc, r = run(d, job)
    check(f"{name}: runs", rc == 0, str(r)[:300])
    return r if rc == 0 else None


def check_curvature(d, tag, model, n, curv, ft):
    name = f"{tag} {curv}{'/' + ft if ft else ''}"
    sl = layer_slices(model)
    D = sum(s.stop - s.start for s in sl)
    r = ok_run(d, name + " dense", curv_job(curv, ft, op="dense"))
    if not r:
        return
    M = np.array(r["matrix"])
    check(f"{name} dense: symmetric", rel(M, M.T) < 1e-12)
    off = M.copy()
    for s in sl:
        off[s, s] = 0
    check(f"{name} dense: off-diagonal layer blocks are 0", np.abs(off).max() == 0)
    check(f"{name} dense: block_kinds", [b["kind"] for b in r["block_kinds"]]
          == ["kronecker"] * 3 and [b["dim_b"] for b in r["block_kinds"]] == [12, 8, 3]
          and [b["dim_a"] for b in r["block_kinds"]] == [7, 13, 9], str(r["block_kinds"]))
    check(f"{name} dense: exact false", r.get("exact") is False)
    r2 = ok_run(d, name + " dense reduce",
                curv_job(curv, ft, op="dense", options={"kfac_approx": "reduce"}))
    if r2:
        check(f"{name} dense: reduce = expand (no weight sharing)",
              rel(r2["matrix"], M) < 1e-12)
    if n == 1:
        exact = {"type-2": "ggn", "mc": "fisher_mc", "empirical": "ef", None: "ggn"}[ft]
        job = {"op": "dense", "curvature": exact, "seed": 4}
        if exact == "fisher_mc":
            job["options"] = {"mc_samples": 2}
        re_ = ok_run(d, name + " exact dense", job)
        if re_:
            E = np.array(re_["matrix"])
            worst = max(rel(M[s, s], E[s, s]) for s in sl)
            check(f"{name} N=1: each layer block = {exact}'s diagonal block", worst < 1e-5,
                  f"rel {worst:.2e}")
    scale = max(np.abs(np.linalg.eigvalsh(M)).max(), 1e-300)
    ev = np.linalg.eigvalsh(M)
    # trace (+ logdet)
    for meth in ("hutchinson", "hutch++"):
        r = ok_run(d, f"{name} trace {meth}", curv_job(curv, ft, op="trace",
                                                      options={"method": meth}))
        if r:
            check(f"{name} trace {meth}: exact = tr(dense)", r.get("exact") is True and
                  abs(r["trace"] - np.trace(M)) <= TOL * abs(np.trace(M)),
                  f"{r.get('trace')} vs {np.trace(M)}")
            sign, ld = np.linalg.slogdet(M)
            if ev.min() > 1e-8 * scale:
                check(f"{name} trace: logdet = slogdet(dense)", "logdet" in r and
                      abs(r["logdet"] - ld) <= 1e-6 * max(1, abs(ld)), f"{r.get('logdet')} {ld}")
            else:
                check(f"{name} trace: no logdet for a singular matrix", "logdet" not in r)
    # diag
    for meth in ("hutchinson", "exact"):
        r = ok_run(d, f"{name} diag {meth}", curv_job(curv, ft, op="diag",
                                                     options={"method": meth}))
        if r:
            check(f"{name} diag {meth}: exact = diag(dense)", r.get("exact") is True and
                  rel(r["diag"], np.diag(M)) < TOL, f"rel {rel(r['diag'], np.diag(M)):.2e}")
    # eigen
    for which in ("largest", "smallest", "magnitude"):
        k = 4
        r = ok_run(d, f"{name} eigen {which}", curv_job(curv, ft, op="eigen", options={
            "k": k, "which": which, "return_vectors": True}))
        if not r:
            continue
        ref = {"largest": ev[::-1][:k], "smallest": ev[:k],
               "magnitude": ev[np.argsort(-np.abs(ev), kind="stable")][:k]}[which]
        got = np.array(r["eigenvalues"])
        check(f"{name} eigen {which}: exact = eigvalsh(dense)", r.get("exact") is True and
              np.abs(got - ref).max() <= TOL * scale, f"{got} vs {ref}")
        V = np.array(r["eigenvectors"]).T
        res = np.linalg.norm(M @ V - V * got, axis=0).max()
        check(f"{name} eigen {which}: eigenvectors (unit, residual)",
              np.abs(np.linalg.norm(V, axis=0) - 1).max() < 1e-10 and res <= 1e-6 * scale,
              f"residual {res:.2e}")
    # density
    r = ok_run(d, f"{name} density", curv_job(curv, ft, op="density",
                                             options={"grid_points": 200}))
    if r:
        nodes = np.array(r["nodes"][0])
        grid, vals = np.array(r["density"]["grid"]), np.array(r["density"]["values"])
        check(f"{name} density: nodes = the spectrum", r.get("exact") is True and
              len(nodes) == D and np.abs(nodes - ev).max() <= TOL * scale)
        check(f"{name} density: normalized", abs(vals.sum() * (grid[1] - grid[0]) - 1) < 1e-9)
    # solve, matvec
    rg = ok_run(d, name + " gradient", {"op": "gradient"})
    lam = 0.1 * scale
    r = ok_run(d, f"{name} solve", curv_job(curv, ft, op="solve",
                                           options={"damping": lam, "method": "minres"}))
    if r and rg:
        x = np.linalg.solve(M + lam * np.eye(D), np.array(rg["gradient"]))
        check(f"{name} solve: exact = numpy damped solve", r.get("exact") is True and
              rel(r["solution"], x) < TOL and r["method"] == "minres",
              f"rel {rel(r['solution'], x):.2e}")
    v = np.random.default_rng(1).standard_normal(D)
    r = ok_run(d, f"{name} matvec", curv_job(curv, ft, op="matvec",
                                            options={"vector": v.tolist()}))
    if r:
        check(f"{name} matvec = dense product", rel(r["product"], M @ v) < 1e-10)
    r = ok_run(d, f"{name} newton", curv_job(curv, ft, op="newton",
                                            options={"damping": lam, "tol": 1e-10}))
    if r and rg:
        x = -np.linalg.solve(M + lam * np.eye(D), np.array(rg["gradient"]))
        check(f"{name} newton cg on the operator", r.get("exact") is False and
              rel(r["step"], x) < 1e-5, f"rel {rel(r['step'], x):.2e}")
    # per-layer blocks: every op
    for op, opts in (("dense", {}), ("trace", {}), ("diag", {}), ("eigen", {"k": 2}),
                     ("density", {"grid_points": 50}), ("solve", {"damping": lam}),
                     ("newton", {"damping": lam}), ("matvec", None)):
        if opts is None:
            continue
        r = ok_run(d, f"{name} {op} blocks layer", curv_job(curv, ft, op=op, blocks="layer",
                                                           options=opts))
        if not r:
            continue
        blocks = r.get("blocks", [])
        good = len(blocks) == 3 and all(b["block_kinds"][0]["kind"] == "kronecker"
                                        for b in blocks)
        if op == "dense":
            good = good and all(rel(b["matrix"], M[s, s]) < 1e-12 for b, s in zip(blocks, sl))
        if op == "trace":
            good = good and all(abs(b["trace"] - np.trace(M[s, s])) <= TOL * np.trace(M[s, s])
                                and b["exact"] for b, s in zip(blocks, sl))
        check(f"{name} {op} blocks layer", good, str(r)[:300])
    # a block cutting layers' (weight, bias) pairs: the principal sub-block
    names = ["0.weight", "2.bias", "4.weight", "4.bias"]
    cut = curv_job(curv, ft, op="dense", blocks=[["0.weight"], ["2.bias", "4.weight", "4.bias"]])
    if curv == "ekfac":  # its eigenbasis is the whole layer's
        rc, r = run(d, cut)
        check(f"{name} dense cut blocks: refused (400 invalid_blocks)",
              rc != 0 and r.get("error", {}).get("code") == "invalid_blocks", str(r)[:200])
        return
    r = ok_run(d, f"{name} dense cut blocks", cut)
    if r:
        i0 = np.arange(0, 72)
        i1 = np.r_[np.arange(84 + 96, 84 + 104), np.arange(188, 215)]
        b0, b1 = r["blocks"]
        check(f"{name} dense cut blocks: principal sub-blocks", rel(b0["matrix"], M[np.ix_(
            i0, i0)]) < 1e-10 and rel(b1["matrix"], M[np.ix_(i1, i1)]) < 1e-10 and
            [k["dim_a"] for k in b1["block_kinds"]] == [1, 9], str(b1["block_kinds"])[:200])
    del names


def theta_perm(n_in, n_out):
    """P as an index map: row-major W~ = [W | b] coordinate -> theta = [vec_r(W), b] index."""
    idx = []
    for o in range(n_out):
        idx += [o * n_in + j for j in range(n_in)] + [n_out * n_in + o]
    return np.array(idx)


def factored_inverse(layers, lam):
    """The block-diagonal inverse of (A + w sqrt(lam) I) (x) (B + sqrt(lam)/w I) in theta order
    from op kfac's factors (block = P (B (x) A) P^T)."""
    blocks = []
    for L in layers:
        A, B = np.array(L["A"]), np.array(L["B"])
        da, db = len(A), len(B)
        w = np.sqrt((np.trace(A) / da) / (np.trace(B) / db))
        Ai = np.linalg.inv(A + w * np.sqrt(lam) * np.eye(da))
        Bi = np.linalg.inv(B + np.sqrt(lam) / w * np.eye(db))
        K = np.kron(Bi, Ai)
        p = theta_perm(da - 1, db)
        T = np.zeros_like(K)
        T[np.ix_(p, p)] = K
        blocks.append(T)
    D = sum(len(b) for b in blocks)
    out, o = np.zeros((D, D)), 0
    for b in blocks:
        out[o:o + len(b), o:o + len(b)] = b
        o += len(b)
    return out


def check_newton_kron(d):
    """newton methods kfac/ekfac/kfra (N = 8): exact damping = numpy's solve of (dense
    Kronecker matrix + lam I) s = -g; factored = the inverse of the damped factors' Kronecker
    product (op kfac's A, B); rescale alpha = -s^T g / s^T G s with the dense exact curvature;
    predicted_change = g^T s + 1/2 s^T F~ s; the curvature rule; per-layer blocks; refusals."""
    lam = 0.05
    rg = ok_run(d, "newton kron: gradient", {"op": "gradient"})
    if not rg:
        return
    g = np.array(rg["gradient"])
    D = len(g)
    # (label, newton job's curvature (None: omitted), method, options, the dense job)
    cases = (("kfac type-2", None, "kfac", {}, curv_job("kfac", "type-2", op="dense")),
             ("kflr", "kflr", "kfac", {}, curv_job("kflr", None, op="dense")),
             ("kfac via ggn", "ggn", "kfac", {}, curv_job("kfac", "type-2", op="dense")),
             ("kfac mc via fisher_mc", "fisher_mc", "kfac", {"mc_samples": 2},
              curv_job("kfac", "mc", op="dense")),
             ("kfac empirical", None, "kfac", {"fisher_type": "empirical"},
              curv_job("kfac", "empirical", op="dense")),
             ("ekfac type-2", "ekfac", "ekfac", {}, curv_job("ekfac", "type-2", op="dense")),
             ("ekfac empirical via ef", "ef", "ekfac", {}, curv_job("ekfac", "empirical",
                                                                   op="dense")),
             ("kfra", None, "kfra", {}, curv_job("kfra", None, op="dense")))
    exact_of = {"type-2": "ggn", "mc": "fisher_mc", "empirical": "ef"}
    for label, curv, method, opts, djob in cases:
        rd = ok_run(d, f"newton {label}: dense", djob)
        job = {"op": "newton", "seed": 4,
               "options": dict(opts, method=method, damping=lam, actual_change=True)}
        if curv:
            job["curvature"] = curv
        r = ok_run(d, f"newton {label}", job)
        if not (r and rd):
            continue
        M = np.array(rd["matrix"])
        x = -np.linalg.solve(M + lam * np.eye(D), g)
        s = np.array(r["step"])
        pc = g @ s + 0.5 * s @ M @ s
        check(f"newton {label}: exact step = -(F~ + lam I)^-1 g", rel(s, x) < TOL and
              r["exact"] is True and r["damping_mode"] == "exact" and r["method"] == method
              and r["curvature"] == rd["curvature"], f"rel {rel(s, x):.2e} {r.get('curvature')}")
        check(f"newton {label}: predicted_change = g^T s + s^T F~ s / 2",
              abs(r["predicted_change"] - pc) <= TOL * abs(pc) and "actual_change" in r
              and len(r["block_kinds"]) == 3, f"{r['predicted_change']} vs {pc}")
        if label in ("kfac type-2", "kfac empirical", "kfra"):
            ft = opts.get("fisher_type", "type-2")
            ex = exact_of[ft]
            rr = ok_run(d, f"newton {label} rescale", dict(job, options=dict(
                job["options"], rescale=True)))
            rG = ok_run(d, f"newton {label}: dense {ex}", {"op": "dense", "curvature": ex,
                                                           "seed": 4})
            if rr and rG:
                G = np.array(rG["matrix"])
                alpha = -(x @ g) / (x @ G @ x)
                sa = np.array(rr["step"])
                pca = g @ sa + 0.5 * sa @ M @ sa
                check(f"newton {label} rescale: alpha = -s^T g / s^T G s ({ex}), step alpha s",
                      abs(rr["alpha"] - alpha) <= TOL * abs(alpha) and
                      rel(sa, alpha * x) < TOL and
                      abs(rr["predicted_change"] - pca) <= TOL * abs(pca),
                      f"{rr.get('alpha')} vs {alpha}")
        if method != "ekfac" and curv != "kflr":
            ft = {"kfac mc via fisher_mc": "mc"}.get(label, opts.get("fisher_type", "type-2"))
            kjob = {"op": "kfac", "seed": 4, "options": {"fisher_type": ft}}
            if ft == "mc":
                kjob["options"]["mc_samples"] = 2
            rk = ok_run(d, f"newton {label}: op kfac", kjob) if method == "kfac" else None
            if method == "kfra":  # kfra's own factors are not op kfac's: the dense check
                continue
            rf = ok_run(d, f"newton {label} factored", dict(job, options=dict(
                job["options"], damping_mode="factored")))
            if rk and rf:
                Minv = factored_inverse(rk["layers"], lam)
                xf = -Minv @ g
                check(f"newton {label} factored = inverse of the damped factors' product",
                      rel(rf["step"], xf) < TOL and rf["damping_mode"] == "factored",
                      f"rel {rel(rf['step'], xf):.2e}")
    # per-layer blocks: the same step (block-diagonal)
    r = ok_run(d, "newton kfac blocks layer", {"op": "newton", "blocks": "layer",
                                               "options": {"method": "kfac", "damping": lam}})
    rf = ok_run(d, "newton kfac full", {"op": "newton", "options": {"method": "kfac",
                                                                     "damping": lam}})
    if r and rf:
        st = np.concatenate([b["step"] for b in r["blocks"]])
        check("newton kfac blocks layer = the full step", rel(st, rf["step"]) < 1e-12)
    for job, code, what in (
            ({"op": "newton", "options": {"method": "ekfac", "damping_mode": "factored"}},
             "invalid_option", "ekfac factored"),
            ({"op": "newton", "curvature": "hessian", "options": {"method": "kfac"}},
             "invalid_curvature", "method kfac with curvature hessian"),
            ({"op": "newton", "curvature": "kfac", "options": {"method": "ekfac"}},
             "invalid_curvature", "method ekfac with curvature kfac"),
            ({"op": "newton", "curvature": "fisher_mc",
              "options": {"method": "kfac", "fisher_type": "type-2"}},
             "invalid_option", "fisher_mc with fisher_type type-2"),
            ({"op": "newton", "curvature": "ef", "options": {"method": "kfra"}},
             "invalid_option", "kfra of ef"),
            ({"op": "newton", "curvature": "ggn", "options": {"damping_mode": "factored"}},
             "invalid_option", "damping_mode with method cg"),
            ({"op": "newton", "options": {"method": "kfac", "damping_mode": "factored",
                                          "damping": -1}},
             "invalid_option", "factored with negative damping"),
            ({"op": "newton", "options": {"method": "kfac", "damping": 0}},
             "not_positive_definite", "kfac damping 0 with a singular factor")):
        rc, r = run(d, job)
        check(f"newton refused: {what}", rc != 0 and r.get("error", {}).get("code") == code,
              str(r)[:200])


def check_newton_mixed(d):
    """A LayerNorm layer (exact slot) in newton kfac: its block by CG on the exact ggn block
    (exact false, iterations > 0); the step = numpy's solve on the dense kfac matrix."""
    lam = 0.05
    r = ok_run(d, "layernorm newton kfac", {"op": "newton", "options": {
        "method": "kfac", "damping": lam, "tol": 1e-12}})
    rd = ok_run(d, "layernorm kfac dense (newton)", {"op": "dense", "curvature": "kfac"})
    rg = ok_run(d, "layernorm gradient", {"op": "gradient"})
    if r and rd and rg:
        M, g = np.array(rd["matrix"]), np.array(rg["gradient"])
        x = -np.linalg.solve(M + lam * np.eye(len(g)), g)
        check("layernorm newton kfac: CG on the exact slot, Kronecker inverse elsewhere",
              rel(r["step"], x) < TOL and r["exact"] is False and r["iterations"] > 0 and
              r["converged"] is True, f"rel {rel(r['step'], x):.2e} {r.get('iterations')}")


def check_mixed(d):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).eval()
    write_case(d, model, 8, seed=5)
    r = ok_run(d, "layernorm kfac dense", {"op": "dense", "curvature": "kfac"})
    g = ok_run(d, "layernorm ggn dense", {"op": "dense", "curvature": "ggn"})
    if r and g:
        M, G = np.array(r["matrix"]), np.array(g["matrix"])
        s = slice(35, 45)
        check("layernorm: block_kinds kronecker, exact, kronecker",
              [b["kind"] for b in r["block_kinds"]] == ["kronecker", "exact", "kronecker"],
              str(r["block_kinds"]))
        check("layernorm: its block = ggn's", rel(M[s, s], G[s, s]) < 1e-6)
    r = ok_run(d, "layernorm kfac trace", {"op": "trace", "curvature": "kfac", "seed": 1})
    if r:
        check("layernorm kfac trace: estimator (exact false)", r["exact"] is False and
              r["probes"] > 0)
    check_newton_mixed(d)
    r = ok_run(d, "layernorm kfac trace layer", {"op": "trace", "curvature": "kfac",
                                                 "blocks": "layer"})
    if r:
        check("layernorm kfac trace per layer: exact on the Linear layers only",
              [b["exact"] for b in r["blocks"]] == [True, False, True])


def check_refusals(d):
    for job, code, what in (
            ({"op": "trace", "curvature": "ggn", "options": {"fisher_type": "mc"}},
             "invalid_option", "fisher_type with ggn"),
            ({"op": "trace", "curvature": "hessian", "options": {"kfac_approx": "reduce"}},
             "invalid_option", "kfac_approx with hessian"),
            ({"op": "trace", "curvature": "kflr", "options": {"fisher_type": "mc"}},
             "invalid_option", "kflr with fisher_type mc"),
            ({"op": "eigen", "curvature": "kfac", "options": {"method": "gram"}},
             "invalid_curvature", "eigen gram on kfac"),
            ({"op": "trace", "curvature": "kfac", "options": {"fisher_type": "typ2"}},
             "invalid_option", "unknown fisher_type")):
        rc, r = run(d, job)
        err = r.get("error", {})
        check(f"refused: {what}", rc != 0 and err.get("code") == code, str(r)[:200])
    rc, r = run(d, {"op": "trace", "curvature": "kfra", "options": {"fisher_type": "mc"}})
    check("refused: kfra with fisher_type mc (its recursion is the GGN's)",
          rc != 0 and r.get("error", {}).get("code") == "invalid_option", str(r)[:200])


def check_ekfac_trace(d):
    """EKFAC's values are diag(Q^T F Q) for the matching exact F (per layer, Q orthogonal):
    their sum, ekfac's exact trace, is tr(F) = the exact curvature's trace."""
    for ft, exact in (("type-2", "ggn"), ("empirical", "ef")):
        r = ok_run(d, f"ekfac/{ft} trace", curv_job("ekfac", ft, op="trace"))
        g = ok_run(d, f"{exact} dense", {"op": "dense", "curvature": exact, "seed": 4})
        if r and g:
            want = float(np.trace(np.array(g["matrix"])))
            check(f"ekfac/{ft}: exact trace = tr({exact}) (diag(Q^T F Q) exact)",
                  r.get("exact") is True and abs(r["trace"] - want) <= 1e-5 * abs(want),
                  f"{r.get('trace')} vs {want}")


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        model = mlp()
        for n in (1, 8):
            write_case(d, model, n)
            for curv, ft in (("kfac", "type-2"), ("kfac", "mc"), ("kfac", "empirical"),
                             ("kflr", None), ("kfra", None), ("ekfac", "type-2"),
                             ("ekfac", "empirical")):
                check_curvature(d, f"N={n}", model, n, curv, ft)
            if n > 1:
                check_ekfac_trace(d)
                check_newton_kron(d)
        check_refusals(d)
        check_mixed(d)
    print(f"e2e_kron: {time.time() - t0:.1f} s")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
