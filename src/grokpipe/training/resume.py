"""The resume state of a run: everything needed to continue training bit-identically.

Two files under ``resume/``, no pickle:

- ``state_epoch_{epoch:05d}.safetensors``: model weights (``model.*``) and the AdamW state
  (``optimizer.{param}.{exp_avg|exp_avg_sq|step}``) after that epoch's optimizer step;
- ``training_state.json``: epoch, losses so far, the config hash, the sha256 of every checkpoint
  written, and the name and sha256 of the tensors file. It is written last and is the commit
  point: a kill between the two writes leaves the previous, complete state in force.

Only the latest state is kept. Full-batch training without dropout consumes no random numbers
after initialisation, so no RNG state needs saving.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io.atomic import sha256_file, write_json_atomic
from ..io.safetensors_io import read_tensors, write_model_file
from ..layout import RunLayout

log = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
FORMAT_VERSION = 1


def _tensors_filename(epoch: int) -> str:
    return f"state_epoch_{epoch:05d}.safetensors"


@dataclass
class Progress:
    """What a run has done so far (held in memory during training, persisted in the resume state)."""

    epoch: int = -1  # last completed 0-based epoch; -1 before the first
    train_losses: list[float | None] = field(default_factory=list)  # None: not finite (diverged)
    test_losses: list[float | None] = field(default_factory=list)  # None: not evaluated, or not finite
    checkpoint_epochs: list[int] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # run-relative path -> sha256
    diverged_at_epoch: int | None = None  # first epoch with a non-finite loss
    stopped_at_epoch: int | None = None  # where the early-stopping rule ended training
    segments: list[dict] = field(default_factory=list)  # one per process that trained epochs
    train_accuracies: list[float | None] = field(default_factory=list)  # None: not recorded
    test_accuracies: list[float | None] = field(default_factory=list)  # None: not evaluated


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {param: name for name, param in model.named_parameters()}
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optimizer.{names[param]}.{key}"] = value
    return tensors


def save(layout: RunLayout, model, optimizer, progress: Progress, config_hash: str) -> None:
    """Persist the state after ``progress.epoch`` crash-safely and drop older states."""
    layout.resume_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(model, optimizer))
    tensors_name = _tensors_filename(progress.epoch)
    digest = write_model_file(layout.resume_dir / tensors_name, tensors, {"format": "pt", "epoch": str(progress.epoch)})
    write_json_atomic(
        layout.resume_dir / STATE_JSON,
        {
            "format_version": FORMAT_VERSION,
            "epoch": progress.epoch,
            "config_hash": config_hash,
            "tensors_file": tensors_name,
            "tensors_sha256": digest,
            "train_losses": progress.train_losses,
            "test_losses": progress.test_losses,
            "checkpoint_epochs": progress.checkpoint_epochs,
            "files": progress.files,
            "diverged_at_epoch": progress.diverged_at_epoch,
            "stopped_at_epoch": progress.stopped_at_epoch,
            "segments": progress.segments,
            "train_accuracies": progress.train_accuracies,
            "test_accuracies": progress.test_accuracies,
        },
    )
    for old in layout.resume_dir.glob("state_epoch_*.safetensors"):
        if old.name != tensors_name:
            old.unlink(missing_ok=True)


def _optional_floats(values, epoch: int) -> list[float | None]:
    if values is None:
        return [None] * (epoch + 1)
    return [None if x is None else float(x) for x in values]


@dataclass
class Loaded:
    progress: Progress
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]


def load(layout: RunLayout, config_hash: str, num_epochs: int) -> tuple[Loaded | None, str]:
    """The saved state if it belongs to this config and can continue; else None and the reason."""
    state_path = layout.resume_dir / STATE_JSON
    if not state_path.exists():
        return None, "no resume state"
    try:
        state = json.loads(state_path.read_text())
        epoch = int(state["epoch"])
        if Path(state["tensors_file"]).name != state["tensors_file"]:
            raise ValueError(f"tensors_file {state['tensors_file']!r} is not a file name in resume/")
        tensors_path = layout.resume_dir / state["tensors_file"]
        recorded_hash = state["config_hash"]
        expected_sha = state["tensors_sha256"]
        progress = Progress(
            epoch=epoch,
            train_losses=[None if x is None else float(x) for x in state["train_losses"]],
            test_losses=[None if x is None else float(x) for x in state["test_losses"]],
            checkpoint_epochs=[int(x) for x in state["checkpoint_epochs"]],
            files={str(k): str(v) for k, v in state["files"].items()},
            diverged_at_epoch=state.get("diverged_at_epoch"),
            stopped_at_epoch=state.get("stopped_at_epoch"),
            segments=[dict(segment) for segment in state.get("segments", [])],
            # states written before accuracies were recorded: unknown for the epochs so far
            train_accuracies=_optional_floats(state.get("train_accuracies"), epoch),
            test_accuracies=_optional_floats(state.get("test_accuracies"), epoch),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{state_path} is unreadable ({exc})"
    if recorded_hash != config_hash:
        return None, (
            f"{state_path} was written with a different configuration "
            f"(config hash {recorded_hash[:12]} != {config_hash[:12]}): changed hyperparameters start a new run"
        )
    if epoch >= num_epochs:
        return None, f"{state_path} is at epoch {epoch}, beyond num_epochs={num_epochs}: starting a new run"
    series = (progress.train_losses, progress.test_losses, progress.train_accuracies, progress.test_accuracies)
    if any(len(values) != epoch + 1 for values in series):
        return None, f"{state_path} holds {len(progress.train_losses)} losses for epoch {epoch}"
    if not tensors_path.exists() or sha256_file(tensors_path) != expected_sha:
        return None, f"{tensors_path} is missing or does not match {state_path}"
    tensors = read_tensors(tensors_path)
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
    return Loaded(progress, model_state, optim), f"resuming after epoch {epoch}"


def restore(loaded: Loaded, model, optimizer) -> None:
    """Load weights and AdamW state into freshly built objects (strict on both)."""
    model.load_state_dict(loaded.model_state, strict=True)
    names = [name for name, _ in model.named_parameters()]
    by_param: dict[int, dict] = {}
    for key, value in loaded.optimizer_tensors.items():
        name, _, field_name = key.rpartition(".")
        if name not in names:
            raise ValueError(f"resume state names unknown parameter {name!r}")
        by_param.setdefault(names.index(name), {})[field_name] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": by_param, "param_groups": current["param_groups"]})


def clear(layout: RunLayout) -> None:
    """Remove the resume state (used when a run starts over)."""
    if layout.resume_dir.is_dir():
        for entry in layout.resume_dir.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)


def exists(layout: RunLayout) -> bool:
    return (layout.resume_dir / STATE_JSON).exists()
