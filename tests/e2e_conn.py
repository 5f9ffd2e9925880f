"""e2e_conn.py - connection limits under attack (issue 27 item 4).

One daemon (--idle-timeout 8, --header-timeout 9, --max-connections-per-ip
200, the default --max-connections 1024) and, all on loopback:
  - 512 idle sockets (connect, send nothing) from 8 addresses 127.0.1.1-8,
  - 64 slow-header sockets from 127.0.2.1 (a header byte every second),
  - 260 sockets from one address 127.0.3.1: --max-connections-per-ip closes
    the ones beyond 200 at accept,
while a normal client on 127.0.0.1 keeps asking GET /v1/health, POST
/v1/jobs and GET /v1/jobs/{id} (a new connection each, as curl does): its
p99 is measured before and under the attack and must stay under 100 ms.
Then: the idle sockets are closed by the daemon after --idle-timeout, the
slow-header ones (never idle) after --header-timeout; a
?wait= long poll longer than the idle timeout is answered, not cut; the
per-client queue quota (--max-queued-per-client) holds for an address.
Prints the latencies (p50/p99/max, ms).  Takes ~35 s.

Usage: python3 tests/e2e_conn.py build/curvd   (VERBOSE=1 lists every pass)
"""
import http.client
import json
import os
import resource
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_lib import Daemon, check, summary  # noqa: E402

IDLE_S = 8
HEADER_S = 9
JOB = {"op": "loss", "model": "demo-mlp", "dataset": "digits", "batch": {"offset": 0, "size": 8}}
LONG = {"op": "density", "model": "demo-mlp", "dataset": "digits",
        "options": {"lanczos_steps": 3000}}

# keeps the one worker busy for far longer than the test needs (cancelled)
BLOCKER = {"op": "density", "model": "demo-mlp", "dataset": "digits",
           "options": {"lanczos_steps": 3000, "runs": 200}}


def wait_status(port, job_id, want, timeout_s):
    """True once GET /v1/jobs/{id} reports status want (polls for timeout_s)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        _, doc, _ = request(port, "GET", "/v1/jobs/%s" % job_id)
        if doc and doc.get("status") == want:
            return True
        time.sleep(0.05)
    return False


def request(port, method, path, body=None, timeout=30, src=None):
    """One request on a new connection (from address src): (status, JSON or None, seconds)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                   source_address=(src, 0) if src else None)
    try:
        hdr = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=None if body is None else json.dumps(body), headers=hdr)
        r = c.getresponse()
        raw = r.read()
        st = r.status
    finally:
        c.close()
    dt = time.perf_counter() - t0
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
    return st, doc, dt


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))] * 1000


def normal_client(port, seconds):
    """Health, job submit and job status in turn for `seconds`: latencies by kind, failures."""
    lat = {"health": [], "submit": [], "status": []}
    fails = []
    end = time.time() + seconds
    jid = None
    while time.time() < end:
        try:
            st, _, dt = request(port, "GET", "/v1/health")
            lat["health"].append(dt)
            if st != 200:
                fails.append("health %d" % st)
            st, doc, dt = request(port, "POST", "/v1/jobs", JOB)
            lat["submit"].append(dt)
            if st != 202:
                fails.append("submit %d %s" % (st, str(doc)[:100]))
            else:
                jid = doc["id"]
            if jid:
                st, _, dt = request(port, "GET", "/v1/jobs/" + jid)
                lat["status"].append(dt)
                if st != 200:
                    fails.append("status %d" % st)
        except OSError as e:
            fails.append("error %s" % e)
        time.sleep(0.02)
    return lat, fails


def report(name, lat):
    allv = [x for v in lat.values() for x in v]
    parts = ["%s n=%d p50 %.1f p99 %.1f max %.1f ms" % (k, len(v), pct(v, 50), pct(v, 99),
                                                        max(v) * 1000)
             for k, v in lat.items() if v]
    print("%s: %s" % (name, "; ".join(parts)))
    return pct(allv, 99) if allv else 1e9


def connect_from(src, port, n):
    """n sockets connected from address src (those refused at connect are left out)."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((src, 0))
        try:
            s.connect(("127.0.0.1", port))
            out.append(s)
        except OSError:
            s.close()
    return out


def closed_by_peer(s):
    """1 when the server has closed s (EOF or reset), without waiting."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_count(socks, want, seconds):
    """Polls until `want` of socks are closed by the server, up to `seconds`; the count."""
    end = time.time() + max(0.0, seconds)
    while True:
        n = sum(closed_by_peer(s) for s in socks)
        if n >= want or time.time() >= end:
            return n
        time.sleep(0.1)


def slow_headers(socks, stop):
    """A header byte per socket every second until stop is set."""
    for s in socks:
        try:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        except OSError:
            pass
    while not stop.wait(1.0):
        for s in socks:
            try:
                s.send(b"a")
            except OSError:
                pass


def main():
    # ~900 sockets here and in the daemon (which inherits the limit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    d = Daemon("--workers", "1", "--idle-timeout", str(IDLE_S), "--header-timeout", str(HEADER_S),
               "--max-connections-per-ip", "200",
               "--max-queued-per-client", "3", "--max-wait", "30", "--shutdown-grace", "1")
    port = int(d.url.rsplit(":", 1)[1])
    try:
        t0 = time.time()
        base, fails = normal_client(port, 4)
        p99_base = report("no attack", base)
        check("normal client without attack: no failures", not fails, str(fails[:3]))

        t_attack = time.time()
        idle = []
        for i in range(8):
            idle += connect_from("127.0.1.%d" % (i + 1), port, 64)
        slow = connect_from("127.0.2.1", port, 64)
        flood = connect_from("127.0.3.1", port, 260)
        stop = threading.Event()
        th = threading.Thread(target=slow_headers, args=(slow, stop), daemon=True)
        th.start()
        check("512 idle sockets connected", len(idle) == 512, str(len(idle)))
        # the ones over --max-connections-per-ip are closed at accept; once 60
        # are, the daemon has accepted every socket and started its thread (on
        # a loaded machine its one accept thread takes seconds for ~800)
        refused = wait_count(flood, 60, 20)
        t_ready = time.time()
        print("the daemon accepted the attack's sockets in %.1f s" % (t_ready - t_attack))
        check("per-IP limit: 60 of 260 sockets from one address closed at accept",
              refused == 60, "closed %d" % refused)
        under, fails = normal_client(port, 3.0)
        open_idle = sum(not closed_by_peer(s) for s in idle)
        open_slow = sum(not closed_by_peer(s) for s in slow)
        p99 = report("under attack (%d idle + %d slow-header + 200 from one address still "
                     "open at the end)" % (open_idle, open_slow), under)
        if open_idle < 512 or open_slow < 64:
            print("note: the daemon accepted so slowly that some sockets reached their "
                  "timeout while the client was measured")
        check("normal client under attack: no failures", not fails, str(fails[:3]))
        # 100 ms; on a machine so loaded that the client sees p99 >= 50 ms without
        # any attack, twice that (said in the output)
        limit = 100.0 if p99_base < 50 else 2 * p99_base
        if limit > 100:
            print("note: loaded machine (p99 %.1f ms without attack): limit %.1f ms"
                  % (p99_base, limit))
        check("normal client under attack: p99 < %.0f ms" % limit, p99 < limit,
              "p99 %.1f ms (without attack %.1f ms)" % (p99, p99_base))

        # idle sockets: closed by the daemon after --idle-timeout; slow-header
        # sockets (which never go idle) after --header-timeout (timed from
        # their accept, which a loaded machine delays)
        closed = wait_count(idle, len(idle), t_ready + IDLE_S + 5 - time.time())
        t_idle = time.time() - t_attack
        check("idle sockets closed after --idle-timeout", closed == len(idle),
              "%d of %d closed %.1f s after connecting" % (closed, len(idle), t_idle))
        cut = wait_count(slow, len(slow), t_ready + HEADER_S + 5 - time.time())
        t_cut = time.time() - t_attack
        check("slow-header sockets cut after --header-timeout", cut == len(slow),
              "%d of %d closed %.1f s after connecting" % (cut, len(slow), t_cut))
        check("... but not before it", t_cut >= HEADER_S, "%.1f s" % t_cut)
        print("idle sockets all closed %.1f s, slow-header %.1f s after connecting "
              "(--idle-timeout %d, --header-timeout %d)" % (t_idle, t_cut, IDLE_S, HEADER_S))
        stop.set()
        th.join()
        for s in idle + slow + flood:
            s.close()

        # a long poll longer than the idle timeout is answered (on a job that
        # still runs when the poll ends: BLOCKER, not a job of fixed length,
        # which a fast machine finishes within the poll).  The same job then
        # keeps the one worker busy for the per-client quota below, so that
        # none of the four jobs there starts running (a free worker would take
        # the first of the four out of the queue).
        st, doc, _ = request(port, "POST", "/v1/jobs", BLOCKER, src="127.0.5.1")
        bid = doc["id"] if doc else ""
        check("blocker job queued", st == 202, str(doc)[:200])
        running = wait_status(port, bid, "running", 30)
        check("blocker job running (the one worker is busy)", running)
        st, doc, dt = request(port, "GET", "/v1/jobs/%s?wait=%d" % (bid, IDLE_S + 3))
        check("?wait= longer than --idle-timeout is answered", st == 200 and dt >= IDLE_S + 2.5
              and (doc or {}).get("status") == "running", "status %d after %.1f s: %s" % (st, dt, str(doc)[:200]))
        # per-client quota (one address, no tokens): 3 queued, the 4th refused
        codes = [request(port, "POST", "/v1/jobs", LONG, src="127.0.4.1")[:2] for _ in range(4)]
        st, doc, _ = request(port, "GET", "/v1/jobs/%s" % bid)
        if not (doc and doc.get("status") == "running"):
            print("note: the blocker job ended during the burst: %s" % str(doc)[:200])
        for c in codes:
            if c[0] == 202:
                request(port, "DELETE", "/v1/jobs/%s" % c[1]["id"])
        request(port, "DELETE", "/v1/jobs/%s" % bid)
        check("--max-queued-per-client 3: the 4th queued job of an address is 429",
              [c[0] for c in codes] == [202, 202, 202, 429]
              and codes[3][1]["error"]["code"] == "client_queue_full", str(codes)[:300])
        st, _, _ = request(port, "GET", "/v1/health")
        check("daemon healthy at the end", st == 200)
        # SIGTERM: the header-deadline thread and the connections shut down cleanly
        d.p.terminate()
        try:
            rc = d.p.wait(60)
        except Exception:  # noqa: BLE001 - reported as a failure below
            rc = None
        time.sleep(0.2)  # the log thread drains the last lines
        bad = [ln for ln in d.log if "Sanitizer" in ln or "runtime error" in ln]
        check("SIGTERM: exit 0, no sanitizer report", rc == 0 and not bad,
              "rc %s %s" % (rc, "".join(bad)[:500]))
        print("e2e_conn: %.1f s" % (time.time() - t0))
    finally:
        d.stop()
    return summary()


if __name__ == "__main__":
    sys.exit(main())
