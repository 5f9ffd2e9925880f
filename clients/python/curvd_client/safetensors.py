"""Minimal safetensors reader/writer using only the standard library.

curvd exchanges parameters and datasets as safetensors files: an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets"}}`` and the raw little-endian tensor data.  This module writes
and reads that format without numpy or the ``safetensors`` package, so the
client works anywhere Python does.  With PyTorch, prefer
:mod:`curvd_client.torch_export`.

Example (a tiny regression dataset built from Python lists)::

    from curvd_client import safetensors as st
    data = st.dumps({
        "x": st.Tensor.from_list([[0.0, 1.0], [1.0, 0.0]], "F32"),
        "y": st.Tensor.from_list([[1.0], [0.0]], "F32"),
    })
"""
from __future__ import annotations

import array
import json
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

__all__ = ["Tensor", "dumps", "loads", "DTYPE_SIZES", "RowSplitter"]

#: Bytes per element of each safetensors dtype this module understands.
DTYPE_SIZES: Dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
# struct format characters (little-endian) for decoding / encoding
_STRUCT = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h",
           "I8": "b", "U8": "B", "BOOL": "?"}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _flatten(values: Any) -> Tuple[List[Any], List[int]]:
    """Flattens nested lists into (flat values, shape); checks that it is rectangular."""
    if not isinstance(values, (list, tuple)):
        return [values], []
    if not values:
        return [], [0]
    parts = [_flatten(v) for v in values]
    inner = parts[0][1]
    for _, s in parts:
        if s != inner:
            raise ValueError("ragged nested list: sub-shapes %s and %s differ" % (inner, s))
    flat: List[Any] = []
    for f, _ in parts:
        flat.extend(f)
    return flat, [len(values)] + inner


@dataclass
class Tensor:
    """One tensor: its safetensors dtype name, shape and raw little-endian bytes."""

    dtype: str
    shape: List[int]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError("unsupported dtype %r (known: %s)" % (self.dtype, ", ".join(DTYPE_SIZES)))
        self.shape = [int(s) for s in self.shape]
        want = _numel(self.shape) * DTYPE_SIZES[self.dtype]
        if len(self.data) != want:
            raise ValueError("tensor of shape %s and dtype %s needs %d bytes, got %d"
                             % (self.shape, self.dtype, want, len(self.data)))

    @classmethod
    def from_list(cls, values: Any, dtype: str = "F32", shape: Union[Sequence[int], None] = None) -> "Tensor":
        """Builds a tensor from a (nested) list of numbers.

        ``shape`` defaults to the nesting of ``values``; give it to reshape a flat list.
        """
        flat, inferred = _flatten(values)
        shp = list(shape) if shape is not None else inferred
        if _numel(shp) != len(flat):
            raise ValueError("%d values do not fit shape %s" % (len(flat), shp))
        if dtype == "BF16":
            raw = b"".join(struct.pack("<f", float(v))[2:] for v in flat)
        else:
            code = _STRUCT[dtype]
            if dtype.startswith("F"):
                flat = [float(v) for v in flat]
            elif dtype != "BOOL":
                flat = [int(v) for v in flat]
            raw = struct.pack("<%d%s" % (len(flat), code), *flat)
        return cls(dtype, shp, raw)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return _numel(self.shape)

    def flat(self) -> List[Union[float, int, bool]]:
        """The elements as a flat Python list (row-major)."""
        n = self.numel
        if self.dtype == "BF16":
            return [struct.unpack("<f", b"\0\0" + self.data[2 * i:2 * i + 2])[0] for i in range(n)]
        if self.dtype in ("F32", "F64", "I64", "I32") and sys.byteorder == "little":
            a = array.array({"F32": "f", "F64": "d", "I64": "q", "I32": "i"}[self.dtype])
            if a.itemsize == DTYPE_SIZES[self.dtype]:
                a.frombytes(self.data)
                return list(a.tolist())
        return list(struct.unpack("<%d%s" % (n, _STRUCT[self.dtype]), self.data))

    def tolist(self) -> Any:
        """The elements as nested lists shaped like :attr:`shape`."""
        vals: Any = self.flat()
        for dim in reversed(self.shape[1:]):
            vals = [vals[i:i + dim] for i in range(0, len(vals), dim)]
        if not self.shape:
            return vals[0]
        return vals


TensorLike = Union[Tensor, Tuple[str, Sequence[int], bytes]]


def dumps(tensors: Mapping[str, TensorLike], metadata: Union[Mapping[str, str], None] = None) -> bytes:
    """Serializes ``{name: Tensor}`` (or ``{name: (dtype, shape, raw_bytes)}``) as safetensors.

    Tensors are written in the mapping's order (curvd takes parameters by name,
    so the order does not matter to it).
    """
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs: List[bytes] = []
    off = 0
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            t = Tensor(t[0], list(t[1]), bytes(t[2]))
        header[name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + len(t.data)]}
        blobs.append(t.data)
        off += len(t.data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def loads(buf: bytes) -> Dict[str, Tensor]:
    """Parses a safetensors file into ``{name: Tensor}`` (``__metadata__`` is dropped)."""
    if len(buf) < 8:
        raise ValueError("not a safetensors file: %d bytes" % len(buf))
    (hlen,) = struct.unpack("<Q", buf[:8])
    if hlen > len(buf) - 8:
        raise ValueError("not a safetensors file: header length %d exceeds the file" % hlen)
    header = json.loads(buf[8:8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out: Dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = Tensor(info["dtype"], info["shape"], bytes(buf[base + a:base + b]))
    return out


class RowSplitter:
    """Splits a dataset file (safetensors whose tensors all have N rows) into parts.

    Each part is a complete safetensors file holding consecutive rows of every
    tensor, at most ``max_bytes`` long, so a dataset larger than the server's
    ``--max-body`` can be sent with ``POST /v1/datasets/{name}/parts``.  ``buf``
    may be bytes or a read-only ``mmap``: only the part being built is copied.

    >>> sp = RowSplitter(data, 1 << 20)
    >>> sp.rows, sp.rows_per_part, len(sp)
    >>> for part, rows in sp: ...
    """

    def __init__(self, buf: Any, max_bytes: int) -> None:
        if len(buf) < 8:
            raise ValueError("not a safetensors file: %d bytes" % len(buf))
        (hlen,) = struct.unpack("<Q", bytes(buf[:8]))
        if hlen > len(buf) - 8:
            raise ValueError("not a safetensors file: header length %d exceeds the file" % hlen)
        header = json.loads(bytes(buf[8:8 + hlen]).decode("utf-8"))
        self.buf = buf
        self.base = 8 + hlen
        self.meta = header.pop("__metadata__", None)
        # tensors in data order: (name, dtype, shape, begin, bytes per row)
        self.tensors: List[Tuple[str, str, List[int], int, int]] = []
        rows = None
        def begin(kv: Tuple[str, Any]) -> int:
            return int(kv[1]["data_offsets"][0])
        for name, info in sorted(header.items(), key=begin):
            shape = list(info["shape"])
            a, b = info["data_offsets"]
            if not shape:
                raise ValueError("tensor %r is a scalar: it has no rows to split" % name)
            if rows is None:
                rows = shape[0]
            if shape[0] != rows:
                raise ValueError("tensor %r has %d rows, another has %d: cannot split by rows"
                                 % (name, shape[0], rows))
            if rows and (b - a) % rows:
                raise ValueError("tensor %r: %d bytes are not a whole number of %d rows"
                                 % (name, b - a, rows))
            self.tensors.append((name, info["dtype"], shape, a, (b - a) // rows if rows else 0))
        if not rows:
            raise ValueError("the dataset has no rows")
        self.rows: int = rows
        row_bytes = sum(t[4] for t in self.tensors)
        overhead = len(self._header(rows, rows)) + 8
        if overhead + row_bytes > max_bytes:
            raise ValueError("one row (%d bytes with the header) is larger than the %d-byte "
                             "limit" % (overhead + row_bytes, max_bytes))
        self.rows_per_part: int = max(1, (max_bytes - overhead) // max(row_bytes, 1))

    def _header(self, start: int, k: int) -> bytes:
        hdr: Dict[str, Any] = {}
        if self.meta:
            hdr["__metadata__"] = self.meta
        off = 0
        for name, dtype, shape, _, rb in self.tensors:
            hdr[name] = {"dtype": dtype, "shape": [k] + shape[1:],
                         "data_offsets": [off, off + k * rb]}
            off += k * rb
        h = json.dumps(hdr, separators=(",", ":")).encode()
        return h + b" " * ((8 - len(h) % 8) % 8)

    def __len__(self) -> int:
        return (self.rows + self.rows_per_part - 1) // self.rows_per_part

    def part(self, i: int) -> Tuple[bytes, int]:
        """Part i (0-based) as safetensors bytes, and its row count."""
        start = i * self.rows_per_part
        k = min(self.rows_per_part, self.rows - start)
        if i < 0 or k <= 0:
            raise IndexError("part %d of %d" % (i, len(self)))
        h = self._header(start, k)
        blobs = [struct.pack("<Q", len(h)), h]
        for _, _, _, begin, rb in self.tensors:
            a = self.base + begin + start * rb
            blobs.append(bytes(self.buf[a:a + k * rb]))
        return b"".join(blobs), k

    def __iter__(self) -> Iterator[Tuple[bytes, int]]:
        for i in range(len(self)):
            yield self.part(i)
