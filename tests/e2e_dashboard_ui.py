"""e2e_dashboard_ui.py - the dashboard's training-monitor panel and one-job viewer in
headless Chromium, driven through chromedriver's WebDriver HTTP protocol (urllib only).

Usage: /usr/bin/python3 tests/e2e_dashboard_ui.py build/curvd
Needs Debian's chromium and chromium-driver ($CHROMIUM, $CHROMEDRIVER override the
paths; missing ones are a failure unless CURVD_ALLOW_SKIP=1).  One daemon (--workers 1)
with the demo model: a monitor (every 1) on demo-mlp, 5 pushed versions, each waited for
in GET /v1/models/demo-mlp/history; then the page:
- the panel: every cell with values drew them (SVG path + points, histogram bars), the
  points' values and the hover tooltip's equal the history's, the 2/eta line at 2/lr;
- CSV and JSON exports (the links' blob contents) equal the API's history;
- zoom by dragging (the versions between), by the wheel, reset; the permalink reopens the
  same view in a fresh page load (model, monitor, lr, zoom and the points drawn);
- the one-job viewer: a job's permalink reopens it; per-layer trace bars labelled with the
  module name, type and parameter names; SNR bar value labels are whole numbers that fit
  their boxes; the spectral density's curve ends at the baseline inside the plot on both
  sides (no end peak clipped);
- screenshots (build/dashboard-ui-*.png) decoded with zlib: not blank, each plot cell of
  the panel has drawn (coloured) pixels.
Ends with "N passed, M failed".
"""
import base64
import csv
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_lib import call, scaled_safetensors, ROOT, Daemon, check, skip, summary  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
BATCH = {"offset": 0, "size": 64}
OPTS = {"probes": 3, "lanczos_steps": 3, "bins": 8}
VERSIONS = 5
CELLS = ["loss", "gradient_norm", "alpha", "alpha_hist", "distance", "tests", "gsnr", "tic",
         "trace", "lmax"]
SERIES = {"loss": ["loss"], "gradient_norm": ["gradient_norm"], "alpha": ["alpha", "alpha_fit"],
          "distance": ["distance_from_init", "update_size"],
          "tests": ["norm_test", "inner_product_test", "orthogonality_test"],
          "gsnr": ["mean_gsnr"], "tic": ["tic_trace", "tic_diag"], "trace": ["hessian_trace"],
          "lmax": ["hessian_max_eigenvalue"]}


# ---- HTTP API ---------------------------------------------------------------------





# ---- WebDriver (chromedriver's HTTP protocol) ----------------------------------------

class WebDriver:
    """One headless Chromium session through chromedriver on a free port."""

    def __init__(self, width=1400, height=1100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.p = subprocess.Popen([CHROMEDRIVER, "--port=%d" % port],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = "http://127.0.0.1:%d" % port
        end = time.time() + 20
        while True:
            try:
                self._req("GET", "/status")
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1",
                "--window-size=%d,%d" % (width, height)]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": args}, "goog:loggingPrefs": {"browser": "ALL"}}}}
        self.sid = self._req("POST", "/session", caps)["sessionId"]

    def _req(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        r = urllib.request.Request(self.base + path, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(r, timeout=60) as f:
                return json.loads(f.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError("webdriver %s %s: %s" % (method, path, e.read()[:400]))

    def cmd(self, method, path, body=None):
        return self._req(method, "/session/%s%s" % (self.sid, path), body)

    def get(self, url):
        self.cmd("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def js_async(self, script, *args):
        return self.cmd("POST", "/execute/async", {"script": script, "args": list(args)})

    def wait(self, script, timeout=15, *args):
        """Polls script (returning a truthy value when ready); its last value."""
        end = time.time() + timeout
        v = None
        while time.time() < end:
            v = self.js(script, *args)
            if v:
                return v
            time.sleep(0.1)
        return v

    def actions(self, *steps):
        """Mouse steps in viewport pixels: ("move", x, y), ("down",), ("up",), ("wheel", x, y, dy)."""
        mouse, wheel = [], []
        for s in steps:
            if s[0] == "move":
                mouse.append({"type": "pointerMove", "duration": 50, "origin": "viewport",
                              "x": int(s[1]), "y": int(s[2])})
                wheel.append({"type": "pause", "duration": 0})
            elif s[0] in ("down", "up"):
                mouse.append({"type": "pointer" + s[0].capitalize(), "button": 0})
                wheel.append({"type": "pause", "duration": 0})
            elif s[0] == "wheel":
                mouse.append({"type": "pause", "duration": 0})
                wheel.append({"type": "scroll", "x": int(s[1]), "y": int(s[2]), "deltaX": 0,
                              "deltaY": int(s[3]), "origin": "viewport", "duration": 50})
        self.cmd("POST", "/actions", {"actions": [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
             "actions": mouse},
            {"type": "wheel", "id": "wheel", "actions": wheel}]})
        self.cmd("DELETE", "/actions")

    def screenshot(self, path):
        png = base64.b64decode(self.cmd("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)
        return png

    def quit(self):
        try:
            self._req("DELETE", "/session/" + self.sid)
        except (OSError, RuntimeError):
            pass
        self.p.terminate()
        self.p.wait(10)


# ---- PNG (zlib) -----------------------------------------------------------------------

def png_decode(png):
    """(width, height, channels, rows of bytes) of an 8-bit non-interlaced RGB(A) PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, hdr = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, hdr
    ch = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * ch
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - ch] if i >= ch else 0
            b = prev[i]
            c = prev[i - ch] if i >= ch else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, ch, rows


def coloured(img, rect):
    """Pixels in rect (x, y, w, h) that are saturated (a plotted line, point or bar, not
    the grey grid or the text)."""
    w, h, ch, rows = img
    x0, y0 = max(0, int(rect[0])), max(0, int(rect[1]))
    x1, y1 = min(w, int(rect[0] + rect[2])), min(h, int(rect[1] + rect[3]))
    n = 0
    for y in range(y0, y1):
        r = rows[y]
        for x in range(x0, x1):
            p = r[x * ch:x * ch + 3]
            if max(p) - min(p) > 60:
                n += 1
    return n


# ---- the checks -------------------------------------------------------------------------

def close(a, b, rel):
    return a is not None and b is not None and abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def setup(u):
    """A monitor on demo-mlp and VERSIONS pushed versions, each waited for; some jobs."""
    params = urllib.request.urlopen(u + "/v1/models/demo-mlp/parameters").read()
    st, m = call(u + "/v1/models/demo-mlp/monitors", "POST",
                 dict(dataset="digits", batch=BATCH, seed=5, **OPTS))
    check("POST monitor 201", st == 201, m)
    for k in range(1, VERSIONS + 1):
        st, doc = call(u + "/v1/models/demo-mlp/parameters", "PUT", perturbed(params, k),
                       "application/octet-stream")
        end = time.time() + 30
        while time.time() < end:
            h = call(u + "/v1/models/demo-mlp/history")[1]["history"]
            if any(e["version"] == doc["version"] for e in h):
                break
            time.sleep(0.05)
    hist = call(u + "/v1/models/demo-mlp/history")[1]["history"]
    st, jobs_instr = call(u + "/v1/jobs/" + hist[-1]["job"])
    check("history has %d entries" % VERSIONS, len(hist) == VERSIONS,
          [e["version"] for e in hist])
    jobs = {"instruments": jobs_instr}
    for name, job in [("trace", {"op": "trace", "blocks": "layer", "options": {"max_probes": 20}}),
                      ("snr", {"op": "snr", "curvature": "fisher_mc", "options": {"k": 8}}),
                      ("density", {"op": "density", "options": {"lanczos_steps": 80,
                                                                "grid_points": 200}})]:
        job.update(model="demo-mlp", dataset="digits")
        st, r = call(u + "/v1/jobs?wait=60", "POST", job)
        check("%s job succeeded" % name, r.get("status") == "succeeded", r)
        jobs[name] = r
    return m["id"], hist, jobs


def aim(w, cell, timeout=10):
    """Scrolls a cell's plot into view and waits until the layout has settled: the plot's box is
    the same over three polls, its centre is inside the viewport and a hit test there lands in the
    plot (cards filling above it after a page load can move it between a measure and a mouse
    action; data-ready says they have had their first fill). Returns the plot's box
    [left, top, width, height] in viewport pixels, or None."""
    end, last, same = time.time() + timeout, None, 0
    w.wait("return document.body.getAttribute('data-ready') === '1'", timeout)
    while time.time() < end:
        r = w.js("""const c = document.querySelector('[data-cell="' + arguments[0] + '"]');
          const s = c && c.querySelector('svg'); if (!s) return null;
          let r = s.getBoundingClientRect();
          if (r.top < 0 || r.bottom > window.innerHeight) {
            c.scrollIntoView({block: 'center'}); r = s.getBoundingClientRect(); }
          const x = r.left + r.width / 2, y = r.top + r.height / 2;
          const hit = document.elementFromPoint(x, y);
          return [r.left, r.top, r.width, r.height, !!(hit && s.contains(hit)),
                  x >= 0 && x < window.innerWidth && y >= 0 && y < window.innerHeight];""", cell)
        if r and r[4] and r[5] and last == r and same > 0:
            return r[:4]
        same = same + 1 if r and last == r else 0
        last = r
        time.sleep(0.2)
    return None


def cell_rect(w, cell):
    return w.js("""const s = document.querySelector('[data-cell="' + arguments[0] + '"] svg');
      if (!s) return null; const r = s.getBoundingClientRect();
      return [r.left, r.top, r.width, r.height];""", cell)


def point_xy(w, cell, name, version):
    return w.js("""const c = document.querySelector('[data-cell="' + arguments[0] + '"] g.points[data-name="'
      + arguments[1] + '"] circle[data-version="' + arguments[2] + '"]');
      if (!c) return null; const r = c.getBoundingClientRect();
      return [r.left + r.width / 2, r.top + r.height / 2];""", cell, name, version)


def view(w):
    return json.loads(w.js("return document.querySelector('#monitor-card').getAttribute('data-view')") or "null")


def drawn(w):
    """cell -> {series name: [[version, value], ...]} from the points, bars for the histogram."""
    return w.js("""const out = {};
      for (const c of document.querySelectorAll('.mon-cell')) {
        const d = {};
        for (const g of c.querySelectorAll('g.points')) d[g.getAttribute('data-name')] =
          Array.from(g.querySelectorAll('circle')).map((p) => [+p.getAttribute('data-version'), +p.getAttribute('data-value')]);
        d.paths = c.querySelectorAll('path.series').length;
        d.bars = Array.from(c.querySelectorAll('rect.bar')).map((b) => +b.getAttribute('data-count'));
        d.eos = Array.from(c.querySelectorAll('line.eos')).map((l) => +l.getAttribute('data-y'));
        out[c.getAttribute('data-cell')] = d;
      }
      return out;""")


def panel(w, u, mid, hist):
    w.get(u + "/")
    ok = w.wait("return document.querySelectorAll('.mon-cell').length === %d && "
                "document.querySelectorAll('[data-cell=\"loss\"] circle.pt').length === %d"
                % (len(CELLS), VERSIONS), 20)
    check("panel: %d cells, loss drawn with %d points" % (len(CELLS), VERSIONS), ok)
    v = view(w)
    check("panel opened on the model with a monitor", v and v["model"] == "demo-mlp" and
          v["monitor"] == mid, v)
    d = drawn(w)
    for cell, names in SERIES.items():
        api = {n: [[e["version"], e["instruments"].get(n)] for e in hist
                   if e["instruments"].get(n) is not None] for n in names}
        if not any(api.values()):
            check("cell %s: no values in the API, none drawn" % cell,
                  d.get(cell, {}).get("paths") == 0)
            continue
        same = all(d.get(cell, {}).get(n, []) == api[n] for n in names)
        check("cell %s: a path per series and points = the history's values" % cell,
              same and d[cell]["paths"] == sum(1 for n in names if api[n]),
              (d.get(cell), api))
    alphas = [e["instruments"]["alpha"] for e in hist if e["instruments"].get("alpha") is not None]
    check("alpha histogram counts every alpha", sum(d["alpha_hist"]["bars"]) == len(alphas)
          and alphas, (d["alpha_hist"], alphas))
    check("no 2/eta line without a learning rate", d["lmax"]["eos"] == [], d["lmax"])

    # hover: the tooltip shows the history's values at the version under the mouse
    for cell, name in [("loss", "loss"), ("lmax", "hessian_max_eigenvalue"), ("tests", "norm_test")]:
        e = hist[2]
        aim(w, cell)
        xy = point_xy(w, cell, name, e["version"])
        if not check("hover %s: the point of version %d is drawn" % (cell, e["version"]), xy, xy):
            continue
        w.actions(("move", xy[0] + 1, xy[1] - 20))
        tip = w.wait("""const t = document.querySelector('#mon-tip');
          return !t.hidden && t.getAttribute('data-cell') === arguments[0] &&
            {version: +t.getAttribute('data-version'), text: t.textContent,
             rows: Array.from(t.querySelectorAll('.tip-row')).map((r) => [r.getAttribute('data-name'), r.querySelector('b').textContent])};""",
                     5, cell)
        rows = dict(tip["rows"]) if tip else {}
        if not tip:
            check("hover %s: tooltip shown" % cell, False,
                  w.js("const t = document.querySelector('#mon-tip'); return [t.hidden, t.outerHTML]"))
            continue
        check("hover %s: tooltip at version %d, %s = the history's (6 digits)" % (cell, e["version"], name),
              tip and tip["version"] == e["version"] and
              close(float(rows.get(name, "nan")), e["instruments"][name], 5e-6), (tip, e["instruments"][name]))

    # exports: the links' contents equal GET /v1/models/demo-mlp/history
    def link_text(sel):
        return w.js_async("""const done = arguments[arguments.length - 1];
          fetch(document.querySelector(arguments[0]).href).then((r) => r.text()).then(done, (e) => done('ERR ' + e));""", sel)
    rows = list(csv.DictReader(io.StringIO(link_text("#mon-csv"))))
    names = sorted({k for e in hist for k in e["instruments"]})
    good = len(rows) == len(hist)
    for r, e in zip(rows, hist):
        good = good and r["monitor"] == mid and int(r["version"]) == e["version"] and \
            r["job"] == e["job"] and r["time"] == e["time"] and int(r["skipped"]) == e["skipped"]
        for n in names:
            x = e["instruments"].get(n)
            good = good and (r.get(n) == "" if x is None else float(r.get(n) or "nan") == x)
    check("CSV export = the API's history (every instrument, exactly)", good and rows,
          rows[:1])
    js = json.loads(link_text("#mon-json"))
    check("JSON export = the API's history", js.get("history") == hist and js.get("model") ==
          "demo-mlp", str(js)[:300])
    check("export file names", w.js("return [document.querySelector('#mon-csv').download, "
                                    "document.querySelector('#mon-json').download]") ==
          ["demo-mlp-%s-history.csv" % mid, "demo-mlp-%s-history.json" % mid])

    # zoom by dragging from the 2nd to the 4th version
    vs = [e["version"] for e in hist]
    aim(w, "loss")
    a, b = point_xy(w, "loss", "loss", vs[1]), point_xy(w, "loss", "loss", vs[3])
    w.actions(("move", a[0], a[1]), ("down",), ("move", (a[0] + b[0]) / 2, a[1]),
              ("move", b[0], a[1]), ("up",))
    w.wait("return document.querySelectorAll('[data-cell=\"loss\"] circle.pt').length === 3", 5)
    v = view(w)
    d = drawn(w)
    check("drag zoom: versions %d..%d shown in every cell" % (vs[1], vs[3]),
          v["from"] == vs[1] and v["to"] == vs[3] and
          [p[0] for p in d["loss"]["loss"]] == vs[1:4] and
          [p[0] for p in d["gsnr"]["mean_gsnr"]] == vs[1:4], (v, d["loss"]))

    # the learning rate: the 2/eta line on the lambda_max cell (2/eta about 2 lambda_max)
    lr = float("%.3g" % (1 / max(e["instruments"]["hessian_max_eigenvalue"] for e in hist)))
    w.js("const i = document.querySelector('#mon-lr'); i.value = arguments[0]; "
         "i.dispatchEvent(new Event('change'));", str(lr))
    d = drawn(w)
    check("learning rate %g: the 2/eta line at %g on lambda_max" % (lr, 2 / lr),
          len(d["lmax"]["eos"]) == 1 and close(d["lmax"]["eos"][0], 2 / lr, 1e-12), d["lmax"])
    link = w.js("return document.querySelector('#mon-permalink').getAttribute('href')")
    check("permalink names the view", link == "#model=demo-mlp&monitor=%s&lr=%s&from=%d&to=%d"
          % (mid, lr, vs[1], vs[3]), link)
    shot(w, "panel")

    # the permalink in a fresh page load
    w.get("about:blank")
    w.get(u + "/" + link)
    w.wait("return document.querySelectorAll('[data-cell=\"loss\"] circle.pt').length === 3", 20)
    # a permalink load scrolls the monitor card into view 300 ms after DOMContentLoaded
    # (monitor.js); the points can be drawn before that, so let it happen before aiming
    time.sleep(0.6)
    v2 = view(w)
    d2 = drawn(w)
    check("permalink reopens the same view (model, monitor, lr, zoom, points, 2/eta)",
          v2 == {"model": "demo-mlp", "monitor": mid, "lr": lr, "from": vs[1], "to": vs[3]} and
          [p[0] for p in d2["loss"]["loss"]] == vs[1:4] and d2["lmax"]["eos"] == d["lmax"]["eos"],
          (v2, d2.get("loss")))

    # wheel: zoom out to everything, then in; reset
    def wheel(dy, changed):
        """One wheel step over the loss plot's centre; retried (at most 3 times) only while the
        view has not changed, so a step that landed elsewhere cannot pass or zoom twice."""
        before = view(w)
        for _ in range(3):
            r = aim(w, "loss")
            if not r:
                return before
            w.actions(("wheel", r[0] + r[2] / 2, r[1] + r[3] / 2, dy))
            if w.wait("return document.querySelector('#monitor-card').getAttribute('data-view') !== "
                      "arguments[0]", 3, json.dumps(before, separators=(",", ":"))) and changed(view(w)):
                break
        return before
    wheel(300, lambda v: v["from"] is None)
    w.wait("return document.querySelectorAll('[data-cell=\"loss\"] circle.pt').length === %d"
           % VERSIONS, 5)
    check("wheel down: zoomed out to every version", view(w)["from"] is None and
          len(drawn(w)["loss"]["loss"]) == VERSIONS, view(w))
    before = wheel(-300, lambda v: v["from"] is not None)
    time.sleep(0.3)
    v = view(w)
    n = len(drawn(w)["loss"]["loss"])
    check("wheel up: zoomed in around the mouse", v != before and v["from"] is not None and
          vs[0] < v["from"] < v["to"] < vs[-1] and n == v["to"] - v["from"] + 1, (v, n))
    w.js("document.querySelector('#mon-reset').click()")
    check("reset zoom: every version", view(w)["from"] is None and
          len(drawn(w)["loss"]["loss"]) == VERSIONS, view(w))

    # the screenshot: each plot cell has coloured pixels
    w.js("document.querySelector('#monitor-card').scrollIntoView()")
    time.sleep(0.3)
    img = png_decode(shot(w, "panel-all"))
    rects = {c: cell_rect(w, c) for c in CELLS}
    counts = {c: (coloured(img, rects[c]) if rects[c] and rects[c][1] + rects[c][3] <= img[1]
                  else None) for c in CELLS}
    check("screenshot: every cell in view has plotted (coloured) pixels",
          sum(1 for c in counts.values() if c is not None) >= 6 and
          all(c is None or c > 40 for c in counts.values()), counts)


def shot(w, name):
    path = os.path.join(ROOT, "build", "dashboard-ui-%s.png" % name)
    png = w.screenshot(path)
    img = png_decode(png)
    colours = set()
    for row in img[3][::max(1, img[1] // 60)]:
        for x in range(0, img[0], max(1, img[0] // 60)):
            colours.add(bytes(row[x * img[2]:x * img[2] + 3]))
    check("screenshot %s: a %dx%d PNG, not blank" % (name, img[0], img[1]),
          img[0] > 300 and img[1] > 300 and len(colours) > 8, len(colours))
    return png


def job_viewer(w, u, jobs):
    # a job's permalink opens it
    tid = jobs["trace"]["id"]
    w.get("about:blank")
    w.get(u + "/#job=" + tid)
    ok = w.wait("return document.querySelector('#result-title').textContent.includes(arguments[0]) && "
                "document.querySelectorAll('#plot svg.plot[data-op=\"trace\"] rect.bar').length", 20,
                tid[:8])
    check("job permalink #job=ID opens that job", ok)
    link = w.js("const a = document.querySelector('#job-permalink'); return a && a.getAttribute('href')")
    check("the result card's permalink is #job=ID", link == "#job=" + tid, link)
    cats = w.js("return Array.from(document.querySelectorAll('#plot svg.plot[data-op=\"trace\"] text.cat'))"
                ".map((t) => Array.from(t.querySelectorAll('tspan')).map((s) => s.textContent))")
    check("per-layer bars: module name and type, parameter names",
          cats == [["0 · Linear(64→32)", "0.weight, 0.bias"], ["2 · Linear(32→10)", "2.weight, 2.bias"]],
          cats)
    shot(w, "trace")

    # SNR: every value label a whole number that fits its box and the plot
    w.js("window.curvd.select(arguments[0])", jobs["snr"]["id"])
    w.wait("return document.querySelectorAll('#plot svg.plot[data-op=\"snr\"] text.value').length", 20)
    w.js("document.querySelector('#result-card').scrollIntoView()")
    labels = w.js("""const svg = document.querySelector('#plot svg.plot[data-op="snr"]');
      const s = svg.getBoundingClientRect(), k = s.width / svg.viewBox.baseVal.width;
      return Array.from(svg.querySelectorAll('text.value')).map((t) => { const r = t.getBoundingClientRect();
        return {text: t.textContent, value: +t.getAttribute('data-value'), box: +t.getAttribute('data-box') * k,
                w: r.width, left: r.left - s.left, right: s.right - r.right, top: r.top - s.top}; });""")
    n = 2 * len(jobs["snr"]["result"]["directions"])
    bad = [lb for lb in labels if not (
        close(float(lb["text"]) if lb["text"].replace(".", "").replace("e-", "").replace("-", "").isdigit()
              else None, lb["value"], 0.06) and
        lb["w"] <= lb["box"] + 0.5 and lb["left"] >= 0 and lb["right"] >= 0 and lb["top"] >= 0)]
    check("SNR: %d value labels, whole numbers within their boxes and the plot" % n,
          len(labels) >= n - 2 and not bad, bad[:4] or len(labels))
    shot(w, "snr")

    # density: the curve ends at the baseline inside the plot on both sides
    w.js("window.curvd.select(arguments[0])", jobs["density"]["id"])
    w.wait("return document.querySelector('#plot svg.plot[data-op=\"density\"] path.series')", 20)
    g = w.js("""const svg = document.querySelector('#plot svg.plot[data-op="density"]');
      const p = svg.querySelector('path.series'), axis = svg.querySelector('.axis > path');
      const pts = p.getAttribute('d').slice(1).split('L').map((s) => s.split(',').map(Number));
      const a = axis.getBBox();
      const ys = pts.map((q) => q[1]);
      return {first: pts[0], last: pts[pts.length - 1], top: Math.min(...ys), base: a.y + a.height,
              left: a.x, right: svg.viewBox.baseVal.width - 18, plotTop: a.y};""")
    check("density: the curve starts and ends at the baseline (no end peak clipped)",
          abs(g["first"][1] - g["base"]) < 1.5 and abs(g["last"][1] - g["base"]) < 1.5, g)
    check("density: the curve inside the plot area (x and the peak's height)",
          g["left"] - 0.5 <= g["first"][0] and g["last"][0] <= g["right"] + 0.5 and
          g["top"] >= g["plotTop"] - 0.5, g)
    top = max(max(r) for r in jobs["density"]["result"]["nodes"])
    xr = w.js("""const ts = Array.from(document.querySelectorAll('#plot svg.plot[data-op="density"] .axis text'))
      .map((t) => +t.textContent).filter((x) => isFinite(x)); return ts;""")
    check("density: the top Ritz value inside the x range", xr and top < max(xr) + 0.5, (top, xr))
    shot(w, "density")

    # a monitor's instruments job: per-layer bars named by module, the gradient histogram
    last = jobs["instruments"]
    w.js("window.curvd.select(arguments[0])", last["id"])
    ok = w.wait("return document.querySelectorAll('#plot svg.plot[data-op=\"instruments-histogram\"] rect.bar').length", 20)
    ins = w.js("""const q = (s) => Array.from(document.querySelectorAll(s));
      return {cats: q('#plot svg.plot[data-op="instruments-layers"] text.cat tspan:first-child').map((t) => t.textContent),
              bars: q('#plot svg.plot[data-op="instruments-layers"] g.series').map((g) => [g.getAttribute('data-label'),
                 Array.from(g.querySelectorAll('text.value')).map((t) => +t.getAttribute('data-value'))]),
              hist: q('#plot svg.plot[data-op="instruments-histogram"] rect.bar').length};""")
    res = last["result"]
    want = [[k, [b[k] for b in res["layers"]]] for k in ("gradient_norm", "update_size",
                                                        "distance_from_init")]
    check("instruments job: norms per layer (module names) and the gradient histogram",
          ok and ins["cats"] == ["0 · Linear(64→32)", "2 · Linear(32→10)"] and ins["bars"] == want
          and ins["hist"] == sum(1 for c in res["gradient_histogram"]["counts"] if c > 0),
          (ins, want))


def main():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        skip("dashboard UI in headless Chromium", "chromium or chromedriver is not installed "
             "(apt-get install chromium chromium-driver; $CHROMIUM, $CHROMEDRIVER)")
        return summary()
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with Daemon("--workers", "1") as d:
        u = d.url
        mid, hist, jobs = setup(u)
        w = WebDriver()
        try:
            panel(w, u, mid, hist)
            job_viewer(w, u, jobs)
            errors = [e for e in w.cmd("POST", "/se/log", {"type": "browser"})
                      if e.get("level") == "SEVERE"]
            check("no script errors on the page", errors == [], errors)
        finally:
            w.quit()
    return summary()


def perturbed(st_bytes, k):
    """The safetensors file with every float32 scaled by (1 + 0.03 k)."""
    return scaled_safetensors(st_bytes, 1 + 0.03 * k)


if __name__ == "__main__":
    sys.exit(main())

