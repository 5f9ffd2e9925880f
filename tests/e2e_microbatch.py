"""e2e_microbatch.py - micro-batched jobs (issue 20): every op and curvature, evaluated over
micro-batches with part of the forward state recomputed, against the same job un-budgeted.

Usage: /usr/bin/python3 tests/e2e_microbatch.py build/curvd
Cases (N = 40 samples each): an MLP (CrossEntropyLoss), a small CNN (Conv2d, BatchNorm2d in
eval mode with random running statistics, ReLU, MaxPool2d, AvgPool2d; CrossEntropyLoss) and
a graph model with residual adds (the pre-activation ResNet of
clients/python/examples/graph_models.py at width 2 on 3x8x8 inputs; MSELoss, so the 1/(N*C)
scale is covered too).

For every op of GET /v1/ops, each of its methods and each curvature it accepts, `curvd run`
runs the job three ways: (ref) un-budgeted, no micro_batch; (cached) "micro_batch": 7 (six
micro-batches, all cached: cached_micro_batches = micro_batches = 6); (budget) the same with a
--job-memory that forces recomputation: halfway between the job's minimum (named by its
job_memory refusal at --job-memory 1) and the cached run's peak_memory_bytes, or just above
the minimum where the engine plans a minimum above that peak (printed as a note); its
cached_micro_batches must be < micro_batches and its peak_memory_bytes within the budget.
Every field of the three results is compared (result_diff): numbers to 1e-4 relative, lists
of numbers as vectors (||a - b|| <= 1e-4 ||b||), lists of objects field by field across the
list; strings, booleans and nulls exactly; the four micro-batch fields and elapsed_s are not
compared.  The randomized estimators (Hutchinson, Hutch++, MC Fisher labels, density's
starting vectors, ViViT's sub-sampling and bootstrap) are held to the same 1e-4: the same seed
must draw the same probes and labels however the batch is cut.  Looser, with the reason next
to them: residuals (rounding-level quantities), eigenvectors (float32 perturbations grow by
lambda_max / gap), CG/MINRES iteration counts (+-1: a stopping test within rounding of tol).
Jobs are chosen away from rounding-decided outcomes: power iteration with tol 0 (a fixed
count), solvers at tol 1e-5, the smallest eigenvalue only of the (indefinite) Hessian.
Also: micro_batch 1, 7 and N give the same numbers (un-budgeted); CrossEntropyLoss with
ignore_index targets (a whole micro-batch ignored plus scattered ones): loss, gradient and
Hessian/GGN products against torch (the mean's 1/M counts the targets of every
micro-batch) and micro-batched = un-budgeted for every curvature; a job_memory refusal
(400 over HTTP, exit 1 from curvd run) naming the bytes needed; micro_batch refused when it is
not an integer >= 1; `curvd serve --job-memory` running a budgeted job like `curvd run`.
Set VERBOSE=1 to print every check, MB_CASES=mlp,cnn,graph to run some cases only,
MB_OPS=op1,op2 to run some ops' jobs only.
Ends with 'N passed, M failed'.
"""
import copy
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python", "examples"))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, Daemon, check, summary  # noqa: E402
from torchref import rel  # noqa: E402
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402
import graph_models as gm  # noqa: E402

torch.set_num_threads(1)

N, MB = 40, 7
RTOL = 1e-4
# result fields that differ between the runs by design
NOT_COMPARED = {"elapsed_s", "micro_batches", "micro_batch_size", "cached_micro_batches",
                "peak_memory_bytes"}
MB_FIELDS = ("micro_batches", "micro_batch_size", "cached_micro_batches", "peak_memory_bytes")
# Residuals are rounding-level numbers (a converged relative residual ~1e-7 changes by 100%
# with the summation order): compared to 1e-4 absolute after scaling by max(1, |lambda_max|).
RESIDUAL_FIELDS = {"residual", "residuals", "newton_cg_residual", "relative_frobenius_error"}
# Eigenvectors move by ~eps * lambda_max / gap under a float32 perturbation; with the
# clustered spectra of these nets (gaps ~1e-2 lambda_max) that is ~1e-5..1e-4: 1e-3.
VECTOR_RTOL = {"eigenvectors": 1e-3,
               # XNysTrace's standard error: the spread of n-q leave-one-out estimates formed
               # through (W^T A W)^-1, which amplifies the products' float32 rounding
               "stderr": 1e-3}
# CG and MINRES stop when a float32-rounded residual falls below tol: when an iteration's
# residual lies within rounding of tol, one summation order stops there and another one
# iteration later (seen at tol 1e-5 and 1e-7).  Their counts may differ by one (the
# solution then differs by about tol, within RTOL); every other count must be equal.
ITER_FIELDS = {"iterations", "matvecs", "newton_cg_iterations"}
ITER_SLACK_OPS = {"solve", "newton", "kfac"}
# kfac's compare runs a Lanczos and a CG per layer: each may stop one step apart, so its
# counts (summed into matvecs; per layer in newton_cg_iterations) get one per layer.
ITER_SLACK = {"kfac": 16}


def iter_slack(job):
    """How far job's ITER_FIELDS counts may differ between summation orders (LSMR: one
    iteration is two matvecs)."""
    if job.get("options", {}).get("method") == "lsmr":
        return 2
    return ITER_SLACK.get(job["op"], 1) if job["op"] in ITER_SLACK_OPS else 0


# ---- the cases ---------------------------------------------------------------------------

def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    x = torch.randn(N, 6)
    y = torch.randint(0, 3, (N,))
    return model, nn.CrossEntropyLoss(), [6], x, y


def cnn_case():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 3))
    with torch.no_grad():
        bn = model[1]
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(N, 2, 8, 8)
    y = torch.randint(0, 3, (N,))
    return model, nn.CrossEntropyLoss(), [2, 8, 8], x, y


def graph_case():
    model = gm.preact_resnet(width=2, classes=3, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 3, 8, 8, generator=g)
    y = torch.randn(N, 3, generator=g)
    return model, nn.MSELoss(), [3, 8, 8], x, y


CASES = [("mlp", mlp_case), ("cnn", cnn_case), ("graph", graph_case)]
# dense and exact diag (D products each) on the graph model: a block of its first and last
# layers (81 parameters) instead of all 393; the others run them on the full vector
DENSE_BLOCKS = {"graph": [["stem.weight", "head.weight", "head.bias"]]}


def write_case(d, model, loss_fn, shape, x, y):
    arch, params = export_model(model, loss_fn, shape, 1, x)
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(params)
    with open(os.path.join(d, "data.safetensors"), "wb") as f:
        f.write(export_dataset(x, y))


# ---- running curvd -------------------------------------------------------------------------

def curvd_run(d, job, budget=None, extra=()):
    """`curvd run` on the case in d (job on stdin); (exit code, parsed stdout or stderr)."""
    args = [CURVD, "run", "--arch", os.path.join(d, "arch.json"),
            "--params", os.path.join(d, "params.safetensors"),
            "--data", os.path.join(d, "data.safetensors"), "--job", "-", *extra]
    if budget is not None:
        args += ["--job-memory", str(budget)]
    p = subprocess.run(args, input=json.dumps(job), capture_output=True, text=True, timeout=300)
    out = p.stdout if p.returncode == 0 else p.stderr
    try:
        return p.returncode, json.loads(out)
    except json.JSONDecodeError:
        return p.returncode, {"raw": out[-2000:]}


def error_code(res):
    e = res.get("error", res)
    return e.get("code") if isinstance(e, dict) else None


# ---- comparing results -----------------------------------------------------------------------

def _is_num(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _flatten(v):
    """The numbers of a nested list (None as nan), or None when it holds anything else."""
    if _is_num(v):
        return [math.nan if v is None else float(v)]
    if isinstance(v, list):
        out = []
        for e in v:
            f = _flatten(e)
            if f is None:
                return None
            out += f
        return out
    return None


def _nan_pattern(a):
    return [math.isnan(t) for t in a]


def result_diff(a, b, path="", scale=1.0, iter_slack=0):
    """The differences between two results beyond float32 precision, as strings;
    iter_slack: how far the ITER_FIELDS counts may differ."""
    key = path.rsplit(".", 1)[-1]
    if isinstance(b, dict):
        if not isinstance(a, dict):
            return [f"{path}: {type(a).__name__} vs object"]
        if "eigenvalues" in b and _flatten(b["eigenvalues"]):
            scale = max(1.0, max(abs(t) for t in _flatten(b["eigenvalues"]) if not math.isnan(t)))
        ka, kb = set(a) - NOT_COMPARED, set(b) - NOT_COMPARED
        if ka != kb:
            return [f"{path}: fields {sorted(ka ^ kb)} in one result only"]
        return [e for k in sorted(kb)
                for e in result_diff(a[k], b[k], f"{path}.{k}", scale, iter_slack)]
    fa, fb = _flatten(a), _flatten(b)
    if fa is not None and fb is not None:
        if len(fa) != len(fb):
            return [f"{path}: {len(fa)} numbers vs {len(fb)}"]
        if _nan_pattern(fa) != _nan_pattern(fb):
            return [f"{path}: nulls differ"]
        ta = torch.tensor([0.0 if math.isnan(t) else t for t in fa], dtype=torch.float64)
        tb = torch.tensor([0.0 if math.isnan(t) else t for t in fb], dtype=torch.float64)
        err = float((ta - tb).norm())
        if key in RESIDUAL_FIELDS:
            ok = err <= 1e-4 * scale
        elif key in ITER_FIELDS and iter_slack:
            ok = err <= iter_slack
        else:
            ok = err <= VECTOR_RTOL.get(key, RTOL) * float(tb.norm()) + 1e-12
        return [] if ok else [f"{path}: |a - b| = {err:.3g}, |b| = {float(tb.norm()):.3g}"
                              + (f" ({fa[0]!r} vs {fb[0]!r})" if len(fb) == 1 else "")]
    if isinstance(b, list) and isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} entries vs {len(b)}"]
        if b and all(isinstance(e, dict) for e in a + b):
            # objects field by field across the list (a direction's gamma_mean may be ~0:
            # relative to the other directions' it is still float32-exact)
            keys = set().union(*a, *b)
            return [e for k in sorted(keys - NOT_COMPARED) for e in
                    result_diff([t.get(k) for t in a], [t.get(k) for t in b], f"{path}[].{k}",
                                scale, iter_slack)]
        return [e for i, (x, z) in enumerate(zip(a, b))
                for e in result_diff(x, z, f"{path}[{i}]", scale, iter_slack)]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


# ---- the job matrix ------------------------------------------------------------------------

CURVATURES = ("hessian", "ggn", "fisher_mc", "ef")
# methods that need the GGN's factor (ViViT): curvature ggn or fisher_mc
FACTOR_ONLY = {("eigen", "gram"), ("newton", "vivit"), ("snr", None)}


def job_variants(op, spec, curv, damping, dense_blocks=None, kfra=True):
    """(label, job) for every method of op (spec: its GET /v1/ops entry) on curvature curv
    (None for ops without one); damping: for solve and newton (positive definite system);
    dense_blocks: the blocks of dense and exact diag (None: the full vector)."""
    heavy = {"blocks": dense_blocks} if dense_blocks else {}
    base = {"op": op, "seed": 5}
    if curv is not None:
        base["curvature"] = curv
    mc = {"mc_samples": 2} if curv == "fisher_mc" else {}

    def j(label, opts, **extra):
        return (label, dict(base, options=dict(opts, **mc), **extra))

    methods = spec.get("methods") or [None]
    out = []
    for m in methods:
        if (op, m) in FACTOR_ONLY or (op == "snr" and (op, None) in FACTOR_ONLY):
            if curv not in ("ggn", "fisher_mc"):
                continue
        mo = {"method": m} if m else {}
        if op in ("loss", "gradient", "per_sample_gradients"):
            out.append(j(op, {}))
        elif op == "matvec":
            out.append(j("matvec", {"probe_seed": 11}))
        elif op == "dense":
            out.append(j("dense", {}, **heavy))
        elif op == "trace" and m == "hutchinson":
            out.append(j("trace hutchinson", dict(mo, max_probes=12, tol=0)))
            out.append(j("trace hutchinson gaussian, blocks layer",
                         dict(mo, max_probes=6, distribution="gaussian"), blocks="layer"))
        elif op == "trace":
            if m == "xnystrace" and curv == "hessian":  # PSD curvatures only
                continue
            out.append(j("trace " + m, dict(mo, max_probes=15)))
        elif op == "frobenius_norm":
            out.append(j("frobenius_norm " + m, dict(mo, max_probes=12) if m != "hutchinson"
                         else dict(mo, max_probes=12, tol=0)))
        elif op == "jvp":
            out.append(j("jvp", {"probe_seed": 11}))
        elif op == "vjp":
            out.append(j("vjp", {"cotangent_seed": 11}))
        elif op == "jacobian":
            out.append(j("jacobian", {}, **heavy))
        elif op == "diag" and m == "xdiag":
            # q = 4 test vectors, below the nets' ranks: a stderr well above rounding
            out.append(j("diag xdiag", dict(mo, max_probes=8)))
        elif op == "diag":
            if m == "hutchinson":
                out.append(j("diag " + m, dict(mo, max_probes=8)))
            else:
                out.append(j("diag " + m, mo, **heavy))
        elif op == "eigen" and m == "lanczos":
            out.append(j("eigen lanczos largest", dict(mo, k=2, return_vectors=True)))
            if curv == "hessian":  # the others are PSD and rank-deficient: their smallest
                # eigenvalue is 0, computed as rounding noise (1e-9 lambda_max)
                out.append(j("eigen lanczos smallest", dict(mo, k=1, which="smallest")))
        elif op == "eigen" and m == "block_lanczos":
            out.append(j("eigen block_lanczos", dict(mo, k=2, block_size=4, max_iter=24, tol=0)))
        elif op == "eigen" and m == "power":
            # tol 0: a fixed number of iterations (a stopping test |d lambda| / |lambda| <
            # tol near its threshold may stop one iteration earlier or later when the
            # summation order changes)
            out.append(j("eigen power", dict(mo, k=2, max_iter=60, tol=0)))
        elif op == "eigen" and m == "gram":
            out.append(j("eigen gram", dict(mo, k=3)))
            out.append(j("eigen gram mc subsample", dict(mo, k=2, mc=True, subsample=0.5)))
        elif op == "density":
            out.append(j("density", {"lanczos_steps": 12, "runs": 2, "grid_points": 64,
                                     "sigma2": 1e-3}))
        elif op == "solve" and m == "neumann":
            out.append(j("solve neumann", dict(mo, damping=damping, scale=0.01, num_terms=20)))
        elif op == "solve":
            # tol 1e-5, well above float32 rounding: a tolerance near it (1e-7) lets the
            # summation order decide whether the last iteration is needed
            out.append(j("solve " + m, dict(mo, damping=damping, tol=1e-5)))
        elif op == "newton" and m == "neumann":
            out.append(j("newton neumann", dict(mo, damping=damping, scale=0.01, num_terms=20)))
        elif op == "newton" and m in ("cg", "minres", "lsmr"):
            out.append(j("newton " + m, dict(mo, damping=damping, tol=1e-5,
                                             actual_change=True)))
        elif op == "newton" and m in ("kfac", "ekfac", "kfra", "acp"):
            # the factors approximate ggn / fisher_mc / ef (kfra: ggn only), not the Hessian
            # (acp: George's alpha is the max over every micro-batch's sample gradients)
            if curv == "hessian" or (m == "kfra" and (curv != "ggn" or not kfra)):
                continue
            out.append(j("newton " + m, dict(mo, damping=damping, actual_change=True)))
        elif op == "newton" and m == "vivit":
            out.append(j("newton vivit bootstrap", dict(mo, k=3, damping="bootstrap",
                                                        bootstrap_samples=20)))
            out.append(j("newton vivit full", dict(mo, mode="full", damping=damping)))
        elif op == "kfac":
            # damping 1 (the MLP's GGN: lambda_max ~0.3): compare's CG converges in a few
            # well-conditioned steps, not ~200 whose count rounding decides
            out.append(j("kfac compare", {"compare": True, "damping": 1.0}))
            out.append(j("kfac mc reduce", {"fisher_type": "mc", "mc_samples": 2,
                                            "kfac_approx": "reduce"}))
        elif op == "laplace":
            out.append(j("laplace kron optimize_prior", {"structure": "kron",
                                                         "optimize_prior": True}))
            out.append(j("laplace last_layer", {"structure": "last_layer",
                                                "prior_precision": 0.5}))
        elif op == "predict":
            out.append(j("predict kron mc", {"structure": "kron", "samples": 50,
                                             "return_covariance": True}))
            out.append(j("predict last_layer posterior_samples",
                         {"structure": "last_layer", "samples": 5,
                          "return_posterior_samples": True}))
        elif op == "instruments":
            if curv != "hessian":  # the instruments use the Hessian only
                continue
            out.append(j("instruments", {"probes": 5, "lanczos_steps": 6, "bins": 8}))
            out.append(j("instruments first-order", {"include": [
                "loss", "gradient_norm", "batch_gradient_norms", "norm_test",
                "inner_product_test", "orthogonality_test", "mean_gsnr"]}))
        elif op == "snr":
            out.append(j("snr", {"k": 3, "return_raw": True}))
            out.append(j("snr mc subsample", {"k": 2, "mc": True, "subsample": 0.5}))
        else:
            out.append((f"{op} {m}: no job written for it", None))
    return out


def mb_fields_ok(res, mbs, size, cached=None):
    """The result reports mbs micro-batches of size, cached (or fewer than mbs when None)."""
    if not all(isinstance(res.get(k), int) for k in MB_FIELDS):
        return False
    c = res["cached_micro_batches"]
    return (res["micro_batches"] == mbs and res["micro_batch_size"] == size
            and (c == cached if cached is not None else 0 <= c < mbs)
            and res["peak_memory_bytes"] > 0)


UNITS = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}


def needed_bytes(res):
    """The minimum a job_memory refusal names ("needs at least 9.6 MiB"), rounded up to
    its last printed digit; None without one."""
    m = re.search(r"at least ([\d.]+) ([KMGT]?i?B)\b", str(res.get("error", {}).get("message")))
    if not m or m.group(2) not in UNITS:
        return None
    digits = m.group(1).split(".")
    ulp = 10.0 ** -len(digits[1]) if len(digits) > 1 else 1.0
    return int((float(m.group(1)) + ulp) * UNITS[m.group(2)]) + 1


def budgeted_run(d, job, peak):
    """The job with micro_batch MB at a --job-memory that forces recomputation:
    (budget, rc, result, note), or (None, rc, last result, note) when none does.  A first
    run at --job-memory 1 is refused (job_memory) naming the job's minimum; the budget is
    then halfway between it and the cached run's peak (about half the micro-batches kept),
    or just above the minimum when the planned minimum exceeds that peak (noted)."""
    rc, res = curvd_run(d, dict(job, micro_batch=MB), 1)
    need = needed_bytes(res) if rc == 1 and error_code(res) == "job_memory" else None
    if need is None:
        return None, rc, res, None
    note = None
    if need >= peak:
        note = f"planned minimum {need} B > the cached run's peak_memory_bytes {peak} B"
    for budget in ((need + peak) // 2, need * 21 // 20, need):
        if budget < need:
            continue
        rc, res = curvd_run(d, dict(job, micro_batch=MB), budget)
        if rc == 0 and res.get("cached_micro_batches", MB) < res.get("micro_batches", 0):
            return budget, rc, res, note
    return None, rc, res, note


def run_three_ways(tag, d, label, job, notes=None):
    """ref, cached (micro_batch MB) and budgeted runs of job; checks; returns ref."""
    name = f"{tag} {job.get('curvature', '-')} {label}"
    rc, ref = curvd_run(d, job)
    if not check(name + ": un-budgeted run", rc == 0, str(ref)[:300]):
        return None
    check(name + ": un-budgeted micro-batch fields (everything kept)",
          mb_fields_ok(ref, ref.get("micro_batches"), ref.get("micro_batch_size"),
                       ref.get("micro_batches")), str({k: ref.get(k) for k in MB_FIELDS}))
    mbs = -(-N // MB)
    rc, cached = curvd_run(d, dict(job, micro_batch=MB))
    if not check(name + ": micro_batch 7 (cached) runs", rc == 0, str(cached)[:300]):
        return ref
    check(name + ": cached micro-batch fields",
          mb_fields_ok(cached, mbs, MB, mbs), str({k: cached.get(k) for k in MB_FIELDS}))
    slack = iter_slack(job)
    diff = result_diff(cached, ref, iter_slack=slack)
    check(name + ": micro_batch 7 (cached) = un-budgeted", not diff, "; ".join(diff[:4]))
    peak = cached.get("peak_memory_bytes")
    if not isinstance(peak, int) or peak <= 1:
        check(name + ": budgeted run", False, f"no peak_memory_bytes: {peak!r}")
        return ref
    budget, rc, res, note = budgeted_run(d, job, peak)
    if note and notes is not None:
        notes.append(f"{name}: {note}")
    if not check(name + ": a --job-memory that forces recomputation",
                 budget is not None, f"peak {peak}; last: rc {rc} {str(res)[:300]}"):
        return ref
    check(name + ": budgeted micro-batch fields, peak within --job-memory",
          mb_fields_ok(res, mbs, MB) and res["peak_memory_bytes"] <= budget,
          str({k: res.get(k) for k in MB_FIELDS}) + f" budget {budget}")
    diff = result_diff(res, ref, iter_slack=slack)
    check(name + ": budgeted (recomputed) = un-budgeted", not diff, "; ".join(diff[:4]))
    return ref


def spd_damping(lmax, lmin):
    """A damping that makes the curvature positive definite with a moderate condition."""
    return max(0.0, -lmin) * 1.5 + 0.1 * max(lmax, 1e-3)


def check_matrix(tag, d, specs, run=None, how="three ways"):
    """Every op x method x curvature, three ways; run(tag, d, label, job, notes) -> the
    reference result (or None) replaces run_three_ways (tests/e2e_mpi.py: over ranks)."""
    run = run or run_three_ways
    t0 = time.time()
    jobs, notes = 0, []
    order = sorted(specs, key=lambda op: op in ("solve", "newton"))  # eigen first: dampings
    for curv in (None,) + CURVATURES:
        ext = {}
        for op in order:
            spec = specs[op]
            if (curv is None) == spec["uses_curvature"]:
                continue
            if os.environ.get("MB_OPS") and op not in os.environ["MB_OPS"].split(","):
                continue
            damping = spd_damping(ext.get("largest", 1.0), ext.get("smallest", 0.0))
            for label, job in job_variants(op, spec, curv, damping, DENSE_BLOCKS.get(tag),
                                           kfra=tag == "mlp"):  # Sequential Linear chains
                if not check(f"{tag} {op}: a job for every method", job is not None, label):
                    continue
                ref = run(tag, d, label, job, notes)
                jobs += 1
                if ref and label.startswith("eigen lanczos"):
                    ext[label.split()[-1]] = ref["eigenvalues"][0]
    print(f"{tag}: {jobs} jobs {how} in {time.time() - t0:.1f} s")
    if notes:  # not a failure: the planner's minimum is conservative (e.g. 32 vectors)
        print(f"note: {tag}: {len(notes)} jobs are refused below their cached run's "
              f"peak_memory_bytes; first: {notes[0]}")


def check_sizes(tag, d):
    """micro_batch 1, 7 and N: the same numbers."""
    jobs = [{"op": "gradient"},
            {"op": "matvec", "curvature": "hessian", "options": {"probe_seed": 3}},
            {"op": "trace", "curvature": "fisher_mc", "seed": 2,
             "options": {"max_probes": 5, "tol": 0}},
            {"op": "eigen", "curvature": "ggn", "options": {"k": 2}},
            {"op": "snr", "curvature": "ggn", "options": {"k": 2}},
            {"op": "per_sample_gradients"}]
    for job in jobs:
        rc, ref = curvd_run(d, job)
        for mb in (1, MB, N):
            rc2, res = curvd_run(d, dict(job, micro_batch=mb))
            mbs = -(-N // mb)
            ok = rc == 0 and rc2 == 0 and mb_fields_ok(res, mbs, mb, mbs)
            diff = result_diff(res, ref) if ok else ["run failed: " + str(res)[:300]]
            check(f"{tag} {job['op']} {job.get('curvature', '')}: micro_batch {mb} = "
                  "un-budgeted", ok and not diff, "; ".join(diff[:4]))


# ---- ignore_index ------------------------------------------------------------------------

def check_ignore_index():
    """CrossEntropyLoss(ignore_index=2) with a whole micro-batch (rows 7..13) and scattered
    rows ignored: the mean divides by the count of the kept targets over all micro-batches."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).eval()
    loss_fn = nn.CrossEntropyLoss(ignore_index=2)
    x = torch.randn(N, 5)
    y = torch.tensor([0, 1, 3] * 14)[:N]
    y[7:14] = 2
    y[[0, 20, 33, 39]] = 2
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    with tempfile.TemporaryDirectory() as d:
        write_case(d, model, loss_fn, [5], x, y)
        for mb in (MB, 3):
            rc, res = curvd_run(d, {"op": "gradient", "micro_batch": mb})
            want = float(loss_fn(m64(x64), y))
            g = tr.gradient(m64, loss_fn, x64, y)
            check(f"ignore_index micro_batch {mb}: loss and gradient vs torch",
                  rc == 0 and tr.close(res["loss"], want, 1e-5) and rel(res["gradient"], g) < RTOL,
                  f"{res.get('loss')} vs {want}")
            torch.manual_seed(6)
            v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
            refs = {"hessian": tr.hvp(m64, loss_fn, x64, y, v),
                    "ggn": tr.ggn_vp(m64, loss_fn, x64, y, v)}
            for curv, want_v in refs.items():
                job = {"op": "matvec", "curvature": curv, "micro_batch": mb,
                       "options": {"vector": v.tolist()}}
                rc, res = curvd_run(d, job)
                e = rel(res["product"], want_v) if rc == 0 else math.inf
                check(f"ignore_index micro_batch {mb}: {curv} product vs torch", e < RTOL,
                      f"rel err {e}")
        for curv in CURVATURES:
            run_three_ways("ignore_index", d, "trace hutch++",
                           {"op": "trace", "curvature": curv, "seed": 1,
                            "options": {"method": "hutch++", "max_probes": 9}})
            run_three_ways("ignore_index", d, "matvec",
                           {"op": "matvec", "curvature": curv,
                            "options": {"probe_seed": 4}})


# ---- refusals and the daemon ------------------------------------------------------------------

def needs_bytes(message):
    """The message names a number of bytes (digits followed by a unit or 'bytes')."""
    return bool(re.search(r"\d+(\.\d+)?\s*(bytes|[KMG]i?B|B\b)", message or ""))


def check_refusals(d):
    rc, res = curvd_run(d, {"op": "eigen", "options": {"k": 2}}, budget="1K")
    e = res.get("error", {})
    check("curvd run --job-memory 1K: exit 1, job_memory naming the bytes needed",
          rc == 1 and e.get("code") == "job_memory" and needs_bytes(e.get("message")), str(res))
    for bad in ("abc", "-5", "1X"):
        rc, res = curvd_run(d, {"op": "loss"}, budget=bad)
        check(f"curvd run --job-memory {bad}: usage error (exit 2)", rc == 2, str(res)[:200])
    rc, res = curvd_run(d, {"op": "loss"}, budget="64M")
    check("curvd run --job-memory 64M (suffix M) runs", rc == 0, str(res)[:200])
    for bad in (0, -1, 2.5, "7", True):
        rc, res = curvd_run(d, {"op": "loss", "micro_batch": bad})
        e = res.get("error", {})
        check(f"micro_batch {bad!r}: refused (exit 1, field micro_batch)",
              rc == 1 and e.get("field") == "micro_batch", str(res)[:200])


def http(url, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def check_daemon(d):
    """GET /v1/ops, a job_memory 400 and a budgeted job through `curvd serve --job-memory`;
    returns the op specs."""
    model_arg = "m=%s:%s" % (os.path.join(d, "arch.json"), os.path.join(d, "params.safetensors"))
    data_arg = "x=" + os.path.join(d, "data.safetensors")
    job = {"op": "trace", "model": "m", "dataset": "x", "curvature": "ggn", "seed": 3,
           "micro_batch": MB, "options": {"max_probes": 10, "tol": 0}}
    local = {k: v for k, v in job.items() if k not in ("model", "dataset", "micro_batch")}
    _, cached = curvd_run(d, dict(local, micro_batch=MB))
    budget, _, want, _ = budgeted_run(d, local, cached.get("peak_memory_bytes", 2))
    with Daemon("--no-demo", "--model", model_arg, "--dataset", data_arg,
                "--job-memory", "1K") as dm:
        st, ops = http(dm.url + "/v1/ops")
        specs = ops["op_specs"]
        st, res = http(dm.url + "/v1/jobs", "POST", dict(job, op="eigen", options={"k": 1}))
        e = (res or {}).get("error", {})
        check("serve --job-memory 1K: POST /v1/jobs 400 job_memory naming the bytes",
              st == 400 and e.get("code") == "job_memory" and needs_bytes(e.get("message")),
              f"{st} {res}")
    with Daemon("--no-demo", "--model", model_arg, "--dataset", data_arg,
                "--job-memory", str(budget or 1)) as dm:
        st, res = http(dm.url + "/v1/jobs?wait=60", "POST", job)
        r = (res or {}).get("result") or {}
        check("serve --job-memory: budgeted job = curvd run --job-memory",
              st == 200 and budget is not None and mb_fields_ok(r, -(-N // MB), MB)
              and not result_diff(r, want), f"{st} {str(res)[:300]}")
    return specs


def main():
    if "--job-memory" not in subprocess.run([CURVD, "--help"], capture_output=True,
                                            text=True).stdout:
        check("curvd has --job-memory (issue 20)", False, "not in curvd --help")
        return summary()
    t0 = time.time()
    only = os.environ.get("MB_CASES")
    specs = None
    for tag, make in CASES:
        if only and tag not in only.split(","):
            continue
        model, loss_fn, shape, x, y = make()
        with tempfile.TemporaryDirectory() as d:
            write_case(d, model, loss_fn, shape, x, y)
            if specs is None:
                specs = check_daemon(d)
                check_refusals(d)
                check("GET /v1/ops lists the ops", len(specs) >= 12, str(list(specs)))
            check_matrix(tag, d, specs)
            check_sizes(tag, d)
    check_ignore_index()
    print(f"e2e_microbatch {time.time() - t0:.1f} s")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
