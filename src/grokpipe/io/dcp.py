"""``torch.distributed.checkpoint`` directories (what FSDP and FSDP2 write): a ``.metadata`` pickle
and one ``__{rank}_{n}.distcp`` file per writer.

``.metadata`` is unpickled by an allowlist unpickler that maps DCP's metadata classes to inert
stand-ins; torch's own reader would ``pickle.load`` it. Each stored item is a ``torch.save`` archive
at ``[offset, offset + length)`` of its ``.distcp`` file, read with the weights-only loader. A
tensor is reassembled from its chunks (any number of ranks, uneven sizes), checked to tile it
exactly; nested state-dict keys are already flattened with ``.`` by DCP. Non-tensor items (step
counters, scheduler state) become the record's non-tensor entries, never weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import GrokpipeError
from .restricted_pickle import StandIn, safe_pickle_load, safe_torch_load, stand_in
from .sources import CheckpointSource, TensorEntry, inside, json_ready

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30
ALLOWED = "torch.distributed.checkpoint's metadata classes, torch sizes, dtypes and layouts, paths"
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
)


def _layout(name):
    if name not in ("torch.strided", "torch.sparse_coo"):
        raise ValueError(f"unexpected layout {name!r}")
    return name


def _path(*parts):
    return "/".join(str(p) for p in parts)


def _allowlist() -> dict[tuple[str, str], object]:
    allow: dict[tuple[str, str], object] = {(_METADATA_MODULE, name): stand_in(name) for name in _METADATA_CLASSES}
    allow[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = stand_in("_StorageInfo")
    allow[(_METADATA_MODULE, "_MEM_FORMAT_ENCODING")] = int  # an enum pickled as its value
    allow[("torch.serialization", "_get_layout")] = _layout
    allow[("torch", "Size")] = torch.Size
    allow[("collections", "OrderedDict")] = dict
    for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        allow[("pathlib", name)] = _path
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allow[("torch", name)] = getattr(torch, name)
    return allow


def _fields(obj, cls: str, what: str) -> dict:
    if not isinstance(obj, StandIn) or type(obj).__name__ != cls:
        raise GrokpipeError(f"{what} is a {type(obj).__name__}, not DCP's {cls}")
    return obj.fields


def _sizes(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise GrokpipeError(f"{what} is {value!r}, not a tuple of non-negative integers")
    return tuple(value)


def _tensor_dtype(properties, what: str) -> torch.dtype:
    fields = _fields(properties, "TensorProperties", what)
    dtype = fields["state"][0] if isinstance(fields.get("state"), tuple) else fields.get("dtype")
    if not isinstance(dtype, torch.dtype):
        raise GrokpipeError(f"{what} has no dtype")
    return dtype


PAIRWISE_CHUNK_LIMIT = 2_000  # chunks that form no grid are compared pairwise up to this many


def _check_tiling(name: str, shape: tuple[int, ...], chunks: list[tuple[tuple, tuple]], path: Path) -> None:
    """Chunks lie inside the tensor, do not overlap, and cover it (their volumes add up to it).

    O(n log n): the chunks that hold elements must form a grid, the product of one partition of
    each dimension (what FSDP, FSDP2 and tensor parallelism write, uneven shards included). Chunks
    that form no grid are compared pairwise, for at most PAIRWISE_CHUNK_LIMIT of them.
    """
    for offsets, sizes in chunks:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise GrokpipeError(f"{path}: a chunk of {name!r} has {len(sizes)} dimensions, the tensor {len(shape)}")
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise GrokpipeError(f"{path}: a chunk of {name!r} at {list(offsets)} reaches past its shape {list(shape)}")
    if sum(math.prod(sizes) for _, sizes in chunks) != math.prod(shape):
        raise GrokpipeError(f"{path}: the chunks of {name!r} do not cover its shape {list(shape)} (a missing rank?)")
    full = [(offsets, sizes) for offsets, sizes in chunks if math.prod(sizes)]
    if _is_grid(full, shape):
        return
    if len(full) > PAIRWISE_CHUNK_LIMIT:
        raise GrokpipeError(
            f"{path}: the {len(full)} chunks of {name!r} form no grid over its shape {list(shape)}; refused"
        )
    for i, (a_off, a_size) in enumerate(full):
        for b_off, b_size in full[i + 1 :]:
            if all(a < b + bs and b < a + s for a, s, b, bs in zip(a_off, a_size, b_off, b_size)):
                raise GrokpipeError(f"{path}: chunks of {name!r} at {list(a_off)} and {list(b_off)} overlap")


def _is_grid(chunks: list[tuple[tuple, tuple]], shape: tuple[int, ...]) -> bool:
    """Whether the (non-empty) chunks are exactly the cells of a grid: per dimension, the chunks'
    intervals partition [0, size), and every combination of intervals is one chunk, once."""
    cells = set()
    for offsets, sizes in chunks:
        cells.add(tuple(zip(offsets, sizes)))
    if len(cells) != len(chunks):
        return False  # a chunk given twice
    count = 1
    for dim, size in enumerate(shape):
        intervals = sorted({cell[dim] for cell in cells})
        position = 0
        for offset, length in intervals:
            if offset != position:
                return False  # overlapping or gapped intervals along this dimension
            position = offset + length
        if position != size:
            return False
        count *= len(intervals)
    return count == len(cells)  # with the cells distinct and inside the grid: all of it, once


def _place(root: Path, info: dict, what: str) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of one stored item, checked to lie inside its ``.distcp`` file."""
    if info.get("transform_descriptors"):
        raise GrokpipeError(f"{what} is stored with transforms {info['transform_descriptors']!r} (not supported)")
    path = inside(root, info.get("relative_path"), f"{root / METADATA}: {what}")
    offset, length = info.get("offset"), info.get("length")
    if not all(isinstance(v, int) and v >= 0 for v in (offset, length)):
        raise GrokpipeError(f"{root / METADATA}: {what} has offset {offset!r}, length {length!r}")
    if offset + length > path.stat().st_size:
        raise GrokpipeError(f"{path}: {what} lies at bytes {offset}-{offset + length}, past the end (truncated)")
    return path, offset, length


def _check_regions_apart(places: list[tuple[Path, int, int]]) -> None:
    """No two stored items share bytes: DCP writes each item once, so chunks pointing at one region
    would only multiply a small input into a large output. O(n log n)."""
    ordered = sorted(places, key=lambda place: (str(place[0]), place[1], place[2]))
    for (file_a, offset_a, length_a), (file_b, offset_b, _) in zip(ordered, ordered[1:]):
        if file_a == file_b and offset_b < offset_a + length_a:
            raise GrokpipeError(
                f"{file_b}: two stored items share bytes from offset {offset_b} (each chunk must have its own); refused"
            )


def _read_item(place: tuple[Path, int, int]):
    """The ``torch.save`` archive of one item, read from its (checked) place in a ``.distcp`` file."""
    path, offset, length = place
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    return safe_torch_load(path, [], "tensors and containers", data=data)


def dcp_source(root: Path) -> CheckpointSource:
    metadata_path = inside(root, METADATA, str(root))
    loaded = safe_pickle_load(metadata_path, _allowlist(), ALLOWED, MAX_METADATA_BYTES)
    metadata = _fields(loaded, "Metadata", str(metadata_path))
    entries = metadata.get("state_dict_metadata")
    storage = metadata.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise GrokpipeError(f"{metadata_path}: no state_dict_metadata/storage_data (not a DCP checkpoint?)")
    places: dict[tuple[str, tuple | None], dict] = {}
    for index, info in storage.items():
        key = _fields(index, "MetadataIndex", f"{metadata_path}: a storage key")
        offset = key.get("offset")
        places[(key.get("fqn"), None if offset is None else tuple(offset))] = _fields(
            info, "_StorageInfo", f"{metadata_path}: storage of {key.get('fqn')!r}"
        )

    tensors: dict[str, TensorEntry] = {}
    # Every stored item is placed (and checked to lie inside its file) here, before anything is written.
    chunks: dict[str, list[tuple[tuple, tuple, tuple[Path, int, int]]]] = {}
    byte_items: dict[str, tuple[Path, int, int]] = {}
    files: dict[Path, None] = {metadata_path: None}
    for name, entry in entries.items():
        what = f"{metadata_path}: entry {name!r}"
        if not isinstance(name, str):
            raise GrokpipeError(f"{metadata_path}: entry name {name!r} is not a string")
        if isinstance(entry, StandIn) and type(entry).__name__ == "BytesStorageMetadata":
            if (name, None) not in places:
                raise GrokpipeError(f"{what} has no storage entry")
            byte_items[name] = _place(root, places[(name, None)], f"entry {name!r}")
            files[byte_items[name][0]] = None
            continue
        fields = _fields(entry, "TensorStorageMetadata", what)
        shape = _sizes(fields.get("size"), f"{what} size")
        parts = []
        for chunk in fields.get("chunks") or []:
            chunk = _fields(chunk, "ChunkStorageMetadata", what)
            offsets = _sizes(chunk.get("offsets"), f"{what} offsets")
            sizes = _sizes(chunk.get("sizes"), f"{what} sizes")
            if (name, offsets) not in places:
                raise GrokpipeError(f"{what}: the chunk at {list(offsets)} has no storage entry")
            parts.append((offsets, sizes, places[(name, offsets)]))
        _check_tiling(name, shape, [(o, s) for o, s, _ in parts], metadata_path)
        parts = [(o, s, _place(root, info, f"the chunk of {name!r} at {list(o)}")) for o, s, info in parts]
        dtype = _tensor_dtype(fields.get("properties"), what)
        for offsets, sizes, (file, _, length) in parts:
            # A stored item is a torch.save archive of the chunk: at least its bytes. This bounds what
            # is written by what is read, and refuses sizes like (2**40, 4) before any allocation.
            if math.prod(sizes) * dtype.itemsize > length:
                raise GrokpipeError(
                    f"{file}: the chunk of {name!r} at {list(offsets)} is {dtype} {list(sizes)} "
                    f"({math.prod(sizes) * dtype.itemsize} bytes), more than its stored item's {length} bytes"
                )
        files.update(dict.fromkeys(place[0] for _, _, place in parts))
        first = parts[0][2][0] if parts else metadata_path
        tensors[name] = TensorEntry(name, dtype, shape, first)
        chunks[name] = parts
    _check_regions_apart([place for parts in chunks.values() for *_, place in parts] + list(byte_items.values()))

    extras = {}
    for name, place in byte_items.items():
        extras[name] = json_ready(_read_item(place))

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for name, entry in tensors.items():
            full = torch.empty(entry.shape, dtype=entry.dtype)
            for offsets, sizes, place in chunks[name]:
                part = _read_item(place)
                if not torch.is_tensor(part) or part.dtype != entry.dtype or tuple(part.shape) != sizes:
                    got = f"{part.dtype} {list(part.shape)}" if torch.is_tensor(part) else type(part).__name__
                    raise GrokpipeError(
                        f"{place[0]}: the chunk of {name!r} at {list(offsets)} is {got}, the metadata says "
                        f"{entry.dtype} {list(sizes)} (ranks disagree)"
                    )
                full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = part
                del part
            yield name, full

    details = {"ranks": sorted(p.name for p in files if p.suffix == ".distcp")}
    return CheckpointSource("torch-dcp", root, list(files), tensors, read, extras=extras, details=details)
