"""e2e_memory.py - memory admission control (--max-memory) over HTTP.

Usage: /usr/bin/python3 tests/e2e_memory.py build/curvd
Three daemons (about 30-40 s in all on 2 cores):
  small  --max-memory 3M --max-kept-bytes 1M: a job that can never fit is 413
         memory_limit with the numbers (need, limit, registry) in the error, a
         result above --max-kept-bytes is 413 result_too_large, an upload past the
         limit is 413 memory_limit; health and /metrics show the account.
  pair   --workers 2, the limit set from a probe so that one long trace job fits
         but two do not: the second waits in the queue while a worker is free
         (waits_total 1), then runs and succeeds once the first ends; an upload
         that fits only once jobs end is 429 memory_busy with Retry-After; a 200k-index
         job document queued behind it is counted at its compact size (4 bytes an
         index, not a cJSON node each) and submitting it raises the daemon's peak
         RSS by far less than a cJSON tree of it would (about 18 MB).
  burst  --workers 2 --max-memory 160M: eight large per_sample_gradients jobs and
         dataset uploads at once (some answered 429 memory_busy with Retry-After,
         retried), then 10 readers of one large result
         (per-sample gradients of 400 samples, ~12 MB of JSON) at once; every
         job succeeds, the readers read identical bytes, and the peak RSS (VmHWM) stays under
         --max-memory plus SLACK (the binary, libraries, thread stacks, request
         buffers and allocator slack, which the account does not count).
  indices --max-memory 160M: six 1M-index job documents (3.6 MB each) at once, all
         run; peak RSS under --max-memory plus SLACK.
  bodies  a request body half sent is counted as request_bodies, and leaves the
         account when the client goes away.
Standard library only; ends with 'N passed, M failed'.
"""
import json
import os
import re
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_lib import Daemon, check, summary  # noqa: E402

SLACK = 0  # the baseline kind counts the process itself: RSS stays under the limit
BASE = {}  # the baseline kind by worker count (main)
JOBS, UPLOADS, INDEX_JOBS = 8, 3, 6  # the burst
# a loss job over a 1M-index batch (3.6 MB of text; a cJSON tree of it ~88 MB)
INDEX_DOC = {"op": "loss", "model": "demo-regression", "dataset": "regression",
             "batch": {"indices": [i % 256 for i in range(1000000)]}}
LONG = {"op": "trace", "model": "demo-mlp", "dataset": "digits", "curvature": "hessian",
        "options": {"max_probes": 1000000, "tol": 0}}


def req(url, method="GET", body=None, ctype="application/json", raw=False):
    """(status, parsed JSON or text (bytes with raw), headers)."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body, separators=(",", ":")).encode()
    r = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(r, timeout=120) as f:
            status, text, hdrs = f.status, f.read(), f.headers
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read(), e.headers
    if raw:
        return status, text, hdrs
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def memory(d):
    return req(d.url + "/v1/health")[1]["memory"]


def vm(pid, key):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def safetensors(n, din, classes):
    """A dataset file: x [n, din] F32, y [n] I64."""
    x = struct.pack("<%df" % (n * din), *[((i * 7) % 13) / 13.0 for i in range(n * din)])
    y = struct.pack("<%dq" % n, *[i % classes for i in range(n)])
    hdr = {"x": {"dtype": "F32", "shape": [n, din], "data_offsets": [0, len(x)]},
           "y": {"dtype": "I64", "shape": [n], "data_offsets": [len(x), len(x) + len(y)]}}
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + x + y


def wait_status(d, jid, want, seconds=60):
    t = time.time() + seconds
    while time.time() < t:
        s = req(d.url + "/v1/jobs/" + jid)[1]
        if s.get("status") in want:
            return s
        time.sleep(0.05)
    return s


def need_of(err):
    m = re.search(r"needs about (\d+) bytes", err.get("message", ""))
    return int(m.group(1)) if m else 0


def baseline(workers):
    """The daemon's baseline kind (its resident memory at start plus 32 MiB a
    worker) as a daemon with that many workers reports it."""
    with Daemon("--workers", str(workers)) as d:
        return memory(d)["by_kind"]["baseline"]


def test_small():
    small = BASE[1] + (3 << 20)  # 3 MiB beside the baseline
    with Daemon("--workers", "1", "--max-memory", str(small), "--max-kept-bytes", "1M") as d:
        st, r, _ = req(d.url + "/v1/jobs", "POST", LONG)
        err = r.get("error", {}) if isinstance(r, dict) else {}
        check("a job that can never fit is 413 memory_limit",
              st == 413 and err.get("code") == "memory_limit", (st, r))
        check("the 413 names the need, the limit and the registry's part",
              need_of(err) > 3 << 20 and str(small) in err.get("message", "")
              and "the registry and the daemon's baseline hold" in err.get("message", ""), err)
        st, r, _ = req(d.url + "/v1/jobs", "POST",
                       {"op": "per_sample_gradients", "model": "demo-mlp", "dataset": "digits"})
        err = r.get("error", {}) if isinstance(r, dict) else {}
        check("a result above --max-kept-bytes is 413 result_too_large at submit",
              st == 413 and err.get("code") == "result_too_large"
              and str(1 << 20) in err.get("message", ""), (st, r))
        st, r, _ = req(d.url + "/v1/datasets/big", "PUT", safetensors(20000, 64, 10),
                       "application/octet-stream")
        check("an upload past --max-memory is 413 memory_limit",
              st == 413 and r.get("error", {}).get("code") == "memory_limit", (st, r))
        mem = memory(d)
        check("health: limit and used bytes by kind",
              mem["limit_bytes"] == small and mem["by_kind"]["registry"] > 0
              and mem["by_kind"]["baseline"] > 32 << 20
              and mem["used_bytes"] == sum(mem["by_kind"].values()), mem)
        text = req(d.url + "/metrics")[1].decode()
        check("metrics: curvd_memory_limit_bytes and curvd_memory_used_bytes by kind",
              "curvd_memory_limit_bytes %d" % small in text
              and 'curvd_memory_used_bytes{kind="running_jobs"}' in text, text[-400:])


def test_pair():
    # the jobs' needs, from a daemon that cannot hold them (--job-memory bounds the
    # engine's plans, so that the index-list job fits too)
    second = dict(LONG, options={"max_probes": 64, "tol": 0})  # 32 vectors at a time, as LONG
    with Daemon("--workers", "1", "--max-memory", str(BASE[1] + (3 << 20)),
                "--job-memory", "16M") as d:
        need = need_of(req(d.url + "/v1/jobs", "POST", LONG)[1]["error"])
        need2 = need_of(req(d.url + "/v1/jobs", "POST", second)[1]["error"])
        reg = memory(d)["by_kind"]["registry"]
    check("the two trace jobs need the same", need == need2 and need > 0, (need, need2))
    # one long job and a 200k-index document beside the registry and the baseline
    limit = BASE[2] + reg + need + need // 2 + (6 << 20)
    with Daemon("--workers", "2", "--max-memory", str(limit), "--job-memory", "16M") as d:
        a = req(d.url + "/v1/jobs", "POST", LONG)[1]["id"]
        wait_status(d, a, ("running",))
        st, r, _ = req(d.url + "/v1/jobs", "POST", second)
        b = r.get("id", "")
        # the free worker's look at b (waits_total counts it; polled, not a fixed
        # sleep, which a slow machine could outlast): then b must still be queued
        for _ in range(200):
            if memory(d)["waits_total"] >= 1:
                break
            time.sleep(0.05)
        s = req(d.url + "/v1/jobs/" + b)[1]
        h = req(d.url + "/v1/health")[1]
        check("a job that fits alone but not beside the running one waits in the queue",
              st == 202 and s.get("status") == "queued" and h["busy_workers"] == 1
              and h["memory"]["waits_total"] == 1, (st, s.get("status"), h))
        # an upload that fits beside the registry but not beside the running job now
        room = limit - h["memory"]["used_bytes"] + h["memory"]["by_kind"]["kept_results"]
        rows = (room + (2 << 20)) // (64 * 4 + 8)
        st, r, hd = req(d.url + "/v1/datasets/later", "PUT", safetensors(rows, 64, 10),
                        "application/octet-stream")
        check("an upload that fits once jobs end is 429 memory_busy with Retry-After",
              st == 429 and r.get("error", {}).get("code") == "memory_busy"
              and hd.get("Retry-After") is not None, (st, r, room))
        # a big index list queued behind it: counted compactly
        docs0 = h["memory"]["by_kind"]["job_documents"]
        # 200k indices: the gathered batch (32 bytes a sample: x, y and the index)
        # counts in the job's engine memory and must fit beside the registry
        n = 200000
        text = json.dumps({"op": "loss", "model": "demo-regression", "dataset": "regression",
                           "batch": {"indices": [i % 256 for i in range(n)]}},
                          separators=(",", ":")).encode()
        hwm0 = vm(d.p.pid, "VmHWM")
        st, r, _ = req(d.url + "/v1/jobs", "POST", text)
        grew = vm(d.p.pid, "VmHWM") - hwm0
        c = r.get("id", "")
        docs = memory(d)["by_kind"]["job_documents"] - docs0
        check("a queued 200k-index document is counted at 4 bytes an index",
              st == 202 and 4 * n <= docs < 4 * n + 65536, (st, docs, r if st != 202 else ""))
        check("submitting it raises peak RSS by less than 3x its text (a cJSON tree: ~25x)",
              grew < 3 * len(text), (grew, len(text)))
        req(d.url + "/v1/jobs/" + a, "DELETE")
        s = wait_status(d, b, ("succeeded", "failed", "cancelled"))
        check("the waiting job runs and succeeds once the first has ended",
              s.get("status") == "succeeded", s.get("status"))
        s = wait_status(d, c, ("succeeded", "failed", "cancelled"))
        check("the index-list job then runs too", s.get("status") == "succeeded",
              (s.get("status"), s.get("error")))
        mem = memory(d)
        check("nothing queued or running is left in the account",
              mem["by_kind"]["job_documents"] == 0 and mem["by_kind"]["running_jobs"] == 0, mem)


def test_burst():
    limit = BASE[2] + (160 << 20)
    with Daemon("--workers", "2", "--max-memory", str(limit), "--job-memory", "32M") as d:
        base = vm(d.p.pid, "VmRSS")
        job = {"op": "per_sample_gradients", "model": "demo-mlp", "dataset": "digits",
               "batch": {"size": 400}}
        data = safetensors(20000, 64, 10)
        out, busy = [], [0]

        def submit_job():
            for _ in range(600):
                st, r, hd = req(d.url + "/v1/jobs?wait=120", "POST", job, raw=True)
                if st != 429:
                    break
                busy[0] += 1
                time.sleep(0.2)
            # the result is large: its status is read from the text's head
            out.append((st, "succeeded" if b'"status":"succeeded"' in r[:300] else r[:300]))

        def upload(k):
            for _ in range(600):
                st, r, hd = req(d.url + "/v1/datasets/up%d" % k, "PUT", data,
                                "application/octet-stream")
                if st != 429:
                    break
                busy[0] += 1
                ok = hd.get("Retry-After") is not None
                if not ok:
                    out.append((st, "429 without Retry-After"))
                    return
                time.sleep(0.2)
            out.append((st, "upload"))

        t0 = time.time()
        ts = [threading.Thread(target=submit_job) for _ in range(JOBS)]
        ts += [threading.Thread(target=upload, args=(k,)) for k in range(UPLOADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        # a large result read by 10 clients at once: streamed from the one kept text
        big = req(d.url + "/v1/jobs?wait=120", "POST", dict(job, batch={"size": 400}),
                  raw=True)
        bid = json.loads(big[1][:big[1].index(b',"op"')] + b"}")["id"] if big[0] == 200 else ""
        bodies = []

        def read_big():
            bodies.append(req(d.url + "/v1/jobs/" + bid, raw=True)[1])

        rs = [threading.Thread(target=read_big) for _ in range(10)]
        for t in rs:
            t.start()
        for t in rs:
            t.join()
        check("10 readers of a large result read the same %d bytes" % len(big[1]),
              big[0] == 200 and len(bodies) == 10 and len(big[1]) > (8 << 20)
              and all(b == bodies[0] and len(b) >= len(big[1]) for b in bodies),
              (big[0], [len(b) for b in bodies]))
        hwm = vm(d.p.pid, "VmHWM")
        jobs_ok = sum(1 for st, s in out if st == 200 and s == "succeeded")
        ups_ok = sum(1 for st, s in out if st in (200, 201) and s == "upload")
        check("every job of the burst succeeded and every upload was taken",
              jobs_ok == JOBS and ups_ok == UPLOADS, out)
        check("peak RSS stays under --max-memory + %d MiB" % (SLACK >> 20),
              hwm <= limit + SLACK,
              "VmHWM %.1f MB, limit %.1f MB, start %.1f MB, %d retries after 429, %.1f s"
              % (hwm / 1e6, limit / 1e6, base / 1e6, busy[0], time.time() - t0))
        print("burst: VmHWM %.1f MB under --max-memory %.1f MB (+%d MiB slack), started at "
              "%.1f MB; %d retries after 429; %.1f s"
              % (hwm / 1e6, limit / 1e6, SLACK >> 20, base / 1e6, busy[0], time.time() - t0))


def test_indices():
    """The queue-of-indices attack: INDEX_JOBS 1M-index documents posted at once."""
    limit = BASE[1] + (160 << 20)
    with Daemon("--workers", "1", "--max-memory", str(limit), "--job-memory", "32M") as d:
        out, busy = [], [0]

        def submit_indices():
            for _ in range(600):
                st, r, hd = req(d.url + "/v1/jobs", "POST", INDEX_DOC)
                if st != 429:
                    break
                busy[0] += 1
                time.sleep(0.2)
            out.append((st, r))

        ts = [threading.Thread(target=submit_indices) for _ in range(INDEX_JOBS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ids = [r["id"] for st, r in out if st == 202]
        done = [wait_status(d, i, ("succeeded", "failed", "cancelled")) for i in ids]
        hwm = vm(d.p.pid, "VmHWM")
        check("every queued 1M-index job was taken and succeeded",
              len(ids) == INDEX_JOBS and all(x.get("status") == "succeeded" for x in done),
              [(st, str(r)[:120]) for st, r in out if st != 202][:3])
        check("queue of 1M-index documents: peak RSS under --max-memory + %d MiB"
              % (SLACK >> 20), hwm <= limit + SLACK,
              "VmHWM %.1f MB, limit %.1f MB, %d retries after 429" % (hwm / 1e6, limit / 1e6,
                                                                    busy[0]))
        print("indices: %d documents of 1M indices, VmHWM %.1f MB under --max-memory %.1f MB; "
              "%d retries after 429" % (INDEX_JOBS, hwm / 1e6, limit / 1e6, busy[0]))


def test_request_bodies():
    """A body being received is counted (request_bodies) until its request ends."""
    import socket
    with Daemon("--workers", "1") as d:
        host, port = d.url.split("//")[1].split(":")
        s = socket.create_connection((host, int(port)))
        s.sendall(b"PUT /v1/datasets/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/octet-stream\r\nContent-Length: 4000000\r\n\r\n")
        s.sendall(b"\0" * 1500000)
        held = 0
        for _ in range(100):
            held = memory(d)["by_kind"]["request_bodies"]
            if held >= 1500000:
                break
            time.sleep(0.05)
        check("a body being received is counted as request_bodies", held >= 1500000, held)
        s.close()
        for _ in range(100):
            held = memory(d)["by_kind"]["request_bodies"]
            if held == 0:
                break
            time.sleep(0.05)
        check("... and leaves the account when its connection ends", held == 0, held)


def main():
    BASE[1], BASE[2] = baseline(1), baseline(2)
    check("the baseline: resident memory at start plus 32 MiB a worker",
          BASE[2] - BASE[1] >= (32 << 20) - (2 << 20) and BASE[1] > 32 << 20, BASE)
    test_request_bodies()
    test_small()
    test_pair()
    test_burst()
    test_indices()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
