"""e2e_mpi_serve.py - `mpirun -np R curvd serve` (issue 21, items 2 and 4): rank 0 runs the
daemon, every job runs on all ranks.

Usage: /usr/bin/python3 tests/e2e_mpi_serve.py build/curvd
Two daemons on the same files: a plain `curvd serve` (one process, the reference) and
`mpirun --enable-recovery -np 3 curvd serve` (--enable-recovery: mpirun keeps the other ranks
when one dies, so the daemon can go on).  Both get the MLP of tests/e2e_microbatch.py (N = 40:
shards of 14/13/13 samples) registered over HTTP, and then:
  - /v1/health: ranks 3 and ranks_started 3 (the plain daemon: 1 and 1);
  - one job per op and method of GET /v1/ops (e2e_microbatch.job_variants' first variant of
    each, on the GGN; the Hessian for eigen and density too) gives the plain daemon's result
    (e2e_microbatch.result_diff, its tolerances), with "ranks": 3 and a "communication"
    record; also a batch range, a batch of indices (the others' shards are sent with the job)
    and a micro-batched job;
  - after a parameter push and a dataset replacement (sent to the other ranks) the results
    still equal the plain daemon's;
  - a job cancelled while it runs ends "cancelled" on all ranks, and one past its time limit
    "job_timeout"; the next job runs on 3 ranks again;
  - rank 2 killed (SIGKILL) while a job runs: the job fails with 503-class error rank_lost
    naming the rank, /v1/health says ranks 1 (ranks_started 3), the next job succeeds on rank
    0 alone with the plain daemon's numbers, and SIGTERM stops everything (mpirun exits);
  - plain `mpirun -np 2 curvd serve` (no --enable-recovery) serves a job too.
The whole file takes about a minute on 2 cores.  It fails (does not skip) without mpirun
or build/curvd-mpi.so: `make test` installs OpenMPI.
"""
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python", "examples"))
import e2e_microbatch as mb  # noqa: E402
from e2e_lib import CURVD, Daemon, check, summary  # noqa: E402

MPIRUN = shutil.which("mpirun")
LAUNCH = [MPIRUN or "mpirun", "--oversubscribe", "--allow-run-as-root"]
SKIP_FIELDS = mb.NOT_COMPARED | {"ranks", "communication", "matvecs"}


def http(url, method="GET", body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def upload(url, path, name, field, files):
    """Multipart upload of files {part: path} to url/path (as the README's curl -F does)."""
    boundary = "curvdtestboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
             .encode()]
    for part, fp in files.items():
        with open(fp, "rb") as f:
            data = f.read()
        parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"; '
                      f'filename="{os.path.basename(fp)}"\r\n'
                      'Content-Type: application/octet-stream\r\n\r\n').encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + path, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def register(url, d):
    a = upload(url, "/v1/models", "m", None, {"architecture": os.path.join(d, "arch.json"),
                                              "parameters": os.path.join(d, "params.safetensors")})
    b = upload(url, "/v1/datasets", "d", None, {"data": os.path.join(d, "data.safetensors")})
    return a, b


def job_result(url, job, wait=120):
    st, r = http(url + "/v1/jobs?wait=%d" % wait, "POST", dict(job, model="m", dataset="d"))
    return r if st in (200, 201, 202) else {"status": "refused", "error": r.get("error"), "http": st}


def same(tag, a, b):
    diffs = mb.result_diff({k: v for k, v in a.items() if k not in SKIP_FIELDS},
                           {k: v for k, v in b.items() if k not in SKIP_FIELDS})
    return check(tag, not diffs, "; ".join(diffs[:3]))


def compare(tag, url1, url3, job):
    r1, r3 = job_result(url1, job), job_result(url3, job)
    if not check(f"{tag}: both succeed", r1.get("status") == "succeeded" and
                 r3.get("status") == "succeeded", f"{r1.get('error')} / {r3.get('error')}"):
        return None
    res3 = r3["result"]
    check(f"{tag}: ran on 3 ranks", res3.get("ranks") == 3 and "communication" in res3,
          str({k: res3.get(k) for k in ("ranks", "communication")}))
    same(f"{tag}: equals the one-process result", res3, r1["result"])
    return res3


def jobs_for_every_op(specs):
    """The first job of every op and method (GGN: every method, the Gram-based ViViT ones
    included, accepts it), plus the Hessian's largest eigenvalues and density."""
    out = []
    for op in sorted(specs):
        spec = specs[op]
        curv = "ggn" if spec["uses_curvature"] else None
        seen = set()
        for label, job in mb.job_variants(op, spec, curv, 1.0):
            method = (job or {}).get("options", {}).get("method")
            if job is not None and method not in seen:
                seen.add(method)
                out.append((label, job))
    for label, job in mb.job_variants("eigen", specs["eigen"], "hessian", 1.0)[:1] + \
            mb.job_variants("density", specs["density"], "hessian", 1.0)[:1]:
        out.append((label + " (hessian)", job))
    return out


def rank_pid(url, rank):
    """The pid of the given rank of the daemon at url (its environment names the rank)."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        if (b"curvd" in cmd and b"serve" in cmd and
                f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and
                f"CURVD_TEST_TAG={url}".encode() in env):
            return int(p)
    return None


def long_job():
    return {"op": "trace", "curvature": "hessian", "seed": 1,
            "options": {"method": "hutchinson", "max_probes": 1000000, "tol": 0}}


def check_stops(url, job_id, want, what):
    deadline = time.time() + 30
    st = {}
    while time.time() < deadline:
        _, st = http(url + f"/v1/jobs/{job_id}?wait=5")
        if st.get("status") not in ("queued", "running"):
            break
    check(what, st.get("status") == want[0] and (st.get("error") or {}).get("code") == want[1],
          json.dumps({k: st.get(k) for k in ("status", "error")}))
    return st


def wait_running(url, job_id, timeout=60):
    """Polls until the job runs and has done a matvec (the long jobs take minutes even on a
    fast machine); False when it ended first or did not get there in `timeout` s (a loaded
    machine: three ranks on two cores)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, st = http(url + f"/v1/jobs/{job_id}")
        if st.get("status") == "running" and st["progress"]["matvecs_done"] > 0:
            return True
        if st.get("status") not in ("queued", "running"):
            return False
        time.sleep(0.05)
    return False


def main():
    t0 = time.time()
    plugin = os.path.join(os.path.dirname(CURVD), "curvd-mpi.so")
    if not check("mpirun is installed (make test installs openmpi-bin)", MPIRUN is not None) or \
            not check("the MPI plugin is built", os.path.exists(plugin), plugin):
        return summary()
    model, loss_fn, shape, x, y = mb.mlp_case()
    with tempfile.TemporaryDirectory() as d:
        mb.write_case(d, model, loss_fn, shape, x, y)
        one = Daemon("--no-demo", "--blas-threads", "1")
        tag = "tag%d" % os.getpid()
        os.environ["CURVD_TEST_TAG"] = tag
        three = Daemon("--no-demo", "--blas-threads", "1",
                       launcher=LAUNCH + ["--enable-recovery", "-x", "CURVD_TEST_TAG", "-np", "3"])
        try:
            run(d, one.url, three, tag)
        finally:
            one.stop()
            three.stop()
        check("mpirun exits after SIGTERM", three.p.poll() is not None, str(three.p.poll()))
        check("rank 0 said it stopped", any("curvd: stopped" in line for line in three.log),
              "".join(three.log)[-600:])
        two = Daemon("--no-demo", "--blas-threads", "1", launcher=LAUNCH + ["-np", "2"])
        try:
            register(two.url, d)
            _, h = http(two.url + "/v1/health")
            check("np 2: health ranks 2", h.get("ranks") == 2, str(h.get("ranks")))
            r = job_result(two.url, {"op": "trace", "curvature": "ggn", "seed": 2,
                                     "options": {"method": "hutchinson", "max_probes": 10}})
            check("np 2: a job runs on both ranks", (r.get("result") or {}).get("ranks") == 2,
                  json.dumps(r)[:300])
            st, r = http(two.url + "/v1/jobs?wait=30", "POST",
                         {"op": "laplace", "model": "m", "dataset": "d",
                          "options": {"structure": "diag", "keep": True}})
            check("np 2: laplace keep refused at submit (400 options.keep: the ranks keep no "
                  "posteriors)", st == 400 and r.get("error", {}).get("field") == "options.keep",
                  f"{st} {json.dumps(r)[:300]}")
        finally:
            two.stop()
    print(f"e2e_mpi_serve {time.time() - t0:.1f} s")
    return summary()


def run(d, url1, three, tag):
    url3 = three.url
    for u in (url1, url3):
        check(f"{u}: model and dataset registered", register(u, d) == (201, 201))
    _, h1 = http(url1 + "/v1/health")
    _, h3 = http(url3 + "/v1/health")
    check("health: one process has ranks 1", h1.get("ranks") == 1 and h1.get("ranks_started") == 1,
          str(h1))
    check("health: mpirun -np 3 has ranks 3", h3.get("ranks") == 3 and h3.get("ranks_started") == 3,
          str(h3))
    check("health: one worker under mpirun (jobs run one at a time)", h3.get("workers") == 1)
    _, specs = http(url3 + "/v1/ops")
    specs = specs["op_specs"]
    for label, job in jobs_for_every_op(specs):
        compare(label, url1, url3, job)
    base = {"op": "eigen", "curvature": "ggn", "seed": 4,
            "options": {"method": "lanczos", "k": 2}}
    compare("batch range", url1, url3, dict(base, batch={"offset": 5, "size": 29}))
    compare("batch indices", url1, url3, dict(base, batch={"indices": [39, 0, 7, 7, 21, 3, 30]}))
    compare("micro-batched", url1, url3, dict(base, micro_batch=4))
    compare("per-sample gradients, batch indices", url1, url3,
            {"op": "per_sample_gradients", "batch": {"indices": [3, 1, 38, 20, 2]}})

    # a parameter push and a dataset replacement reach the other ranks
    torch_model, loss_fn, shape, x, y = mb.mlp_case()
    import torch
    with torch.no_grad():
        for p in torch_model.parameters():
            p.mul_(1.5)
    d2 = tempfile.mkdtemp()
    mb.write_case(d2, torch_model, loss_fn, shape, x * 0.5, y)
    for u in (url1, url3):
        with open(os.path.join(d2, "params.safetensors"), "rb") as f:
            req = urllib.request.Request(u + "/v1/models/m/parameters", data=f.read(),
                                         method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(req, timeout=60) as r:
                check(f"{u}: parameters pushed", r.status == 200)
    compare("after a parameter push", url1, url3, base)
    for u in (url1, url3):
        with open(os.path.join(d2, "data.safetensors"), "rb") as f:
            req = urllib.request.Request(u + "/v1/datasets/d", data=f.read(), method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
            check(f"{u}: dataset replaced", status in (200, 201), str(status))
    ref = compare("after a dataset replacement", url1, url3, base)
    shutil.rmtree(d2, ignore_errors=True)

    # cancel and time limit: every rank stops, the ranks stay whole.  The long
    # jobs read 20000 rows (the 40-row dataset runs a million probes in ~4 s
    # in one process here, well under a second on a fast machine: it would
    # end before the cancel, the 1 s limit or the kill)
    big = os.path.join(d, "big.safetensors")
    with open(big, "wb") as f:
        f.write(mb.export_dataset(x.repeat(500, 1), y.repeat(500)))
    check("the long jobs' 20000-row dataset registered",
          upload(url3, "/v1/datasets", "big", None, {"data": big}) == 201)
    # its 20000 indices: rank 0 holds the document's text for the other ranks
    # as well as the int32 list, and --max-memory counts both
    job = dict(long_job(), model="m", dataset="big",
               batch={"indices": list(range(19999, -1, -1))})
    _, j = http(url3 + "/v1/jobs", "POST", job)
    check("long job started", wait_running(url3, j["id"]))
    _, h3 = http(url3 + "/v1/health")
    docs = h3["memory"]["by_kind"]["job_documents"]
    text = len(json.dumps(job, separators=(",", ":")))
    check("the running job's document counts its text for the other ranks",
          docs >= text + 4 * 20000, f"{docs} bytes counted; text {text} + indices {4 * 20000}")
    http(url3 + f"/v1/jobs/{j['id']}", "DELETE")
    check_stops(url3, j["id"], ("cancelled", "cancelled"), "cancel stops the job on every rank")
    st, j = http(url3 + "/v1/jobs?timeout=1", "POST", dict(long_job(), model="m", dataset="big"))
    check_stops(url3, j.get("id"), ("failed", "job_timeout"), "a job past its time limit stops")
    r = compare("a job after cancel and timeout", url1, url3, base)

    # rank 2 killed while a job runs
    _, j = http(url3 + "/v1/jobs", "POST", dict(long_job(), model="m", dataset="big"))
    check("long job running before the kill", wait_running(url3, j["id"]))
    pid = rank_pid(tag, 2)
    if check("found rank 2's process", pid is not None):
        os.kill(pid, signal.SIGKILL)
        st = check_stops(url3, j["id"], ("failed", "rank_lost"), "the running job fails: rank_lost")
        check("the error names rank 2", "rank 2" in ((st.get("error") or {}).get("message", "")),
              str(st.get("error")))
    _, h3 = http(url3 + "/v1/health")
    check("health after the loss: ranks 1 of 3 started",
          h3.get("ranks") == 1 and h3.get("ranks_started") == 3 and h3.get("status") == "ok",
          str({k: h3.get(k) for k in ("status", "ranks", "ranks_started")}))
    r1, r3 = job_result(url1, base), job_result(url3, base)
    ok = r3.get("status") == "succeeded"
    check("the daemon keeps serving: the next job succeeds on rank 0 alone",
          ok and "ranks" not in r3["result"], json.dumps(r3)[:300])
    if ok and r1.get("status") == "succeeded":
        same("... with the one-process numbers", r3["result"], r1["result"])
    pid1 = rank_pid(tag, 1)
    deadline = time.time() + 10
    while pid1 is not None and time.time() < deadline:
        time.sleep(0.2)
        pid1 = rank_pid(tag, 1)
    check("rank 1 left after the loss", pid1 is None)


if __name__ == "__main__":
    sys.exit(main())
