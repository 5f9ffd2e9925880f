"""e2e_kron_memory.py - Kronecker factors in the job memory plan (issue 22, --job-memory).

A job that builds Kronecker factors (a Kronecker curvature in any op, the kfac op, newton's
methods kfac/ekfac/kfra/acp) declares them at submit: sum over the Kronecker layers of
dim_a^2 + dim_b^2 doubles (A and B), plus what the op keeps per factor: the
eigendecompositions (another dim_a^2 + dim_b^2 doubles and dim_a + dim_b eigenvalues) for the
exact paths (trace's logdet, eigen, density, solve, newton's Kronecker methods, kfac's
compare), the eigenvalues for op kfac, ekfac's values (dim_a dim_b) and eigenbasis.
On an MLP with wide layers (Linear 6-300-300-3, ReLU, CE, N = 8) through `curvd run`:
  - under --job-memory 1 every such job is refused (400 job_memory) with a message naming
    "N MiB of Kronecker factors" = the formula above (to the message's 0.1 MiB), a job on an
    exact curvature names none;
  - a budget above the job's minimum without the factors but below it with them refuses the
    job (the factors make the difference); a budget that fits runs it, and its
    peak_memory_bytes >= the factors' bytes, <= the budget;
  - newton acp's peak_memory_bytes - newton cg (ggn)'s = the declared factor bytes (within
    1 KiB above, 64 KiB below: same vectors; the factors' backward walk sizes only its own
    cotangent buffers, so acp's product workspace may be a little smaller than cg's).
Usage: /usr/bin/python3 tests/e2e_kron_memory.py build/curvd.  Ends with 'N passed, M failed'.
"""
import json
import os
import re
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
import torchref as tr  # noqa: E402
from e2e_lib import CURVD, check, summary  # noqa: E402
from curvd_client.torch_export import export_dataset, export_model  # noqa: E402

WIDTH = 300
MIB = 1024.0 * 1024.0


def write_case(d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, 3)).eval()
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    arch, params = export_model(model, nn.CrossEntropyLoss(), [6], 1, x)
    with open(os.path.join(d, "arch.json"), "w") as f:
        json.dump(arch, f)
    with open(os.path.join(d, "params.safetensors"), "wb") as f:
        f.write(params)
    with open(os.path.join(d, "data.safetensors"), "wb") as f:
        f.write(export_dataset(x, y))
    dims = [(7, WIDTH), (WIDTH + 1, WIDTH), (WIDTH + 1, 3)]  # (dim_a, dim_b) per layer
    sq = sum(a * a + b * b for a, b in dims)
    lin = sum(a + b for a, b in dims)
    prod = sum(a * b for a, b in dims)
    return sq, lin, prod


def run(d, job, budget):
    """`curvd run` on the case in d under --job-memory budget: (rc, result or error)."""
    return tr.curvd_run(CURVD, d, job, expect_ok=False, extra=("--job-memory", str(budget)))


def mib(msg, what):
    """The MiB figure before `what` in a job_memory message (None if absent)."""
    m = re.search(r"([0-9.]+) (B|KiB|MiB|GiB) of " + what, msg)
    if not m:
        return None
    return float(m.group(1)) * {"B": 1 / MIB, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[m.group(2)]


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        sq, lin, prod = write_case(d)
        fac, eig = 8.0 * sq, 8.0 * (sq + lin)
        cases = (
            ("matvec kfac", {"op": "matvec", "curvature": "kfac", "options": {"probe_seed": 1}}, fac),
            ("diag kfac", {"op": "diag", "curvature": "kfac"}, fac),
            ("trace kfac (logdet)", {"op": "trace", "curvature": "kfac"}, fac + eig),
            ("eigen kfac", {"op": "eigen", "curvature": "kfac", "options": {"k": 2}}, fac + eig),
            ("solve kfac", {"op": "solve", "curvature": "kfac", "options": {"damping": 1}},
             fac + eig),
            ("matvec ekfac", {"op": "matvec", "curvature": "ekfac", "options": {"probe_seed": 1}}, fac + 8.0 * prod + eig),
            ("kfac op", {"op": "kfac", "options": {"return_factors": False}}, fac + 8.0 * lin),
            ("newton kfac", {"op": "newton", "options": {"method": "kfac", "damping": 1}},
             fac + eig),
            ("newton cg on kfac", {"op": "newton", "curvature": "kfac",
                                   "options": {"damping": 1, "max_iter": 3}}, fac),
            ("newton acp", {"op": "newton", "options": {"method": "acp", "damping": 1}},
             fac + eig),
        )
        peaks = {}
        for name, job, want in cases:
            rc, r = run(d, job, 1)
            msg = r.get("error", {}).get("message", "")
            got = mib(msg, "Kronecker factors")
            check(f"{name}: refused at --job-memory 1 naming {want / MIB:.1f} MiB of Kronecker "
                  "factors", rc != 0 and r.get("error", {}).get("code") == "job_memory" and
                  got is not None and abs(got - want / MIB) <= 0.06, msg[:300])
            need = mib(msg, "engine memory") if msg else None
            if need is None:
                continue
            need = (need + 0.1) * MIB  # the message rounds to 0.1 MiB
            # above the minimum without the factors, below it with them
            between = int(need - 0.1 * MIB - want / 2)
            rc2, r2 = run(d, job, between)
            check(f"{name}: refused at {between / MIB:.1f} MiB (the minimum without the factors "
                  "fits)", rc2 != 0 and r2.get("error", {}).get("code") == "job_memory" and
                  "Kronecker factors" in r2["error"].get("message", ""), str(r2)[:300])
            rc3, r3 = run(d, job, int(need + MIB))
            peak = r3.get("peak_memory_bytes", 0)
            check(f"{name}: runs at {(need + MIB) / MIB:.1f} MiB, factors <= peak_memory_bytes "
                  "<= budget", rc3 == 0 and want <= peak <= need + MIB,
                  f"peak {peak} factors {want} {str(r3)[:200]}")
            peaks[name] = peak
        rc, r = run(d, {"op": "newton", "curvature": "ggn", "options": {"damping": 1,
                                                                         "max_iter": 3}}, 1)
        msg = r.get("error", {}).get("message", "")
        check("newton cg on ggn: refused at 1 B without Kronecker factors",
              r.get("error", {}).get("code") == "job_memory" and "Kronecker" not in msg, msg)
        rc, r = run(d, {"op": "newton", "curvature": "ggn", "options": {"damping": 1,
                                                                         "max_iter": 3}}, 1 << 30)
        if "newton acp" in peaks and rc == 0:
            diff = peaks["newton acp"] - r["peak_memory_bytes"]
            check("newton acp's peak - newton cg (ggn)'s = the factors and their "
                  "eigendecompositions", -65536 <= diff - (fac + eig) <= 1024,
                  f"{diff} vs {fac + eig}")
        else:
            check("newton cg on ggn runs at 1 GiB", False, str(r)[:300])
    print(f"e2e_kron_memory: {time.time() - t0:.1f} s")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
