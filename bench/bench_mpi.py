"""bench_mpi.py - data-parallel jobs over MPI ranks (issue 21): speed-up of `curvd run` under
`mpirun -np R` against the plain single-process run, and a scaling model from the measured
numbers (`make bench-mpi`).

Cases: the bench MLP 784-512-512-10 (bench.py's mlp_model) on N = 4096 synthetic samples and
the bench CNN (bench.py's cnn_model, 2c2d-like, 1x28x28) on N = 128; CrossEntropyLoss.  The
timed job is the Hutchinson trace of the GGN with exactly 100 Rademacher probes (tol 0),
run as `mpirun --oversubscribe --allow-run-as-root -np R build/curvd run ... --blas-threads 1`
for each R of --ranks (R = 1 loads no MPI: the plain run).  Each repetition runs every R
back to back (the VM's speed drifts); per R the best elapsed_s (the job's time, without
start-up and file loading) and the best wall time of the whole mpirun command are kept.
The traces must agree to 1e-6 (relative) between rank counts.

Scaling model (per matvec, printed after the measurements):
  T(R) = t_comp(N/R) + t_comm(R)
  t_comp(n) = a + b n          a, b from the np-1 trace at N and at N/2 samples (elapsed_s /
                               matvecs): a is the per-probe work on D-vectors that every rank
                               repeats, b the per-sample work that splits over ranks
  t_comm(R) = c (2(R-1) alpha) + m (2(R-1)/R) / beta
                               ring allreduce; c collectives and m bytes per matvec as the
                               np-2 trace run counted them (communication.collectives/bytes
                               over matvecs)
alpha (latency) and beta (bandwidth) on this machine come from two np-2 runs with very
different buffer sizes: the trace (quadratic forms: 8 bytes per probe) and a GGN power
iteration (each product an allreduce of D doubles); at R = 2 a run's communication.seconds
is 2 alpha collectives + bytes / beta, two equations for two unknowns.  communication.seconds
includes the time a rank waits for the other, so the fitted alpha also holds the ranks'
imbalance.  Multi-node rows use assumed networks (NETWORKS).  Predicted speed-up:
t_comp(N) / T(R).

Usage: python3 bench/bench_mpi.py [--curvd build/curvd] [--ranks 1,2] [--cases mlp,cnn]
       [--reps 1] [--mlp-n 4096] [--cnn-n 128] [--json]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import bench  # noqa: E402  (the bench models)
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402

PROBES = 100
TRACE_JOB = {"op": "trace", "curvature": "ggn", "seed": 0,
             "options": {"method": "hutchinson", "max_probes": PROBES, "tol": 0}}
# Products (one allreduce of D doubles each) for the bandwidth term: power iteration, tol 0.
POWER_JOB = {"op": "eigen", "curvature": "ggn", "seed": 0,
             "options": {"method": "power", "k": 1, "max_iter": 10, "tol": 0}}
MODEL_RANKS = (2, 4, 16, 64)
# (name, alpha s, beta B/s): assumptions, not measurements; None: fitted here.
NETWORKS = [("shared memory (fitted here)", None, None),
            ("10 GbE (assumed 25 us, 1.1 GB/s)", 25e-6, 1.1e9),
            ("100 Gb/s InfiniBand (assumed 2 us, 11 GB/s)", 2e-6, 11e9)]
CASES = {"mlp": (bench.mlp_model, [784]), "cnn": (bench.cnn_model, [1, 28, 28])}


def write_case(d, name, n):
    """arch.json, params.safetensors, data.safetensors (n samples), half.safetensors (the
    first n/2 of them) and the job files in d; returns D."""
    torch.manual_seed(0)
    make, shape = CASES[name]
    model = make().eval()
    arch, params = export_model(model, torch.nn.CrossEntropyLoss(), shape)
    x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))
    files = {"arch.json": json.dumps(arch).encode(), "params.safetensors": params,
             "data.safetensors": export_dataset(x, y),
             "half.safetensors": export_dataset(x[:n // 2], y[:n // 2]),
             "trace.json": json.dumps(TRACE_JOB).encode(),
             "power.json": json.dumps(POWER_JOB).encode()}
    for f, b in files.items():
        with open(os.path.join(d, f), "wb") as fh:
            fh.write(b)
    return sum(p.numel() for p in model.parameters())


def mpirun(curvd, d, ranks, job="trace.json", data="data.safetensors"):
    """One `mpirun -np ranks curvd run`: (result JSON, wall seconds of the command)."""
    cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(ranks), curvd, "run",
           "--arch", os.path.join(d, "arch.json"), "--params", os.path.join(d, "params.safetensors"),
           "--data", os.path.join(d, data), "--job", os.path.join(d, job), "--blas-threads", "1"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(" ".join(cmd) + " failed:\n" + p.stderr[-3000:])
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), wall


def keep_best(acc, key, res, wall):
    """acc[key]: the run with the smallest elapsed_s (and the smallest wall seen)."""
    old = acc.get(key)
    if old is None or res["elapsed_s"] < old["res"]["elapsed_s"]:
        acc[key] = {"res": res, "wall": wall if old is None else min(wall, old["wall"])}
    else:
        old["wall"] = min(old["wall"], wall)


def measure(curvd, name, n, ranks, reps, log):
    """Every run of the case, best of reps each; returns the case's record."""
    best = {}
    with tempfile.TemporaryDirectory() as d:
        dim = write_case(d, name, n)
        for rep in range(reps):
            for r in ranks:
                res, wall = mpirun(curvd, d, r)
                keep_best(best, r, res, wall)
                print(f"# {name} rep {rep + 1} np {r}: elapsed {res['elapsed_s']:.3f} s, wall "
                      f"{wall:.2f} s, comm {res.get('communication')}", file=log, flush=True)
            res, wall = mpirun(curvd, d, 1, data="half.safetensors")  # t_comp(N/2)
            keep_best(best, "half", res, wall)
            pres, wall = mpirun(curvd, d, 2, job="power.json")  # products: the bandwidth term
            keep_best(best, "power2", pres, wall)
            if 2 not in ranks:
                res, wall = mpirun(curvd, d, 2)
                keep_best(best, 2, res, wall)
            print(f"# {name} rep {rep + 1}: np 1 half-N {best['half']['res']['elapsed_s']:.3f}"
                  f" s, np 2 power {pres['matvecs']} matvecs comm {pres.get('communication')}",
                  file=log, flush=True)
    return {"case": name, "n": n, "D": dim, "runs": best}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def fit_network(cases):
    """alpha, beta from the np-2 communication of every case's trace and power runs
    (least squares of seconds = 2 alpha collectives + bytes / beta)."""
    rows = []
    for c in cases:
        for key in (2, "power2"):
            cm = c["runs"][key]["res"]["communication"]
            rows.append((2.0 * cm["collectives"], float(cm["bytes"]), cm["seconds"]))
    # normal equations for [alpha, 1/beta]
    s11 = sum(x * x for x, _, _ in rows)
    s12 = sum(x * y for x, y, _ in rows)
    s22 = sum(y * y for _, y, _ in rows)
    t1 = sum(x * s for x, _, s in rows)
    t2 = sum(y * s for _, y, s in rows)
    det = s11 * s22 - s12 * s12
    alpha = (t1 * s22 - t2 * s12) / det
    inv_beta = (s11 * t2 - s12 * t1) / det
    if alpha < 0 or inv_beta <= 0:  # noise: fall back to one term per run kind
        alpha = max(sum(s for x, y, s in rows[0::2]) / sum(x for x, _, _ in rows[0::2]), 0.0)
        inv_beta = max(sum(s - alpha * x for x, _, s in rows[1::2]) /
                       sum(y for _, y, _ in rows[1::2]), 1e-12)
    return alpha, 1.0 / inv_beta


def model(c, alpha_beta):
    """The case's scaling model: per-matvec terms and predicted speed-ups per network."""
    runs, n = c["runs"], c["n"]
    one, half = runs[1]["res"], runs["half"]["res"]
    t_n, t_h = one["elapsed_s"] / one["matvecs"], half["elapsed_s"] / half["matvecs"]
    b = (t_n - t_h) / (n - n // 2)
    a = t_n - b * n
    if a < 0:  # superlinear in n (noise or caches): no fixed part, all of it splits
        a, b = 0.0, t_n / n
    two = runs[2]["res"]
    cm = two["communication"]
    coll, byt = cm["collectives"] / two["matvecs"], cm["bytes"] / two["matvecs"]
    out = {"a_s": a, "b_s": b, "t1_s": t_n, "coll_per_mv": coll, "bytes_per_mv": byt,
           "pred": {}}
    for net, al, be in NETWORKS:
        al, be = (al, be) if al is not None else alpha_beta
        out["pred"][net] = {}
        for r in MODEL_RANKS:
            comm = coll * 2 * (r - 1) * al + byt * 2 * (r - 1) / r / be
            t = a + b * n / r + comm
            out["pred"][net][r] = {"t_s": t, "comm_s": comm, "speedup": t_n / t}
    meas2 = one["elapsed_s"] / two["elapsed_s"]
    out["check2"] = {"measured": meas2,
                     "predicted": out["pred"][NETWORKS[0][0]][2]["speedup"]}
    out["check2"]["rel_err"] = rel(out["check2"]["predicted"], meas2)
    return out


def report(cases, ranks, alpha, beta, log=sys.stdout):
    print(f"{'case':5} {'N':>5} {'D':>8} {'np':>3} {'elapsed s':>10} {'wall s':>8} "
          f"{'speed-up':>8} {'wall sp.':>8} {'trace':>14} {'rel diff':>8} {'colls':>6} "
          f"{'comm B':>10} {'comm s':>8}", file=log)
    for c in cases:
        base = c["runs"][1]
        for r in ranks:
            run = c["runs"][r]
            res, cm = run["res"], run["res"].get("communication", {})
            print(f"{c['case']:5} {c['n']:5} {c['D']:8} {r:3} {res['elapsed_s']:10.3f} "
                  f"{run['wall']:8.2f} {base['res']['elapsed_s'] / res['elapsed_s']:7.2f}x "
                  f"{base['wall'] / run['wall']:7.2f}x {res['trace']:14.8g} "
                  f"{rel(res['trace'], base['res']['trace']):8.1e} {cm.get('collectives', 0):6} "
                  f"{cm.get('bytes', 0):10} {cm.get('seconds', 0.0):8.3f}", file=log)
    print(f"# products (GGN power iteration, np 2): bytes per matvec = 8D + setup; "
          f"fitted alpha {alpha * 1e6:.1f} us, beta {beta / 1e9:.2f} GB/s "
          f"(seconds include waiting for the other rank)", file=log)
    for c in cases:
        p = c["runs"]["power2"]["res"]
        cm = p["communication"]
        print(f"#   {c['case']}: {p['matvecs']} matvecs, {cm['collectives']} collectives, "
              f"{cm['bytes']} B ({cm['bytes'] / p['matvecs']:.0f} B/matvec, 8D = {8 * c['D']}), "
              f"{cm['seconds']:.3f} s", file=log)
    print("\nscaling model, per matvec: T(R) = a + b N/R + c 2(R-1) alpha + m 2(R-1)/R / beta",
          file=log)
    for c in cases:
        m = c["model"]
        print(f"# {c['case']}: a {m['a_s'] * 1e3:.2f} ms (per rank, not split), b "
              f"{m['b_s'] * 1e6:.2f} us/sample, T(1) {m['t1_s'] * 1e3:.2f} ms; c "
              f"{m['coll_per_mv']:.3f} collectives, m {m['bytes_per_mv']:.0f} B per matvec; "
              f"2-rank check: predicted {m['check2']['predicted']:.2f}x, measured "
              f"{m['check2']['measured']:.2f}x ({m['check2']['rel_err'] * 100:.0f}% off)",
              file=log)
    print(f"{'case':5} {'network':44} " + " ".join(f"{'R=' + str(r):>7}" for r in MODEL_RANKS),
          file=log)
    for c in cases:
        for net, _, _ in NETWORKS:
            pr = c["model"]["pred"][net]
            print(f"{c['case']:5} {net:44} " +
                  " ".join(f"{pr[r]['speedup']:6.2f}x" for r in MODEL_RANKS), file=log)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--curvd", default=os.path.join(HERE, "..", "build", "curvd"))
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--cases", default="mlp,cnn")
    ap.add_argument("--reps", type=int, default=1, help="repetitions; best of them per run")
    ap.add_argument("--mlp-n", type=int, default=4096)
    ap.add_argument("--cnn-n", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the records as JSON")
    a = ap.parse_args()
    ranks = sorted({1, *(int(r) for r in a.ranks.split(","))})
    curvd = os.path.abspath(a.curvd)
    plugin = os.path.join(os.path.dirname(curvd), "curvd-mpi.so")
    if not os.path.exists(plugin):
        sys.exit(f"bench_mpi.py: {plugin} is missing (install libopenmpi-dev and openmpi-bin, "
                 "then `make`)")
    cases = []
    for name in a.cases.split(","):
        n = a.mlp_n if name == "mlp" else a.cnn_n
        cases.append(measure(curvd, name, n, ranks, a.reps, sys.stderr))
    alpha, beta = fit_network(cases)
    for c in cases:
        c["model"] = model(c, (alpha, beta))
    if a.json:
        print(json.dumps({"ranks": ranks, "alpha_s": alpha, "beta_Bps": beta,
                          "networks": NETWORKS, "cases": cases}, default=str))
    else:
        print(f"# curvd data-parallel trace ({PROBES} probes, GGN, --blas-threads 1), "
              f"{os.cpu_count()} CPUs, best of {a.reps}")
        report(cases, ranks, alpha, beta)
    bad = [(c["case"], r) for c in cases for r in ranks
           if rel(c["runs"][r]["res"]["trace"], c["runs"][1]["res"]["trace"]) > 1e-6]
    if bad:
        print(f"bench_mpi.py: traces differ by more than 1e-6 (relative): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
