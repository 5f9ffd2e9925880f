"""e2e_mpi.py - data-parallel jobs (issue 21, item 4): `mpirun -np R curvd run` against the
single-process `curvd run` of the same job, on the cases of tests/e2e_microbatch.py.

Usage: /usr/bin/python3 tests/e2e_mpi.py build/curvd
Needs mpirun and build/curvd-mpi.so (`make test` installs OpenMPI): without either the file
fails, it does not skip.  Every run is `curvd run ... --job - --blas-threads 1`, under
`mpirun --oversubscribe --allow-run-as-root -np R` for R > 1.

The job matrix is e2e_microbatch's (its check_matrix and job_variants: every op of
GET /v1/ops x method x curvature, the same dampings from the single-process Lanczos
extremes), on its MLP, CNN and graph model (N = 40):
  - np 2 (shards 20/20): every job of the matrix on the MLP; on the CNN and the graph
    model every other job of it (and every np 3 pick), to keep the file near 4 minutes;
  - np 3 (shards 14/13/13, uneven): one job per op on each model, a different one per model
    (model i takes the variant at i/3 of the op's list over curvatures and methods), so
    that every op runs on three ranks on every model and the curvatures rotate.  The full
    matrix at np 3 too would double the running time (each mpirun start costs ~0.5 s and
    the test machine has 2 cores: the file must finish in well under 6 minutes).
A data-parallel result must equal the single-process one under e2e_microbatch's
result_diff (the same tolerances and the same reasons: 1e-4 relative, looser residuals,
eigenvectors and CG/MINRES counts +-1): the reductions change only the summation order,
and the estimators draw the same probes, MC labels and sub-samples from the same seed on
every rank.  Not compared: elapsed_s and the four micro-batch fields (they describe rank 0's
shard) and "ranks", which must be R; batch_size must be N; rank 0's micro-batch fields
must describe its shard (one micro-batch of its cv_comm_share, all cached).
Also, on the MLP, for gradient, per-sample gradients, matvec, trace (Hutchinson, Hutch++),
eigen (Lanczos, ViViT's gram, its MC sub-sampled variant), snr, newton vivit and solve:
  - N = 41 on np 2 and np 3 (21/20, 14/14/13); N = 2 on np 2 and np 3 (rank 2 holds no
    sample); a job's batch as a range and as indices (with a repeat) of the 40 samples;
  - "micro_batch": 7 under np 2 and np 3 (rank 0: 3 and 2 micro-batches of 7, all cached)
    against the single-process run (with and without micro_batch); "micro_batch": 4 under
    the least --job-memory the job accepts (nothing cached) (every product recomputes each micro-batch) for a
    fisher_mc matvec, Hessian eigenvalues and a GGN trace;
  - errors: an unknown option (exit 1, the single-process error JSON on stderr, printed
    once), a batch outside the dataset; a label out of range and a NaN in the last sample
    only (rank 1's, resp. rank 2's, shard): exit 1 and the single-process code and field.
Set VERBOSE=1 to print every check, MPI_CASES=mlp,cnn,graph to run some matrix cases only.
Ends with 'N passed, M failed'.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e_microbatch as mb  # noqa: E402
from e2e_lib import CURVD, Daemon, check, summary  # noqa: E402

MPIRUN = shutil.which("mpirun")
PLUGIN = os.path.join(os.path.dirname(CURVD), "curvd-mpi.so")
MPI_ARGS = ["--oversubscribe", "--allow-run-as-root"]
RUN_ARGS = ["--blas-threads", "1"]
DP_FIELDS = ("ranks", "communication")  # a data-parallel result's own fields
TIMEOUT = 120  # a hang (a rank waiting forever) fails the check instead of the whole file


# ---- running curvd --------------------------------------------------------------------------

def error_docs(text):
    """The JSON objects with "error" among the lines of text (mpirun adds its own lines)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and "error" in doc:
                out.append(doc)
    return out


def run(d, job, ranks=1, data=None, extra=()):
    """`curvd run` on the case in d (job on stdin), under mpirun when ranks > 1:
    (exit code, the result or the first error JSON, the error JSONs on stderr)."""
    args = [CURVD, "run", "--arch", os.path.join(d, "arch.json"),
            "--params", os.path.join(d, "params.safetensors"),
            "--data", data or os.path.join(d, "data.safetensors"), "--job", "-", *RUN_ARGS,
            *extra]
    if ranks > 1:
        args = [MPIRUN, *MPI_ARGS, "-np", str(ranks), *args]
    try:
        p = subprocess.run(args, input=json.dumps(job), capture_output=True, text=True,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return -1, {"raw": f"no answer in {TIMEOUT} s"}, []
    errs = error_docs(p.stderr)
    if p.returncode == 0:
        try:
            return 0, json.loads(p.stdout), errs
        except json.JSONDecodeError:
            return 0, {"raw": p.stdout[-2000:]}, errs
    return p.returncode, errs[0] if errs else {"raw": p.stderr[-2000:]}, errs


def shard0(n, ranks):
    """Rank 0's share of n samples (engine/comm.h: the first n % R ranks get one more)."""
    return n // ranks + (1 if n % ranks else 0)


def compare(name, ref, job, d, ranks, n, data=None, mb_size=None):
    """Runs job on ranks and checks it against the single-process result ref."""
    name = f"{name} np {ranks}"
    rc, res, _ = run(d, job, ranks, data)
    if not check(name + ": runs", rc == 0, f"rc {rc}: {str(res)[:300]}"):
        return
    check(name + ': "ranks" and batch_size', res.get("ranks") == ranks
          and res.get("batch_size") == n, f"ranks {res.get('ranks')!r} batch_size "
          f"{res.get('batch_size')!r}, want {ranks} and {n}")
    s0 = shard0(n, ranks)
    size = min(mb_size, s0) if mb_size else s0
    mbs = -(-s0 // size)
    check(name + ": micro-batch fields describe rank 0's shard",
          mb.mb_fields_ok(res, mbs, size, mbs),
          f"shard {s0}: {str({k: res.get(k) for k in mb.MB_FIELDS})}")
    slack = mb.iter_slack(job)
    diff = mb.result_diff({k: v for k, v in res.items() if k not in DP_FIELDS}, ref,
                          iter_slack=slack)
    check(name + ": = single-process", not diff, "; ".join(diff[:4]))


def single(name, d, job, data=None):
    """The single-process result of job (checked to run), or None."""
    rc, ref, _ = run(d, job, 1, data)
    ok = check(name + ": single-process run", rc == 0 and "ranks" not in ref,
               f"rc {rc}: {str(ref)[:300]}")
    return ref if ok else None


# ---- the matrix ----------------------------------------------------------------------------

def np3_picks(specs, index):
    """(curvature, label) of the one job per op that model number index runs on 3 ranks:
    the variant at index/3 of the op's list in check_matrix's order."""
    per_op = {}
    for curv in (None,) + mb.CURVATURES:
        for op, spec in specs.items():
            if (curv is None) == spec["uses_curvature"]:
                continue
            for label, job in mb.job_variants(op, spec, curv, 1.0):
                if job is not None:
                    per_op.setdefault(op, []).append((curv, label))
    return {v[index * len(v) // 3] for v in per_op.values()}


def matrix_runner(picks, counts, every=1):
    """check_matrix's run: the single-process result, then np 2 (and np 3 for picks).
    every > 1: only every every-th job besides the picks (each op still runs, on 3 ranks)."""
    seen = [0]

    def run_ranks(tag, d, label, job, notes=None):
        seen[0] += 1
        picked = (job.get("curvature"), label) in picks
        # the Lanczos extremes always run: check_matrix takes the later jobs'
        # dampings from them
        if not picked and not label.startswith("eigen lanczos") and seen[0] % every:
            return None
        name = f"{tag} {job.get('curvature', '-')} {label}"
        ref = single(name, d, job)
        if ref is None:
            return None
        compare(name, ref, job, d, 2, mb.N)
        counts[2] += 1
        if picked:
            compare(name, ref, job, d, 3, mb.N)
            counts[3] += 1
        return ref
    return run_ranks


# ---- uneven, tiny and selected batches ---------------------------------------------------

DAMPING = 1.0  # the MLP's GGN: lambda_max ~ 0.3, so GGN + 1 is well conditioned
FEW_OPS = [
    {"op": "gradient"},
    {"op": "per_sample_gradients"},
    {"op": "matvec", "curvature": "fisher_mc", "seed": 5, "options": {"probe_seed": 11}},
    {"op": "trace", "curvature": "ggn", "seed": 5, "options": {"max_probes": 12, "tol": 0}},
    {"op": "trace", "curvature": "hessian", "seed": 5,
     "options": {"method": "hutch++", "max_probes": 15}},
    {"op": "eigen", "curvature": "hessian", "seed": 5,
     "options": {"k": 2, "return_vectors": True}},
    {"op": "eigen", "curvature": "ggn", "seed": 5, "options": {"method": "gram", "k": 2}},
    {"op": "eigen", "curvature": "fisher_mc", "seed": 5,
     "options": {"method": "gram", "k": 2, "mc": True, "subsample": 0.5, "mc_samples": 2}},
    {"op": "snr", "curvature": "ggn", "seed": 5, "options": {"k": 2, "return_raw": True}},
    {"op": "newton", "curvature": "ggn", "seed": 5,
     "options": {"method": "vivit", "mode": "full", "damping": DAMPING}},
    {"op": "solve", "curvature": "ggn", "seed": 5,
     "options": {"method": "cg", "damping": DAMPING, "tol": 1e-5}},
]


def job_name(job):
    o = job.get("options", {})
    extra = " mc" if o.get("mc") else ""
    return f"{job['op']} {job.get('curvature', '-')} {o.get('method', '')}{extra}".rstrip()


def mlp_data(d, n):
    """The MLP case with its first n samples (n <= 40) or n = 41 (one sample repeated)."""
    model, loss_fn, shape, x, y = mb.mlp_case()
    if n > len(x):
        x, y = torch.cat([x, x[:n - len(x)]]), torch.cat([y, y[:n - len(y)]])
    mb.write_case(d, model, loss_fn, shape, x[:n], y[:n])


def check_shards():
    """N = 41 and N = 2 on 2 and 3 ranks; batch ranges and indices of 40 samples."""
    for n in (41, 2):
        with tempfile.TemporaryDirectory() as d:
            mlp_data(d, n)
            for job in FEW_OPS:
                name = f"mlp N={n} {job_name(job)}"
                ref = single(name, d, job)
                if ref is not None:
                    for ranks in (2, 3):
                        compare(name, ref, job, d, ranks, n)
    with tempfile.TemporaryDirectory() as d:
        mlp_data(d, mb.N)
        batches = [("range 5+29", {"offset": 5, "size": 29}),
                   ("indices", {"indices": [39, 0, 17, 3, 3, 22, 8, 31]})]
        for bname, batch in batches:
            n = batch.get("size") or len(batch["indices"])
            for job in FEW_OPS[:2] + FEW_OPS[3:4] + FEW_OPS[6:7]:
                job = dict(job, batch=batch)
                name = f"mlp batch {bname} {job_name(job)}"
                ref = single(name, d, job)
                if ref is not None:
                    for ranks in (2, 3):
                        compare(name, ref, job, d, ranks, n)


def check_micro_batch():
    """micro_batch 7 over ranks: rank 0 cuts its shard (20 or 14) into micro-batches."""
    with tempfile.TemporaryDirectory() as d:
        mlp_data(d, mb.N)
        for job in [FEW_OPS[3], FEW_OPS[5], FEW_OPS[1], FEW_OPS[8]]:
            name = f"mlp {job_name(job)}"
            ref = single(name, d, job)
            job = dict(job, micro_batch=mb.MB)
            ref_mb = single(name + " micro_batch 7", d, job)
            if ref is None or ref_mb is None:
                continue
            diff = mb.result_diff(ref_mb, ref)
            check(name + ": single-process micro_batch 7 = without", not diff,
                  "; ".join(diff[:4]))
            for ranks in (2, 3):
                compare(name + " micro_batch 7", ref_mb, job, d, ranks, mb.N, mb_size=mb.MB)


def check_recompute():
    """Micro-batches of 4 recomputed for every product (--job-memory just above the job's
    minimum: nothing cached) over ranks: the recomputed scratch state must draw fisher_mc's labels from each
    sample's whole-batch stream on every rank, and the Hessian's cotangents must be rebuilt
    for the right samples; equal to the un-budgeted single-process run."""
    with tempfile.TemporaryDirectory() as d:
        mlp_data(d, mb.N)
        for job in [FEW_OPS[2], FEW_OPS[5], FEW_OPS[3]]:
            job = dict(job, micro_batch=4)
            name = f"mlp {job_name(job)} micro_batch 4 recomputed"
            ref = single(name, d, job)
            if ref is None:
                continue
            # the job's least budget (named by its refusal of 1 byte) caches nothing
            _, refusal, _ = run(d, job, 1, extra=("--job-memory", "1"))
            need = mb.needed_bytes(refusal)
            if not check(name + ": job_memory names the least budget", need is not None,
                         str(refusal)[:300]):
                continue
            for ranks in (2, 3):
                rc, res, _ = run(d, job, ranks, extra=("--job-memory", str(need + 64)))
                ok = rc == 0 and res.get("cached_micro_batches", 1) == 0 and \
                    res.get("micro_batches", 0) > 1
                if not check(f"{name} np {ranks}: runs, nothing cached", ok,
                             f"rc {rc}: {str({k: res.get(k) for k in mb.MB_FIELDS})}"):
                    continue
                diff = mb.result_diff({k: v for k, v in res.items() if k not in DP_FIELDS},
                                      ref)
                check(f"{name} np {ranks}: = single-process", not diff, "; ".join(diff[:4]))


# ---- errors ---------------------------------------------------------------------------------

def same_error(name, d, job, ranks, data=None, exact=True):
    """job fails with exit 1 on one process and on ranks, rank 0 printing one error JSON:
    the same one (exact), or the same code and field."""
    rc1, e1, _ = run(d, job, 1, data)
    rc, e, errs = run(d, job, ranks, data)
    want = e1.get("error", {})
    got = e.get("error", {})
    check(f"{name}: single-process exit 1 with an error JSON", rc1 == 1 and want.get("code"),
          f"rc {rc1}: {str(e1)[:300]}")
    check(f"{name} np {ranks}: exit 1, one error JSON on stderr", rc == 1 and len(errs) == 1,
          f"rc {rc}, {len(errs)} error JSONs: {str(e)[:300]}")
    if exact:
        ok = e == e1
    else:
        ok = (got.get("code"), got.get("field")) == (want.get("code"), want.get("field"))
    check(f"{name} np {ranks}: the single-process error" + ("" if exact else
          " code and field"), ok, f"{got} vs {want}")


def check_errors():
    with tempfile.TemporaryDirectory() as d:
        mlp_data(d, mb.N)
        bad = {"op": "trace", "curvature": "ggn", "options": {"bogus": 1}}
        same_error("unknown option", d, bad, 2)
        same_error("unknown option", d, bad, 3)
        same_error("batch outside the dataset", d,
                   {"op": "gradient", "batch": {"offset": 30, "size": 20}}, 2)
        model, loss_fn, shape, x, y = mb.mlp_case()
        y[-1] = 7  # 3 classes: in rank 1's shard (np 2) / rank 2's (np 3) only
        os.makedirs(os.path.join(d, "label"))
        mb.write_case(os.path.join(d, "label"), model, loss_fn, shape, x, y)
        model, loss_fn, shape, x, y = mb.mlp_case()
        x[-1, 2] = float("nan")
        os.makedirs(os.path.join(d, "nan"))
        mb.write_case(os.path.join(d, "nan"), model, loss_fn, shape, x, y)
        for what in ("label", "nan"):
            data = os.path.join(d, what, "data.safetensors")
            for ranks in (2, 3):
                same_error(f"a bad {what} in the last sample", d,
                           {"op": "trace", "curvature": "ggn", "options": {"max_probes": 3}},
                           ranks, data, exact=False)


# ---- main ----------------------------------------------------------------------------------

def op_specs():
    with Daemon("--no-demo") as dm:
        st, ops = mb.http(dm.url + "/v1/ops")
    check("GET /v1/ops lists the ops", st == 200 and len(ops["op_specs"]) >= 12, str(ops)[:200])
    return ops["op_specs"]


def main():
    have = [check("mpirun on PATH (make test installs OpenMPI)", MPIRUN is not None, ""),
            check("build/curvd-mpi.so beside curvd", os.path.exists(PLUGIN), PLUGIN)]
    if not all(have):
        return summary()
    t0 = time.time()
    specs = op_specs()
    only = os.environ.get("MPI_CASES")
    for index, (tag, make) in enumerate(mb.CASES):
        if only and tag not in only.split(","):
            continue
        counts = {2: 0, 3: 0}
        model, loss_fn, shape, x, y = make()
        with tempfile.TemporaryDirectory() as d:
            mb.write_case(d, model, loss_fn, shape, x, y)
            # the MLP runs the whole matrix on 2 ranks; the CNN and the graph model
            # every other job of it (alternating) besides their np 3 picks
            every = 1 if index == 0 else 2
            mb.check_matrix(tag, d, specs,
                            matrix_runner(np3_picks(specs, index), counts, every),
                            "on 1 and 2 ranks")
        print(f"{tag}: {counts[2]} jobs on 2 ranks, {counts[3]} on 3 ranks")
    t1 = time.time()
    check_shards()
    check_micro_batch()
    check_recompute()
    check_errors()
    print(f"e2e_mpi {time.time() - t0:.1f} s (matrix {t1 - t0:.1f} s)")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
