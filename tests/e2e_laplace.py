"""e2e_laplace.py - op "laplace" (issue 23, item 1) against torch in float64.

Usage: /usr/bin/python3 tests/e2e_laplace.py build/curvd
References: tests/laplace_ref.py (laplace-torch's conventions, torch float64).
Cases: an MLP classifier (CrossEntropyLoss mean and sum), an MLP regressor (MSELoss mean) and
a two-output Bernoulli MLP (BCEWithLogitsLoss mean, 0/1 targets):
  - every result field for full, diag and kron (kron: the Kronecker factors built in torch
    from hooks - A = mean a a^T, B = sum_n J_n^T Lam_n J_n through the square roots of the
    summed loss's output Hessians - and the dense log det of P (B (x) A) P^T + delta I);
  - lowrank against the dense top-k (scalar prior: sum log(g lam + delta) + (D - k) log delta;
    per-block prior: the dense log det of V diag(g lam) V^T + P0), last_layer (full, kron);
  - per-block prior_precision, temperature, sigma_noise;
  - optimize_prior (scalar and per block) against a grid search: the optimum within the grid
    resolution of the grid's best and its evidence >= every grid point's; optimize_sigma
    against a grid over sigma, and both together against a 2-D grid;
  - refusals (400 with the field): prior_precision <= 0, a list of the wrong length,
    sigma_noise / optimize_sigma with CE, an unknown structure, k > dim, k without lowrank.
Ends with 'N passed, M failed'.
"""
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import laplace_ref as lr  # noqa: E402
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, Daemon, check, summary  # noqa: E402

TOL = 1e-5


def laplace(d, options, expect_ok=True):
    return lr.run_op(d, "laplace", options, expect_ok)


FIELDS = ("log_marginal_likelihood", "log_likelihood", "log_det_posterior_precision",
          "log_det_prior_precision", "scatter")


def check_terms(tag, r, want, ref, deltas, structure, last=False, tol=TOL, sigma=None):
    ok, bad = True, []
    for f, w in zip(FIELDS, want[:5]):
        if not tr.close(r.get(f), w, tol, tol):
            ok = False
            bad.append(f"{f} {r.get(f)} vs {w}")
    check(f"{tag}: every evidence term", ok, "; ".join(bad))
    blocks = [len(ref.dims) - 1] if last else list(range(len(ref.dims)))
    ds = deltas * len(blocks) if len(deltas) == 1 else deltas
    rb = r.get("blocks", [])
    sc = ref.block_scatter(ds, blocks)
    ok = len(rb) == len(blocks) and all(
        e["dim"] == ref.dims[b] and tr.close(e["prior_precision"], dd, 1e-12)
        and tr.close(e["scatter"], s, tol, tol)
        and tr.close(e["log_det_prior_precision"], ref.dims[b] * math.log(dd), 1e-9, 1e-9)
        for e, b, dd, s in zip(rb, blocks, ds, sc))
    per = want[5]
    if per is not None:
        ok = ok and all(tr.close(e.get("log_det_posterior_precision"), p, tol, tol)
                        for e, p in zip(rb, per))
    check(f"{tag}: blocks (dim, prior_precision, scatter, log dets)", ok,
          str([(e.get("dim"), e.get("scatter"), e.get("log_det_posterior_precision"))
               for e in rb]) + f" vs {sc} {per}")
    pp = r.get("prior_precision")
    ok = (isinstance(pp, list) and len(deltas) > 1 and all(tr.close(a, b, 1e-12)
                                                          for a, b in zip(pp, deltas))) or \
         (len(deltas) == 1 and tr.close(pp, deltas[0], 1e-12))
    want_sigma = sigma if sigma is not None else 1.0
    check(f"{tag}: prior_precision, sigma_noise, structure echoed", ok
          and tr.close(r.get("sigma_noise"), want_sigma, 1e-12)
          and r.get("structure") == (("last_layer") if last else structure),
          f"{pp} {r.get('sigma_noise')} {r.get('structure')}")


# ---- checks ------------------------------------------------------------------------------

def check_structures(tag, d, ref, reduction_factor):
    r = laplace(d, {"structure": "full", "prior_precision": 0.5})
    check(f"{tag}: ggn_factor", tr.close(r.get("ggn_factor"), reduction_factor, 1e-12),
          f"{r.get('ggn_factor')} vs {reduction_factor}")
    check_terms(f"{tag} full", r, ref.terms("full", [0.5]), ref, [0.5], "full")
    for st in ("diag", "kron"):
        r = laplace(d, {"structure": st, "prior_precision": 0.5})
        check_terms(f"{tag} {st}", r, ref.terms(st, [0.5]), ref, [0.5], st)
    per = [0.3, 2.0, 7.0][:len(ref.dims)]
    for st in ("full", "diag", "kron"):
        r = laplace(d, {"structure": st, "prior_precision": per})
        check_terms(f"{tag} {st} per-block prior", r, ref.terms(st, per), ref, per, st)
    r = laplace(d, {"structure": "full", "prior_precision": 0.5, "temperature": 0.3})
    check_terms(f"{tag} full temperature 0.3", r, ref.terms("full", [0.5], T=0.3), ref, [0.5],
                "full")
    r = laplace(d, {"structure": "kron", "prior_precision": per, "temperature": 2.0})
    check_terms(f"{tag} kron per-block temperature 2", r, ref.terms("kron", per, T=2.0), ref,
                per, "kron")


def check_lowrank(tag, d, ref):
    k = 6
    lam = torch.linalg.eigvalsh(ref.G)
    r = laplace(d, {"structure": "lowrank", "k": k, "prior_precision": 0.7})
    top = lam.flip(0)[:k]
    check(f"{tag} lowrank: the top-k eigenvalues of G_sum", r.get("k") == k
          and tr.rel(r.get("eigenvalues"), top) < 1e-6,
          f"{r.get('eigenvalues')} vs {top.tolist()}")
    want = ref.terms("lowrank", [0.7], k=k)
    check(f"{tag} lowrank: log det = sum log(lam + delta) + (D - k) log delta",
          tr.close(r.get("log_det_posterior_precision"),
                   float(torch.log(top + 0.7).sum()) + (ref.D - k) * math.log(0.7), 1e-6, 1e-6),
          f"{r.get('log_det_posterior_precision')}")
    check_terms(f"{tag} lowrank", r, want, ref, [0.7], "lowrank", tol=1e-6)
    per = [0.3, 2.0, 7.0][:len(ref.dims)]
    r = laplace(d, {"structure": "lowrank", "k": k, "prior_precision": per})
    check_terms(f"{tag} lowrank per-block prior", r, ref.terms("lowrank", per, k=k), ref, per,
                "lowrank", tol=1e-6)


def check_last_layer(tag, d, ref):
    r = laplace(d, {"structure": "last_layer", "prior_precision": 1.5})
    check(f"{tag} last_layer: n_params is the last layer's, last_layer_structure full",
          r.get("n_params") == ref.dims[-1] and r.get("last_layer_structure") == "full",
          f"{r.get('n_params')} {r.get('last_layer_structure')}")
    check_terms(f"{tag} last_layer full", r, ref.terms("full", [1.5], last=True), ref, [1.5],
                "full", last=True)
    for inner in ("kron", "diag"):
        r = laplace(d, {"structure": "last_layer", "last_layer_structure": inner,
                        "prior_precision": 1.5})
        check_terms(f"{tag} last_layer {inner}", r, ref.terms(inner, [1.5], last=True), ref,
                    [1.5], inner, last=True)


def grid_best(f, grid):
    vals = [f(g) for g in grid]
    i = max(range(len(grid)), key=lambda j: vals[j])
    return grid[i], vals[i], max(vals)


def check_optimize_prior(tag, d, ref):
    step = 0.05
    grid = [10 ** (-4 + step * i) for i in range(int(8 / step) + 1)]
    for st in ("full", "kron", "diag"):
        r = laplace(d, {"structure": st, "optimize_prior": True})
        dopt = r.get("prior_precision")
        gbest, _, gmax = grid_best(lambda g: ref.terms(st, [g])[0], grid)
        at = ref.terms(st, [dopt])[0] if isinstance(dopt, float) else None
        check(f"{tag} {st} optimize_prior: within the grid step of the grid's best",
              at is not None and abs(math.log10(dopt) - math.log10(gbest)) <= step,
              f"{dopt} vs grid {gbest}")
        check(f"{tag} {st} optimize_prior: evidence at the optimum >= every grid point's",
              at is not None and at >= gmax - 1e-9 * abs(gmax)
              and tr.close(r.get("log_marginal_likelihood"), at, TOL, TOL),
              f"{at} vs {gmax}, reported {r.get('log_marginal_likelihood')}")
    # per block: the coordinates of the optimum are each optimal (a perturbation of
    # +-1% in any block lowers the evidence) and it beats the scalar optimum
    for st in ("diag", "kron", "full"):
        nb = len(ref.dims)
        r = laplace(d, {"structure": st, "optimize_prior": True, "prior_precision": [1.0] * nb})
        dopt = r.get("prior_precision")
        at = ref.terms(st, dopt)[0]
        worse = True
        for b in range(nb):
            for f in (0.99, 1.01):
                q = list(dopt)
                q[b] *= f
                worse = worse and ref.terms(st, q)[0] <= at + 1e-10 * abs(at)
        _, _, gmax = grid_best(lambda g: ref.terms(st, [g])[0], grid)
        check(f"{tag} {st} optimize_prior per block: a local optimum beating the scalar grid",
              worse and at >= gmax - 1e-9 * abs(gmax)
              and tr.close(r.get("log_marginal_likelihood"), at, TOL, TOL),
              f"{dopt}: {at} vs scalar grid {gmax}")


def check_sigma(tag, d, ref):
    r = laplace(d, {"structure": "full", "prior_precision": 0.5, "sigma_noise": 0.4})
    check_terms(f"{tag} full sigma_noise 0.4", r, ref.terms("full", [0.5], sigma=0.4), ref,
                [0.5], "full", sigma=0.4)
    r = laplace(d, {"structure": "kron", "prior_precision": 0.5, "sigma_noise": 2.0,
                    "temperature": 0.5})
    check_terms(f"{tag} kron sigma_noise 2 temperature 0.5", r,
                ref.terms("kron", [0.5], sigma=2.0, T=0.5), ref, [0.5], "kron", sigma=2.0)
    step = 0.02
    sgrid = [10 ** (-2 + step * i) for i in range(int(3 / step) + 1)]
    r = laplace(d, {"structure": "full", "prior_precision": 0.5, "optimize_sigma": True})
    s = r.get("sigma_noise")
    gbest, _, gmax = grid_best(lambda v: ref.terms("full", [0.5], sigma=v)[0], sgrid)
    at = ref.terms("full", [0.5], sigma=s)[0]
    check(f"{tag} optimize_sigma: within the grid step, evidence >= every grid point's",
          abs(math.log10(s) - math.log10(gbest)) <= step and at >= gmax - 1e-9 * abs(gmax)
          and tr.close(r.get("prior_precision"), 0.5, 1e-12),
          f"sigma {s} vs grid {gbest}; {at} vs {gmax}")
    r = laplace(d, {"structure": "kron", "optimize_prior": True, "optimize_sigma": True})
    s, dl = r.get("sigma_noise"), r.get("prior_precision")
    at = ref.terms("kron", [dl], sigma=s)[0]
    g2 = max(ref.terms("kron", [10 ** (-3 + 0.25 * i)], sigma=10 ** (-1.5 + 0.1 * j))[0]
             for i in range(25) for j in range(26))
    check(f"{tag} optimize_prior + optimize_sigma: evidence >= every point of a 2-D grid",
          at >= g2 - 1e-9 * abs(g2) and tr.close(r.get("log_marginal_likelihood"), at, TOL, TOL),
          f"delta {dl} sigma {s}: {at} vs grid {g2}")
    # full, one precision per block, and sigma: Newton steps on the dense posterior
    nb = len(ref.dims)
    r = laplace(d, {"structure": "full", "prior_precision": [1.0] * nb, "optimize_prior": True,
                    "optimize_sigma": True})
    s, dl = r.get("sigma_noise"), r.get("prior_precision")
    at = ref.terms("full", dl, sigma=s)[0]
    worse = True
    for c in range(nb + 1):
        for f in (0.99, 1.01):
            q, sq = list(dl), s
            if c < nb:
                q[c] *= f
            else:
                sq *= f
            worse = worse and ref.terms("full", q, sigma=sq)[0] <= at + 1e-10 * abs(at)
    g2 = max(ref.terms("full", [10 ** (-3 + 0.25 * i)], sigma=10 ** (-1.5 + 0.1 * j))[0]
             for i in range(25) for j in range(26))
    check(f"{tag} full per-block optimize_prior + optimize_sigma: a local optimum beating "
          "the 2-D grid of one precision", worse and at >= g2 - 1e-9 * abs(g2)
          and tr.close(r.get("log_marginal_likelihood"), at, TOL, TOL),
          f"delta {dl} sigma {s}: {at} vs grid {g2}")


def check_refusals(d_cls, d_reg, nblocks):
    cases = [
        (d_cls, {"prior_precision": 0}, "options.prior_precision"),
        (d_cls, {"prior_precision": -1.0}, "options.prior_precision"),
        (d_cls, {"prior_precision": [1.0, -2.0, 1.0]}, "options.prior_precision[1]"),
        (d_cls, {"prior_precision": [1.0] * (nblocks + 1)}, "options.prior_precision"),
        (d_cls, {"structure": "last_layer", "prior_precision": [1.0, 1.0]},
         "options.prior_precision"),
        (d_cls, {"sigma_noise": 0.5}, "options.sigma_noise"),
        (d_cls, {"optimize_sigma": True}, "options.optimize_sigma"),
        (d_reg, {"sigma_noise": 0}, "options.sigma_noise"),
        (d_cls, {"temperature": 0}, "options.temperature"),
        (d_cls, {"structure": "kronecker"}, "options.structure"),
        (d_cls, {"structure": "lowrank", "k": 1000}, "options.k"),
        (d_cls, {"structure": "full", "k": 3}, "options.k"),
        (d_cls, {"last_layer_structure": "diag"}, "options.last_layer_structure"),
        (d_cls, {"keep": True}, "options.keep"),
    ]
    for st in ("full", "diag"):  # D products / a D x D matrix: refused above --dense-max
        rc, r = tr.curvd_run(CURVD, d_cls, {"op": "laplace", "options": {"structure": st}},
                             expect_ok=False, extra=["--dense-max", "10"])
        err = r.get("error", {})
        check(f"refused {st} above --dense-max: too_large, options.structure", rc != 0
              and err.get("code") == "too_large" and err.get("field") == "options.structure",
              str(r)[:300])
    for d, opts, field in cases:
        rc, r = laplace(d, opts, expect_ok=False)
        err = r.get("error", {})
        check(f"refused {opts}: field {field}", rc != 0 and err.get("field") == field
              and err.get("code") in ("invalid_option", "unknown_option"),
              str(r)[:300])


def check_default_k(root):
    """lowrank without k on a 6-parameter model: k = min(10, dim) = 6 (not refused)."""
    torch.manual_seed(4)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    d = os.path.join(root, "tiny")
    os.makedirs(d)
    tr.write_case(d, m, [2], torch.nn.CrossEntropyLoss(), x, y)
    r = laplace(d, {"structure": "lowrank"})
    ref = lr.Ref(m, x, y, torch.nn.CrossEntropyLoss())
    check("lowrank without k: k = min(10, dim), the whole spectrum", r.get("k") == 6
          and tr.close(r.get("log_det_posterior_precision"), ref.terms("full", [1.0])[2], 1e-6,
                       1e-6), f"{r.get('k')} {r.get('log_det_posterior_precision')}")


def check_memory_plan(root):
    """The memory plan counts the posterior's dimension: on a 2380-parameter MLP under
    --job-memory 64M, full (3 D^2 doubles: 136 MB) is refused with job_memory at submit,
    last_layer (the last layer's 310) runs."""
    torch.manual_seed(5)
    m = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 30),
                            torch.nn.Tanh(), torch.nn.Linear(30, 10))
    x, y = torch.randn(16, 20), torch.randint(0, 10, (16,))
    d = os.path.join(root, "wide")
    os.makedirs(d)
    tr.write_case(d, m, [20], torch.nn.CrossEntropyLoss(), x, y)
    lim = ["--job-memory", "64M"]
    rc, r = tr.curvd_run(CURVD, d, {"op": "laplace", "options": {"structure": "full"}},
                         expect_ok=False, extra=lim)
    check("full beyond --job-memory: refused with job_memory", rc != 0
          and r.get("error", {}).get("code") == "job_memory", str(r)[:300])
    rc, r = tr.curvd_run(CURVD, d, {"op": "laplace", "options": {"structure": "last_layer"}},
                         expect_ok=False, extra=lim)
    check("last_layer under the same --job-memory: runs on the last layer's 310", rc == 0
          and r.get("n_params") == 310, str(r)[:300])


def check_service():
    """Under curvd serve (demo-mlp on digits, CE mean): the model checks refuse at submit
    (400, before queueing), and a job runs."""
    m = {"op": "laplace", "model": "demo-mlp", "dataset": "digits",
         "batch": {"offset": 0, "size": 64}}
    with Daemon() as dmn:
        for opts, field in (({"prior_precision": [1, 2, 3]}, "options.prior_precision"),
                            ({"sigma_noise": 0.5}, "options.sigma_noise"),
                            ({"structure": "lowrank", "k": 100000}, "options.k")):
            st, r = lr.post(dmn.url, dict(m, options=opts))
            check(f"service: {opts} refused at submit with 400 {field}", st == 400
                  and r.get("error", {}).get("field") == field, f"{st} {r}")
        st, r = lr.post(dmn.url, dict(m, options={"structure": "kron", "optimize_prior": True}))
        res = r.get("result", {})
        check("service: a kron job with optimize_prior succeeds", st in (200, 201)
              and r.get("status") == "succeeded" and res.get("prior_precision", 0) > 0
              and len(res.get("blocks", [])) == 2, f"{st} {str(r)[:300]}")


def main():
    with tempfile.TemporaryDirectory() as root:
        dirs = {}
        for name, (m, x, y, loss) in (("mean", lr.classifier("mean")),
                                      ("sum", lr.classifier("sum")),
                                      ("reg", lr.regressor()), ("bce", lr.bernoulli())):
            d = os.path.join(root, name)
            os.makedirs(d)
            tr.write_case(d, m, list(x.shape[1:]), loss, x, y)
            # ggn_factor = kappa / c: CE mean N, MSE mean N C / 2, BCE mean N C, sum 1
            fac = {"mean": x.shape[0], "sum": 1, "reg": 0.5 * y.numel(), "bce": y.numel()}
            dirs[name] = (d, lr.Ref(m, x, y, loss), x.shape[0], fac[name])
        for name in ("mean", "sum", "reg", "bce"):
            d, ref, N, fac = dirs[name]
            tag = {"mean": "CE mean", "sum": "CE sum", "reg": "MSE mean", "bce": "BCE mean"}[name]
            check_structures(tag, d, ref, fac)
            check_lowrank(tag, d, ref)
            check_last_layer(tag, d, ref)
        check_optimize_prior("CE mean", dirs["mean"][0], dirs["mean"][1])
        check_optimize_prior("MSE mean", dirs["reg"][0], dirs["reg"][1])
        check_sigma("MSE mean", dirs["reg"][0], dirs["reg"][1])
        check_refusals(dirs["mean"][0], dirs["reg"][0], len(dirs["mean"][1].dims))
        check_default_k(root)
        check_memory_plan(root)
    check_service()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
