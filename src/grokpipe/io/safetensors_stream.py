"""Writing one safetensors file from tensors that arrive one at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a consolidated model can be
larger than memory. The format allows streaming: the header (names, dtypes, shapes, byte offsets)
depends only on shapes and dtypes, so it is written first and each tensor's bytes follow as it
arrives. The file is written to a temporary name, fsynced, renamed, and then read back with the
safetensors library and compared, bit for bit, with a second pass over the source.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import current_umask, fsync_dir
from ..errors import GrokpipeError
from ..safetensors_io import same_bits
from .sources import TensorEntry, dtype_name

Tensors = Callable[[], Iterator[tuple[str, torch.Tensor]]]


def output_dtype(entry: TensorEntry, cast: torch.dtype | None) -> torch.dtype:
    """``cast`` for floating tensors; integer and bool tensors keep their dtype."""
    return cast if cast is not None and entry.dtype.is_floating_point else entry.dtype


def header_bytes(entries: dict[str, TensorEntry], cast: torch.dtype | None, metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for ``entries`` laid out in order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, entry in entries.items():
        dtype = output_dtype(entry, cast)
        end = offset + entry.nbytes // entry.dtype.itemsize * dtype.itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(entry.shape), "data_offsets": [offset, end]}
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


def write_streaming(
    path: Path, entries: dict[str, TensorEntry], tensors: Tensors, cast: torch.dtype | None, metadata: dict[str, str]
) -> str:
    """Write ``entries`` (bytes from ``tensors()``) to ``path`` crash-safely; returns its sha256."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            head = header_bytes(entries, cast, metadata)
            fh.write(head)
            digest.update(head)
            for name, tensor, entry in _in_order(entries, tensors()):
                data = _converted(name, tensor, entry, cast).reshape(-1).view(torch.uint8).numpy()
                fh.write(data)
                digest.update(data)
                del tensor, data
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise GrokpipeError(f"{path}: write failed ({exc.strerror or exc}); nothing was written there") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return digest.hexdigest()


def verify_streamed(path: Path, entries: dict[str, TensorEntry], tensors: Tensors, cast: torch.dtype | None) -> None:
    """Read ``path`` back with the safetensors library and compare every tensor, bit for bit, with
    the source read again."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            if set(fh.keys()) != set(entries):
                raise GrokpipeError(f"{path}: read back, it holds other tensor names than were written")
            for name, tensor, entry in _in_order(entries, tensors()):
                if not same_bits(fh.get_tensor(name), _converted(name, tensor, entry, cast)):
                    raise GrokpipeError(f"{path}: read back, tensor {name!r} differs from the source")
    except (SafetensorError, OSError) as exc:
        raise GrokpipeError(f"{path}: read back, not a readable safetensors file ({exc})") from None
