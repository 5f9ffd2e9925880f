"""bench_laplace.py - issue 23's speed target: a Kronecker Laplace posterior with prior
optimization (op laplace, structure kron, optimize_prior) on the bench MLP 784-512-512-10
(N = 512, CrossEntropyLoss mean) against curvd's own KFAC factor time on the same batch
(op kfac, fisher_type type-2: the factors and their eigenvalues), the ratio of the best of
--reps `curvd run` elapsed_s each (target: <= 3x).  Also the per-block prior (one per layer)
and last_layer, for the record.

Usage: python3 bench/bench_laplace.py [--curvd build/curvd] [--threads 2] [--reps 3]
"""
import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the bench models)
import bench_kfac as bk  # noqa: E402  (write_case, run_job)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvd", default="build/curvd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(1)
    model = bench.mlp_model().eval()
    x, y = torch.randn(512, 784), torch.randint(0, 10, (512,))
    jobs = {
        "kfac factors (type-2)": {"op": "kfac", "options": {"return_factors": False}},
        "laplace kron, optimize_prior": {"op": "laplace", "options": {
            "structure": "kron", "optimize_prior": True}},
        "laplace kron, per-layer prior optimized": {"op": "laplace", "options": {
            "structure": "kron", "optimize_prior": True, "prior_precision": [1.0, 1.0, 1.0]}},
        "laplace last_layer (kron), optimize_prior": {"op": "laplace", "options": {
            "structure": "last_layer", "last_layer_structure": "kron",
            "optimize_prior": True}},
    }
    with tempfile.TemporaryDirectory() as d:
        bk.write_case(d, model, [784], x, y)
        times = {}
        for name, job in jobs.items():
            times[name], res = bk.run_job(a.curvd, d, job, a.threads, a.reps)
            extra = ""
            if job["op"] == "laplace":
                extra = (f"  log_marginal_likelihood {res['log_marginal_likelihood']:.6g}, "
                         f"prior_precision {res['prior_precision']}")
            print(f"{name:42} {times[name]:8.3f} s{extra}", flush=True)
    base = times["kfac factors (type-2)"]
    print(f"\nratio laplace kron + optimize_prior / kfac factors: "
          f"{times['laplace kron, optimize_prior'] / base:.2f}x (issue 23 target: <= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
