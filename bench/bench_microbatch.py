"""bench_microbatch.py - whole-dataset Hessian-vector products over micro-batches (issue 20):
curvd with a memory budget that forces recomputation, curvd with every micro-batch cached,
and PyTorch looping over the same micro-batches with double-backward HVPs.

The model is a CIFAR-shaped CNN (Conv 3->64 5x5 pad 2, ReLU, MaxPool 2, Conv 64->96 5x5
pad 2, ReLU, MaxPool 2, Flatten, Linear 6144->512, ReLU, Linear 512->256, ReLU,
Linear 256->10; CrossEntropyLoss; 3.3M parameters) on N random 3x32x32 samples (default
2,000 in micro-batches of 250).  curvd's time per product comes from two `curvd run` jobs
of power iteration (k 1, tol 0: one Hessian-vector product per iteration) with 1 and 5
iterations: the difference of their elapsed_s over the difference of their matvecs, so the
job's set-up (loading, the first forward pass) is not counted.  Both jobs set
"micro_batch"; the cached run has a --job-memory large enough for every micro-batch's forward
state (cached_micro_batches = micro_batches, checked), the budgeted run halfway between the
cached run's peak_memory_bytes and the job's minimum (the one its job_memory refusal names)
(cached_micro_batches < micro_batches, checked).  The two runs'
eigenvalue estimates are compared (float32 summation order only).  PyTorch
(bench/bench_torch.py, op hvpmb) does what PyHessian's data-loader mode does: per product and
per micro-batch a forward pass, the gradient with create_graph, and the double-backward
product, summed with weights n_b / N; same threads (bench.py's torch_best: the faster of two
thread configurations).

Usage: python3 bench/bench_microbatch.py [--curvd build/curvd] [--threads T] [--n 2000]
       [--micro-batch 250] [--quick]      (or through bench.py: --cases cifarmb)
Imported by bench/dataset_scale.py for the model and the data files.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402

MB_FIELDS = ("micro_batches", "micro_batch_size", "cached_micro_batches", "peak_memory_bytes")


def cifar_cnn(seed=0):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 96, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6144, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10)).eval()


def cifar_data(n, seed=1):
    """n random CIFAR-shaped samples (N(0, 1) pixels) and labels, fixed by seed; the first
    m of cifar_data(n) are cifar_data(m)'s (drawn in chunks), so a slice is reproducible."""
    xs, ys = [], []
    for i in range(0, n, 1000):
        gx = torch.Generator().manual_seed(seed * 1000003 + 2 * (i // 1000))
        gy = torch.Generator().manual_seed(seed * 1000003 + 2 * (i // 1000) + 1)
        k = min(1000, n - i)
        xs.append(torch.randn(k, 3, 32, 32, generator=gx))
        ys.append(torch.randint(0, 10, (k,), generator=gy))
    return torch.cat(xs), torch.cat(ys)


def write_model(d, model):
    arch, params = export_model(model, torch.nn.CrossEntropyLoss(), [3, 32, 32])
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(params)


def write_data(path, x, y):
    with open(path, "wb") as f:
        f.write(export_dataset(x, y))


class JobError(RuntimeError):
    """`curvd run` failed; .error: its parsed JSON error (or {})."""

    def __init__(self, msg, error):
        super().__init__(msg)
        self.error = error


def curvd_run(curvd, d, job, budget=None, threads=1, data="data.safetensors"):
    """`curvd run` of job on d's files (data: a file name in d or a path): the parsed
    result; JobError on failure."""
    cmd = [curvd, "run", "--arch", os.path.join(d, "arch.json"),
           "--params", os.path.join(d, "params.safetensors"),
           "--data", os.path.join(d, data), "--job", "-", "--blas-threads", str(threads)]
    if budget is not None:
        cmd += ["--job-memory", str(budget)]
    p = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True)
    if p.returncode != 0:
        try:
            err = json.loads(p.stderr)
        except json.JSONDecodeError:
            err = {}
        raise JobError(" ".join(cmd) + " failed: " + p.stderr[-2000:], err)
    return json.loads(p.stdout)


def product_time(curvd, d, micro_batch, budget, threads, iters=(1, 5)):
    """Seconds per whole-set Hessian-vector product from two power-iteration jobs; also
    the longer job's result (micro-batch fields, eigenvalue)."""
    res = []
    for it in iters:
        res.append(curvd_run(curvd, d, power_job(micro_batch, it), budget, threads))
    dm = res[1]["matvecs"] - res[0]["matvecs"]
    return (res[1]["elapsed_s"] - res[0]["elapsed_s"]) / dm, res[1]


def power_job(micro_batch, iters):
    return {"op": "eigen", "curvature": "hessian", "seed": 0, "micro_batch": micro_batch,
            "options": {"method": "power", "k": 1, "max_iter": iters, "tol": 0}}


def recompute_budget(curvd, d, job, peak, threads, data="data.safetensors"):
    """A --job-memory halfway between the job's minimum (named by its job_memory refusal at
    --job-memory 1) and the cached run's peak: about half the micro-batches kept."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from e2e_microbatch import needed_bytes  # noqa: E402
    try:
        curvd_run(curvd, d, job, 1, threads, data)
        raise RuntimeError("no job_memory refusal at --job-memory 1")
    except JobError as e:
        need = needed_bytes(e.error)
    if need is None:
        raise RuntimeError("no minimum in the job_memory refusal at --job-memory 1")
    return (need + max(need, peak)) // 2


def torch_time(case_pt, threads, micro_batch, reps):
    """PyTorch's best seconds per whole-set HVP over micro-batches (bench.py's torch_best)."""
    sys.path.insert(0, HERE)
    import bench  # noqa: E402  (bench.py imports this module only inside a function)
    return bench.torch_best(case_pt, threads, reps, ["hvpmb"],
                            extra=["--micro-batch", str(micro_batch)])["hvpmb"]


def run(curvd, threads, n, micro_batch, reps=1, log=sys.stderr):
    """The rows of the case: dicts with model, op, curvd_s, torch_s, and a summary line."""
    model = cifar_cnn()
    x, y = cifar_data(n)
    with tempfile.TemporaryDirectory() as d:
        write_model(d, model)
        write_data(os.path.join(d, "data.safetensors"), x, y)
        torch.save({"model": model, "loss": torch.nn.CrossEntropyLoss(), "x": x, "y": y,
                    "class_dim": 1}, os.path.join(d, "case.pt"))
        t_cached, r_cached = product_time(curvd, d, micro_batch, "64G", threads)
        mbs = r_cached["micro_batches"]
        if r_cached["cached_micro_batches"] != mbs:
            raise RuntimeError("the cached run recomputes: %s" %
                               {k: r_cached[k] for k in MB_FIELDS})
        budget = recompute_budget(curvd, d, power_job(micro_batch, 1),
                                  r_cached["peak_memory_bytes"], threads)
        t_mb, r_mb = product_time(curvd, d, micro_batch, budget, threads)
        if r_mb["cached_micro_batches"] >= mbs:
            raise RuntimeError("half the cached peak still caches every micro-batch: %s" %
                               {k: r_mb[k] for k in MB_FIELDS})
        print(f"# cifarmb curvd: cached {t_cached:.4g} s/product, budget {budget} B "
              f"{t_mb:.4g} s/product", file=log, flush=True)
        t_torch = torch_time(os.path.join(d, "case.pt"), threads, micro_batch, reps)
    lam_c, lam_b = r_cached["eigenvalues"][0], r_mb["eigenvalues"][0]
    rows = [{"model": "cifarmb", "op": "hvp-mb", "curvd_s": t_mb, "torch_s": t_torch},
            {"model": "cifarmb", "op": "hvp-cache", "curvd_s": t_cached, "torch_s": t_torch}]
    summary = (f"N {n}, micro-batches {mbs} of {micro_batch}; budget {budget} B caches "
               f"{r_mb['cached_micro_batches']}/{mbs} (peak {r_mb['peak_memory_bytes']} B; "
               f"cached run peak {r_cached['peak_memory_bytes']} B); "
               f"recompute/cached {t_mb / t_cached:.2f}; power-iteration estimate "
               f"rel. diff {abs(lam_b - lam_c) / max(abs(lam_c), 1e-30):.1e}")
    return rows, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvd", default=os.path.join(HERE, "..", "build", "curvd"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--micro-batch", type=int, default=250)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="N 500 in micro-batches of 125")
    a = ap.parse_args()
    n, mb = (500, 125) if a.quick else (a.n, a.micro_batch)
    rows, summary = run(a.curvd, a.threads, n, mb, a.reps)
    print(f"{'model':8} {'op':9} {'curvd s':>10} {'torch s':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:8} {r['op']:9} {r['curvd_s']:10.4g} {r['torch_s']:10.4g} "
              f"{r['torch_s'] / r['curvd_s']:7.1f}x")
    print("# " + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
