"""Writing one safetensors file from tensors that arrive one at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a consolidated model can be
larger than memory. The format allows streaming: the header (names, dtypes, shapes, byte offsets)
depends only on shapes and dtypes, so it is written first and each tensor's bytes follow as it
arrives (bytes a source stores raw, as safetensors shards do, are copied kernel-side). The file is
written to a temporary name, fsynced, renamed, and then read back with the safetensors library and
compared, bit for bit, with a second pass over the source.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import GrokpipeError
from .atomic import atomic_file
from .safetensors_io import same_bits
from .sources import TensorEntry, dtype_name

Tensors = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def output_dtype(entry: TensorEntry, cast: torch.dtype | None) -> torch.dtype:
    """``cast`` for floating tensors; integer and bool tensors keep their dtype."""
    return cast if cast is not None and entry.dtype.is_floating_point else entry.dtype


def output_nbytes(entry: TensorEntry, cast: torch.dtype | None) -> int:
    """Bytes of the tensor as written (after ``cast``)."""
    return entry.nbytes // entry.dtype.itemsize * output_dtype(entry, cast).itemsize


def header_bytes(entries: dict[str, TensorEntry], cast: torch.dtype | None, metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for ``entries`` laid out in order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, entry in entries.items():
        end = offset + output_nbytes(entry, cast)
        header[name] = {
            "dtype": dtype_name(output_dtype(entry, cast)),
            "shape": list(entry.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _converted(name: str, tensor: torch.Tensor, entry: TensorEntry, cast: torch.dtype | None) -> torch.Tensor:
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise GrokpipeError(
            f"{entry.file}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)} but was described as "
            f"{entry.dtype} {list(entry.shape)}"
        )
    return tensor.to(output_dtype(entry, cast)).contiguous()


def cast_changes(source: torch.Tensor, converted: torch.Tensor) -> dict[str, int]:
    """What a cast to a narrower float lost: finite values that became ±inf, non-zero values that
    became zero. Empty when nothing changed that way."""
    if converted.dtype == source.dtype or not source.dtype.is_floating_point:
        return {}
    overflowed = int((torch.isfinite(source) & ~torch.isfinite(converted)).sum())
    underflowed = int(((source != 0) & (converted == 0)).sum())
    counts = {"overflowed_to_inf": overflowed, "underflowed_to_zero": underflowed}
    return {key: value for key, value in counts.items() if value}


def _in_order(entries: dict[str, TensorEntry], tensors: Iterator[tuple[str, torch.Tensor]]):
    expected = iter(entries.items())
    for name, tensor in tensors:
        want, entry = next(expected, (None, None))
        if name != want:
            raise GrokpipeError(f"tensor {name!r} arrived where {want!r} was expected (the source changed?)")
        yield name, tensor, entry
    missing = next(expected, None)
    if missing is not None:
        raise GrokpipeError(f"{missing[1].file}: tensor {missing[0]!r} was described but never read")


def _copy_range(source: Path, begin: int, end: int, out_fd: int) -> None:
    """Append bytes ``[begin, end)`` of ``source`` to ``out_fd``: kernel-side (copy_file_range)
    where the file systems allow it, else through a buffer."""
    with open(source, "rb") as fh:
        position = begin
        try:
            while position < end:
                copied = os.copy_file_range(fh.fileno(), out_fd, end - position, position)
                if copied == 0:
                    raise GrokpipeError(f"{source}: ends before byte {end} (truncated while being read?)")
                position += copied
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            while position < end:
                block = os.pread(fh.fileno(), min(end - position, 16 << 20), position)
                if not block:
                    raise GrokpipeError(f"{source}: ends before byte {end} (truncated while being read?)") from None
                os.write(out_fd, block)
                position += len(block)


def _raw_runs(entries: dict[str, TensorEntry], raw: dict[str, tuple[Path, int, int]]):
    """The entries' raw byte ranges in order, adjacent ranges of one file merged."""
    runs: list[list] = []
    for name in entries:
        path, begin, end = raw[name]
        if runs and runs[-1][0] == path and runs[-1][2] == begin:
            runs[-1][2] = end
        else:
            runs.append([path, begin, end])
    return runs


def write_streaming(
    path: Path,
    entries: dict[str, TensorEntry],
    tensors: Tensors,
    cast: torch.dtype | None,
    metadata: dict[str, str],
    raw: dict[str, tuple[Path, int, int]] | None = None,
    *,
    allow_overflow: bool = False,
) -> dict[str, dict[str, int]]:
    """Write ``entries`` (bytes from ``tensors()``, or copied from ``raw`` ranges when nothing is
    cast) to ``path`` crash-safely.

    Returns what the cast changed, per tensor (see :func:`cast_changes`). A value that overflows
    to inf stops the write (GrokpipeError naming the tensor) unless ``allow_overflow``."""
    changes: dict[str, dict[str, int]] = {}
    copy_raw = raw is not None and all(output_dtype(e, cast) == e.dtype for e in entries.values())
    with atomic_file(path) as fh:
        fh.write(header_bytes(entries, cast, metadata))
        fh.flush()
        if copy_raw:
            for source, begin, end in _raw_runs(entries, raw):
                _copy_range(source, begin, end, fh.fileno())
        else:
            for name, tensor, entry in _in_order(entries, tensors()):
                converted = _converted(name, tensor, entry, cast)
                changed = cast_changes(tensor, converted)
                if changed.get("overflowed_to_inf") and not allow_overflow:
                    raise GrokpipeError(
                        f"{entry.file}: tensor {name!r}: {changed['overflowed_to_inf']} finite values overflow to "
                        f"inf as {converted.dtype}; pass --allow-overflow to write them anyway"
                    )
                if changed:
                    changes[name] = changed
                fh.write(converted.reshape(-1).view(torch.uint8).numpy())
                del tensor, converted
    return changes


REOPEN_BYTES = 64 << 20


def verify_streamed(path: Path, entries: dict[str, TensorEntry], tensors: Tensors, cast: torch.dtype | None) -> None:
    """Read ``path`` back with the safetensors library and compare every tensor, bit for bit, with
    the source read again. The file is reopened every ``REOPEN_BYTES``: pages of its memory map
    that were read count as the process's memory until it is closed."""
    handle, opened_bytes = None, 0
    try:
        for name, tensor, entry in _in_order(entries, tensors()):
            if handle is None or opened_bytes > REOPEN_BYTES:
                if handle is not None:
                    handle.__exit__(None, None, None)
                handle, opened_bytes = safe_open(str(path), framework="pt", device="cpu").__enter__(), 0
                if set(handle.keys()) != set(entries):
                    raise GrokpipeError(f"{path}: read back, it holds other tensor names than were written")
            expected = _converted(name, tensor, entry, cast)
            if not same_bits(handle.get_tensor(name), expected):
                raise GrokpipeError(f"{path}: read back, tensor {name!r} differs from the source")
            opened_bytes += expected.numel() * expected.element_size()
    except (SafetensorError, OSError) as exc:
        raise GrokpipeError(f"{path}: read back, not a readable safetensors file ({exc})") from None
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)
