"""bench_xtrace.py - variance per matvec of the trace estimators (issue 26): Hutchinson,
Hutch++, XTrace and (PSD curvatures) XNysTrace at the same matvec budget on the bench MLP
784-512-512-10 (CrossEntropyLoss mean), GGN and Hessian, over --seeds seeds each through
`curvd run`: the spread (std over seeds) of each method's estimate, its mean, the mean of
its own stderr, and the variance ratio to Hutchinson's.  Not a timing benchmark.

Usage: python3 bench/bench_xtrace.py [--curvd build/curvd] [--n 256] [--seeds 8]
       [--budget 100] [--threads 2]
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import torchref as tr  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvd", default="build/curvd")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    x, y = torch.randn(a.n, 784), torch.randint(0, 10, (a.n,))
    print(f"| curvature | method | mean | std over {a.seeds} seeds | mean stderr | "
          f"variance / Hutchinson's |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        tr.write_case(d, model, [784], torch.nn.CrossEntropyLoss(), x, y)
        for curv in ("ggn", "hessian"):
            methods = ["hutchinson", "hutch++", "xtrace"] + (["xnystrace"] if curv == "ggn"
                                                              else [])
            base = None
            for m in methods:
                est, se = [], []
                for s in range(a.seeds):
                    opts = {"method": m, "max_probes": a.budget}
                    if m == "hutchinson":
                        opts["tol"] = 0
                    _, r = tr.curvd_run(a.curvd, d, {"op": "trace", "curvature": curv,
                                                     "seed": s, "options": opts},
                                        extra=("--blas-threads", str(a.threads)))
                    assert r["matvecs"] == a.budget or m == "xtrace", r
                    est.append(r["trace"])
                    se.append(r["stderr"])
                v = np.var(est, ddof=1)
                base = v if base is None else base
                print(f"| {curv} | {m} | {np.mean(est):.6g} | {np.sqrt(v):.3g} | "
                      f"{np.mean(se):.3g} | {v / base:.3g} |", flush=True)


if __name__ == "__main__":
    main()
