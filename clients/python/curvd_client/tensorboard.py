"""tensorboard.py - instruments as TensorBoard scalars and CSV, without TensorBoard.

TensorBoard reads `events.out.tfevents.*` files: TFRecord files (each record: its length as
a little-endian uint64, the masked CRC-32C of those 8 bytes, the data, the masked CRC-32C of
the data) holding serialized `tensorflow.Event` protocol buffers. This module writes them
directly (Debian ships no tensorboard), from the standard library:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
              Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first record of a file is the event with file_version "brain.Event:2".

    w = EventWriter("runs/mlp")               # runs/mlp/events.out.tfevents.<time>.<host>.curvd
    w.add_scalar("curvd/loss", 0.31, step=7)
    w.close()
    write_history(history, "runs/mlp")        # every scalar instrument of a monitor's history
    write_history_csv(history, "history.csv")
"""
from __future__ import annotations

import csv
import math
import os
import socket
import struct
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _CRC32C_POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of data."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add 0xa282ead8 (mod 2^32)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: ten bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, file_version: Optional[str] = None,
                 scalars: Optional[Mapping[str, float]] = None) -> bytes:
    """One serialized Event: wall_time, step, and a file_version or scalar values."""
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) +
                         struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _bytes_field(5, summary)
    return out


def tfrecord(data: bytes) -> bytes:
    """data framed as one TFRecord."""
    head = struct.pack("<Q", len(data))
    return (head + struct.pack("<I", masked_crc32c(head)) + data +
            struct.pack("<I", masked_crc32c(data)))


class EventWriter:
    """Appends scalar events to a new events file in logdir (created if missing)."""

    def __init__(self, logdir: str, suffix: str = ".curvd") -> None:
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, "events.out.tfevents.%d.%s%s" % (
            int(time.time()), socket.gethostname(), suffix))
        self._f = open(self.path, "ab")
        self._f.write(tfrecord(encode_event(time.time(), file_version="brain.Event:2")))

    def add_scalars(self, scalars: Mapping[str, float], step: int,
                    wall_time: Optional[float] = None) -> None:
        """One event with these tag -> value scalars at step (non-finite values skipped)."""
        ok = {k: float(v) for k, v in scalars.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if ok:
            self._f.write(tfrecord(encode_event(time.time() if wall_time is None else wall_time,
                                                step, scalars=ok)))

    def add_scalar(self, tag: str, value: float, step: int,
                   wall_time: Optional[float] = None) -> None:
        self.add_scalars({tag: value}, step, wall_time)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def scalar_instruments(entry: Mapping[str, Any]) -> Dict[str, float]:
    """The scalar instruments of one history entry (or of an instruments job's result):
    its numbers, including the min/median/max of batch_gradient_norms; lists, null and
    per-layer values left out."""
    src = entry.get("instruments", entry)
    out: Dict[str, float] = {}
    for k, v in src.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif k == "batch_gradient_norms" and isinstance(v, Mapping):
            for q, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{k}_{q}"] = float(x)
    return out


def _entry_time(entry: Mapping[str, Any]) -> Optional[float]:
    t = entry.get("time")
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, str):  # ISO 8601 UTC, as curvd writes times
        try:
            return time.mktime(time.strptime(t[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        except ValueError:
            return None
    return None


def write_history(history: Iterable[Mapping[str, Any]], logdir: str,
                  prefix: str = "curvd/") -> str:
    """Every scalar instrument of each history entry as TensorBoard scalars (tag prefix +
    name, step = the model version); returns the events file's path."""
    with EventWriter(logdir) as w:
        for e in history:
            sc = scalar_instruments(e)
            w.add_scalars({prefix + k: v for k, v in sc.items()}, int(e.get("version", 0)),
                          _entry_time(e))
        return w.path


def write_history_csv(history: Iterable[Mapping[str, Any]], path: str) -> List[str]:
    """One row per history entry (version, time, then each scalar instrument); returns the
    columns."""
    rows = [(e, scalar_instruments(e)) for e in history]
    names = sorted({k for _, sc in rows for k in sc})
    cols = ["version", "time"] + names
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e, sc in rows:
            w.writerow([e.get("version"), e.get("time")] + [sc.get(k, "") for k in names])
    return cols
