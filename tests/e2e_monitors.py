"""e2e_monitors.py - training monitors (issue 24 item 2) through the HTTP API.

Usage: /usr/bin/python3 tests/e2e_monitors.py build/curvd
One daemon (--workers 1, --monitor-history 4, --state-dir) with the demo
model: a monitor with every=2 gets history entries for versions 3, 5, 7
whose instruments equal a direct `instruments` job on the same version and
batch; coalescing while a long interactive job holds the only worker
(entries + skipped add up to the monitored versions, the interactive job
submitted after the pushes runs before the monitor's job); the history cap;
the curvd_instrument gauges; the errors; then a restart on the same state
directory keeps the monitors and their histories and goes on counting; the
roles (admin creates and deletes, read reads).
"""
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_lib import call, scaled_safetensors, Daemon, check, summary  # noqa: E402

BATCH = {"offset": 0, "size": 64}
OPTS = {"probes": 3, "lanczos_steps": 3, "bins": 8}
CAP = 3






def push(u, params, k):
    st, doc = call(u + "/v1/models/demo-mlp/parameters", "PUT", perturbed(params, k),
                   "application/octet-stream")
    assert st == 200, (st, doc)
    return doc["version"]


def history(u, q=""):
    return call(u + "/v1/models/demo-mlp/history" + q)[1]["history"]


def wait_entry(u, mid, version, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        for h in history(u, "?monitor=" + mid):
            if h["version"] == version:
                return h
        time.sleep(0.05)
    return None


def wait_status(u, jid, want, timeout=30):
    """The job's status document once its status is one of want (or at the timeout)."""
    end = time.time() + timeout
    while True:
        s = call(u + "/v1/jobs/" + jid)[1]
        if not isinstance(s, dict) or s.get("status") in want or time.time() > end:
            return s if isinstance(s, dict) else {}
        time.sleep(0.02)


def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def run(u, params, state):
    # ---- creation and errors ----
    doc = dict(dataset="digits", batch=BATCH, every=2, seed=5, **OPTS)
    st, m1 = call(u + "/v1/models/demo-mlp/monitors", "POST", doc)
    check("POST monitor 201", st == 201 and m1.get("id") and m1["every"] == 2, m1)
    mid = m1["id"]
    st, lst = call(u + "/v1/models/demo-mlp/monitors")
    check("GET monitors lists it", st == 200 and [m["id"] for m in lst["monitors"]] == [mid], lst)
    for name, body, code, field in [
            ("unknown field", {"dataset": "digits", "evry": 2}, 400, "evry"),
            ("missing dataset", {"every": 2}, 400, "dataset"),
            ("every 0", {"dataset": "digits", "every": 0}, 400, "every"),
            ("probes 0 (the op's table)", {"dataset": "digits", "probes": 0}, 400, "probes"),
            ("bad include", {"dataset": "digits", "include": ["nope"]}, 400, "include"),
            ("bad batch", {"dataset": "digits", "batch": {"offset": 0, "size": 10 ** 7}}, 400,
             "batch"),
            ("unknown dataset", {"dataset": "nope"}, 404, "dataset")]:
        st, e = call(u + "/v1/models/demo-mlp/monitors", "POST", body)
        err = e.get("error", {}) if isinstance(e, dict) else {}
        check("monitor %s -> %d %s" % (name, code, field),
              st == code and err.get("field", "").startswith(field), (st, e))
    st, e = call(u + "/v1/models/nope/monitors", "POST", {"dataset": "digits"})
    check("monitor of unknown model 404", st == 404, (st, e))
    check("history of unknown model 404", call(u + "/v1/models/nope/history")[0] == 404)
    check("list of unknown model 404", call(u + "/v1/models/nope/monitors")[0] == 404)
    check("history of unknown monitor 404",
          call(u + "/v1/models/demo-mlp/history?monitor=m000000000000")[0] == 404)
    check("DELETE unknown monitor 404",
          call(u + "/v1/models/demo-mlp/monitors/m000000000000", "DELETE")[0] == 404)
    check("?since=abc 400", call(u + "/v1/models/demo-mlp/history?since=abc")[0] == 400)

    # ---- every=2: versions 3, 5, 7, equal to a direct job ----
    v0 = call(u + "/v1/models/demo-mlp")[1]["version"]
    seen = []
    for k in range(1, 7):
        v = push(u, params, k)
        if k % 2 == 0:
            h = wait_entry(u, mid, v)
            seen.append(v)
            job = {"op": "instruments", "model": "demo-mlp", "dataset": "digits", "batch": BATCH,
                   "seed": 5, "options": OPTS}
            st, r = call(u + "/v1/jobs?wait=30", "POST", job)
            res = r.get("result", {})
            same = h is not None and all(close(h["instruments"][n], res.get(n))
                                         for n in h["instruments"])
            check("version %d entry equals a direct instruments job" % v,
                  same and h["skipped"] == 0 and len(h["instruments"]) >= 10 and
                  h["instruments"]["update_size"] > 0, (h, res))
    check("entries for every 2nd version", [h["version"] for h in history(u)] ==
          [v0 + 2, v0 + 4, v0 + 6] and seen == [v0 + 2, v0 + 4, v0 + 6],
          [h["version"] for h in history(u)])
    check("?since filters", [h["version"] for h in history(u, "?since=%d" % (v0 + 4))] ==
          [v0 + 4, v0 + 6])

    # ---- gauges ----
    st, text = call(u + "/metrics")
    text = text.decode() if isinstance(text, bytes) else str(text)
    last = history(u)[-1]["instruments"]
    line = 'curvd_instrument{model="demo-mlp",name="loss"} '
    got = [float(x[len(line):]) for x in text.splitlines() if x.startswith(line)]
    check("curvd_instrument loss gauge = newest entry", got and close(got[0], last["loss"]),
          (got, last["loss"]))
    check("gauge per scalar instrument",
          all(('name="%s"' % n) in text for n, x in last.items() if x is not None))

    # ---- coalescing behind a long interactive job (one worker) ----
    st, m2 = call(u + "/v1/models/demo-mlp/monitors", "POST",
                  dict(dataset="digits", batch=BATCH, **OPTS))
    mid2 = m2["id"]
    longjob = {"op": "trace", "model": "demo-mlp", "dataset": "digits", "curvature": "hessian",
               "options": {"max_probes": 1000000, "tol": 0}}
    # it holds the worker until it is cancelled below, once the pushes and the
    # quick job are in (a 2 s time limit raced them on a slow or loaded machine)
    st, lj = call(u + "/v1/jobs?timeout=300", "POST", longjob)
    check("long job accepted", st == 202, lj)
    s = wait_status(u, lj.get("id", ""), ("running",))
    check("long job running", s.get("status") == "running", s)
    pushed = [push(u, params, 10 + k) for k in range(10)]
    st, quick = call(u + "/v1/jobs", "POST", {"op": "loss", "model": "demo-mlp",
                                                "dataset": "digits", "batch": BATCH})
    st, s = call(u + "/v1/jobs/" + lj.get("id", ""), "DELETE")
    # cancelled (not ended otherwise): it held the only worker through the pushes
    check("long job cancelled after the pushes and the quick job",
          st == 200 and s.get("status") == "cancelled", (st, s))
    h2 = wait_entry(u, mid2, pushed[-1])
    check("coalesced: the newest version ran", h2 is not None, history(u, "?monitor=" + mid2))
    e2 = history(u, "?monitor=" + mid2)
    check("entries + skipped = versions pushed (every 1)",
          len(e2) + sum(h["skipped"] for h in e2) == 10 and len(e2) < 10,
          [(h["version"], h["skipped"]) for h in e2])
    lm = [m for m in call(u + "/v1/models/demo-mlp/monitors")[1]["monitors"] if m["id"] == mid2][0]
    check("monitor document counts", lm["versions_seen"] == 10 and lm["skipped"] ==
          sum(h["skipped"] for h in e2) and lm["runs"] == len(e2), lm)
    qj = call(u + "/v1/jobs/" + quick["id"] + "?wait=30")[1]
    mj = call(u + "/v1/jobs/" + h2["job"])[1]
    # one worker: the quick job ended before the monitor's (several ms) started
    check("interactive job ran before the monitor's", qj["status"] == "succeeded" and
          qj["finished_at"] <= mj["started_at"] <= mj["finished_at"],
          (qj.get("finished_at"), mj.get("started_at"), mj.get("finished_at")))
    wait_entry(u, mid, pushed[-1] if (len(pushed) + 6) % 2 == 0 else pushed[-2])
    e1 = call(u + "/v1/models/demo-mlp/monitors")[1]["monitors"][0]
    check("every-2 monitor: runs + skipped = monitored versions",
          e1["runs"] + e1["skipped"] == 8 and e1["versions_seen"] == 16, e1)

    # ---- the cap ----
    e1h = history(u, "?monitor=" + mid)
    check("history capped (--monitor-history %d), oldest dropped" % CAP,
          len(e1h) == CAP and e1h[-1]["version"] == pushed[-1] and e1["runs"] > CAP,
          [h["version"] for h in e1h])
    return mid, mid2, history(u)


def roles(tmp):
    """Creating and deleting monitors needs admin; reading them read."""
    path = os.path.join(tmp, "tokens")
    with open(path, "w") as f:
        f.write("read-1a2b3c4d5e read\nsubmit-2b3c4d5e6f submit\nadmin-3c4d5e6f7a admin\n")
    with Daemon("--workers", "1", "--auth-token-file", path) as d:
        u, doc = d.url + "/v1/models/demo-mlp", {"dataset": "digits"}
        check("role submit: POST monitor 403",
              call(u + "/monitors", "POST", doc, token="submit-2b3c4d5e6f")[0] == 403)
        st, m = call(u + "/monitors", "POST", doc, token="admin-3c4d5e6f7a")
        check("role admin: POST monitor 201", st == 201, m)
        check("role read: GET monitors and history 200",
              call(u + "/monitors", token="read-1a2b3c4d5e")[0] == 200 and
              call(u + "/history", token="read-1a2b3c4d5e")[0] == 200)
        check("role submit: DELETE monitor 403", call(u + "/monitors/" + m["id"], "DELETE",
                                                      token="submit-2b3c4d5e6f")[0] == 403)
        check("role admin: DELETE monitor 200", call(u + "/monitors/" + m["id"], "DELETE",
                                                     token="admin-3c4d5e6f7a")[0] == 200)


def main():
    tmp = tempfile.mkdtemp(prefix="curvd-mon-")
    state = os.path.join(tmp, "state")
    try:
        args = ("--workers", "1", "--monitor-history", str(CAP), "--state-dir", state)
        with Daemon(*args) as d:
            u = d.url
            params = urllib.request.urlopen(u + "/v1/models/demo-mlp/parameters").read()
            mid, mid2, before = run(u, params, state)
            check("DELETE monitor", call(u + "/v1/models/demo-mlp/monitors/" + mid2,
                                         "DELETE")[0] == 200)
            before = [h for h in before if h["monitor"] == mid]
        with Daemon(*args) as d:
            u = d.url
            lst = call(u + "/v1/models/demo-mlp/monitors")[1]["monitors"]
            check("restart: the monitor is back, the deleted one is not",
                  [m["id"] for m in lst] == [mid], lst)
            check("restart: history read back", history(u) == before,
                  (history(u), before))
            v = push(u, params, 40)
            v = push(u, params, 41)
            h = wait_entry(u, mid, v)
            check("restart: counting goes on (every 2)", h is not None and
                  lst[0]["versions_seen"] == 16, lst)
            st, m3 = call(u + "/v1/models/demo-mlp/monitors", "POST", {"dataset": "digits"})
            check("restart: new ids do not repeat", st == 201 and m3["id"] not in (mid, mid2), m3)
        roles(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


def perturbed(st_bytes, k):
    """The safetensors file with every float32 scaled by (1 + 0.01 k)."""
    return scaled_safetensors(st_bytes, 1 + 0.01 * k)


if __name__ == "__main__":
    sys.exit(main())

