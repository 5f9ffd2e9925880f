"""e2e_monitor_client.py - the Python client's training-loop integration
(curvd_client.monitor.Monitor) against `curvd serve`'s demo MLP:

a Monitor (every=1, 64 samples) gets 12 weight versions from step() as fast as a loop
produces them (each the demo's parameters scaled by 1 + 0.01 k, as safetensors bytes);
step() never blocks (12 calls well under the time one push takes), pushed + dropped = 12
(dropped: weights superseded while a push was in flight), the model's version grew by
`pushed`; the history ends with an entry for the newest version (coalescing never loses
the newest) whose loss equals a direct `instruments` job on that version; CSV and
TensorBoard exports hold that entry; delete() removes the monitor; errors: an unknown
option is CurvdError 400 naming the field; clients/python/examples/train_monitor.py
--instruments (40 steps, a version every 10) runs, its history has every instrument, its
plot, CSV and TensorBoard exports are written.

Usage: /usr/bin/python3 tests/e2e_monitor_client.py build/curvd
"""
import csv
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

from e2e_lib import PY, ROOT, Daemon, check, summary

sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from curvd_client import Client, CurvdError  # noqa: E402
from curvd_client import safetensors as st  # noqa: E402
from curvd_client.monitor import Monitor  # noqa: E402


def scaled(raw, f):
    """The F32 tensors of safetensors bytes raw scaled by f."""
    out = {}
    for name, t in st.loads(raw).items():
        n = len(t.data) // 4
        vals = struct.unpack("<%df" % n, t.data)
        out[name] = st.Tensor("F32", t.shape, struct.pack("<%df" % n, *(v * f for v in vals)))
    return st.dumps(out)


with Daemon("--workers", "1") as d, tempfile.TemporaryDirectory() as tmp:
    c = Client(d.url)
    base = c.get_parameters("demo-mlp")
    v0 = c.get_model("demo-mlp")["version"]
    batch = {"offset": 0, "size": 64}
    versions = [scaled(base, 1 + 0.01 * k) for k in range(1, 13)]
    mon = Monitor(c, "demo-mlp", "digits", every=1, batch=batch, probes=4, lanczos_steps=4,
                  seed=3)
    check("monitor created with an id", bool(mon.id), str(mon.info)[:300])
    t0 = time.time()
    for raw in versions:
        mon.step(raw)
    t_steps = time.time() - t0
    mon.close()
    check("step() does not block (12 calls)", t_steps < 0.5, f"{t_steps:.3f} s")
    check("pushed + dropped = 12, at least one pushed",
          mon.pushed + mon.dropped == 12 and mon.pushed >= 1 and mon.error is None,
          f"pushed {mon.pushed} dropped {mon.dropped} error {mon.error}")
    v_last = c.get_model("demo-mlp")["version"]
    check("the model's version grew by the pushes", v_last == v0 + mon.pushed,
          f"{v0} -> {v_last}, pushed {mon.pushed}")
    hist = mon.wait_for_version(v_last, timeout=60)
    last = hist[-1] if hist else {}
    check("the history ends with the newest version", last.get("version") == v_last,
          str([h.get("version") for h in hist]))
    job = c.run({"op": "instruments", "model": "demo-mlp", "dataset": "digits",
                 "batch": batch, "seed": 3, "options": {"probes": 4, "lanczos_steps": 4}},
                timeout=60)
    loss = (last.get("instruments") or {}).get("loss")
    check("its loss equals a direct instruments job on that version",
          loss is not None and abs(loss - job["loss"]) <= 1e-9 * max(1.0, abs(job["loss"])),
          f"{loss} vs {job.get('loss')}")
    cols = mon.to_csv(os.path.join(tmp, "h.csv"))
    rows = list(csv.DictReader(open(os.path.join(tmp, "h.csv"))))
    check("CSV export: one row per entry, the loss column",
          len(rows) == len(hist) and "loss" in cols and
          int(rows[-1]["version"]) == v_last, str(cols)[:200])
    path = mon.to_tensorboard(os.path.join(tmp, "runs"))
    check("TensorBoard export: one events file",
          glob.glob(os.path.join(tmp, "runs", "events.out.tfevents.*")) == [path] and
          os.path.getsize(path) > 100, path)
    mon.delete()
    listed = c._json("GET", "/v1/models/demo-mlp/monitors")["monitors"]
    check("delete() removes the monitor", all(m["id"] != mon.id for m in listed), str(listed))
    try:
        Monitor(c, "demo-mlp", "digits", every=1, probez=3)
        check("an unknown option is refused", False)
    except CurvdError as e:
        check("an unknown option is refused (400 naming the field)",
              e.status == 400 and "probez" in (e.field + e.message), str(e))

    # the example: train_monitor.py --instruments (torch, sklearn, matplotlib)
    out, js, cs = (os.path.join(tmp, n) for n in ("inst.png", "inst.json", "inst.csv"))
    p = subprocess.run([PY, os.path.join(ROOT, "clients", "python", "examples",
                                         "train_monitor.py"), "--url", d.url, "--steps", "40",
                        "--every", "10", "--instruments", "--out", out, "--json", js,
                        "--csv", cs, "--tensorboard", os.path.join(tmp, "tb"),
                        "--name", "mon-inst"], capture_output=True, text=True, timeout=180)
    check("train_monitor.py --instruments runs", p.returncode == 0,
          (p.stdout + p.stderr)[-2000:])
    try:
        h = json.load(open(js))["history"]
    except (OSError, ValueError, KeyError) as e:
        h = []
    inst = (h[-1].get("instruments") or {}) if h else {}
    check("its history: entries with every first- and second-order instrument",
          len(h) >= 1 and {"loss", "gradient_norm", "norm_test", "inner_product_test",
                           "orthogonality_test", "mean_gsnr", "tic_trace", "hessian_trace",
                           "hessian_max_eigenvalue", "update_size", "alpha"} <= set(inst),
          str(inst)[:300])
    check("its plot is a PNG", open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n")
    check("its CSV and TensorBoard exports",
          len(list(csv.DictReader(open(cs)))) == len(h) and
          len(glob.glob(os.path.join(tmp, "tb", "events.out.tfevents.*"))) == 1)

raise SystemExit(summary())
