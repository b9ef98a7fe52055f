"""Converting a legacy grokking pickle into grokpipe's run layout.

The result has exactly the layout of a trained run: one safetensors file per embedded checkpoint
(the pickle's own epoch labels, which follow the demo's convention like ours), the final model,
``metadata.json`` and ``config.json``. Everything is written to a hidden staging directory beside
the target and moved into place only after every tensor was re-read and compared with the original
(as safetensors' own convert.py does), so a failure leaves nothing half-written. The legacy file is
only ever read.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ._version import __version__
from .config import canonical_json, run_name
from .errors import GrokpipeError
from .io.atomic import sha256_file, staged_directory, write_json_atomic
from .io.legacy import LegacyRun, hooked_config_from_legacy, normalize_buffers, read_legacy
from .io.safetensors_io import header, write_verified_model_file
from .layout import RUN_DIR_RE, RunLayout
from .training.train import EPOCH_CONVENTION, METADATA_FORMAT_VERSION, finite_or_none, first_non_finite, grokking_epoch
from .writer_lock import writer_lock

log = logging.getLogger(__name__)


def _checkpoint_every(epochs: list[int]) -> int | None:
    """The demo's cadence k if every label satisfies (e + 1) % k == 0 with a constant step k."""
    if not epochs:
        return None
    k = epochs[0] + 1
    ok = all(e == (i + 1) * k - 1 for i, e in enumerate(sorted(epochs)))
    return k if ok else None


def _check_strict_load(path: Path, hooked: dict, state: dict[str, torch.Tensor]) -> None:
    from .training.model import loaded_model

    try:
        loaded_model(hooked, state, path)
    except GrokpipeError as exc:
        raise GrokpipeError(f"{exc}; nothing was written") from None


def convert(
    legacy_path: str | Path,
    run_dir: str | Path,
    *,
    model_name: str | None = None,
    prime: int | None = None,
    seed: int | None = None,
    grokking_threshold: float = 0.01,
    force: bool = False,
) -> dict:
    """Convert ``legacy_path`` into ``run_dir``; returns the metadata written.

    Model name, prime and seed come from the run directory's name when it follows
    ``{model_name}_p{prime}_seed{seed}``, else from the arguments or the pickled config. An existing
    non-empty ``run_dir`` is refused unless ``force`` (then it is replaced, only once the new run is
    complete). The run's writer lock is held throughout.
    """
    legacy_path, run_dir = Path(legacy_path), Path(run_dir)
    run = read_legacy(legacy_path)
    named = RUN_DIR_RE.match(run_dir.name)
    model_name = model_name or (named and named["model_name"]) or "grokking"
    prime = prime if prime is not None else (int(named["prime"]) if named else run.prime)
    seed = seed if seed is not None else (int(named["seed"]) if named else int(run.config.get("seed") or 0))
    if prime != run.prime:
        raise GrokpipeError(f"{legacy_path}: holds a p = {run.prime} model (d_vocab_out), not p = {prime}")
    if run_dir.name != run_name(model_name, prime, seed):
        raise GrokpipeError(f"{run_dir}: a run directory must be named {run_name(model_name, prime, seed)}")

    hooked = hooked_config_from_legacy(run.config)
    n_ctx = int(hooked.get("n_ctx", 3))
    final_state, normalized = normalize_buffers(run.model, n_ctx)
    _check_strict_load(legacy_path, hooked, final_state)

    legacy_sha = sha256_file(legacy_path)
    config_hash = hashlib.sha256(canonical_json({"hooked": hooked, "legacy_sha256": legacy_sha}).encode()).hexdigest()
    with writer_lock(run_dir, "convert"):
        if run_dir.exists() and any(run_dir.iterdir()) and not force:
            raise GrokpipeError(f"{run_dir}: already holds a run; pass --force to replace it (nothing was written)")
        metadata = _convert_locked(
            run, run_dir, model_name, prime, seed, hooked, config_hash, legacy_sha, normalized, grokking_threshold
        )
    log.info("converted %s -> %s (%d checkpoints)", legacy_path, run_dir, len(run.checkpoints))
    return metadata


STAGING_MARKERS = (".converting-", ".replaced-")


def _convert_locked(run, run_dir, model_name, prime, seed, hooked, config_hash, legacy_sha, normalized, threshold):
    with staged_directory(run_dir, "converting", STAGING_MARKERS) as staging:
        metadata = _write_run(
            run,
            RunLayout(staging, run_dir.name),
            model_name,
            prime,
            seed,
            hooked,
            config_hash,
            legacy_sha,
            normalized,
            threshold,
        )
    return metadata


def _write_run(
    run: LegacyRun, layout: RunLayout, model_name, prime, seed, hooked, config_hash, legacy_sha, normalized, threshold
) -> dict:
    n_ctx = int(hooked.get("n_ctx", 3))
    layout.checkpoints_dir.mkdir(parents=True)
    layout.artifacts_dir.mkdir()
    files = {}
    for epoch, state in sorted(zip(run.checkpoint_epochs, run.checkpoints), key=lambda pair: pair[0]):
        state, _ = normalize_buffers(state, n_ctx)
        meta = header(model_name, prime, seed, config_hash, epoch, "checkpoint", hooked, source="converted")
        path = layout.checkpoint(epoch)
        files[layout.relative(path)] = write_verified_model_file(path, state, meta, "conversion")
    num_epochs = len(run.train_losses)
    final_state, _ = normalize_buffers(run.model, n_ctx)
    final_meta = header(model_name, prime, seed, config_hash, num_epochs - 1, "final", hooked, source="converted")
    final = layout.final_model
    files[layout.relative(final)] = write_verified_model_file(final, final_state, final_meta, "conversion")

    every = _checkpoint_every(run.checkpoint_epochs)
    training = {
        "num_epochs": num_epochs,
        "checkpoint_every": every,
        "frac_train": len(run.train_indices) / (prime * prime),
    }
    write_json_atomic(
        layout.config,
        {
            "model_name": model_name,
            "prime": prime,
            "seed": seed,
            "source": "converted",
            "training": training,  # what the pickle records; lr, weight decay and betas it does not
            "hooked_transformer_config": hooked,
            "config_hash": config_hash,
            "grokpipe_version": __version__,
        },
    )
    train_losses = [finite_or_none(x) for x in run.train_losses]
    test_losses = [finite_or_none(x) for x in run.test_losses]
    metadata = {
        "format_version": METADATA_FORMAT_VERSION,
        "source": "converted",
        "legacy_file": str(run.path),
        "legacy_sha256": legacy_sha,
        "normalized_buffers": normalized,
        "model_name": model_name,
        "prime": prime,
        "seed": seed,
        "num_epochs": num_epochs,
        "checkpoint_every": every,
        "epoch_convention": EPOCH_CONVENTION,
        "checkpoint_epochs": sorted(run.checkpoint_epochs),
        "final_epoch": num_epochs - 1,
        "train_losses": train_losses,  # null where the pickle holds NaN/inf
        "test_losses": test_losses,
        "final_train_loss": train_losses[-1],
        "final_test_loss": test_losses[-1],
        "diverged_at_epoch": first_non_finite(run.train_losses, run.test_losses),
        "grokking_threshold": threshold,
        "grokking_epoch": grokking_epoch(test_losses, threshold),
        "train_indices": run.train_indices.tolist(),
        "test_indices": run.test_indices.tolist(),
        "config_hash": config_hash,
        "files": dict(sorted(files.items())),
        "environment": {  # of the conversion; device: where the legacy run was trained
            "grokpipe": __version__,
            "torch": torch.__version__,
            "device": str(run.config.get("device", "unknown")),
            "implementation": "hooked_transformer",
        },
    }
    write_json_atomic(layout.metadata, metadata)
    return metadata
