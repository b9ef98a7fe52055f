"""Hugging Face checkpoints: sharded safetensors or ``.bin`` pickles with their index, or a single
``model.safetensors`` / ``pytorch_model.bin``.

Safetensors shards are described from their headers alone (validated by
:func:`grokpipe.io.safetensors_header.read_header`: a truncated shard is caught there) and read one
tensor at a time. ``.bin`` shards are unpickled only by the restricted loader, memory-mapped, one
shard at a time. Trainer extras beside them (``optimizer.pt``, ``rng_state.pth``,
``training_args.bin``, ``scheduler.pt``) are never opened.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import GrokpipeError
from ..loading import read_json
from .paths import regular_file
from .restricted_pickle import numpy_allowlist, safe_torch_load
from .safetensors_header import HeaderError, read_header
from .sources import SAFETENSORS_DTYPES, CheckpointSource, TensorEntry, inside, json_ready

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
SINGLE_BIN = "pytorch_model.bin"
BIN_ALLOWED = "tensors, containers and numpy scalars"


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a Hugging Face index file: tensor name -> shard file name."""
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise GrokpipeError(f"{path}: no 'weight_map' object naming the shard of each tensor")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise GrokpipeError(f"{path}: weight_map gives {shard!r} for tensor {name!r}, not a file name")
    return weight_map


def _shards(root: Path, index_path: Path) -> dict[Path, list[str]]:
    """Shard path -> the tensor names the index puts there, shards in file-name order."""
    by_shard: dict[Path, list[str]] = {}
    for name, shard in read_index(index_path).items():
        path = inside(root, shard, f"{index_path}: tensor {name!r}")
        by_shard.setdefault(path, []).append(name)
    return dict(sorted(by_shard.items()))


def _check_shard_names(index_path: Path | None, shard: Path, listed: list[str], held: list[str], seen: dict) -> None:
    """Every tensor the index lists is in its shard, and every tensor of a shard is listed there
    and in no other shard."""
    for name in held:
        if name in seen:
            raise GrokpipeError(f"{shard}: tensor {name!r} is also in {seen[name].name} (a tensor in two shards)")
        seen[name] = shard
    if index_path is None:
        return
    missing = sorted(set(listed) - set(held))
    if missing:
        raise GrokpipeError(f"{shard}: the index puts {missing[0]!r} here, but the shard does not hold it")
    unlisted = sorted(set(held) - set(listed))
    if unlisted:
        raise GrokpipeError(f"{shard}: holds {unlisted[0]!r}, which the index {index_path.name} does not list there")


def safetensors_source(root: Path, index_path: Path | None, single: str = SINGLE_SAFETENSORS) -> CheckpointSource:
    shards = _shards(root, index_path) if index_path else {inside(root, single, str(root)): []}
    tensors: dict[str, TensorEntry] = {}
    raw: dict[str, tuple[Path, int, int]] = {}
    seen: dict[str, Path] = {}
    held_by: dict[Path, list[str]] = {}  # shard -> its tensor names, in file order
    for shard, listed in shards.items():
        try:
            header = read_header(shard)
        except HeaderError as exc:
            raise GrokpipeError(f"{shard}: not a valid safetensors file ({exc})") from None
        held = held_by[shard] = sorted(header.tensors, key=lambda n: header.tensors[n].offsets)
        _check_shard_names(index_path, shard, listed, held, seen)
        for name in held:
            info = header.tensors[name]
            if info.dtype not in SAFETENSORS_DTYPES:
                raise GrokpipeError(f"{shard}: tensor {name!r} has dtype {info.dtype}, which torch cannot hold")
            tensors[name] = TensorEntry(name, SAFETENSORS_DTYPES[info.dtype], info.shape, shard)
            data_start = 8 + header.header_bytes
            raw[name] = (shard, data_start + info.offsets[0], data_start + info.offsets[1])

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for shard, held in held_by.items():
            try:
                with safe_open(str(shard), framework="pt", device="cpu") as fh:
                    for name in held:
                        yield name, fh.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise GrokpipeError(f"{shard}: not a readable safetensors file ({exc})") from None

    files = ([index_path] if index_path else []) + list(shards)
    kind = "hf-sharded-safetensors" if index_path else "safetensors"
    return CheckpointSource(kind, root, files, tensors, read, config=_config(root), raw=raw)


def _load_bin(shard: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and non-tensor entries of one ``.bin`` state dict, tensor data memory-mapped."""
    loaded = safe_torch_load(shard, numpy_allowlist(), BIN_ALLOWED, mmap=True)
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise GrokpipeError(f"{shard}: expected a state dict (names -> tensors), got {type(loaded).__name__}")
    tensors = {k: v for k, v in loaded.items() if torch.is_tensor(v)}
    extras = {k: json_ready(v) for k, v in loaded.items() if not torch.is_tensor(v)}
    return tensors, extras


def bin_source(root: Path, index_path: Path | None, single: str = SINGLE_BIN) -> CheckpointSource:
    shards = _shards(root, index_path) if index_path else {inside(root, single, str(root)): []}
    tensors: dict[str, TensorEntry] = {}
    extras: dict[str, object] = {}
    seen: dict[str, Path] = {}
    for shard, listed in shards.items():
        held, shard_extras = _load_bin(shard)  # pickle only; the mapped data is not read here
        _check_shard_names(index_path, shard, listed, list(held), seen)
        extras.update(shard_extras)
        for name, tensor in held.items():
            tensors[name] = TensorEntry(name, tensor.dtype, tuple(tensor.shape), shard)
        del held

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for shard in shards:
            held, _ = _load_bin(shard)
            for name in list(held):
                yield name, held.pop(name)  # tensors sharing storage are yielded (and written) each
            # torch.load leaves reference cycles that keep the shard's memory map (and the pages
            # read from it) alive until the cycle collector runs: collect before the next shard.
            gc.collect()

    files = ([index_path] if index_path else []) + list(shards)
    kind = "hf-sharded-bin" if index_path else "pytorch-bin"
    return CheckpointSource(kind, root, files, tensors, read, extras=extras, config=_config(root))


def _config(root: Path) -> Path | None:
    """The checkpoint's config.json, to be copied: a regular file inside ``root`` (a link to any
    other file, such as ``/proc/self/environ``, would carry its content into the output)."""
    path = root / "config.json"
    return regular_file(path, root=root) if os.path.lexists(path) else None
