"""e2e_tensorboard.py - curvd_client.tensorboard's event files, read back by a decoder
written here from the formats' specifications (not from the writer's code):

TFRecord: uint64 length (little-endian), uint32 masked CRC-32C of the length bytes, the
data, uint32 masked CRC-32C of the data; masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8.
CRC-32C here bit by bit (polynomial 0x1EDC6F41, reflected), checked against the standard
check value crc32c("123456789") = 0xE3069283. Protocol buffers: a generic wire-format
parser (varint, 64-bit, length-delimited, 32-bit), then tensorflow.Event's field numbers
(wall_time 1 double, step 2 int64, file_version 3 string, summary 5: value 1: tag 1
string, simple_value 2 float).

Checks: the first record is file_version "brain.Event:2"; a history of three versions of
an instruments job's result run on `curvd serve`'s demo MLP comes back with every scalar
instrument, its step (the version) and wall time; float32 rounding only; a corrupted
byte is detected by the CRC; CSV columns and values.

Usage: /usr/bin/python3 tests/e2e_tensorboard.py build/curvd
"""
import csv
import glob
import json
import os
import struct
import sys
import tempfile
import urllib.request

from e2e_lib import ROOT, Daemon, check, summary

sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from curvd_client import tensorboard as tb  # noqa: E402


def crc32c_bitwise(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked(c):
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(raw):
    """The TFRecord payloads of raw; raises ValueError on a bad CRC or a short file."""
    out, at = [], 0
    while at < len(raw):
        if at + 12 > len(raw):
            raise ValueError("truncated header")
        head = raw[at:at + 8]
        (n,) = struct.unpack("<Q", head)
        (hc,) = struct.unpack("<I", raw[at + 8:at + 12])
        if hc != masked(crc32c_bitwise(head)):
            raise ValueError("length CRC")
        data = raw[at + 12:at + 12 + n]
        if len(data) != n or at + 16 + n > len(raw):
            raise ValueError("truncated data")
        (dc,) = struct.unpack("<I", raw[at + 12 + n:at + 16 + n])
        if dc != masked(crc32c_bitwise(data)):
            raise ValueError("data CRC")
        out.append(data)
        at += 16 + n
    return out


def varint(buf, at):
    shift = val = 0
    while True:
        b = buf[at]
        at += 1
        val |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return val, at


def fields(buf):
    """[(number, wire type, value)] of a protobuf message."""
    out, at = [], 0
    while at < len(buf):
        key, at = varint(buf, at)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, at = varint(buf, at)
        elif wire == 1:
            v, at = buf[at:at + 8], at + 8
        elif wire == 2:
            n, at = varint(buf, at)
            v, at = buf[at:at + n], at + n
        elif wire == 5:
            v, at = buf[at:at + 4], at + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((num, wire, v))
    return out


def event(data):
    ev = {"scalars": {}}
    for num, wire, v in fields(data):
        if num == 1 and wire == 1:
            ev["wall_time"] = struct.unpack("<d", v)[0]
        elif num == 2 and wire == 0:
            ev["step"] = v
        elif num == 3 and wire == 2:
            ev["file_version"] = v.decode()
        elif num == 5 and wire == 2:
            for n2, w2, val in fields(v):
                if n2 == 1 and w2 == 2:
                    tag = value = None
                    for n3, w3, x in fields(val):
                        if n3 == 1 and w3 == 2:
                            tag = x.decode()
                        elif n3 == 2 and w3 == 5:
                            value = struct.unpack("<f", x)[0]
                    ev["scalars"][tag] = value
    return ev


check("crc32c check value (bitwise decoder's)", crc32c_bitwise(b"123456789") == 0xE3069283)
check("crc32c check value (writer's)", tb.crc32c(b"123456789") == 0xE3069283)

with Daemon() as d, tempfile.TemporaryDirectory() as tmp:
    req = urllib.request.Request(
        d.url + "/v1/jobs?wait=60", method="POST",
        data=json.dumps({"model": "demo-mlp", "dataset": "digits", "op": "instruments",
                         "batch": {"offset": 0, "size": 64}, "seed": 1,
                         "options": {"probes": 4, "lanczos_steps": 4}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=90) as r:
        job = json.load(r)
    res = job.get("result", {})
    check("instruments job succeeded", job.get("status") == "succeeded", str(job)[:300])
    history = [{"version": v, "time": "2026-12-06T10:00:0%dZ" % v,
                "instruments": dict(res, loss=res.get("loss", 0) + v)} for v in (1, 2, 3)]
    want = tb.scalar_instruments(history[0])
    check("the result has scalar instruments", {"loss", "gradient_norm", "norm_test",
                                                 "hessian_trace"} <= set(want), str(want))
    logdir = os.path.join(tmp, "runs")
    path = tb.write_history(history, logdir)
    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    check("one events file named as TensorBoard expects", files == [path], str(files))
    raw = open(path, "rb").read()
    recs = records(raw)
    evs = [event(x) for x in recs]
    check("first record: file_version brain.Event:2",
          evs and evs[0].get("file_version") == "brain.Event:2", str(evs[:1]))
    check("one event per version, steps 1..3", [e.get("step") for e in evs[1:]] == [1, 2, 3],
          str([e.get("step") for e in evs]))
    ok = True
    for e, h in zip(evs[1:], history):
        sc = tb.scalar_instruments(h)
        got = e["scalars"]
        if set(got) != {"curvd/" + k for k in sc}:
            ok = False
        for k, v in sc.items():
            g = got.get("curvd/" + k)
            if g is None or abs(g - v) > 1e-6 * max(1.0, abs(v)):
                ok = False
    check("every scalar instrument read back (float32)", ok, str(evs[1]["scalars"])[:400])
    check("wall times from the history's ISO times",
          abs(evs[2]["wall_time"] - evs[1]["wall_time"] - 1.0) < 1e-6,
          str([e.get("wall_time") for e in evs]))
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0x40
    try:
        records(bytes(bad))
        check("a flipped byte fails the CRC", False)
    except ValueError:
        check("a flipped byte fails the CRC", True)
    cpath = os.path.join(tmp, "h.csv")
    cols = tb.write_history_csv(history, cpath)
    rows = list(csv.DictReader(open(cpath)))
    check("CSV: one row per version with every instrument",
          len(rows) == 3 and cols[:2] == ["version", "time"] and
          abs(float(rows[2]["loss"]) - history[2]["instruments"]["loss"]) < 1e-9 and
          set(cols[2:]) == set(want), str(cols))

raise SystemExit(summary())
