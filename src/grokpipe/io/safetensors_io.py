"""Safetensors files of grokpipe: model weights plus string-only provenance in ``__metadata__``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .._version import __version__
from ..config import RunSpec
from ..errors import GrokpipeError
from .atomic import write_bytes_atomic
from .paths import regular_file


def provenance(spec: RunSpec, epoch: int, kind: str, hooked_config: dict) -> dict[str, str]:
    """Header metadata of a trained model file."""
    return header(
        spec.model_name, spec.prime, spec.seed, spec.config_hash, epoch, kind, hooked_config, operation=spec.operation
    )


def header(
    model_name: str,
    prime: int,
    seed: int,
    config_hash: str,
    epoch: int,
    kind: str,
    hooked_config: dict,
    source: str = "trained",
    operation: str = "add",
) -> dict[str, str]:
    """String-only ``__metadata__`` of a model file (safetensors' rule); ``format=pt`` is what
    Hugging Face loaders require."""
    return {
        "format": "pt",
        "kind": kind,  # "checkpoint" or "final"
        "epoch": str(epoch),
        "prime": str(prime),
        "seed": str(seed),
        "operation": operation,  # the task (grokpipe.training.tasks); legacy demo pickles are "add"
        "model_name": model_name,
        "grokpipe_version": __version__,
        "config_hash": config_hash,
        "source": source,  # "trained" or "converted"
        # The model config travels with every file, so one file alone rebuilds its HookedTransformer.
        "hooked_config": json.dumps(hooked_config, sort_keys=True),
    }


def consolidated_header(source_format: str, source_path: str, dtype: str) -> dict[str, str]:
    """``__metadata__`` of a file consolidated from another trainer's checkpoint."""
    return {
        "format": "pt",
        "source": "consolidated",
        "source_format": source_format,
        "source_path": source_path,
        "dtype": dtype,
        "grokpipe_version": __version__,
    }


def serialize_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    return save(tensors, metadata=metadata)


def write_model_file(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a state dict crash-safely; returns the file's sha256."""
    return write_bytes_atomic(path, serialize_state_dict(state_dict, metadata))


def write_verified_model_file(
    path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str], what: str
) -> str:
    """:func:`write_model_file`, then read the file back and compare every tensor bit for bit;
    returns its sha256. ``what`` names the step in the error (``conversion``, ``export``)."""
    digest = write_model_file(path, state_dict, metadata)
    difference = first_difference(state_dict, read_tensors(path))
    if difference:
        raise GrokpipeError(f"{path}: {what} check failed: {difference} after writing")
    return digest


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, without reading tensor data."""
    regular_file(path)  # a FIFO would block the reader
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise GrokpipeError(f"{path}: not a readable safetensors file ({exc})") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on CPU."""
    regular_file(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise GrokpipeError(f"{path}: not a readable safetensors file ({exc})") from None


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold exactly the same bytes (dtype, shape and every bit, so identical NaNs
    are equal and -0.0 differs from 0.0, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a = a.detach().to("cpu").contiguous().reshape(-1)
    b = b.detach().to("cpu").contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def first_difference(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> str | None:
    """What differs between two state dicts (names, or the first tensor whose dtype, shape or bits
    differ), or None when they hold exactly the same tensors."""
    if expected.keys() != actual.keys():
        return "tensor names differ"
    for name, tensor in expected.items():
        if not same_bits(tensor, actual[name]):
            return f"tensor {name} differs"
    return None
