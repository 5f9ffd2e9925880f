"""bench_diag.py - the exact diagonal by backpropagation (issue 26 item 1): curvd's op
"diag" with method "exact" (backprop: true) against curvd's own op "gradient" on the same
batch (the issue's targets: GGN diagonal <= (C + 2) x the gradient's time, Hessian
diagonal <= 2 (C + 2) x), and against a PyTorch implementation of the same
backpropagation (BackPACK's DiagGGNExact the hook way: forward hooks for the layer inputs
and outputs, torch.autograd.grad for the output cotangents without parameter gradients,
one backward pass per column of the loss Hessian's square root S_n = diag(sqrt p) -
p sqrt(p)^T (times sqrt(1/N) for the mean), then per Linear layer
diag_W = (sum_j g_j.^2)^T (x.^2) and diag_b = sum (sum_j g_j.^2); ef: one backward pass of
the summed loss, squared per-sample gradients (sum of losses, times 1/N); hessian: the
MLP's activations are ReLU (phi'' = 0), so its diagonal is the GGN's on both sides).

Case: bench.py's MLP 784-512-512-10 (N = 512), CrossEntropyLoss mean.  curvd: build/bench_ops
in process (ops gradient, diagggn, diagef, diaghessian: each a fresh engine, so the forward pass is
included, best of --reps), the numbers checked from a `curvd run` job; torch: best of
--reps of forward + backward passes + the squares, with torch's intra-op threads = --threads and =
1, the faster kept (as bench.py).  The diagonals must agree to 1e-4 relative (the
largest entry).  Both sides pinned to --threads BLAS threads.

Usage: python3 bench/bench_diag.py [--curvd build/curvd] [--threads 2] [--reps 3] [--n 512]
       [--curvatures ggn,ef] [--json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blas_env  # noqa: E402,F401  (before torch: its BLAS threads)
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import bench  # noqa: E402  (the bench models)
from bench_kfac import run_job, write_case  # noqa: E402


def torch_diag(model, x, y, curvature):
    """The diagonal (parameters in state_dict order) the hook way: forward hooks keep each
    Linear's input and output, torch.autograd.grad takes the output cotangents (no
    parameter gradients), one backward pass per column."""
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    acts, outs = {}, {}

    def keep(m, i, o):
        acts[m] = i[0].detach()
        outs[m] = o
    hooks = [m.register_forward_hook(keep) for m in mods]
    out = model(x)
    for h in hooks:
        h.remove()
    n, c = out.shape
    targets = [outs[m] for m in mods]
    sq = [None] * len(mods)
    if curvature in ("ggn", "hessian"):  # ReLU: phi'' = 0, the Hessian's diagonal is the GGN's
        p = torch.softmax(out.detach(), 1)
        sp = p.sqrt()
        S = (torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)) / n ** 0.5
        cols = [S[:, :, j] for j in range(c)]
    else:
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"),
                                out, retain_graph=True)[0]
        cols = [g]
    for j, col in enumerate(cols):
        gs = torch.autograd.grad(out, targets, col, retain_graph=j + 1 < len(cols))
        for q, g in enumerate(gs):
            sq[q] = g * g if sq[q] is None else sq[q] + g * g
    parts = []
    for q, m in enumerate(mods):
        s = sq[q] / n if curvature == "ef" else sq[q]
        parts += [(s.T @ (acts[m] ** 2)).reshape(-1), s.sum(0)]
    return torch.cat(parts)


def time_torch(model, x, y, curvature, reps, threads):
    """Best of reps, with torch's intra-op threads = threads and = 1 (bench.py's rule: on
    2 cores its OpenMP threads may spin against the BLAS threads), the faster kept."""
    best, res = None, None
    for t_intra in sorted({threads, 1}):
        torch.set_num_threads(t_intra)
        t, res = time_torch_once(model, x, y, curvature, reps)
        best = t if best is None else min(best, t)
    torch.set_num_threads(threads)
    return best, res


def time_torch_once(model, x, y, curvature, reps):
    best, res = None, None
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        res = torch_diag(model, x, y, curvature)
        t = time.perf_counter() - t0
        best = t if best is None else min(best, t)
    return best, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvd", default=os.path.join(HERE, "..", "build", "curvd"))
    ap.add_argument("--bench-ops", default=os.path.join(HERE, "..", "build", "bench_ops"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--curvatures", default="ggn,ef,hessian")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    torch.manual_seed(0)
    model = bench.mlp_model().eval()
    x = torch.randn(args.n, 784)
    y = torch.randint(0, 10, (args.n,))
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as d:
        write_case(d, model, [784], x, y)
        ops = ["gradient"] + ["diag" + c for c in args.curvatures.split(",")]
        t = bench.run_json([args.bench_ops, "--arch", f"{d}/arch.json", "--params",
                            f"{d}/params.safetensors", "--data", f"{d}/data.safetensors",
                            "--threads", str(args.threads), "--reps", str(args.reps),
                            "--only", ",".join(ops)])
        tg = t["gradient"]
        for curv in args.curvatures.split(","):
            job = {"op": "diag", "curvature": curv, "options": {"method": "exact"}}
            _, res = run_job(args.curvd, d, job, args.threads, 1)
            tc = t["diag" + curv]
            tt, ref = time_torch(model, x, y, curv, args.reps, args.threads)
            got = torch.tensor(res["diag"], dtype=torch.float64)
            ref = ref.double()
            diff = float((got - ref).abs().max() / ref.abs().max())
            bad += diff > 1e-4 or res.get("backprop") is not True
            rows.append({"curvature": curv, "n": args.n, "diag_s": tc, "gradient_s": tg,
                         "ratio": tc / tg, "torch_s": tt, "speedup": tt / tc,
                         "rel_diff": diff})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"MLP 784-512-512-10, C = 10, threads {args.threads}, best of {args.reps}")
        print("| curvature | N | diag exact s | gradient s | ratio | torch s | speed-up | "
              "rel. diff |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['curvature']} | {r['n']} | {r['diag_s']:.4g} | {r['gradient_s']:.4g} | "
                  f"{r['ratio']:.2f}x | {r['torch_s']:.4g} | {r['speedup']:.2f}x | "
                  f"{r['rel_diff']:.1e} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
