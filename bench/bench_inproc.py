"""bench_inproc.py - the "in-process Python" column of bench.py (issue 25): the estimator
jobs bench_ops times (trace: Hutchinson 100 probes, eigen5: Lanczos top-5 at tol 1e-3,
density: SLQ 100 steps), run through `import curvd` (libcurvd.so via ctypes) on the same
files, timed as the Python call's wall time (job parse, forward pass, estimator, result
JSON, ctypes), best of --reps.  Prints one JSON line {op: seconds, op_matvecs: count}
(bench_ops draws its probes and Lanczos start from the stream these seed-0 jobs use, so
both sides do the same products; bench.py also prints the ratio per matvec).

Usage: python3 bench/bench_inproc.py --case DIR --threads T [--reps 3] [--only trace,...]
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))

JOBS = {
    "trace": {"op": "trace", "seed": 0, "options": {"max_probes": 100, "tol": 0}},
    "eigen5": {"op": "eigen", "seed": 0, "options": {"k": 5, "tol": 1e-3}},
    "density": {"op": "density", "seed": 0, "options": {"lanczos_steps": 100, "runs": 1}},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=",".join(JOBS))
    a = ap.parse_args()
    import curvd
    curvd.set_blas_threads(a.threads)
    with open(os.path.join(a.case, "arch.json")) as f:
        arch = json.load(f)
    with open(os.path.join(a.case, "params.safetensors"), "rb") as f:
        model = curvd.Model(arch, f.read())
    with open(os.path.join(a.case, "data.safetensors"), "rb") as f:
        data = curvd.Data.from_safetensors(f.read())
    out = {}
    for name in a.only.split(","):
        job = dict(JOBS[name], curvature="hessian")
        for _ in range(a.reps):
            t0 = time.perf_counter()
            res = curvd.run(model, data, job)
            dt = time.perf_counter() - t0
            out[name] = min(out.get(name, dt), dt)
            out[name + "_matvecs"] = res["matvecs"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
