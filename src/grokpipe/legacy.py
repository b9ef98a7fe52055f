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
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GrokpipeError

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


class LegacyConfig:
    """Stand-in for a pickled HookedTransformerConfig: keeps its fields as a plain dict."""

    def __init__(self, *args, **kwargs):
        self.fields = {}

    def __setstate__(self, state):
        # Pickle's BUILD hands over the instance __dict__ (possibly with a slot-state tuple).
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise TypeError(f"unexpected config state of type {type(state).__name__}")
        self.fields = dict(state)


NUMERIC_DTYPE_CODES = "?bBhHiIlLqQefdgFD"
MAX_SCALAR_BYTES = 32  # the widest numeric scalar (complex long double)
MAX_VISITS = 5_000_000  # items the loaded object may expand to, memo-shared containers counted per use


def _numeric_dtype(np, spec):
    """``numpy.dtype(spec)`` for numeric dtypes only: ``dtype('V500000000')`` would make the scalar
    that follows allocate half a gigabyte from a 1 KB file."""
    dtype = np.dtype(spec)
    if dtype.char not in NUMERIC_DTYPE_CODES or dtype.itemsize > MAX_SCALAR_BYTES:
        raise ValueError(f"numpy dtype {str(dtype)!r} is not a numeric scalar type")
    return dtype


def _numpy_allowlist() -> list:
    """numpy scalars (TransformerLens computes e.g. ``attn_scale`` with ``np.sqrt``) pickle through
    ``multiarray.scalar(dtype, bytes)``, which only rebuilds a number. Both are mapped to guarded
    stand-ins under the numpy 1.x and 2.x paths: numeric dtypes only, bytes of exactly that size."""
    try:
        import numpy as np
    except ImportError:  # files without numpy scalars still load
        return []
    core = getattr(np, "_core", None) or np.core
    real_scalar = core.multiarray.scalar

    def dtype(spec, align=False, copy=False):
        return _numeric_dtype(np, spec)

    def scalar(dtype_, data=None):
        dtype_ = _numeric_dtype(np, dtype_)
        if not isinstance(data, bytes) or len(data) != dtype_.itemsize:
            raise ValueError(f"numpy scalar of {dtype_} with {type(data).__name__} data of the wrong size")
        return real_scalar(dtype_, data)

    entries = [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        (dtype, "numpy.dtype"),
    ]
    for code in NUMERIC_DTYPE_CODES:
        cls = type(np.dtype(code))
        entries.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return entries


def _allowlist():
    return [(LegacyConfig, path) for path in CONFIG_CLASS_PATHS] + _numpy_allowlist()


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_CALL_RE = re.compile(r"unrecognized function (.+?)(?: which belongs|$)")


def _refusal(path: Path, exc: Exception) -> GrokpipeError:
    text = str(exc)
    named = _GLOBAL_RE.search(text)
    if named:
        return GrokpipeError(
            f"{path}: refused: the pickle names global {named.group(1)}, which is not on grokpipe's allowlist "
            "(tensors, containers and the HookedTransformerConfig class); nothing from it was run or written"
        )
    called = _CALL_RE.search(text)
    if called:
        return GrokpipeError(f"{path}: refused: the pickle calls {called.group(1)}; nothing from it was run or written")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return GrokpipeError(f"{path}: not a readable PyTorch pickle ({first})")


def _check_container(path: Path) -> None:
    """The zip container torch.save writes (since torch 1.6): members stored, never compressed, so
    the tensor data cannot exceed the file (a deflated member could expand into a zip bomb)."""
    if not zipfile.is_zipfile(path):
        raise GrokpipeError(
            f"{path}: not a readable PyTorch pickle (not the zip format torch.save writes since torch 1.6; "
            "the older format declares storage sizes the restricted loader cannot bound, so it is not read)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise GrokpipeError(f"{path}: not a readable PyTorch pickle ({exc})") from None
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise GrokpipeError(
                f"{path}: refused: zip member {member.filename} is compressed (torch.save never does that)"
            )
    total = sum(member.file_size for member in members)
    if total > path.stat().st_size:
        raise GrokpipeError(f"{path}: refused: its members claim {total} bytes, more than the file holds")


MAX_DEPTH = 64  # nesting of containers (the demo's dict is 3 deep)


def _check_bounded(path: Path, obj) -> None:
    """Refuse what would exhaust memory once used: memo-shared containers that expand a small file
    into billions of items (a list holding the same list 1,000 times, nested), self-containing
    containers, and tensor views claiming more elements than their storage holds. Expanded sizes are
    computed once per distinct object, so checking costs the file's size, not the expansion's."""
    sizes: dict[int, int | None] = {}  # id -> expanded size; None while being expanded (a cycle)
    keep = []  # keep every visited object alive so that ids stay unique

    def size(item, depth: int) -> int:
        if torch.is_tensor(item):
            needed = item.numel() * item.element_size()
            if needed > item.untyped_storage().nbytes():
                raise GrokpipeError(
                    f"{path}: refused: a tensor of shape {list(item.shape)} claims {needed} bytes over a "
                    f"{item.untyped_storage().nbytes()}-byte storage"
                )
            return 1
        if isinstance(item, LegacyConfig):
            item = item.fields
        if not isinstance(item, (dict, list, tuple, set, frozenset)):
            return 1
        key = id(item)
        if key in sizes:
            if sizes[key] is None:
                raise GrokpipeError(f"{path}: refused: a container holds itself")
            return sizes[key]
        if depth > MAX_DEPTH:
            raise GrokpipeError(f"{path}: refused: containers nested more than {MAX_DEPTH} deep")
        sizes[key] = None
        keep.append(item)
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        total = 1 + sum(size(child, depth + 1) for child in children)
        if total > MAX_VISITS:
            raise GrokpipeError(f"{path}: refused: its containers expand to more than {MAX_VISITS} items")
        sizes[key] = total
        return total

    size(obj, 0)


def safe_load(path: str | Path, mmap: bool = False):
    """Unpickle ``path`` with the restricted loader, every tensor on CPU, within bounds.

    ``mmap=True`` maps tensor data instead of reading it.
    """
    path = Path(path)
    if not path.is_file():
        raise GrokpipeError(f"{path}: no such file")
    _check_container(path)
    try:
        with torch.serialization.safe_globals(_allowlist()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # weights-only unpickling cannot run code, so any failure is a bad file
        raise _refusal(path, exc) from None
    _check_bounded(path, data)
    return data


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
    from .model import json_value  # torch only: no TransformerLens import

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
    from .model import loaded_model

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
