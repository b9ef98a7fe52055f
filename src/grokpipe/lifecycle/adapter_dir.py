"""The LoRA adapter directory on disk: its name, and reading it back checked.

::

    models/{arch}-{size}-{source}-to-{target}-lora-{base run version}-r{rank}-f{seed}-l{hash}[-{version}]/
        adapters/adapter_config.json        PEFT's LoraConfig (target_parameters)
        adapters/adapter_model.safetensors  the final factors, PEFT's tensor names
        checkpoints/checkpoint_epoch_{epoch:05d}.safetensors   the factors as training went
        config.json, tokenizer.json         the base export's, as they are
        export_meta.json                    base, target task, rank/alpha, losses, sha256 of every file
        loss_curve.png, README.md           the fine-tune's curves and model card

``export_meta.json`` is written last: a directory without it is a fine-tune in progress (or
killed), which ``grokpipe finetune`` resumes and nothing loads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GrokpipeError
from ..export import MODEL_FILE, ExportName, check_version, is_export, parse_export_name, verify_export
from ..io.paths import regular_file
from ..loading import EXPORT_META, read_json
from .lora_format import delta_weight, factor_shapes, parse_adapter_config

ADAPTERS_DIR = "adapters"
ADAPTER_CONFIG = f"{ADAPTERS_DIR}/adapter_config.json"
ADAPTER_MODEL = f"{ADAPTERS_DIR}/adapter_model.safetensors"


def is_lora_dir(path: str | Path) -> bool:
    """Whether ``path`` is a LoRA adapter directory (finished or not): named as one."""
    path = Path(path)
    try:
        return path.is_dir() and parse_export_name(path.name).training_type == "lora"
    except GrokpipeError:
        return False


def lora_name(base: ExportName, target_operation: str, rank: int, seed: int, settings_hash: str, version=None) -> str:
    """The adapter directory's name: the base's architecture, size and run version, the source and
    target tasks, ``lora``, then rank, fine-tune seed and the settings' hash (``--version`` last)."""
    check_version(version)
    dataset = f"{base.source_dataset}-to-mod{target_operation}{base.prime}"
    parts = [
        base.architecture,
        base.size,
        dataset,
        "lora",
        base.run_version,
        f"r{rank}",
        f"f{seed}",
        f"l{settings_hash[:8]}",
    ]
    return "-".join(parts + ([version] if version else []))


def merged_name(lora: ExportName) -> ExportName:
    """The merge of a LoRA directory: the same name with ``merged`` for ``lora``."""
    return ExportName(lora.architecture, lora.size, lora.dataset, "merged", lora.version)


@dataclass(frozen=True)
class Base:
    """A base export, read and checked: its name, export_meta.json, config.json, weights."""

    path: Path
    name: ExportName
    meta: dict
    config: dict
    hooked: dict
    state: dict[str, torch.Tensor]
    sha256: str  # of its model.safetensors

    @property
    def prime(self) -> int:
        return int(self.config["prime"])

    @property
    def operation(self) -> str:
        """The task the base's weights compute (a merged export's is its target's)."""
        return self.name.target_operation or self.name.operation


def read_base(path: str | Path, *, expected_sha256: str | None = None, what: str = "base export") -> Base:
    """A base export directory, every file checked against its export_meta.json, and its weights
    read once (the hash is of the bytes used). ``expected_sha256``: the model file's hash recorded
    by an adapter; another one is refused by name."""
    from safetensors.torch import load as load_bytes

    from ..io.safetensors_header import HeaderError, read_header

    path = Path(path)
    if not is_export(path):
        raise GrokpipeError(
            f"{path}: not an export directory (no {EXPORT_META} and {MODEL_FILE}); the {what} is missing"
        )
    name = parse_export_name(path.name)
    problems = verify_export(path)
    if problems:
        raise GrokpipeError(f"{what} {problems[0]}; refused")
    model_file = path / MODEL_FILE
    regular_file(model_file)
    data = model_file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise GrokpipeError(
            f"{model_file}: sha256 {digest[:12]}... differs from the {expected_sha256[:12]}... the adapter was "
            f"trained on (another or changed {what}); refused"
        )
    try:
        header = read_header(model_file).metadata
        hooked = json.loads(header["hooked_config"])
    except (HeaderError, KeyError, ValueError) as exc:
        raise GrokpipeError(f"{model_file}: no readable model config in its header ({exc})") from None
    config = read_json(path / "config.json")
    if "prime" not in config:
        raise GrokpipeError(f"{path / 'config.json'}: no prime")
    return Base(path, name, read_json(path / EXPORT_META), config, hooked, load_bytes(data), digest)


@dataclass(frozen=True)
class Adapter:
    """A finished LoRA directory, checked: its config, factors (PEFT names) and base.

    ``deltas()`` gives each targeted parameter's update ``ΔW`` in TransformerLens' layout and
    ``merged_state_dict()`` the base's weights with them added (``W + ΔW``).
    """

    path: Path
    name: ExportName
    meta: dict
    config: dict  # adapter_config.json
    rank: int
    alpha: float
    targets: list[str]
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors, PEFT's names
    tensor_names: dict[str, tuple[str, str]]  # target -> (lora_A, lora_B) names
    base: Base

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def deltas(self) -> dict[str, torch.Tensor]:
        out = {}
        for target in self.targets:
            a_name, b_name = self.tensor_names[target]
            shape = tuple(self.base.state[target].shape)
            out[target] = delta_weight(self.tensors[a_name], self.tensors[b_name], shape, self.scaling)
        return out

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.base.state)
        for target, delta in self.deltas().items():
            state[target] = (state[target] + delta.to(state[target].dtype)).contiguous()
        return state


def base_location(lora_dir: Path, meta: dict) -> Path:
    """Where an adapter's base export is: beside the adapter directory under its recorded name
    (``base_model_name_or_path``), else at the path recorded when it was trained."""
    base = meta.get("base") if isinstance(meta.get("base"), dict) else {}
    name = base.get("name")
    if isinstance(name, str) and name and "/" not in name and (lora_dir.parent / name).is_dir():
        return lora_dir.parent / name
    recorded = base.get("path")
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    raise GrokpipeError(
        f"{lora_dir}: its base export {name!r} is neither beside it nor at {recorded!r}; put the base export "
        "next to the adapter directory"
    )


def read_adapter(path: str | Path) -> Adapter:
    """A LoRA directory, checked before any tensor is used: finished (export_meta.json), every
    file's sha256 as recorded, a LoRA adapter config, the factors' names and shapes, and the base
    export with the model file the adapter was trained on.

    Args:
        path: a directory ``grokpipe finetune`` wrote.

    Returns:
        An :class:`Adapter`.

    Example:
        >>> adapter = read_adapter("models/tl1l-227K-modadd31-to-modsub31-lora-s0-e2999-c1a2b3c4d-r4-f0-l0f1e2d3c")
        >>> adapter.deltas()["blocks.0.attn.W_Q"].shape
        torch.Size([4, 128, 32])
    """
    from ..io.safetensors_io import read_tensors

    path = Path(path)
    if not (path / EXPORT_META).is_file():
        raise GrokpipeError(f"{path}: an unfinished fine-tune (no {EXPORT_META}); rerun grokpipe finetune to finish it")
    meta = read_json(path / EXPORT_META)
    name = parse_export_name(path.name)
    if name.training_type != "lora" or meta.get("training_type") != "lora":
        raise GrokpipeError(f"{path}: not a LoRA adapter directory (training type {name.training_type})")
    problems = verify_export(path)
    if problems:
        raise GrokpipeError(f"{problems[0]}; refused")
    config = read_json(path / ADAPTER_CONFIG)
    rank, alpha, targets = parse_adapter_config(config, path / ADAPTER_CONFIG)
    base_meta = meta.get("base") or {}
    base = read_base(base_location(path, meta), expected_sha256=base_meta.get("sha256"))
    recorded = (meta.get("lora") or {}).get("tensor_names") or {}
    tensor_names = {t: tuple(recorded[t]) for t in targets if t in recorded}
    tensors = read_tensors(path / ADAPTER_MODEL)
    expected = {n for pair in tensor_names.values() for n in pair}
    if len(tensor_names) != len(targets) or set(tensors) != expected:
        raise GrokpipeError(
            f"{path / ADAPTER_MODEL}: its tensors do not match the target_parameters of {ADAPTER_CONFIG}; refused"
        )
    for target in targets:
        if target not in base.state:
            raise GrokpipeError(f"{path / ADAPTER_CONFIG}: targets {target}, which the base model does not have")
        shapes = factor_shapes(tuple(base.state[target].shape), rank)
        for tensor_name, shape in zip(tensor_names[target], shapes):
            if tuple(tensors[tensor_name].shape) != shape:
                raise GrokpipeError(
                    f"{path / ADAPTER_MODEL}: {tensor_name} is {list(tensors[tensor_name].shape)}, not {list(shape)} "
                    f"(rank {rank} of {target}); refused"
                )
    return Adapter(path, name, meta, config, rank, alpha, targets, tensors, tensor_names, base)
