"""e2e_solvers.py - solve methods lsmr and neumann (issue 26) against numpy's dense solves.

Usage: /usr/bin/python3 tests/e2e_solvers.py build/curvd
On a Tanh MLP (D = 111, CrossEntropyLoss mean, N = 12) with torch's dense GGN and Hessian
(float64): lsmr solves (H + 0.05 I) x = g (indefinite) and (G + 0.01 I) x = g like
numpy.linalg.solve (1e-4 relative: float32 products); neumann with scale 1/(lambda_max +
damping) and enough terms equals the solve, with few terms equals the truncated series
s sum_k (I - s M)^k g formed densely; the reported residual is the true one; refusals:
scale with method cg (400 invalid_option), a scale that makes the series diverge (400
diverges, field options.scale); newton methods lsmr and neumann give -(G + 0.05 I)^-1 g and its
predicted change; three right-hand sides in one job (rhs of 3 x D numbers: CG in lockstep,
and block CG on related ones: fewer matvecs)
each equal to numpy's solve.  Ends with 'N passed, M failed'.
"""
import copy
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main():
    model, x, y = tr.make_mlp_case(torch.nn.Tanh, torch.nn.CrossEntropyLoss(), n=12)
    lf = torch.nn.CrossEntropyLoss()
    m64 = copy.deepcopy(model).double()
    H = np.asarray(tr.dense_hessian(m64, lf, x.double(), y))
    G = np.asarray(tr.dense_ggn(m64, lf, x.double(), y))
    g = tr.gradient(m64, lf, x.double(), y).numpy()
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [x.shape[1]], lf, x, y)
        for name, A, damp in (("hessian", H, 0.05), ("ggn", G, 0.01)):
            M = A + damp * np.eye(len(A))
            want = np.linalg.solve(M, g)
            r = tr.run(d, {"op": "solve", "curvature": name,
                           "options": {"method": "lsmr", "damping": damp, "tol": 1e-9,
                                       "max_iter": 2000}})
            check(f"solve lsmr {name} + {damp} I = numpy.linalg.solve", r["converged"] and
                  rel(r["solution"], want) < 1e-4 and r["method"] == "lsmr",
                  f"rel {rel(r['solution'], want):.2e} residual {r['residual']:.2e}")
            true = np.linalg.norm(g - M @ np.asarray(r["solution"])) / np.linalg.norm(g)
            check(f"solve lsmr {name}: residual is the true one", abs(true - r["residual"]) <
                  1e-5 + 1e-3 * true, f"{true} vs {r['residual']}")
        lam = np.linalg.eigvalsh(G)
        M = G + 0.05 * np.eye(len(G))
        s = 1.0 / (lam[-1] + 0.05)
        r = tr.run(d, {"op": "solve", "curvature": "ggn",
                       "options": {"method": "neumann", "damping": 0.05, "scale": s,
                                   "num_terms": 3}})
        t, acc = g.copy(), np.zeros_like(g)
        for _ in range(4):
            acc += s * t
            t = t - s * (M @ t)
        check("solve neumann, 3 terms = s sum_k (I - s M)^k g", rel(r["solution"], acc) < 1e-5 and
              r["iterations"] == 3, f"{rel(r['solution'], acc):.2e}")
        k = int(np.ceil(np.log(1e-8) / np.log(1 - s * (lam[0] + 0.05)))) + 5
        r = tr.run(d, {"op": "solve", "curvature": "ggn",
                       "options": {"method": "neumann", "damping": 0.05, "scale": s,
                                   "num_terms": min(k, 100000), "tol": 1e-5}})
        want = np.linalg.solve(M, g)
        check(f"solve neumann, {k} terms = numpy.linalg.solve", rel(r["solution"], want) < 1e-4
              and r["converged"], f"{rel(r['solution'], want):.2e} {r['residual']:.2e}")
        for meth, extra in (("lsmr", {"tol": 1e-9, "max_iter": 2000}),
                            ("neumann", {"scale": s, "num_terms": min(k, 100000)})):
            r = tr.run(d, {"op": "newton", "curvature": "ggn",
                           "options": dict(extra, method=meth, damping=0.05)})
            step = -np.linalg.solve(M, g)
            pred = g @ step + 0.5 * step @ G @ step
            check(f"newton {meth} = -(G + 0.05 I)^-1 g, predicted change", r["method"] == meth
                  and rel(r["step"], step) < 1e-4 and abs(r["predicted_change"] - pred) <
                  1e-4 * abs(pred), f"{rel(r['step'], step):.2e} {r['predicted_change']} {pred}")
        R = np.random.default_rng(6).standard_normal((3, len(G)))
        r = tr.run(d, {"op": "solve", "curvature": "ggn",
                       "options": {"damping": 0.05, "tol": 1e-9, "rhs": R.ravel().tolist()}})
        want = np.linalg.solve(M, R.T).T
        check("solve cg with 3 right-hand sides (lockstep): each = numpy.linalg.solve",
              len(r.get("solutions", [])) == 3 and all(
                  rel(s_, w_) < 1e-4 for s_, w_ in zip(r["solutions"], want)) and
              r["converged"] and len(r["residuals"]) == 3 and
              r["iterations"] == max(r["iterations_per_rhs"]), str(r.get("residuals")))
        lock = r
        # related right-hand sides (b2 = b0 + b1): block CG shares one Krylov space
        R[2] = R[0] + R[1]
        r = tr.run(d, {"op": "solve", "curvature": "ggn",
                       "options": {"method": "block_cg", "damping": 0.05, "tol": 1e-9,
                                   "rhs": R.ravel().tolist()}})
        want = np.linalg.solve(M, R.T).T
        check("solve block_cg with 3 related right-hand sides: each = numpy.linalg.solve",
              r.get("method") == "block_cg" and len(r.get("solutions", [])) == 3 and all(
                  rel(s_, w_) < 1e-4 for s_, w_ in zip(r["solutions"], want)) and
              r["converged"] and all(x < 1e-5 for x in r["residuals"]),
              f"{r.get('residuals')} {r.get('iterations_per_rhs')}")
        check("block_cg: fewer matvecs than CG in lockstep (dependent columns dropped)",
              r["matvecs"] < lock["matvecs"], f"{r['matvecs']} vs {lock['matvecs']}")
        rc, r = tr.curvd_run(CURVD, d, {"op": "solve", "curvature": "ggn",
                                        "options": {"rhs": [1.0] * (len(G) + 1)}},
                             expect_ok=False)
        check("rhs of D + 1 numbers: refused at bind (options.rhs)", rc != 0 and
              r.get("error", {}).get("field") == "options.rhs", str(r)[:200])
        rc, r = tr.curvd_run(CURVD, d, {"op": "solve", "curvature": "ggn",
                                        "options": {"method": "cg", "damping": 0.1,
                                                    "scale": 0.5}}, expect_ok=False)
        check("scale with method cg: refused (invalid_option naming neumann)", rc != 0 and
              r.get("error", {}).get("code") == "invalid_option" and
              "neumann" in r["error"].get("message", ""), str(r)[:200])
        rc, r = tr.curvd_run(CURVD, d, {"op": "solve", "curvature": "ggn",
                                        "options": {"method": "neumann", "damping": 0.05,
                                                    "scale": 10 * s, "num_terms": 500}},
                             expect_ok=False)
        check("a diverging Neumann series: 400 diverges", rc != 0 and r.get("error", {}).get(
            "code") == "diverges" and r["error"].get("field") == "options.scale", str(r)[:300])
    return summary()


if __name__ == "__main__":
    sys.exit(main())
