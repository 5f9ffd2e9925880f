"""bench.py - curvd vs PyTorch, side by side, as ratios (`make bench`).

For each model (an MLP 784-512-512-10 at batch 512, a DeepOBS 2c2d-like CNN at
batch 128, a tiny MLP where overheads dominate; the graph models of
clients/python/examples/graph_models.py: a pre-activation ResNet on 3x32x32 at
batch 32 and a decoder-only transformer LM, d_model 128, 4 heads, T 64, vocab
96, at 32 sequences; lmtiny, the test-size LM, for the smoke test; cifarmb, opt-in: a
CIFAR-shaped CNN on 2,000 samples, whole-set HVPs over micro-batches of 250, see
bench/bench_microbatch.py) it writes the same weights
and batch for both sides, runs build/bench_ops (curvd, in process) and
bench/bench_torch.py (Debian's torch) on the same number of cores (torch: the
faster of two thread configurations, see torch_best), and prints
a table: curvd seconds, torch seconds, speedup (torch / curvd), and curvd's
achieved GFLOP/s on the dense-layer work against the measured sgemm peak; the
estimators again as jobs through the in-process Python package (rows "<op> py",
bench/bench_inproc.py, with their ratio to bench_ops).
Usage: python3 bench/bench.py [--threads T] [--cases mlp,cnn,tiny,resnet,lm,lmtiny,cifarmb]
       [--quick]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import torchref as tr  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python", "examples"))

# GEMM FLOPs per product come from bench_ops (exact count of the engine's
# Linear/Conv2d GEMMs); the 16-vector variants do 16x the work per pass.
FLOP_OP = {"gradient": "gradient", "ggnvp": "ggnvp", "hvp": "hvp", "ggnvp16": "ggnvp",
           "hvp16": "hvp"}


# The torch op each curvd op is compared with, and the groups timed side by
# side (curvd, then torch, group after group): on a shared VM the machine's
# speed drifts over minutes, so each ratio comes from back-to-back runs.
TORCH_OP = {"hvp16": "hvp", "ggnvp16": "ggnvp", "eigen5": "power5"}
OP_GROUPS = [["gradient", "hvp", "ggnvp", "hvp16", "ggnvp16"], ["trace"], ["eigen5", "power5"],
             ["density"], ["gradient", "instr_fo", "instr_nh", "instr_tl", "instr_all"]]
# op "instruments" (issue 24; no torch counterpart): instr_fo the first-order instruments,
# instr_nh the same without gradient_histogram, instr_tl instr_fo with hessian_trace (10
# probes) and hessian_max_eigenvalue (10 Lanczos steps), instr_all every single-version
# one (instr_tl and TIC with the exact Hessian diagonal); their time over
# curvd's gradient, from the same bench_ops run, is printed as (instruments) ratios
# The estimators also timed through `import curvd` (bench_inproc.py: the job in-process
# from Python, rows "<op> py"), side by side with bench_ops in the same group.
INPROC_OPS = ("trace", "eigen5", "density")


def best_into(acc, r):
    """Merges run r into acc keeping the smaller time per key (other values: r's)."""
    for k, v in r.items():
        if not (isinstance(v, float) and k in acc and acc[k] <= v):
            acc[k] = v


def mlp_model():
    """The bench MLP 784-512-512-10 (ReLU; CrossEntropyLoss), weights from torch's RNG."""
    return torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 10))


def cnn_model():
    """The bench CNN (DeepOBS 2c2d-like, 1x28x28 inputs; CrossEntropyLoss)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(3136, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10))


def make_cases(names, quick):
    torch.manual_seed(0)
    cases = {}
    if "mlp" in names:
        n = 128 if quick else 512
        m = mlp_model()
        cases["mlp"] = (m, torch.nn.CrossEntropyLoss(), torch.randn(n, 784),
                        torch.randint(0, 10, (n,)), [784])
    if "cnn" in names:
        n = 32 if quick else 128
        m = cnn_model()
        cases["cnn"] = (m, torch.nn.CrossEntropyLoss(), torch.randn(n, 1, 28, 28),
                        torch.randint(0, 10, (n,)), [1, 28, 28])
    if "tiny" in names:
        m = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3))
        cases["tiny"] = (m, torch.nn.CrossEntropyLoss(), torch.randn(32, 10),
                         torch.randint(0, 3, (32,)), [10])
    if any(n in names for n in GRAPH_CASES):
        cases.update(graph_cases(names, quick))
    return cases


# Graph models (issue 19), exported with curvd_client.torch_export in the graph
# form; the 6th tuple entry is the loss's class_dim (-1: [N, T, C] logits).
GRAPH_CASES = ("resnet", "lm", "lmtiny")


def graph_cases(names, quick):
    import graph_models as gm
    cases = {}
    if "resnet" in names:
        x, y = gm.image_batch(n=8 if quick else 32, classes=gm.BENCH_RESNET["classes"])
        cases["resnet"] = (gm.preact_resnet(**gm.BENCH_RESNET), torch.nn.CrossEntropyLoss(),
                           x, y, [3, 32, 32], 1)
    for name, cfg, n in (("lm", gm.BENCH_LM, 8 if quick else gm.BENCH_LM_N),
                         ("lmtiny", gm.SMALL_LM, 4)):
        if name in names:
            x, y = gm.lm_batch(n=n, **cfg)
            cases[name] = (gm.transformer_lm(**cfg, attention="mha"),
                           torch.nn.CrossEntropyLoss(), x, y, [cfg["seq_len"]], -1)
    return cases


def write_case(d, name, case):
    """The model, weights and batch for both sides: curvd's files in d, torch's case.pt."""
    model, loss, x, y, shape = case[:5]
    class_dim = case[5] if len(case) > 5 else None
    if class_dim is None:
        tr.write_case(d, model, shape, loss, x, y)
    else:
        from curvd_client.torch_export import write_files
        write_files(d, model, loss, shape, x, y, class_dim=class_dim)
    torch.save({"model": model, "loss": loss, "x": x, "y": y, "class_dim": class_dim or 1},
               os.path.join(d, "case.pt"))


# Both sides run with OpenBLAS's idle workers parked at once instead of spinning
# (sched_yield) for ~0.1 s after each GEMM: on 2 cores the spinning worker
# competes with the other side's own threads (curvd's elementwise loops, torch's
# OpenMP pool) between GEMMs; parked, both run 5-20% faster on the CNN.  An
# OPENBLAS_THREAD_TIMEOUT already in the environment wins.
BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")}


def run_json(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, **BLAS_ENV, **(env or {})})
    if p.returncode != 0:
        raise RuntimeError(" ".join(cmd) + " failed:\n" + p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def torch_best(case, threads, reps, only, extra=()):
    """Torch's best use of `threads` cores, op by op.  Debian's torch runs its
    GEMMs in OpenBLAS, whose pool ignores torch.set_num_threads (by default
    it takes every core), so both pools are pinned to the thread budget.  On
    2 cores torch is fastest with intra-op 1 and OpenBLAS 2 (its OpenMP
    threads otherwise spin against the BLAS threads), so that configuration
    is timed too and the faster is kept: the baseline favours torch."""
    configs = [(threads, threads)] + ([(1, threads)] if threads > 1 else [])
    best = {}
    for intra, blas in configs:
        env = {"OMP_NUM_THREADS": str(intra), "OPENBLAS_NUM_THREADS": str(blas)}
        r = run_json([sys.executable, os.path.join(HERE, "bench_torch.py"), "--case", case,
                      "--threads", str(intra), "--reps", str(reps), "--only", ",".join(only),
                      *extra], env)
        for k, v in r.items():
            if isinstance(v, float) and (k not in best or v < best[k]):
                best[k] = v
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-ops", default="build/bench_ops")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cases", default="mlp,cnn,tiny")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller batches (smoke test)")
    ap.add_argument("--est-rounds", type=int, default=None,
                    help="alternating curvd/torch runs per estimator (best of each side); "
                    "default 2, 1 on the graph cases (resnet, lm: minutes of torch HVPs)")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    a = ap.parse_args()
    peak = run_json([a.bench_ops, "--sgemm", "--threads", str(a.threads)])["sgemm_gflops"]
    print(f"# curvd vs torch {torch.__version__} | {platform.processor() or platform.machine()}"
          f" | threads {a.threads} | sgemm peak {peak:.1f} GFLOP/s | torch: OpenBLAS {a.threads}, "
          + (f"best of intra-op {a.threads} and 1" if a.threads > 1 else "intra-op 1")
          + f" | both: OPENBLAS_THREAD_TIMEOUT={BLAS_ENV['OPENBLAS_THREAD_TIMEOUT']}")
    print(f"{'model':6} {'op':9} {'curvd s':>10} {'torch s':>10} {'speedup':>8} "
          f"{'GFLOP/s':>8} {'%peak':>6}")
    rows = []
    if "cifarmb" in a.cases.split(","):
        rows += microbatch_case(a)
    for name, case in make_cases(a.cases.split(","), a.quick).items():
        with tempfile.TemporaryDirectory() as d:
            write_case(d, name, case)
            cv, th, py = {}, {}, {}
            graph = name in GRAPH_CASES
            est_rounds = a.est_rounds or (1 if graph else 2)
            for group in OP_GROUPS:  # side by side per group: the VM's speed drifts
                first = group == OP_GROUPS[0]
                for _ in range(1 if first else est_rounds):  # alternate, keep each best
                    best_into(cv, run_json([a.bench_ops, "--arch", f"{d}/arch.json",
                                            "--params", f"{d}/params.safetensors", "--data",
                                            f"{d}/data.safetensors", "--threads",
                                            str(a.threads), "--reps", str(a.reps), "--only",
                                            ",".join(group)]))
                    best_into(th, torch_best(f"{d}/case.pt", a.threads, a.reps,
                                             sorted({TORCH_OP.get(op, op) for op in group})))
                    if group[0] in INPROC_OPS and name not in GRAPH_CASES:
                        best_into(py, {"py_" + k: v for k, v in run_json(
                            [sys.executable, os.path.join(HERE, "bench_inproc.py"), "--case", d,
                             "--threads", str(a.threads), "--reps", str(a.reps), "--only",
                             ",".join(o for o in group if o in INPROC_OPS)]).items()})
                print(f"# {name} " + " ".join(
                    f"{op} {cv.get(op, float('nan')):.4g}/{th.get(TORCH_OP.get(op, op), float('nan')):.4g}"
                    for op in group) + " (curvd/torch s)", file=sys.stderr, flush=True)
        for op in ["gradient", "hvp", "ggnvp", "hvp16", "ggnvp16", "trace", "eigen5",
                   "power5", "density", "instr_fo", "instr_nh", "instr_tl", "instr_all"]:
            if op not in cv:
                continue
            ref = TORCH_OP.get(op, op)
            t_c, t_t = cv[op], th.get(ref)
            gf = pct = ""
            if op in FLOP_OP:
                g = cv["flops"][FLOP_OP[op]] / t_c * 1e-9
                gf, pct = f"{g:8.1f}", f"{100 * g / peak:5.0f}%"
            sp = f"{t_t / t_c:7.1f}x" if t_t else "       -"
            label = op + ("*" if ref != op else "")
            print(f"{name:6} {label:9} {t_c:10.4g} {t_t if t_t else float('nan'):10.4g} {sp:>8} "
                  f"{gf:>8} {pct:>6}")
            rows.append({"model": name, "op": label, "curvd_s": t_c, "torch_s": t_t,
                         "gflops": gf.strip(), "pct": pct.strip()})
            if "py_" + op in py:
                t_p = py["py_" + op]
                sp = f"{t_t / t_p:7.1f}x" if t_t else "       -"
                per = (t_p / py.get("py_" + op + "_matvecs", 1)) / \
                    (t_c / cv.get(op + "_matvecs", 1)) if cv.get(op + "_matvecs") else t_p / t_c
                print(f"{name:6} {op + ' py':9} {t_p:10.4g} {t_t if t_t else float('nan'):10.4g} "
                      f"{sp:>8} {'':>8} {'':>6}   (in-process Python / bench_ops: "
                      f"{t_p / t_c:.2f}, per matvec {per:.2f})")
                rows.append({"model": name, "op": op + " (py)", "curvd_s": t_p, "torch_s": t_t,
                             "gflops": "", "pct": ""})
        print(f"{name:6} {'(ratios)':9} hvp/grad {cv['hvp'] / cv['gradient']:.2f}  "
              f"ggnvp/grad {cv['ggnvp'] / cv['gradient']:.2f}  "
              f"matvecs: trace {cv.get('trace_matvecs')} eigen5 {cv.get('eigen5_matvecs')} "
              f"power5 {cv.get('power5_matvecs')} density {cv.get('density_matvecs')}"
              f" (reorthogonalized {cv.get('density_reorths')})")
        if all(k in cv for k in ("instr_fo", "instr_nh", "instr_tl", "instr_all")):
            g = cv["gradient"]
            print(f"{name:6} {'(instruments)':9} first-order/grad {cv['instr_fo'] / g:.2f} (target"
                  f" <= 2; without the histogram {cv['instr_nh'] / g:.2f})  + trace and lambda_max"
                  f"/grad {cv['instr_tl'] / g:.2f} (target <= 25)  all/grad {cv['instr_all'] / g:.2f}")
    print("# * hvp16/ggnvp16: 16 vectors per pass, time per vector, vs torch's single-vector"
          " product; eigen5: curvd Lanczos (tol 1e-3) vs torch power iteration (PyHessian)")
    if a.markdown:
        write_markdown(a.markdown, rows, a.threads, peak)
    return 0


def microbatch_case(a):
    """The cifarmb rows (bench/bench_microbatch.py): curvd micro-batched with recomputation
    (hvp-mb) and cached (hvp-cache) against torch looping over the same micro-batches."""
    import bench_microbatch as bm
    curvd = os.path.join(os.path.dirname(a.bench_ops), "curvd")
    n, mb = (500, 125) if a.quick else (2000, 250)
    rows, summary = bm.run(curvd, a.threads, n, mb, reps=1)
    for r in rows:
        print(f"{r['model']:6} {r['op']:9} {r['curvd_s']:10.4g} {r['torch_s']:10.4g} "
              f"{r['torch_s'] / r['curvd_s']:7.1f}x {'':>8} {'':>6}")
        r.update(gflops="", pct="")
    print(f"{'cifarmb':6} (ratios)  {summary}", flush=True)
    return rows


def write_markdown(path, rows, threads, peak):
    """The table for bench/README.md: one row per (model, op), ratios from this run."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"{cpu}, {threads} threads, torch {torch.__version__}, "
             f"measured sgemm peak {peak:.0f} GFLOP/s, both sides with "
             f"OPENBLAS_THREAD_TIMEOUT={BLAS_ENV['OPENBLAS_THREAD_TIMEOUT']}.", "",
             "| model | op | curvd s | torch s | speed-up | GFLOP/s | % sgemm peak |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['torch_s'] / r['curvd_s']:.1f}x" if r["torch_s"] else "-"
        ts = f"{r['torch_s']:.4g}" if r["torch_s"] else "-"
        lines.append(f"| {r['model']} | {r['op']} | {r['curvd_s']:.4g} | {ts} | {sp} | "
                     f"{r['gflops'] or '-'} | {r['pct'] or '-'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
