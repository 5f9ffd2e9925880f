"""bench_monitor.py - a training monitor under a training loop's push rate (issue 24,
"Speed": a monitor on every version of a loop pushing 10 versions/s of the digits MLP
keeps up, coalescing, without growing memory).

Usage: /usr/bin/python3 bench/bench_monitor.py [build/curvd] [--seconds 30] [--rate 10]
       [--state-dir] [--workers 2] [--batch 256] [--light] [--keep-jobs S]
       [--monitor-history N]
Starts `curvd serve` (demo model demo-mlp, dataset digits), creates a monitor with
every=1 on a 256-sample batch (all instruments with probes 10, lanczos_steps 10 unless
--light), pushes perturbed parameters at --rate per second for --seconds, meanwhile
submits an interactive `loss` job every second and records its latency, and reports:
pushes, entries, skipped (entries + skipped = pushes once drained), the lag of the last
entry behind the last push, the interactive jobs' latency, and the daemon's RSS (VmRSS
from /proc) after a 3 s warm-up and at the end.
"""
import argparse
import array
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.argv, ARGV = sys.argv[:1] + [a for a in sys.argv[1:] if not a.startswith("-")][:1], sys.argv
from e2e_lib import Daemon  # noqa: E402


def call(url, method="GET", body=None, ctype="application/json"):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("curvd", nargs="?", default="build/curvd")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--state-dir", action="store_true")
    ap.add_argument("--batch", type=int, default=256, help="samples per instruments job")
    ap.add_argument("--keep-jobs", type=float, default=None,
                    help="curvd serve --keep-jobs (finished jobs, results included, are kept "
                    "600 s by default: the job table, not the monitor, grows meanwhile)")
    ap.add_argument("--monitor-history", type=int, default=None)
    ap.add_argument("--light", action="store_true", help="first-order instruments only")
    a = ap.parse_args(ARGV[1:])
    extra = ["--workers", str(a.workers)]
    if a.monitor_history is not None:
        extra += ["--monitor-history", str(a.monitor_history)]
    if a.keep_jobs is not None:
        extra += ["--keep-jobs", str(a.keep_jobs)]
    tmp = tempfile.mkdtemp(prefix="curvd-benchmon-")
    if a.state_dir:
        extra += ["--state-dir", os.path.join(tmp, "state")]
    with Daemon(*extra) as d:
        u = d.url
        params = urllib.request.urlopen(u + "/v1/models/demo-mlp/parameters").read()
        n = struct.unpack("<Q", params[:8])[0]
        head, data = params[:8 + n], array.array("f")
        data.frombytes(params[8 + n:])
        mon = {"dataset": "digits", "batch": {"offset": 0, "size": a.batch}, "every": 1,
               "probes": 10, "lanczos_steps": 10}
        if a.light:
            mon["exclude"] = ["hessian_trace", "hessian_max_eigenvalue", "tic_trace", "tic_diag"]
        opts = {k: mon[k] for k in mon if k not in ("dataset", "batch", "every")}
        job_s = call(u + "/v1/jobs?wait=60", "POST", {
            "op": "instruments", "model": "demo-mlp", "dataset": "digits",
            "batch": mon["batch"], "options": opts})["result"]["elapsed_s"]
        m = call(u + "/v1/models/demo-mlp/monitors", "POST", mon)
        t0 = time.time()
        pushes, lat, rss0, rss_t = 0, [], None, []
        next_job = t0 + 1
        while time.time() - t0 < a.seconds:
            k = pushes + 1
            body = head + array.array("f", [x * (1 + 1e-4 * k) for x in data]).tobytes()
            v = call(u + "/v1/models/demo-mlp/parameters", "PUT", body,
                     "application/octet-stream")["version"]
            pushes += 1
            if rss0 is None and time.time() - t0 >= 3:
                rss0 = rss_kb(d.p.pid)
            if time.time() - t0 >= 5 * (len(rss_t) + 1):
                rss_t.append(rss_kb(d.p.pid))
            if time.time() >= next_job:
                s = time.time()
                call(u + "/v1/jobs?wait=30", "POST", {"op": "loss", "model": "demo-mlp",
                                                     "dataset": "digits"})
                lat.append(time.time() - s)
                next_job += 1
            sleep = t0 + pushes / a.rate - time.time()
            if sleep > 0:
                time.sleep(sleep)
        t_end = time.time()
        last = None
        while time.time() - t_end < 30:
            h = call(u + "/v1/models/demo-mlp/history?monitor=" + m["id"])["history"]
            if h and h[-1]["version"] == v:
                last = time.time()
                break
            time.sleep(0.02)
        h = call(u + "/v1/models/demo-mlp/history?monitor=" + m["id"])["history"]
        rss1 = rss_kb(d.p.pid)
        skipped = sum(e["skipped"] for e in h)
        print(json.dumps({
            "seconds": round(t_end - t0, 1), "pushes": pushes,
            "push_rate": round(pushes / (t_end - t0), 2), "workers": a.workers,
            "state_dir": a.state_dir, "light": a.light,
            "entries": len(h), "skipped": skipped, "entries_plus_skipped": len(h) + skipped,
            "last_entry_lag_s": None if last is None else round(last - t_end, 3),
            "instruments_job_elapsed_s": job_s,
            "interactive_loss_job_s": {"median": round(statistics.median(lat), 4),
                                       "max": round(max(lat), 4), "n": len(lat)} if lat else None,
            "batch": a.batch, "rss_kb_every_5s": rss_t,
            "jobs_kept_bytes": [x for x in urllib.request.urlopen(u + "/metrics").read().decode()
                                .splitlines() if x.startswith("curvd_jobs_kept_bytes")],
            "rss_kb_after_3s": rss0, "rss_kb_end": rss1}, indent=1))
    if a.state_dir:
        # the history read back after a restart (several segment records when > 256)
        with Daemon(*extra) as d:
            h2 = call(d.url + "/v1/models/demo-mlp/history?monitor=" + m["id"])["history"]
            print(json.dumps({"restart_history_entries": len(h2), "restart_history_equal": h2 == h,
                              "segment_files": sorted(os.listdir(os.path.join(tmp, "state",
                                                                              "monitors")))}))


if __name__ == "__main__":
    main()
