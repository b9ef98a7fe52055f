"""Loading runs for analysis: any checkpoint by epoch into a TransformerLens HookedTransformer.

Loading one epoch reads that one safetensors file only (its header carries the model config), on
CPU unless asked otherwise, whatever device trained it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GrokpipeError
from .io.paths import regular_file
from .io.safetensors_io import read_metadata, read_tensors
from .layout import RunLayout

LEGACY_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle")
EXPORT_META = "export_meta.json"


def _is_legacy(path: Path) -> bool:
    return path.is_file() and path.suffix in LEGACY_SUFFIXES


def list_epochs(run_dir: str | Path) -> list[int]:
    """Epoch labels of the checkpoint files present in a run directory, ascending."""
    layout = _layout(run_dir)
    return list(layout.checkpoint_files())


def checkpoint_path(run_dir: str | Path, epoch: int | None = None) -> Path:
    """The file holding ``epoch``'s weights (``None``: the final model)."""
    layout = _layout(run_dir)
    if epoch is None:
        if not layout.final_model.exists():
            raise GrokpipeError(
                f"{layout.final_model}: no final model (the run is unfinished?); "
                f"checkpoints available: {_describe(list_epochs(run_dir))}"
            )
        return layout.final_model
    path = layout.checkpoint(int(epoch))
    if not path.exists():
        raise GrokpipeError(
            f"{layout.root}: no checkpoint for epoch {epoch}; available: {_describe(list_epochs(run_dir))}"
        )
    return path


def _describe(epochs: list[int]) -> str:
    if not epochs:
        return "none"
    if len(epochs) <= 8:
        return ", ".join(map(str, epochs))
    return f"{epochs[0]}, {epochs[1]}, ..., {epochs[-1]} ({len(epochs)} epochs)"


def _layout(run_dir: str | Path) -> RunLayout:
    root = Path(run_dir)
    if not root.is_dir():
        raise GrokpipeError(f"{root}: not a run directory")
    return RunLayout(root)


def _resolve(path: str | Path, epoch: int | None) -> Path:
    path = Path(path)
    if path.is_dir() and (path / EXPORT_META).is_file():  # a `grokpipe export` directory
        path = path / "model.safetensors"
    elif path.is_dir():
        return checkpoint_path(path, epoch)
    if not path.exists():
        raise GrokpipeError(f"{path}: no such file or run directory")
    if epoch is not None and path.suffix == ".safetensors":
        label = read_metadata(path).get("epoch")
        if label is not None and int(label) != int(epoch):
            raise GrokpipeError(f"{path} holds epoch {label}, not {epoch}")
    return path


def load_state_dict(path: str | Path, epoch: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint (run directory + epoch, or a file), on CPU; no TransformerLens needed."""
    path = Path(path)
    if _is_legacy(path):
        from .io.legacy import legacy_state_dict

        return legacy_state_dict(path, epoch)
    return read_tensors(_resolve(path, epoch))


def load_checked_state_dict(
    run_dir: str | Path, epoch: int | None = None, *, metadata: dict | None = None
) -> dict[str, torch.Tensor]:
    """Like :func:`load_state_dict` for a run directory, but only for the run's own file, as written.

    Before any tensor is used: the file is a regular file of the run (not a link to another run's),
    its sha256 equals the one ``metadata.json`` recorded when it was written, and its header names
    this run (model name, prime, seed, config hash) and this epoch. What ``export`` and
    ``progress`` read goes through here.

    Args:
        run_dir: a run directory.
        epoch: a checkpoint epoch, or None for the final model.
        metadata: the run's metadata.json, when the caller has read it already.

    Returns:
        The tensors, on CPU.

    Example:
        >>> state = load_checked_state_dict("results/grokking/grokking_p31_seed0", 999)
    """
    import hashlib

    from safetensors.torch import load as load_bytes

    from .io.safetensors_header import HeaderError, read_header

    layout = _layout(run_dir)
    metadata = load_metadata(layout.root) if metadata is None else metadata
    path = layout.final_model if epoch is None else layout.checkpoint(int(epoch))
    what = "the final model" if epoch is None else f"the checkpoint of epoch {epoch}"
    if not os.path.lexists(path):
        raise GrokpipeError(f"{path}: missing ({what} of the run; `grokpipe train` recomputes it)")
    if path.is_symlink():
        raise GrokpipeError(f"{path}: a link ({what} must be the run's own file); refused")
    regular_file(path)
    relative = path.relative_to(layout.root).as_posix()
    recorded = (metadata.get("files") or {}).get(relative)
    if recorded is None:
        raise GrokpipeError(f"{path}: not recorded in {layout.metadata.name}; refused")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != recorded:
        raise GrokpipeError(f"{path}: sha256 differs from the one recorded when it was written (replaced or damaged)")
    try:
        header = read_header(path).metadata
    except HeaderError as exc:
        raise GrokpipeError(f"{path}: not a valid safetensors file ({exc})") from None
    keys = ("model_name", "prime", "seed", "config_hash")
    expected = {key: str(metadata[key]) for key in keys if metadata.get(key) is not None}
    if epoch is not None:
        expected["epoch"] = str(epoch)
    for key, value in expected.items():
        if key in header and header[key] != value:
            raise GrokpipeError(f"{path}: its header says {key} {header[key]!r}, but this run's is {value!r}; refused")
    return load_bytes(data)


def hooked_config_dict(path: str | Path, epoch: int | None = None) -> dict:
    """The HookedTransformerConfig fields of a checkpoint, from its header (or the run's config.json)."""
    file = _resolve(Path(path), epoch)
    header = read_metadata(file)
    if "hooked_config" in header:
        return json.loads(header["hooked_config"])
    config_json = file.parent / "config.json"
    if file.parent.name == "checkpoints":
        config_json = file.parent.parent / "config.json"
    if config_json.exists():
        return load_config(config_json.parent)["hooked_transformer_config"]
    raise GrokpipeError(f"{file}: no model config in its header and no config.json beside it")


def load_model(path: str | Path, epoch: int | None = None, device: str = "cpu"):
    """A HookedTransformer holding the weights of ``epoch`` (``None``: the final model).

    ``path`` is a run directory, a ``grokpipe export`` directory (a merged one too), a LoRA
    directory of ``grokpipe finetune`` (the base with ``W + (alpha/r)·B@A`` in every targeted
    matrix; :func:`load_adapter` gives the factors), a single ``.safetensors`` file, or a legacy
    pickle (read through the restricted loader; converting it with ``grokpipe convert`` is
    recommended). The load is strict.
    """
    from .training.model import loaded_model

    path = Path(path)
    from .lifecycle.adapter_dir import is_lora_dir

    if is_lora_dir(path):  # the base export with the adapter's updates added
        adapter = load_adapter(path)
        return loaded_model(adapter.base.hooked, adapter.merged_state_dict(), path, device)
    if _is_legacy(path):
        from .io.legacy import legacy_model

        return legacy_model(path, epoch, device)
    file = _resolve(path, epoch)
    return loaded_model(hooked_config_dict(file), read_tensors(file), file, device)


def load_adapter(path: str | Path):
    """A LoRA directory's adapter, checked (every file's sha256, the base's model file): its PEFT
    config, factors, per-matrix updates in TransformerLens' layout and base.

    Args:
        path: a directory ``grokpipe finetune`` wrote.

    Returns:
        A :class:`grokpipe.lifecycle.adapter_dir.Adapter`.

    Example:
        >>> lora = "models/tl1l-227K-modadd31-to-modsub31-lora-s0-e2999-c1a2b3c4d-r4-f0-l0f1e2d3c"
        >>> adapter = grokpipe.load_adapter(lora)
        >>> {name: delta.shape for name, delta in adapter.deltas().items()}
    """
    from .lifecycle.adapter_dir import read_adapter

    return read_adapter(path)


def load_metadata(run_dir: str | Path) -> dict:
    """The run's metadata.json (losses, indices, checkpoint epochs, grokking epoch, file hashes)."""
    return read_json(_layout(run_dir).metadata)


def load_config(run_dir: str | Path) -> dict:
    """The run's config.json (HookedTransformerConfig fields + training hyperparameters)."""
    return read_json(_layout(run_dir).config)


@dataclass(frozen=True)
class RunDataset:
    """The data one run was trained and tested on (see :func:`run_dataset`)."""

    p: int
    operation: str
    tokens: torch.Tensor  # (p², 3) every input [a, b, =] in pair-id order: row a * p + b
    labels: torch.Tensor  # (p²,) the operation's true label per row; -1 where it is undefined (div, b = 0)
    train_indices: torch.Tensor  # pair ids (rows of tokens) trained on, in the run's order
    test_indices: torch.Tensor  # pair ids held out
    train_labels: torch.Tensor  # the labels training saw, label noise included (aligned with train_indices)
    noisy_indices: torch.Tensor  # pair ids whose training label is noise (empty without label noise)

    @property
    def train_tokens(self) -> torch.Tensor:
        return self.tokens[self.train_indices]

    @property
    def test_tokens(self) -> torch.Tensor:
        return self.tokens[self.test_indices]

    @property
    def test_labels(self) -> torch.Tensor:
        return self.labels[self.test_indices]


def run_dataset(run_dir: str | Path) -> RunDataset:
    """A run's dataset as it trained: every input, its labels and the train/test split.

    Read from the run's ``metadata.json`` (the recorded indices and label noise, so converted legacy
    runs work too); no model is built and no global RNG is touched.

    Args:
        run_dir: a run directory.

    Returns:
        A :class:`RunDataset`. ``tokens`` holds all p² inputs with row ``a * p + b``, so
        ``tokens[train_indices]`` are the training inputs, as in the TransformerLens demo.

    Example:
        >>> data = grokpipe.run_dataset("results/grokking/grokking_p31_seed0")
        >>> logits, cache = model.run_with_cache(data.tokens)
        >>> (logits[:, -1].argmax(-1) == data.labels)[data.test_indices].float().mean()
    """
    from .training.tasks import OPERATION_NAMES, labels_of, pair_ids, tokens_of

    layout = _layout(run_dir)
    metadata = load_metadata(layout.root)
    try:
        p, operation = int(metadata["prime"]), str(metadata.get("operation", "add"))
        if operation not in OPERATION_NAMES:
            raise ValueError(f"unknown operation {operation!r}")
        ids = {key: torch.tensor(metadata.get(key, []), dtype=torch.long).reshape(-1) for key in _INDEX_KEYS}
        noisy_labels = torch.tensor(metadata.get("noisy_labels", []), dtype=torch.long).reshape(-1)
    except (KeyError, TypeError, ValueError) as exc:
        raise GrokpipeError(f"{layout.metadata}: no readable dataset ({exc})") from None
    defined = pair_ids(p, operation)
    labels = torch.full((p * p,), -1, dtype=torch.long)
    labels[defined] = labels_of(defined, p, operation)
    for key, values in ids.items():
        if values.numel() and (values.min() < 0 or values.max() >= p * p or bool((labels[values] < 0).any())):
            raise GrokpipeError(f"{layout.metadata}: {key} holds pair ids outside the task's pairs")
    if len(noisy_labels) != len(ids["noisy_indices"]):
        raise GrokpipeError(f"{layout.metadata}: noisy_labels and noisy_indices differ in length")
    train_labels = labels.clone()
    train_labels[ids["noisy_indices"]] = noisy_labels
    return RunDataset(
        p=p,
        operation=operation,
        tokens=tokens_of(torch.arange(p * p), p),
        labels=labels,
        train_indices=ids["train_indices"],
        test_indices=ids["test_indices"],
        train_labels=train_labels[ids["train_indices"]],
        noisy_indices=ids["noisy_indices"],
    )


_INDEX_KEYS = ("train_indices", "test_indices", "noisy_indices")


def read_json(path: Path) -> dict:
    """A JSON object file (of a run, an export, an index): the one JSON reader of grokpipe.

    Missing, not a regular file (a FIFO is never opened), unreadable, or not a JSON object: a
    GrokpipeError naming it.
    """
    regular_file(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GrokpipeError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise GrokpipeError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GrokpipeError(f"{path}: not a JSON object")
    return data


__all__ = [
    "checkpoint_path",
    "hooked_config_dict",
    "list_epochs",
    "load_adapter",
    "load_config",
    "load_metadata",
    "load_model",
    "load_state_dict",
    "run_dataset",
    "RunDataset",
]
