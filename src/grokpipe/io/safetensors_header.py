"""Defensive parsing of a safetensors header, before any tensor is touched.

The format: 8 bytes little-endian header length N, N bytes of JSON, then the tensor data. This
reads only those 8 + N bytes and checks everything a hostile or damaged file could get wrong:
a regular file (a FIFO is refused, not waited on), N bounded and inside the file, valid UTF-8
JSON, known dtypes, non-negative shapes whose element count fits torch's int64 sizes,
dtype size × shape = byte length, offsets contiguous from 0 to exactly the end of the file,
no NUL in tensor names, no name given twice, no JSON nested past the recursion limit,
``__metadata__`` (when present) an object of strings.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .paths import kind_of

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_DIMENSION = 2**63 - 1  # torch sizes are int64: a larger dimension (even of an empty tensor) cannot be built

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_bytes: int
    file_bytes: int


def read_header(path: str | Path) -> Header:
    """Parse and validate the header of ``path``; raises HeaderError naming the problem."""
    path = Path(path)
    try:
        # Non-blocking open, then fstat: a FIFO or device is refused without waiting on it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as fh:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise HeaderError(f"{kind_of(status.st_mode)}, not a regular file")
            size = status.st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise HeaderError(f"header length {n} points past the end of the {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise HeaderError(f"cannot read ({exc.strerror or exc})") from None
    header = _parse_json(raw)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError("__metadata__ must be an object mapping strings to strings")
    data_bytes = size - 8 - n
    tensors = {name: _tensor_info(name, entry) for name, entry in header.items()}
    _check_layout(tensors, data_bytes)
    return Header(metadata=dict(metadata), tensors=tensors, header_bytes=n, file_bytes=size)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook: a name given twice is refused (json keeps the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"header names {key!r} twice")
        out[key] = value
    return out


def _parse_json(raw: bytes) -> dict:
    """The header's JSON object: valid UTF-8, no duplicate keys. JSON nested deeper than the
    interpreter's recursion limit (a hostile header) is refused like any other invalid JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not valid UTF-8 ({exc})") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except HeaderError:
        raise
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HeaderError(f"header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    return header


def _tensor_info(name: str, entry) -> TensorInfo:
    if "\x00" in name:
        raise HeaderError(f"tensor name {name!r} contains a NUL byte")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HeaderError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
    if math.prod(d for d in shape if d) > MAX_DIMENSION:  # covers each dimension; zeros would hide it
        raise HeaderError(f"tensor {name!r}: shape {shape!r} is larger than any tensor can be (2^63 elements)")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise HeaderError(
            f"tensor {name!r}: {dtype} x {shape} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]))


def _check_layout(tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """Tensors must tile the data region exactly: no gaps, no overlaps, nothing past the end."""
    position = 0
    for info in sorted(tensors.values(), key=lambda t: t.offsets):
        if info.offsets[0] != position:
            problem = "overlaps the previous tensor" if info.offsets[0] < position else "leaves a gap before it"
            raise HeaderError(f"tensor {info.name!r}: data_offsets start at {info.offsets[0]}, {problem}")
        position = info.offsets[1]
    if position != data_bytes:
        raise HeaderError(
            f"tensor data ends at byte {position} but the file holds {data_bytes} data bytes "
            f"({'truncated' if position > data_bytes else 'trailing bytes'})"
        )
