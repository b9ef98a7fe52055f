"""DeepSpeed ZeRO checkpoints (stage 1, 2 and 3): the fp32 master weights reconstructed from the
per-rank optimizer partitions, as DeepSpeed's ``zero_to_fp32`` does, without importing DeepSpeed
and without running the ``zero_to_fp32.py`` it copies beside the checkpoint.

Layout: ``latest`` names the tag directory (``global_stepN``), which holds the model states
(``mp_rank_00_model_states.pt``; stage 3: one ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per
rank) and one ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank.

Reconstruction:
- stage 1/2: per parameter group, the ranks' flat fp32 partitions concatenated in rank order hold
  the group's parameters back to back (``param_shapes`` order, plus any recorded per-parameter
  alignment padding); the tail is padding to a multiple of 2 x world size.
- stage 3: every parameter is split across all ranks on its own: rank r holds elements
  ``[r * ceil(n / W), (r + 1) * ceil(n / W))`` of it, padded at the end (the padding holds garbage).
- buffers come from the model states (floating ones as fp32), frozen parameters from their
  recorded fragments, and ``shared_params`` (tied weights) are written again under their own name.

All ``.pt`` files go through the restricted loader, memory-mapped; the few DeepSpeed classes they
pickle (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``) become inert stand-ins. Ranks are
mapped only while their data is read and dropped after every ``REMAP_BYTES`` read, so memory stays
near one rank's partition rather than the model's size.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import GrokpipeError
from .paths import regular_file
from .restricted_pickle import numpy_allowlist, safe_torch_load, stand_in
from .sources import CheckpointSource, TensorEntry, inside

ALLOWED = "tensors, containers, numpy scalars and DeepSpeed's LossScaler, ZeroStageEnum and fragment_address"
REMAP_BYTES = 256 << 20
MAX_TAG_BYTES = 255  # a directory name
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def _allowlist() -> list:
    return [
        (stand_in("LossScaler"), "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
        (stand_in("DynamicLossScaler"), "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
        (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an IntEnum pickled as its value
        (stand_in("fragment_address"), "deepspeed.utils.tensor_fragment.fragment_address"),
        (str, "pathlib.PosixPath"),
        *numpy_allowlist(),
    ]


def _load(path: Path) -> dict:
    loaded = safe_torch_load(path, _allowlist(), ALLOWED, mmap=True)
    if not isinstance(loaded, dict):
        raise GrokpipeError(f"{path}: expected DeepSpeed's state dict, got {type(loaded).__name__}")
    return loaded


def tag_directory(root: Path) -> Path:
    """The directory holding the ZeRO files: ``root`` itself, or the tag ``root/latest`` names."""
    if any(_OPTIM_RE.match(p.name) for p in root.iterdir()):
        return root
    latest = regular_file(root / "latest", root=root)
    try:
        with open(latest, "rb") as fh:
            raw = fh.read(MAX_TAG_BYTES + 1)
    except OSError as exc:
        raise GrokpipeError(f"{latest}: cannot read the checkpoint tag ({exc.strerror or exc})") from None
    tag = raw.decode("utf-8", "replace").strip()
    # The content is echoed only once it is known to be a plain directory name.
    if len(raw) > MAX_TAG_BYTES or not _TAG_RE.match(tag):
        raise GrokpipeError(f"{latest}: does not hold a checkpoint directory name (as DeepSpeed's global_step10)")
    directory = root / tag
    if tag in (".", "..") or not directory.resolve().is_relative_to(root.resolve()):
        raise GrokpipeError(f"{latest}: tag {tag!r} is not a directory name inside {root}")
    if not directory.is_dir():
        raise GrokpipeError(f"{latest}: names {tag!r}, which is missing from {root}")
    return directory


def _rank_files(directory: Path, pattern: re.Pattern, what: str) -> list[Path]:
    """Files matching ``pattern`` in rank order, ranks 0..W-1 each exactly once, model parallel 0 only."""
    found = {}
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if not match:
            continue
        rank, mp_rank = match.group(1), int(match.group(2))
        if mp_rank != 0:
            raise GrokpipeError(f"{path}: model-parallel rank {mp_rank}; only mp_rank_00 checkpoints are supported")
        rank = int(rank) if rank is not None else 0
        if rank in found:
            raise GrokpipeError(f"{path}: rank {rank} appears twice ({found[rank].name})")
        found[rank] = inside(directory, path.name, str(directory))
    if sorted(found) != list(range(len(found))):
        missing = min(set(range(max(found, default=-1) + 1)) - set(found), default=0)
        raise GrokpipeError(f"{directory}: the {what} file of rank {missing} is missing")
    return [found[r] for r in range(len(found))]


def _shapes(value, path: Path, what: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (tuple, list)) and all(isinstance(d, int) and d >= 0 for d in v)
        for k, v in value.items()
    ):
        raise GrokpipeError(f"{path}: {what} is not a mapping of names to shapes")
    return {k: tuple(v) for k, v in value.items()}


def _flat_groups(path: Path, optim: dict, key: str) -> list[torch.Tensor]:
    groups = optim.get(key)
    if not isinstance(groups, (list, tuple)) or not all(torch.is_tensor(g) and g.ndim == 1 for g in groups):
        raise GrokpipeError(f"{path}: optimizer_state_dict.{key} is not a list of flat tensors")
    return list(groups)


class _Ranks:
    """The ranks' flat fp32 groups, memory-mapped on demand and dropped after ``REMAP_BYTES``."""

    def __init__(self, files: list[Path], key: str):
        self.files, self.key, self.loaded, self.read_bytes = files, key, {}, 0

    def group(self, rank: int, index: int) -> torch.Tensor:
        if rank not in self.loaded:
            state = _load(self.files[rank]).get("optimizer_state_dict") or {}
            self.loaded[rank] = _flat_groups(self.files[rank], state, self.key)
        return self.loaded[rank][index]

    def narrow(self, rank: int, index: int, start: int, length: int) -> torch.Tensor:
        self.read_bytes += length * 4
        return self.group(rank, index).narrow(0, start, length)

    def done_with_tensor(self) -> None:
        if self.read_bytes > REMAP_BYTES:  # touched pages of the mapping count as memory: let them go
            self.loaded.clear()
            self.read_bytes = 0
            gc.collect()  # torch.load's reference cycles hold the mappings until collected


def deepspeed_source(root: Path) -> CheckpointSource:
    directory = tag_directory(root)
    optim_files = _rank_files(directory, _OPTIM_RE, "optimizer states")
    if not optim_files:
        raise GrokpipeError(f"{directory}: no *_optim_states.pt files (not a DeepSpeed ZeRO checkpoint)")
    first = _load(optim_files[0]).get("optimizer_state_dict")
    if not isinstance(first, dict) or "zero_stage" not in first:
        raise GrokpipeError(f"{optim_files[0]}: no optimizer_state_dict.zero_stage (not a ZeRO checkpoint)")
    stage = first["zero_stage"]
    world = first.get("partition_count")
    world = max(world) if isinstance(world, (list, tuple)) and world else world
    if stage not in (1, 2, 3) or not isinstance(world, int) or world < 1:
        raise GrokpipeError(f"{optim_files[0]}: zero_stage {stage!r}, partition_count {world!r} are not ZeRO's")
    if world != len(optim_files):
        raise GrokpipeError(
            f"{directory}: the checkpoint was written by {world} ranks but holds {len(optim_files)} optimizer "
            "states files (a rank's file is missing, or an old checkpoint was partly overwritten)"
        )
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    model_files = _rank_files(directory, _MODEL_RE, "model states")
    if len(model_files) != (world if stage == 3 else 1):
        raise GrokpipeError(
            f"{directory}: {len(model_files)} model states files for ZeRO stage {stage} on {world} ranks"
        )
    models = [_load(path) for path in model_files]
    rank0 = models[0]
    for name in ("module", "buffer_names", "param_shapes"):
        if name not in rank0:
            raise GrokpipeError(f"{model_files[0]}: no {name!r} (not a DeepSpeed model states file)")
    param_groups = rank0["param_shapes"]
    if not isinstance(param_groups, (list, tuple)):
        raise GrokpipeError(f"{model_files[0]}: param_shapes is not a list of parameter groups")
    param_groups = [_shapes(g, model_files[0], "param_shapes") for g in param_groups]

    # Sizes of every rank's flat groups, from a first pass that drops each rank's mapping again.
    sizes, dtypes = [], set()
    for path in optim_files:
        groups = _flat_groups(path, _load(path).get("optimizer_state_dict") or {}, key)
        sizes.append([g.numel() for g in groups])
        dtypes |= {g.dtype for g in groups}
        del groups
        gc.collect()
    if len(dtypes) != 1 or any(len(s) != len(sizes[0]) for s in sizes):
        raise GrokpipeError(
            f"{directory}: the ranks' fp32 groups disagree in number or dtype ({sorted(map(str, dtypes))})"
        )
    if stage == 3 and any(s != sizes[0] for s in sizes):
        raise GrokpipeError(f"{directory}: the ranks' stage-3 partitions differ in size ({sizes})")
    (master_dtype,) = dtypes

    buffer_names = rank0["buffer_names"]
    module = rank0["module"]
    if not isinstance(module, dict) or not isinstance(buffer_names, (list, tuple, set)):
        raise GrokpipeError(f"{model_files[0]}: module/buffer_names are not a state dict and a list")
    # As zero_to_fp32: the module's entries named in buffer_names (a non-persistent buffer is named
    # there but not saved in the module's state dict, and is skipped).
    buffers = {name: t for name, t in module.items() if name in set(buffer_names) and torch.is_tensor(t)}
    frozen_shapes = _shapes(rank0.get("frozen_param_shapes") or {}, model_files[0], "frozen_param_shapes")
    frozen = [m.get("frozen_param_fragments") or {} for m in models]
    for path, fragments in zip(model_files, frozen):
        absent = [n for n in frozen_shapes if not torch.is_tensor(fragments.get(n))]
        if absent:
            raise GrokpipeError(f"{path}: frozen parameter {absent[0]!r} has no fragment")
    for name, shape in frozen_shapes.items():
        held = sum(fragments[name].numel() for fragments in (frozen if stage == 3 else frozen[:1]))
        needed = math.prod(shape)
        # stage 3 pads each rank's fragment to ceil(n / W) elements; stages 1/2 keep the whole tensor
        fits = needed <= held <= needed + world if stage == 3 else held == needed
        if not fits:
            raise GrokpipeError(
                f"{model_files[0]}: frozen parameter {name!r} has {held} elements in its fragments, but "
                f"frozen_param_shapes gives it shape {list(shape)}"
            )
    names = [*buffers, *frozen_shapes, *(name for group in param_groups for name in group)]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise GrokpipeError(f"{model_files[0]}: {twice!r} is named twice among the buffers and parameters")
    shared = rank0.get("shared_params") or {}
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise GrokpipeError(f"{model_files[0]}: shared_params is not a mapping of names to names")

    placements = _stage3_placements(param_groups, sizes[0], world, directory) if stage == 3 else None
    if stage != 3:
        if len(param_groups) != len(sizes[0]):
            raise GrokpipeError(
                f"{model_files[0]}: param_shapes has {len(param_groups)} parameter groups, but the optimizer "
                f"states hold {len(sizes[0])} flat groups"
            )
        paddings = first.get("param_alignment_paddings")
        placements = _stage12_placements(param_groups, sizes, world, paddings, directory)

    tensors: dict[str, TensorEntry] = {}
    for name, tensor in buffers.items():
        dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
        tensors[name] = TensorEntry(name, dtype, tuple(tensor.shape), model_files[0])
    for name, shape in frozen_shapes.items():
        tensors[name] = TensorEntry(name, frozen[0][name].dtype, shape, model_files[0])
    for group in param_groups:
        for name, shape in group.items():
            tensors[name] = TensorEntry(name, master_dtype, shape, optim_files[0])
    tied = {name: source for name, source in shared.items() if source in tensors and name not in tensors}
    for name, source in tied.items():
        tensors[name] = TensorEntry(name, tensors[source].dtype, tensors[source].shape, tensors[source].file)

    def frozen_tensor(name: str) -> torch.Tensor:
        shape = frozen_shapes[name]
        if stage != 3:
            return frozen[0][name].reshape(shape)
        parts = torch.cat([f[name].reshape(-1) for f in frozen])
        return parts[: math.prod(shape)].view(shape)

    def buffer_tensor(name: str) -> torch.Tensor:
        tensor = buffers[name]
        return tensor.float() if tensor.is_floating_point() else tensor

    def trainable_tensor(ranks: _Ranks, pieces, shape) -> torch.Tensor:
        parts = [ranks.narrow(*piece) for piece in pieces]  # (rank, group, start, length)
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return flat[: math.prod(shape)].view(shape)

    placed = {name: (pieces, shape) for name, pieces, shape in placements}

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        ranks = _Ranks(optim_files, key)
        for name in buffers:
            yield name, buffer_tensor(name)
        for name in frozen_shapes:
            yield name, frozen_tensor(name)
        for name, (pieces, shape) in placed.items():
            yield name, trainable_tensor(ranks, pieces, shape)
            ranks.done_with_tensor()
        for name, source in tied.items():  # written again as an independent tensor
            if source in buffers:
                yield name, buffer_tensor(source)
            elif source in frozen_shapes:
                yield name, frozen_tensor(source)
            else:
                yield name, trainable_tensor(_Ranks(optim_files, key), *placed[source])

    files = [root / "latest"] if (root / "latest").is_file() and directory != root else []
    files += model_files + optim_files
    details = {"zero_stage": int(stage), "world_size": world, "tag": directory.name}
    extras = {"ds_version": rank0.get("ds_version"), "global_steps": rank0.get("global_steps")}
    kind = f"deepspeed-zero{int(stage)}"
    return CheckpointSource(kind, root, files, tensors, read, extras=extras, details=details)


Placement = tuple[str, list[tuple[int, int, int, int]], tuple[int, ...]]  # name, (rank, group, start, length)


def _stage12_placements(groups, sizes, world, paddings, directory) -> list[Placement]:
    """Stage 1/2: a group's parameters lie back to back in the rank-ordered concatenation of its
    partitions (the last ranks' saved partitions may be shorter: their padding is not saved)."""
    out = []
    for g, shapes in enumerate(groups):
        bounds = [0]
        for rank_sizes in sizes:
            bounds.append(bounds[-1] + rank_sizes[g])
        pads = paddings[g] if isinstance(paddings, (list, tuple)) and g < len(paddings) else None
        if pads is not None and len(pads) != len(shapes):
            raise GrokpipeError(f"{directory}: group {g} has {len(pads)} paddings for {len(shapes)} parameters")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > bounds[-1]:
                raise GrokpipeError(f"{directory}: parameter {name!r} reaches past the ranks' partitions")
            out.append((name, _pieces(bounds, offset, numel, lambda rank, start, g=g: (rank, g, start)), shape))
            offset += numel + (int(pads[i]) if pads is not None else 0)
        align = 2 * world
        if align * math.ceil(offset / align) != align * math.ceil(bounds[-1] / align):
            raise GrokpipeError(f"{directory}: group {g} holds {bounds[-1]} elements but its parameters need {offset}")
    return out


def _pieces(bounds: list[int], offset: int, numel: int, where) -> list[tuple[int, int, int, int]]:
    """Elements ``[offset, offset + numel)`` of a concatenation whose part i spans
    ``[bounds[i], bounds[i + 1])``, as ``(*where(i, start), length)`` pieces (one empty piece for
    an empty tensor)."""
    pieces, position, left = [], offset, numel
    while left > 0:
        part = max(i for i in range(len(bounds) - 1) if bounds[i] <= position)
        length = min(left, bounds[part + 1] - position)
        pieces.append((*where(part, position - bounds[part]), length))
        position, left = position + length, left - length
    return pieces or [(*where(0, 0), 0)]


def _stage3_placements(groups, rank_sizes, world, directory) -> list[Placement]:
    """Stage 3: each parameter's ceil(n / W) elements on every rank, at the same offset of the
    rank's concatenated groups (a parameter may straddle two groups)."""
    bounds = [0]
    for size in rank_sizes:
        bounds.append(bounds[-1] + size)
    out, offset = [], 0
    for shapes in groups:
        for name, shape in shapes.items():
            part = math.ceil(math.prod(shape) / world)
            if offset + part > bounds[-1]:
                raise GrokpipeError(f"{directory}: parameter {name!r} reaches past the ranks' partitions")
            pieces = []
            for rank in range(world):
                pieces += _pieces(bounds, offset, part, lambda group, start, rank=rank: (rank, group, start))
            out.append((name, pieces, shape))
            offset += part
    if offset != bounds[-1]:
        raise GrokpipeError(f"{directory}: the ranks hold {bounds[-1]} elements each but the parameters need {offset}")
    return out
