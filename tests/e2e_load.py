"""e2e_load.py - the in-tree load test (tests/load/curvd_load.py) at a size that keeps
`make test` fast: 40 clients x 5 jobs (none lost, duplicated or wrong; the daemon's job
count grows by exactly the acknowledged jobs; a queue of 16 answers 429 + Retry-After,
retried), 64 idle and 8 slow-header sockets from
127.0.0.2 while a normal client's 60 health/job requests all succeed, and a 400-sample
per-sample-gradient result read by 4 clients at once (identical bodies).  The full size
(200 clients x 10 jobs, 512 idle sockets, 10 readers) is `make soak`.

Usage: /usr/bin/python3 tests/e2e_load.py build/curvd
"""
import json
import os
import subprocess

from e2e_lib import CURVD, PY, ROOT, check, summary

out = subprocess.run([PY, os.path.join(ROOT, "tests/load/curvd_load.py"), "--curvd", CURVD,
                      "--clients", "40", "--jobs", "5", "--idle", "64", "--slow", "8",
                      "--probes", "60", "--readers", "4", "--fanout-samples", "400",
                      "--timeout", "240", "--serve-arg=--max-queue=16"], capture_output=True, text=True, timeout=300)
print(out.stdout, end="")
lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
res = json.loads(lines[-1]) if lines else {}
jobs, att, fan = res.get("jobs", {}), res.get("attacks", {}), res.get("fanout", {})
check("load: exit status 0", out.returncode == 0, out.stderr[-2000:])
check("load: 200 jobs acknowledged, none lost, duplicated, extra or wrong",
      jobs.get("acknowledged") == 200 and jobs.get("lost") == 0 and
      jobs.get("duplicated") == 0 and jobs.get("extra_jobs") == 0 and jobs.get("wrong") == 0
      and jobs.get("errors") == 0, json.dumps(jobs))
check("load: under 72 idle/slow sockets every normal request succeeds",
      att.get("opened") == 72 and att.get("failed") == 0 and att.get("p99_ms") is not None,
      json.dumps(att))
check("load: 4 readers of a large result get identical bodies",
      fan.get("identical") is True and fan.get("result_bytes", 0) > 10_000_000,
      json.dumps(fan))
check("load: peak RSS measured", res.get("peak_rss_bytes", 0) > 0, str(res.get("peak_rss_bytes")))
# the large result's JSON tree (~80 bytes a number) goes back to the OS once printed
check("load: memory given back after the large job (RSS after < 0.6 x peak)",
      0 < (fan.get("rss_after_bytes") or 0) < 0.6 * res.get("peak_rss_bytes", 0),
      f"{fan.get('rss_after_bytes')} vs peak {res.get('peak_rss_bytes')}")
raise SystemExit(summary())
