"""e2e_lib.py - the harness every tests/e2e_*.py shares (standard library only).

CURVD     the script's first argument (default build/curvd), made absolute
ROOT, PY  the repository root; /usr/bin/python3 (else this interpreter)
check(name, ok, detail)  counts one check; prints failures (every check with VERBOSE=1)
skip(name, why)          a check that cannot run here: a failure unless CURVD_ALLOW_SKIP=1
summary()                prints the closing 'N passed, M failed' line; returns the exit code
Daemon(*args, launcher=None)
                         `curvd serve --port 0 --bind 127.0.0.1 *args` (after the launcher's
                         words, e.g. mpirun's): the port read from its 'listening on' line,
                         ready once GET /v1/health answers 200; .url, .log (stderr lines),
                         .stop() (SIGTERM to a launcher, then SIGKILL); SystemExit when it does
                         not come up in 20 s
readme_block(name)       the fenced block after <!-- test: name --> in README.md
for_url(code, url)       code with the README's http://127.0.0.1:8080 / localhost:8080 -> url
call(url, method, body, ctype, token)
                         one HTTP request: (status, parsed JSON or the raw bytes)
scaled_safetensors(b, s) a safetensors file with every float32 times s
"""
import array
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURVD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "build/curvd")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
RESULTS = {"passed": 0, "failed": 0}
VERBOSE = os.environ.get("VERBOSE") == "1"


def check(name, ok, detail=""):
    """Counts one check; prints failures (and passes with VERBOSE=1); returns ok."""
    RESULTS["passed" if ok else "failed"] += 1
    if not ok or VERBOSE:
        print("ok  " if ok else "FAIL", name, detail)
    return ok


def skip(name, why):
    """A check that cannot run here: a failure unless CURVD_ALLOW_SKIP=1 (CI installs
    every tool, so a skip there would hide a missing check)."""
    if os.environ.get("CURVD_ALLOW_SKIP") == "1":
        print("note: %s skipped (CURVD_ALLOW_SKIP=1): %s" % (name, why))
        return
    check(name, False, why + " (set CURVD_ALLOW_SKIP=1 to skip)")


def summary():
    """Prints the closing 'N passed, M failed' line; returns the exit code."""
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    return 1 if RESULTS["failed"] else 0


def _healthy(url):
    try:
        with urllib.request.urlopen(url + "/v1/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class Daemon:
    """curvd serve on a free loopback port; stderr drained by a thread."""

    def __init__(self, *args, launcher=None):
        self.launcher = launcher
        self.p = subprocess.Popen(list(launcher or []) +
                                  [CURVD, "serve", "--port", "0", "--bind", "127.0.0.1"] + list(args),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log = []
        self.url = None
        ready = threading.Event()

        def drain():
            for line in self.p.stderr:
                self.log.append(line)
                m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        deadline = time.time() + 20
        ready.wait(20)
        while self.url and not _healthy(self.url) and self.p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if not self.url or not _healthy(self.url):
            self.stop()
            raise SystemExit("curvd did not start: %s" % "".join(self.log)[-2000:])

    def stop(self):
        if self.p.poll() is None and self.launcher:
            self.p.terminate()  # mpirun passes SIGTERM on to every rank
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        self._drain.join(5)  # .log then holds every line the daemon wrote before it exited

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def readme_block(name, readme="README.md"):
    """The fenced block after <!-- test: name --> in the top-level README.md (or readme)."""
    text = open(os.path.join(ROOT, readme), encoding="utf-8").read()
    m = re.search(r"<!-- test: %s -->\s*\n```[a-z]*\n(.*?)\n```" % re.escape(name), text, re.S)
    return m.group(1) if m else None


def for_url(code, url):
    return code.replace("http://127.0.0.1:8080", url).replace("localhost:8080", url[len("http://"):])


def call(url, method="GET", body=None, ctype="application/json", token=None):
    """One request: (status, the JSON answer parsed, or its raw bytes)."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, st = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, st = e.read(), e.code
    try:
        return st, json.loads(raw)
    except ValueError:
        return st, raw


def scaled_safetensors(st_bytes, s):
    """The safetensors file (float32 tensors only) with every value times s."""
    n = struct.unpack("<Q", st_bytes[:8])[0]
    head, data = st_bytes[:8 + n], st_bytes[8 + n:]
    a = array.array("f")
    a.frombytes(data)
    return head + array.array("f", [x * s for x in a]).tobytes()
