"""Reading legacy grokking pickles (the TransformerLens demo's ``torch.save`` files), safely.

The demo saved one dict::

    {"model": state_dict, "config": model.cfg, "checkpoints": [state_dict, ...],
     "checkpoint_epochs": [99, 199, ...], "test_losses": [...], "train_losses": [...],
     "train_indices": LongTensor, "test_indices": LongTensor}

Files are read only through torch's weights-only unpickler (``torch.load(weights_only=True)``),
extended by an explicit allowlist that maps the pickled HookedTransformerConfig class, under each
path TransformerLens has used, to :class:`LegacyConfig`, a plain data holder. Nothing else is
allowed: a file naming any other global (``os.system``, ``builtins.exec``, ...) is refused before
anything runs. TransformerLens is never imported here, and tensors saved on a GPU load on CPU.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GrokpipeError
from .restricted_pickle import StandIn, numpy_allowlist, safe_torch_load

log = logging.getLogger(__name__)

# Where TransformerLens versions pickled their config class from.
CONFIG_CLASS_PATHS = (
    "transformer_lens.HookedTransformerConfig.HookedTransformerConfig",  # TL 1.x / 2.x
    "transformer_lens.config.hooked_transformer_config.HookedTransformerConfig",  # TL 3.x
    "transformer_lens.config.HookedTransformerConfig.HookedTransformerConfig",
)
REQUIRED_KEYS = (
    "model",
    "config",
    "checkpoints",
    "checkpoint_epochs",
    "test_losses",
    "train_losses",
    "train_indices",
    "test_indices",
)


class LegacyConfig(StandIn):
    """Stand-in for a pickled HookedTransformerConfig: keeps its fields as a plain dict."""

    def __setstate__(self, state):
        state = self.merged(state)
        if not isinstance(state, dict):  # a config pickles its fields, nothing else
            raise TypeError(f"unexpected config state of type {type(state).__name__}")
        self.fields = dict(state)


ALLOWED = "tensors, containers and the HookedTransformerConfig class"


def safe_load(path: str | Path, mmap: bool = False):
    """Unpickle ``path`` with the restricted loader, every tensor on CPU, within bounds.

    ``mmap=True`` maps tensor data instead of reading it.
    """
    allowlist = [(LegacyConfig, path_) for path_ in CONFIG_CLASS_PATHS] + numpy_allowlist()
    return safe_torch_load(path, allowlist, ALLOWED, mmap=mmap)


@dataclass
class LegacyRun:
    """A legacy pickle's content as plain data."""

    path: Path
    model: dict[str, torch.Tensor]
    config: dict
    checkpoints: list[dict[str, torch.Tensor]]
    checkpoint_epochs: list[int]
    train_losses: list[float]
    test_losses: list[float]
    train_indices: torch.Tensor
    test_indices: torch.Tensor

    @property
    def prime(self) -> int:
        return int(self.config["d_vocab_out"])


def _state_dict(path: Path, value, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items()):
        raise GrokpipeError(f"{path}: {what} is not a state dict of tensors")
    return dict(value)


def _numbers(path: Path, value, what: str) -> list[float]:
    """A flat list of floats from a list/tuple of numbers or 0-d tensors, or a 1-d tensor."""
    if torch.is_tensor(value):
        if value.ndim != 1 or value.is_complex():
            raise GrokpipeError(f"{path}: {what} is a tensor of shape {list(value.shape)}, not a 1-d list of numbers")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise GrokpipeError(f"{path}: {what} is a {type(value).__name__}, not a list of numbers")
    out = []
    for x in value:
        if torch.is_tensor(x) and x.numel() == 1 and not x.is_complex():
            x = x.item()
        if isinstance(x, bool) or not isinstance(x, (int, float)) and type(x).__module__ != "numpy":
            raise GrokpipeError(f"{path}: {what} holds a {type(x).__name__}, not a number")
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            raise GrokpipeError(f"{path}: {what} holds {x!r}, not a number") from None
    return out


def _whole_numbers(path: Path, value, what: str, below: int) -> list[int]:
    """Integers in [0, below): floats only when whole (``99.0``); NaN, negatives, fractions refused."""
    numbers = _numbers(path, value, what)
    for x in numbers:
        if not math.isfinite(x) or x != int(x) or not 0 <= x < below:
            raise GrokpipeError(f"{path}: {what} holds {x!r}, not a whole number in [0, {below})")
    return [int(x) for x in numbers]


def _indices(path: Path, value, what: str, n_pairs: int) -> torch.Tensor:
    if torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
        raise GrokpipeError(
            f"{path}: {what} is a {str(value.dtype).removeprefix('torch.')} tensor, not integer indices"
        )
    return torch.tensor(_whole_numbers(path, value, what, n_pairs), dtype=torch.long)


def read_legacy(path: str | Path, mmap: bool = False) -> LegacyRun:
    """Read and sanity-check a legacy grokking pickle (read-only; the file is never modified).

    Everything ``convert`` needs is checked here, so ``inspect`` (which reads the same way, tensor
    data memory-mapped) accepts exactly what ``convert`` accepts.
    """
    path = Path(path)
    data = safe_load(path, mmap=mmap)
    if not isinstance(data, dict):
        raise GrokpipeError(f"{path}: expected the grokking demo's dict, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise GrokpipeError(f"{path}: not a grokking run: missing key(s) {', '.join(missing)}")
    config = data["config"]
    if isinstance(config, LegacyConfig):
        config = config.fields
    if not isinstance(config, dict):
        raise GrokpipeError(f"{path}: 'config' is a {type(config).__name__}, not a HookedTransformerConfig or dict")
    for key in ("d_vocab_out", "d_model", "n_layers"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GrokpipeError(f"{path}: config '{key}' is {value!r}, not a positive integer")
    prime = config["d_vocab_out"]
    checkpoints = data["checkpoints"]
    if not isinstance(checkpoints, (list, tuple)):
        raise GrokpipeError(f"{path}: 'checkpoints' is not a list")
    train_losses = _numbers(path, data["train_losses"], "'train_losses'")
    test_losses = _numbers(path, data["test_losses"], "'test_losses'")
    if not train_losses or len(train_losses) != len(test_losses):
        raise GrokpipeError(
            f"{path}: {len(train_losses)} train losses but {len(test_losses)} test losses (one of each per epoch)"
        )
    epochs = _whole_numbers(path, data["checkpoint_epochs"], "'checkpoint_epochs'", len(train_losses))
    if len(epochs) != len(checkpoints):
        raise GrokpipeError(f"{path}: {len(checkpoints)} checkpoints but {len(epochs)} checkpoint_epochs")
    if len(set(epochs)) != len(epochs):
        raise GrokpipeError(f"{path}: checkpoint_epochs has duplicates")
    indices = {key: _indices(path, data[key], f"'{key}'", prime * prime) for key in ("train_indices", "test_indices")}
    pairs = torch.cat(list(indices.values())).sort().values
    if not torch.equal(pairs, torch.arange(prime * prime)):
        raise GrokpipeError(
            f"{path}: train_indices and test_indices do not partition the {prime * prime} pairs of p = {prime}"
        )
    return LegacyRun(
        path=path,
        model=_state_dict(path, data["model"], "'model'"),
        config=dict(config),
        checkpoints=[_state_dict(path, c, f"checkpoint {i}") for i, c in enumerate(checkpoints)],
        checkpoint_epochs=epochs,
        train_losses=train_losses,
        test_losses=test_losses,
        train_indices=indices["train_indices"],
        test_indices=indices["test_indices"],
    )


def hooked_config_from_legacy(config: dict) -> dict:
    """JSON-ready HookedTransformerConfig fields of a legacy config (dtype as a string, on CPU)."""
    from ..training.model import json_value  # torch only: no TransformerLens import

    out = {key: json_value(value) for key, value in config.items()}
    out["device"] = "cpu"  # trained on a GPU or not, a converted run loads on CPU
    out["n_devices"] = 1
    return out


def normalize_buffers(state_dict: dict[str, torch.Tensor], n_ctx: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt TransformerLens 2.x buffers to 3.x: the causal ``attn.mask`` became a (0, 0) placeholder
    (3.x builds the mask at forward time). Only an exact lower-triangular mask is replaced;
    anything else is refused rather than silently changed."""
    out, changed = dict(state_dict), []
    causal = torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool))
    for name, tensor in state_dict.items():
        if name.endswith("attn.mask") and tensor.shape != (0, 0):
            if tensor.dtype != torch.bool or tensor.shape != causal.shape or not torch.equal(tensor, causal):
                raise GrokpipeError(f"{name} is not the causal mask of n_ctx={n_ctx}; refusing to convert it")
            out[name] = torch.empty((0, 0), dtype=torch.bool)
            changed.append(name)
    return out, changed


def _epoch_state(run: LegacyRun, epoch: int | None) -> dict[str, torch.Tensor]:
    if epoch is None:
        return run.model
    if int(epoch) not in run.checkpoint_epochs:
        raise GrokpipeError(
            f"{run.path}: no checkpoint for epoch {epoch}; it holds {len(run.checkpoint_epochs)} "
            f"checkpoints from epoch {min(run.checkpoint_epochs, default='-')}"
        )
    return run.checkpoints[run.checkpoint_epochs.index(int(epoch))]


def legacy_state_dict(path: str | Path, epoch: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one epoch of a legacy pickle (``None``: the final model), read through the safe loader."""
    return _epoch_state(read_legacy(path), epoch)


def legacy_model(path: str | Path, epoch: int | None = None, device: str = "cpu"):
    """A HookedTransformer from a legacy pickle (read-only). Converting once is faster and safer."""
    from ..training.model import loaded_model

    warnings.warn(
        f"loading legacy pickle {path}: every load unpickles the whole file; convert it once with "
        f"`grokpipe convert {path} RUN_DIR` and load the safetensors run instead",
        UserWarning,
        stacklevel=3,
    )
    run = read_legacy(path)
    hooked = hooked_config_from_legacy(run.config)
    state, _ = normalize_buffers(_epoch_state(run, epoch), int(hooked.get("n_ctx", 3)))
    return loaded_model(hooked, state, path, device)
