#!/usr/bin/python3
"""curvd_load.py - the in-tree load test (issue 27 item 7): bounded, loopback only.

Starts `curvd serve` on a free loopback port (or uses --url) and runs three phases:

1. jobs: --clients threads each submit --jobs small jobs (op loss on the demo MLP, one of
   64 fixed 16-sample batches of the digits dataset) and wait for their results; a 429/503
   is retried after its Retry-After (counted, not an error). Every acknowledged job must
   finish with the loss the same batch gave when run alone (wrong), exactly once (its id
   given to one submission only: duplicated; the daemon's job count grows by exactly the
   acknowledged submissions: extra), and never go missing (lost).
2. attacks: --idle sockets that connect and send nothing and --slow sockets that send a
   request header one byte per second, all from source address 127.0.0.2, while a normal
   client (127.0.0.1) times GET /v1/health and small jobs; their p50/p99 are reported.
3. fan-out: one job with a large result (per-sample gradients of --fanout-samples
   samples), read by --readers concurrent clients; every body must be identical.

The daemon's resident memory is sampled every 20 ms throughout (VmRSS of its pid); the
peak is reported against --max-memory when the serve arguments give one.
Prints one line per phase and a JSON summary (last line); exit status 1 when a job was
lost, duplicated or wrong, a request failed, or (with --max-p99-ms / --max-memory) a
bound was broken.

Usage: tests/load/curvd_load.py [--curvd build/curvd] [--clients 200 --jobs 10]
           [--idle 512 --slow 64 --probes 200] [--readers 10 --fanout-samples 1000]
           [--serve-arg=--max-queue=64 ...] [--max-p99-ms 100]
"""
import argparse
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"
ATTACK_SRC = "127.0.0.2"
BATCHES = 64
BATCH = 16


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curvd", default="build/curvd")
    p.add_argument("--url", help="an already running daemon (http://127.0.0.1:PORT)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `curvd serve` argument (repeatable, e.g. --serve-arg=--max-queue=64)")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--idle", type=int, default=512)
    p.add_argument("--slow", type=int, default=64)
    p.add_argument("--probes", type=int, default=200, help="normal client's requests in phase 2")
    p.add_argument("--readers", type=int, default=10)
    p.add_argument("--fanout-samples", type=int, default=1000)
    p.add_argument("--max-p99-ms", type=float, default=0, help="fail when phase 2's p99 is above")
    p.add_argument("--timeout", type=float, default=300, help="whole run's limit (s)")
    return p.parse_args()


def size_arg(text):
    """BYTES with an optional K/M/G suffix (as curvd's flags)."""
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


def max_memory_of(serve_args):
    for i, a in enumerate(serve_args):
        if a.startswith("--max-memory="):
            return size_arg(a.split("=", 1)[1])
        if a == "--max-memory" and i + 1 < len(serve_args):
            return size_arg(serve_args[i + 1])
    return None


class Daemon:
    """curvd serve on a free loopback port (its stderr kept)."""

    def __init__(self, curvd, extra):
        args = [curvd, "serve", "--port", "0", "--bind", HOST, "--keep-jobs", "3600",
                "--max-kept-bytes", "0"]
        for a in extra:  # --flag=value -> --flag value (curvd's parser takes either?)
            args += a.split("=", 1) if a.startswith("--") and "=" in a else [a]
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        self.log, self.port = [], None
        ready = threading.Event()

        def drain():
            for line in self.p.stderr:
                self.log.append(line)
                m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(20)
        if not self.port:
            self.stop()
            raise SystemExit("curvd did not start: " + "".join(self.log)[-2000:])

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


class RssSampler(threading.Thread):
    """The peak VmRSS (bytes) of pid, sampled every 20 ms until stop(), then raised to
    the kernel's VmHWM."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            rss = self.now()
            if not rss:  # the daemon is gone
                return
            self.peak = max(self.peak, rss)
            self.done.wait(0.02)

    def stop(self):
        self.done.set()
        self.join(2)
        # and the kernel's own high-water mark: a peak shorter than the 20 ms
        # between samples (the large result's JSON tree on a fast machine) counts
        self.peak = max(self.peak, self.now("VmHWM:"))

    def now(self, field="VmRSS:"):
        """The current VmRSS (or another /proc/PID/status field such as VmHWM:; bytes),
        or 0."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


def request(port, method, path, body=None, timeout=120):
    """(status, headers dict, body bytes); one connection per request."""
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdr = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, body=data, headers=hdr)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def percentile(xs, q):
    """The q-th percentile of xs in milliseconds (None when xs is empty)."""
    if not xs:
        return None
    xs = sorted(xs)
    return round(1e3 * xs[min(len(xs) - 1, int(round(q / 100.0 * (len(xs) - 1))))], 2)


def job_doc(b):
    return {"model": "demo-mlp", "dataset": "digits", "op": "loss",
            "batch": {"offset": b * BATCH, "size": BATCH}}


def submit(port, doc, stats, lock):
    """Submits doc until acknowledged (retrying 429/503 after Retry-After); the job id."""
    while True:
        st, hdr, body = request(port, "POST", "/v1/jobs", doc)
        if st in (429, 503):
            with lock:
                stats["retried"] += 1
            time.sleep(min(float(hdr.get("retry-after", "1") or 1), 2.0) * 0.25)
            continue
        if st not in (200, 201, 202):
            raise RuntimeError(f"POST /v1/jobs: {st} {body[:200]!r}")
        return json.loads(body)["id"]


def wait_result(port, jid):
    """The finished job document (long-polls ?wait=)."""
    while True:
        st, _, body = request(port, "GET", f"/v1/jobs/{jid}?wait=30", timeout=60)
        if st != 200:
            return {"status": f"http {st}", "body": body[:200].decode(errors="replace")}
        doc = json.loads(body)
        if doc.get("status") not in ("queued", "running"):
            return doc


def job_count(port):
    st, _, body = request(port, "GET", "/v1/jobs?limit=100000")
    return json.loads(body)["count"] if st == 200 else -1


def phase_jobs(port, a, ref, out):
    stats = {"retried": 0, "acked": 0, "lost": 0, "wrong": 0, "duplicated": 0, "errors": []}
    lock, ids, lat = threading.Lock(), {}, []

    def client(ci):
        for j in range(a.jobs):
            b = (ci * a.jobs + j) % BATCHES
            t0 = time.time()
            try:
                jid = submit(port, job_doc(b), stats, lock)
                with lock:
                    stats["acked"] += 1
                    ids[jid] = ids.get(jid, 0) + 1
                doc = wait_result(port, jid)
            except (OSError, RuntimeError, ValueError, KeyError) as ex:
                with lock:
                    stats["errors"].append(f"client {ci} job {j}: {ex}")
                continue
            with lock:
                lat.append(time.time() - t0)
                if doc.get("status") != "succeeded":
                    stats["lost"] += 1
                    stats["errors"].append(f"job {jid}: {str(doc)[:200]}")
                elif abs(doc["result"]["loss"] - ref[b]) > 1e-6 * max(1.0, abs(ref[b])):
                    stats["wrong"] += 1

    before = job_count(port)
    t0 = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    stats["duplicated"] = sum(n - 1 for n in ids.values() if n > 1)
    extra = job_count(port) - before - stats["acked"]
    stats["extra_jobs"] = extra
    out["jobs"] = {"submitted": a.clients * a.jobs, "acknowledged": stats["acked"],
                   "retried_429_503": stats["retried"], "lost": stats["lost"],
                   "duplicated": stats["duplicated"], "extra_jobs": extra,
                   "wrong": stats["wrong"], "errors": len(stats["errors"]),
                   "jobs_per_s": round(stats["acked"] / wall, 1) if wall > 0 else None,
                   "p50_ms": percentile(lat, 50),
                   "p99_ms": percentile(lat, 99), "seconds": round(wall, 2)}
    for msg in stats["errors"][:5]:
        print("  error:", msg)
    print("jobs:", json.dumps(out["jobs"]))
    return (stats["lost"] or stats["duplicated"] or stats["wrong"] or stats["errors"]
            or extra != 0)


def attacker_socket(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ATTACK_SRC, 0))
    s.settimeout(5)
    s.connect((HOST, port))
    return s


def phase_attacks(port, a, out):
    socks, opened, refused = [], 0, 0
    for _ in range(a.idle + a.slow):
        try:
            socks.append(attacker_socket(port))
            opened += 1
        except OSError:
            refused += 1
    stop = threading.Event()
    slow = socks[a.idle:]
    header = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096

    def drip():
        i = 0
        while not stop.is_set():
            for s in list(slow):
                try:
                    s.send(header[i % len(header):i % len(header) + 1])
                except OSError:
                    slow.remove(s)
            i += 1
            stop.wait(1.0)

    threading.Thread(target=drip, daemon=True).start()
    time.sleep(0.5)
    lat_h, lat_j, failed = [], [], 0
    for i in range(a.probes):
        t0 = time.time()
        try:
            if i % 5 == 4:
                st, _, body = request(port, "POST", "/v1/jobs?wait=30", job_doc(i % BATCHES),
                                      timeout=30)
                ok = st == 200 and json.loads(body).get("status") == "succeeded"
                (lat_j if ok else []).append(time.time() - t0)
            else:
                st, _, _ = request(port, "GET", "/v1/health", timeout=10)
                ok = st == 200
                if ok:
                    lat_h.append(time.time() - t0)
            failed += not ok
        except OSError:
            failed += 1
    stop.set()
    alive = 0
    for s in socks:  # which attack connections the daemon still holds open
        try:
            s.setblocking(False)
            alive += s.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.close()
    everything = lat_h + lat_j
    out["attacks"] = {"idle": a.idle, "slow": a.slow, "opened": opened, "refused": refused,
                      "still_open_at_end": alive, "probes": a.probes, "failed": failed,
                      "health_p50_ms": percentile(lat_h, 50),
                      "health_p99_ms": percentile(lat_h, 99),
                      "job_p50_ms": percentile(lat_j, 50),
                      "job_p99_ms": percentile(lat_j, 99),
                      "p99_ms": percentile(everything, 99)}
    print("attacks:", json.dumps(out["attacks"]))
    bad = failed > 0
    if a.max_p99_ms and (out["attacks"]["p99_ms"] or 1e9) > a.max_p99_ms:
        print(f"  p99 {out['attacks']['p99_ms']} ms above --max-p99-ms {a.max_p99_ms}")
        bad = True
    return bad


def phase_fanout(port, a, out, rss=None):
    n = min(a.fanout_samples, BATCHES * BATCH)
    st, _, body = request(port, "POST", "/v1/jobs?wait=120",
                          {"model": "demo-mlp", "dataset": "digits", "op": "per_sample_gradients",
                           "batch": {"offset": 0, "size": n}}, timeout=180)
    doc = json.loads(body)
    if st != 200 or doc.get("status") != "succeeded":
        print("fan-out: job failed", st, body[:300])
        out["fanout"] = {"failed": True}
        return True
    jid = doc["id"]
    digests, sizes, errors = [], [], []
    lock = threading.Lock()

    def reader():
        try:
            s, _, b = request(port, "GET", f"/v1/jobs/{jid}", timeout=120)
            with lock:
                (digests if s == 200 else errors).append(hashlib.sha256(b).hexdigest()
                                                          if s == 200 else s)
                sizes.append(len(b))
        except OSError as ex:
            with lock:
                errors.append(str(ex))

    t0 = time.time()
    threads = [threading.Thread(target=reader) for _ in range(a.readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.3)
    out["fanout"] = {"samples": n, "readers": a.readers, "result_bytes": max(sizes or [0]),
                     "rss_after_bytes": rss.now() if rss else None,
                     "identical": len(set(digests)) == 1 and len(digests) == a.readers,
                     "errors": len(errors), "seconds": round(time.time() - t0, 2)}
    print("fan-out:", json.dumps(out["fanout"]))
    return not out["fanout"]["identical"] or errors


def references(port):
    """The loss of each of the 64 batches, one job at a time."""
    ref = {}
    for b in range(BATCHES):
        st, _, body = request(port, "POST", "/v1/jobs?wait=60", job_doc(b))
        doc = json.loads(body)
        if st != 200 or doc.get("status") != "succeeded":
            raise SystemExit(f"reference job {b} failed: {st} {body[:300]!r}")
        ref[b] = doc["result"]["loss"]
    return ref


def main():
    a = parse_args()
    daemon = None
    if a.url:
        port = int(a.url.rsplit(":", 1)[1].strip("/"))
        pid = None
    else:
        daemon = Daemon(os.path.abspath(a.curvd), a.serve_arg)
        port, pid = daemon.port, daemon.p.pid
    rss = RssSampler(pid) if pid else None
    if rss:
        rss.start()
    watchdog = threading.Timer(a.timeout, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()
    out, bad = {}, False
    try:
        ref = references(port)
        bad |= bool(phase_jobs(port, a, ref, out))
        bad |= bool(phase_attacks(port, a, out))
        bad |= bool(phase_fanout(port, a, out, rss))
    finally:
        if rss:
            rss.stop()
        if daemon:
            daemon.stop()
    cap = max_memory_of(a.serve_arg)
    if rss:
        out["peak_rss_bytes"] = rss.peak
        out["max_memory_bytes"] = cap
        print(f"peak RSS {rss.peak / 2**20:.1f} MiB" +
              (f" (--max-memory {cap / 2**20:.1f} MiB)" if cap else " (no --max-memory given)"))
        if cap and rss.peak > cap:
            print("  peak RSS above --max-memory")
            bad = True
    out["ok"] = not bad
    print(json.dumps(out))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
