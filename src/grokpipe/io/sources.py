"""One description of a checkpoint written by another trainer: which files it reads, which
tensors (name, dtype, shape) it holds in which order, its non-tensor entries, and a generator that
yields the tensors in that order, one shard at a time, so that nothing holds the whole model."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

from ..errors import GrokpipeError
from .paths import regular_file

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> "F32"


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the source: its name, dtype and shape, and the file that (first) holds it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class CheckpointSource:
    """What ``grokpipe consolidate`` reads. ``tensors`` is in the order ``read`` yields them."""

    format: str
    root: Path
    files: list[Path]
    tensors: dict[str, TensorEntry]
    read: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    extras: dict[str, object] = field(default_factory=dict)
    config: Path | None = None
    details: dict[str, object] = field(default_factory=dict)
    # name -> (file, begin, end): where a tensor's exact bytes lie, when the source stores them raw
    # (safetensors shards); lets the writer copy them kernel-side instead of through memory.
    raw: dict[str, tuple[Path, int, int]] | None = None

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (``F32``), or a clear error for one it cannot store."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise GrokpipeError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def inside(root: Path, relative: object, what: str) -> Path:
    """``root / relative`` for a name an index or metadata file gave, refused when it is not a
    plain relative path that stays inside ``root`` once symlinks are resolved."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise GrokpipeError(f"{what} names {relative!r}, not a file name")
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise GrokpipeError(f"{what} names {relative!r}, which leaves the checkpoint directory {root}")
    path = root / relative
    resolved, base = path.resolve(), root.resolve()
    if not resolved.is_relative_to(base):
        raise GrokpipeError(f"{what} names {relative!r}, a link that leaves the checkpoint directory {root}")
    if not os.path.lexists(path):
        raise GrokpipeError(f"{what} names {relative!r}, which is missing from {root}")
    return regular_file(path, root=root)


def json_ready(value, depth: int = 0):
    """A non-tensor entry as JSON: numbers, strings, booleans, lists and string-keyed dicts kept;
    tensors described by dtype and shape; anything else by its type name."""
    if depth > 32:
        return "(nested too deeply)"
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if torch.is_tensor(value):
        if value.numel() == 1 and not value.is_complex():
            return json_ready(value.item(), depth + 1)
        return {"tensor": {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): json_ready(v, depth + 1) for k, v in value.items()}
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return json_ready(value.item(), depth + 1)
    return f"({type(value).__name__})"
