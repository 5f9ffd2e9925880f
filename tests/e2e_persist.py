"""e2e_persist.py - `curvd serve --state-dir DIR`: what survives a restart and a kill -9.

Usage: /usr/bin/python3 tests/e2e_persist.py build/curvd [--kills N] [--seed S]
Three parts, each against daemons sharing one state directory:
1. restart: models (versions, parameters), datasets (uploaded, replaced, mapped from
   --data-dir), deletions and finished jobs (results byte for byte) survive SIGTERM
   and SIGKILL; the state beats the demo's registration; new job ids are new;
   --keep-jobs / --max-kept-bytes apply to the jobs read back (their files go).
2. damage: a flipped byte (model), a truncated file (dataset), a flipped byte in a
   job record, a garbage file and a left-over temporary file: each is reported
   on a log line naming the file and why, set aside, and everything else loads.
3. crash loop (SQLite-style): --kills N times (default 60) the daemon is SIGKILLed
   at a random moment while threads register/replace/delete models and datasets
   and submit jobs; after each restart every acknowledged (2xx) change is there,
   a change in flight is either wholly there or not at all, every acknowledged job
   exists (finished ones with the same result), no job id repeats, no file is
   reported damaged, and the daemon starts.  One restart in five is itself SIGKILLed
   0-30 ms after its start (during the start-up read) first.
Standard library only; ends with 'N passed, M failed'.  `make crash-soak` runs part 3
with more kills.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from curvd_client import Client, CurvdError  # noqa: E402
from curvd_client import safetensors as st  # noqa: E402

from e2e_lib import CURVD, Daemon, check, summary  # noqa: E402

MAPPED = (100, 101, 102)  # seeds of the --data-dir files of the crash loop
ARCH = {"input_shape": [4], "layers": [{"type": "Linear", "in_features": 4, "out_features": 3}],
        "loss": {"type": "CrossEntropyLoss"}}


def params(seed):
    """Parameters whose every value says which seed made them."""
    return st.dumps({"0.weight": st.Tensor.from_list([[seed + 0.01 * (4 * i + j) for j in range(4)]
                                                      for i in range(3)], "F32"),
                     "0.bias": st.Tensor.from_list([seed, seed, seed], "F32")})


def params_seed(raw):
    """The seed of a parameters download, or None when its values are not one seed's."""
    t = st.loads(raw)
    seed = t["0.bias"].flat()[0]
    return seed if st.loads(params(seed))["0.weight"].flat() == t["0.weight"].flat() and \
        t["0.bias"].flat() == [seed] * 3 else None


def data(seed, n=8):
    """A dataset of n rows whose every value says which seed made it."""
    return st.dumps({"x": st.Tensor.from_list([[seed + 0.5 * j for j in range(4)] for _ in range(n)], "F32"),
                     "y": st.Tensor.from_list([int(seed) % 3] * n, "I64")})


def data_seed(raw):
    t = st.loads(raw)
    x = t["x"].flat()
    seed = x[0]
    n = len(t["y"].flat())
    return seed if st.dumps({"x": t["x"], "y": t["y"]}) == data(seed, n) else None


def kill(d):
    os.kill(d.p.pid, signal.SIGKILL)
    d.p.wait(10)
    clean_log(d)


def term(d, what):
    """SIGTERM: the daemon exits 0 (a sanitizer build: with no report)."""
    d.p.send_signal(signal.SIGTERM)
    d.p.wait(30)
    check(what + ": exits 0 on SIGTERM", d.p.returncode == 0, (d.p.returncode, "".join(d.log)[-3000:]))
    clean_log(d)


def clean_log(d):
    time.sleep(0.05)  # the log thread's last lines
    bad = [x for x in d.log if "Sanitizer" in x or "runtime error:" in x]
    if bad:
        check("no sanitizer report", False, "".join(d.log)[-5000:])


def strip_timing(doc):
    return {k: v for k, v in doc.items() if k not in ("run_s",)}


# ---- 1. restart -------------------------------------------------------------------------

def test_restart(tmp):
    state = os.path.join(tmp, "state")
    ddir = os.path.join(tmp, "data")
    os.makedirs(ddir)
    with open(os.path.join(ddir, "big.safetensors"), "wb") as f:
        f.write(data(7.0, 100))
    d = Daemon("--state-dir", state, "--data-dir", ddir)  # with the demo
    c = Client(d.url)
    check("health says state_dir", c.health().get("state_dir") is True, c.health())
    p = subprocess.run([CURVD, "serve", "--port", "0", "--no-demo", "--state-dir", state],
                       capture_output=True, text=True, timeout=20)
    check("a second daemon on the same directory is refused", p.returncode != 0 and
          "in use by another curvd" in p.stderr, (p.returncode, p.stderr))
    demo = c.list_models()[0]["name"]
    c.push_parameters(demo, c.get_parameters(demo))  # demo model at version 2
    c.register_model("m", ARCH, params(1.0))
    c.push_parameters("m", params(2.0))
    c.push_parameters("m", params(3.0))
    c.register_model("gone", ARCH, params(4.0))
    c.delete_model("gone")
    c.register_dataset("ds", data(5.0))
    c.put_dataset("ds", data(6.0, 20))
    c.register_server_file("mapped", "big.safetensors")
    jobs = {}
    for op in ("gradient", "trace"):
        doc = {"op": op, "model": "m", "dataset": "ds"}
        if op == "trace":
            doc.update(seed=3, options={"max_probes": 4, "tol": 0})
        j = c.submit(doc, wait=30)
        jobs[j.id] = c.job_status(j.id)
        check("job %s finished before the restart" % op, jobs[j.id]["status"] == "succeeded", jobs[j.id])
    failed = c.submit({"op": "dense", "model": "m", "dataset": "ds", "curvature": "hessian",
                       "batch": {"offset": 0, "size": 4}}, wait=30)
    jobs[failed.id] = c.job_status(failed.id)

    def same(c2, how):
        check(how + ": model version kept", c2.get_model("m")["version"] == 3, c2.get_model("m"))
        check(how + ": parameters kept", params_seed(c2.get_parameters("m")) == 3.0)
        check(how + ": deleted model stays deleted",
              "gone" not in [m["name"] for m in c2.list_models()])
        check(how + ": dataset version kept", c2.get_dataset("ds")["version"] == 2)
        check(how + ": dataset data kept", c2.get_dataset_data("ds") == data(6.0, 20))
        g = c2.get_dataset("mapped")
        check(how + ": --data-dir dataset mapped again", g.get("mapped") is True and g["n"] == 100, g)
        check(how + ": the state's demo version wins", c2.get_model(demo)["version"] == 2,
              c2.get_model(demo))
        for jid, doc in jobs.items():
            got = c2.job_status(jid)
            check(how + ": job %s kept as it was" % doc["op"], got == doc,
                  {k: (doc.get(k), got.get(k)) for k in set(doc) | set(got) if doc.get(k) != got.get(k)})

    term(d, "restart")
    d = Daemon("--state-dir", state, "--data-dir", ddir)
    c = Client(d.url)
    same(c, "after SIGTERM")
    j = c.submit({"op": "gradient", "model": "m", "dataset": "ds"}, wait=30)
    check("a new job id is new", j.id not in jobs, j.id)
    jobs[j.id] = c.job_status(j.id)
    kill(d)
    d = Daemon("--state-dir", state, "--data-dir", ddir)
    c = Client(d.url)
    same(c, "after SIGKILL")
    c.delete_model("m")
    c.delete_dataset("ds")
    kill(d)
    check("a deleted model's file is gone", not os.path.exists(os.path.join(state, "models", "m.cvst")))
    check("a deleted dataset's file is gone", not os.path.exists(os.path.join(state, "datasets", "ds.cvst")))
    # the kept-jobs caps apply to the jobs read back
    njobs = len(os.listdir(os.path.join(state, "jobs")))
    check("one job file per kept job", njobs == len(jobs), (njobs, len(jobs)))
    d = Daemon("--state-dir", state, "--data-dir", ddir, "--max-kept-bytes", "1")
    c = Client(d.url)
    left = [x["id"] for x in c.list_jobs()]
    check("--max-kept-bytes keeps only the newest job read back", left == [j.id], left)
    check("the dropped jobs' files are gone", os.listdir(os.path.join(state, "jobs")) == [j.id + ".cvst"],
          os.listdir(os.path.join(state, "jobs")))
    kill(d)
    # jobs running or queued at a kill: failed "interrupted" after the restart
    d = Daemon("--state-dir", state, "--data-dir", ddir, "--workers", "1")
    c = Client(d.url)
    c.register_model("m", ARCH, params(1.0))
    # 20000 rows: a million probes take minutes (~400 s here); on 64 rows they
    # took under 2 s, which a fast machine ends before the kill
    c.register_dataset("ds", data(2.0, 20000))
    long = {"op": "trace", "model": "m", "dataset": "ds", "seed": 1,
            "options": {"max_probes": 1000000, "tol": 0}}
    running = c.submit(long)
    queued = c.submit(long)
    deadline = time.time() + 10
    while c.job_status(running.id)["status"] != "running" and time.time() < deadline:
        time.sleep(0.01)
    check("a long job runs, another waits", c.job_status(running.id)["status"] == "running" and
          c.job_status(queued.id)["status"] == "queued")
    kill(d)
    d = Daemon("--state-dir", state, "--data-dir", ddir)
    c = Client(d.url)
    for what, jid in (("running", running.id), ("queued", queued.id)):
        s = c.job_status(jid)
        check("a job %s at the kill is failed 'interrupted'" % what,
              s["status"] == "failed" and s["error"]["code"] == "interrupted", s)
    cancelled = c.submit(long)
    c.cancel(cancelled.id)
    term(d, "restart")
    d = Daemon("--state-dir", state, "--data-dir", ddir)
    c = Client(d.url)
    s = c.job_status(cancelled.id)
    check("a job cancelled before SIGTERM stays cancelled", s["status"] == "cancelled", s)
    kill(d)
    d = Daemon("--state-dir", state, "--data-dir", ddir, "--keep-jobs", "0")
    c = Client(d.url)
    check("--keep-jobs 0 drops the jobs read back", c.list_jobs() == [], c.list_jobs())
    check("...and their files", os.listdir(os.path.join(state, "jobs")) == [])
    term(d, "keep-jobs 0")
    shutil.rmtree(state)


# ---- 2. damaged files ------------------------------------------------------------------

def test_damage(tmp):
    state = os.path.join(tmp, "state2")
    d = Daemon("--no-demo", "--state-dir", state)
    c = Client(d.url)
    for name, seed in (("a", 1.0), ("flipped", 2.0), ("b", 3.0)):
        c.register_model(name, ARCH, params(seed))
    c.register_dataset("da", data(1.0))
    c.register_dataset("cut", data(2.0, 50))
    j1 = c.submit({"op": "gradient", "model": "a", "dataset": "da"}, wait=30)
    j2 = c.submit({"op": "gradient", "model": "b", "dataset": "da"}, wait=30)
    kill(d)
    mp = os.path.join(state, "models", "flipped.cvst")
    with open(mp, "r+b") as f:
        f.seek(os.path.getsize(mp) - 9)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    dp = os.path.join(state, "datasets", "cut.cvst")
    os.truncate(dp, os.path.getsize(dp) - 100)
    jp = os.path.join(state, "jobs", j2.id + ".cvst")
    with open(jp, "r+b") as f:
        f.seek(50)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    gp = os.path.join(state, "models", "garbage.cvst")
    with open(gp, "wb") as f:
        f.write(b"not a state file at all, long enough for a header........")
    tp = os.path.join(state, "models", ".tmp-a-Xy12Ab")
    with open(tp, "wb") as f:
        f.write(b"CURVDST\0half")
    d = Daemon("--no-demo", "--state-dir", state)
    c = Client(d.url)
    log = "".join(d.log)

    def reported(path, why):
        return any(path in line and "damaged" in line and why in line for line in d.log)
    check("flipped byte reported with the file's name", reported(mp, "checksum mismatch"), log)
    check("truncated file reported", reported(dp, "truncated"), log)
    check("damaged job record reported", reported(jp, "checksum"), log)
    check("garbage file reported", reported(gp, "bad magic"), log)
    check("left-over temporary file reported and removed",
          any(tp in line and "partial write" in line for line in d.log) and not os.path.exists(tp), log)
    names = sorted(m["name"] for m in c.list_models())
    check("the intact models load, the damaged ones do not", names == ["a", "b"], names)
    check("the intact models' parameters", params_seed(c.get_parameters("a")) == 1.0 and
          params_seed(c.get_parameters("b")) == 3.0)
    check("the intact dataset loads, the truncated one does not",
          [x["name"] for x in c.list_datasets()] == ["da"], c.list_datasets())
    ids = [x["id"] for x in c.list_jobs()]
    check("the intact job loads, the damaged one does not", ids == [j1.id], ids)
    check("damaged files are set aside (.damaged)",
          all(os.path.exists(p + ".damaged") and not os.path.exists(p) for p in (mp, dp, jp, gp)))
    c.register_model("flipped", ARCH, params(9.0))
    check("a set-aside name can be registered again",
          params_seed(c.get_parameters("flipped")) == 9.0)
    kill(d)
    d = Daemon("--no-demo", "--state-dir", state)
    check("no damage reported on the next start", not any("damaged" in x for x in d.log), "".join(d.log))
    term(d, "damage")
    shutil.rmtree(state)


# ---- 3. crash loop ----------------------------------------------------------------------

class Name:
    """What a client knows of one model or dataset name: the acknowledged state
    (None: absent, else the seed of its content and its version) and the change in
    flight, if any (the state it leads to)."""

    def __init__(self, kind, name):
        self.kind, self.name = kind, name
        self.acked = None      # (version, seed) or None
        self.pending = []      # possible states of a change in flight


class Worker(threading.Thread):
    def __init__(self, url, names, jobs, rnd, stop):
        super().__init__(daemon=True)
        self.c = Client(url, timeout=10)
        self.names, self.jobs, self.rnd, self.stop = names, jobs, rnd, stop
        self.ops = 0

    def put_data(self, n, seed, replace):
        """A dataset upload: whole, in parts (only the commit is acknowledged), or a
        --data-dir file (mapped; its seed is one of MAPPED)."""
        if seed in MAPPED:
            self.c.register_server_file(n.name, "s%d.safetensors" % seed, replace=True)
            return
        raw = data(seed, self.rnd.choice((8, 64, 2000)))
        if self.rnd.random() < 0.3:
            self.c._upload_parts(n.name, raw, 4096, replace, None)
        elif replace:
            self.c.put_dataset(n.name, raw)
        else:
            self.c.register_dataset(n.name, raw)

    def change(self, n):
        r = self.rnd
        seed = float(r.randrange(1, 1 << 20))
        model = n.kind == "model"
        if not model and r.random() < 0.2:
            seed = float(r.choice(MAPPED))
        if n.acked is None:
            outcome = (1, seed)
            n.pending = [outcome]
            if model:
                self.c.register_model(n.name, ARCH, params(seed))
            else:
                self.put_data(n, int(seed), False)
        elif r.random() < 0.15:
            n.pending = [None]
            (self.c.delete_model if model else self.c.delete_dataset)(n.name)
            outcome = None
        else:
            outcome = (n.acked[0] + 1, seed)
            n.pending = [outcome]
            if model:
                self.c.push_parameters(n.name, params(seed))
            else:
                self.put_data(n, int(seed), True)
        n.acked, n.pending = outcome, []
        self.ops += 1

    def job(self):
        j = self.c.submit({"op": "gradient", "model": "jm", "dataset": "jd"})
        if j.id in self.jobs["acked"] or j.id in self.jobs["known"]:
            self.jobs["reused"].append(j.id)
        self.jobs["acked"][j.id] = None
        s = self.c.job_status(j.id, wait=5)
        if s["status"] == "succeeded":
            self.jobs["acked"][j.id] = s
        self.ops += 1

    def run(self):
        try:
            while not self.stop.is_set():
                if self.names is None:
                    self.job()
                else:
                    self.change(self.rnd.choice(self.names))
        except CurvdError:
            pass  # the kill


def actual(c, n):
    try:
        if n.kind == "model":
            v = c.get_model(n.name)["version"]
            return (v, params_seed(c.get_parameters(n.name)))
        v = c.get_dataset(n.name)["version"]
        return (v, data_seed(c.get_dataset_data(n.name)))
    except CurvdError as e:
        if e.status == 404:
            return None
        raise


def test_crash(tmp, kills, seed):
    state = os.path.join(tmp, "state3")
    ddir = os.path.join(tmp, "data3")
    os.makedirs(ddir)
    for s in MAPPED:
        with open(os.path.join(ddir, "s%d.safetensors" % s), "wb") as f:
            f.write(data(float(s), 8))
    rnd = random.Random(seed)
    args = ("--no-demo", "--state-dir", state, "--workers", "2", "--data-dir", ddir)
    d = Daemon(*args)
    c = Client(d.url)
    c.register_model("jm", ARCH, params(1.0))
    c.register_dataset("jd", data(1.0, 64))
    names = [[Name("model", "m%d" % t), Name("dataset", "d%d" % t)] for t in range(3)]
    jobs = {"acked": {}, "known": {}, "reused": []}
    nacked = 0
    startup_kills = 0
    problems = []
    ops = 0
    t0 = time.time()
    for k in range(kills):
        stop = threading.Event()
        workers = [Worker(d.url, ns, jobs, random.Random(rnd.random()), stop) for ns in names]
        workers.append(Worker(d.url, None, jobs, random.Random(rnd.random()), stop))
        for w in workers:
            w.start()
        time.sleep(rnd.uniform(0.01, 0.3))
        kill(d)
        stop.set()
        for w in workers:
            w.join(15)
        ops += sum(w.ops for w in workers)
        if k % 5 == 4:
            # one kill in five lands during the start-up read (interrupted jobs rewritten)
            p = subprocess.Popen([CURVD, "serve", "--port", "0", "--bind", "127.0.0.1"] + list(args),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rnd.uniform(0, 0.03))
            p.kill()
            p.wait(10)
            startup_kills += 1
        try:
            d = Daemon(*args)
        except SystemExit as e:
            check("the daemon starts after kill %d" % (k + 1), False, str(e))
            return
        c = Client(d.url)
        damaged = [x for x in d.log if "damaged" in x]
        if damaged:
            problems.append("kill %d: %s" % (k + 1, damaged))
        for n in sum(names, []):
            got = actual(c, n)
            allowed = [n.acked] + n.pending
            if got not in allowed or (got is not None and got[1] is None):
                problems.append("kill %d: %s %s is %r, allowed %r" % (k + 1, n.kind, n.name, got, allowed))
            n.acked, n.pending = got, []
        listed = {x["id"]: x for x in c.list_jobs(limit=100000)}
        for jid, entry in jobs["known"].items():  # read back after an earlier restart
            if listed.get(jid) != entry:
                problems.append("kill %d: job %s changed: %r -> %r" % (k + 1, jid, entry, listed.get(jid)))
        for jid, seen in jobs["acked"].items():  # acknowledged since the last restart
            got = listed.get(jid)
            if got is None:
                problems.append("kill %d: acknowledged job %s is gone" % (k + 1, jid))
            elif seen is not None:
                full = c.job_status(jid)
                if full != seen:
                    problems.append("kill %d: job %s changed: %r -> %r" % (k + 1, jid, seen, full))
            elif not (got["status"] == "succeeded" or
                      (got["status"] == "failed" and got["error"]["code"] == "interrupted")):
                problems.append("kill %d: job %s is %r after the restart" % (k + 1, jid, got))
        # a submission in flight may have been recorded: then it is whole (finished, or
        # failed "interrupted")
        for jid in set(listed) - set(jobs["known"]) - set(jobs["acked"]):
            got = listed[jid]
            if not (got["status"] == "succeeded" or
                    (got["status"] == "failed" and got["error"]["code"] == "interrupted")):
                problems.append("kill %d: unacknowledged job %s is %r" % (k + 1, jid, got))
            elif got["status"] == "succeeded" and "result" not in c.job_status(jid):
                problems.append("kill %d: unacknowledged job %s has no result" % (k + 1, jid))
        if jobs["reused"]:
            problems.append("kill %d: job ids given twice: %s" % (k + 1, jobs["reused"]))
        nacked += len(jobs["acked"])
        jobs["known"] = listed
        jobs["acked"], jobs["reused"] = {}, []
    dt = time.time() - t0
    term(d, "crash loop")
    check("crash loop: %d kills (+%d during start-up), %d acknowledged operations, %d jobs, %.1f s" %
          (kills, startup_kills, ops, nacked, dt), not problems, "\n".join(problems[:20]))
    check("crash loop: the workload did something", ops >= kills and nacked >= kills // 4,
          (ops, nacked))
    print("crash loop: %d kills during the workload, %d more during start-up, %d acknowledged "
          "operations, %d jobs acknowledged, %.1f s" % (kills, startup_kills, ops, nacked, dt))
    shutil.rmtree(state)


def main():
    kills, seed, parts = 60, 1, ("restart", "damage", "crash")
    args = sys.argv[2:]
    while args:
        a = args.pop(0)
        if a == "--kills":
            kills = int(args.pop(0))
        elif a == "--seed":
            seed = int(args.pop(0))
        elif a == "--only":
            parts = tuple(args.pop(0).split(","))
        else:
            raise SystemExit("unknown argument " + a)
    tmp = tempfile.mkdtemp(prefix="curvd-persist-")
    try:
        if "restart" in parts:
            test_restart(tmp)
        if "damage" in parts:
            test_damage(tmp)
        if "crash" in parts:
            test_crash(tmp, kills, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
