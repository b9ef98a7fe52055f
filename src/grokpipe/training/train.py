"""Training one (prime, seed) run: the TransformerLens grokking demo's loop, checkpointed as it goes.

Every checkpoint is written to its own safetensors file the moment it exists and is never kept in
memory; the resume state follows it, so a killed run continues from its last checkpoint and ends
bit-identical to one that was never interrupted (same machine, same thread count).

Epoch labels follow the demo: epochs are 0-based, and the weights after epoch ``e``'s optimizer
step are checkpointed when ``(e + 1) % checkpoint_every == 0`` (labels 99, 199, ... for 100).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .._version import __version__
from ..config import RunSpec
from ..errors import GrokpipeError
from ..io.atomic import remove_stale_temporaries, sha256_file, write_bytes_atomic, write_json_atomic
from ..io.safetensors_io import first_difference, provenance, read_metadata, read_tensors, serialize_state_dict
from ..layout import RunLayout
from ..writer_lock import writer_lock
from . import resume
from .data import make_split
from .lean_forward import objective_fn, unsupported_reason
from .model import config_to_json, resolve_device, training_model

log = logging.getLogger(__name__)

METADATA_FORMAT_VERSION = 1
DIVERGENCE_RULE = (
    "training stops after the first epoch whose train or test loss is not finite (NaN/inf); that epoch "
    "is diverged_at_epoch and final_epoch, its non-finite losses are recorded as null"
)
EARLY_STOPPING_RULE = (
    "training stops at the first checkpoint epoch at or after E + after_epochs, where E is the first "
    "evaluated epoch whose test loss is below test_loss_below; that checkpoint is the final model"
)
INDICES_CONVENTION = "train/test/noisy indices are pair ids a * p + b of the inputs [a, b, =] (token p is =)"
MEMORIZATION_ACCURACY = 0.99  # the memorization epoch is the first with train accuracy >= this
EPOCH_CONVENTION = (
    "0-based epochs; checkpoint E holds the weights after epoch E's optimizer step and is written "
    "when (E + 1) % checkpoint_every == 0 (the TransformerLens grokking demo's labels)"
)


def first_non_finite(*series: list[float | None]) -> int | None:
    """First epoch at which any of the loss series is NaN/inf (None entries are not evaluated)."""
    bad = [i for losses in series for i, x in enumerate(losses) if x is not None and not math.isfinite(x)]
    return min(bad) if bad else None


def grokking_epoch(test_losses: list[float | None], threshold: float) -> int | None:
    """First epoch whose test loss is below ``threshold`` (None if none is; unevaluated epochs skipped)."""
    for epoch, loss in enumerate(test_losses):
        if loss is not None and loss < threshold:
            return epoch
    return None


def first_epoch_at_least(values: list[float | None], level: float) -> int | None:
    """First epoch whose value is >= ``level`` (None entries skipped; None if none is)."""
    return next((epoch for epoch, x in enumerate(values) if x is not None and x >= level), None)


def early_stop_epoch(first_below: int | None, rule: dict | None, checkpoint_every: int) -> int | None:
    """The epoch the early-stopping ``rule`` ends training at, given the first epoch whose test loss
    fell below its threshold (None: not yet, or no rule): the first checkpoint epoch at or after
    ``first_below + after_epochs``, so the run ends on a checkpoint and a resume point."""
    if rule is None or first_below is None:
        return None
    target = first_below + rule["after_epochs"]
    return -(-(target + 1) // checkpoint_every) * checkpoint_every - 1


def epoch_bar(start: int, stop: int, total: int, desc: str, enabled: bool):
    """The epochs ``start..stop-1`` with a tqdm bar on stderr (every training loop's)."""
    return tqdm(
        range(start, stop),
        initial=start,
        total=total,
        desc=desc,
        file=sys.stderr,
        mininterval=2.0,
        disable=not enabled,
        ascii=True,
    )


def is_eval_epoch(epoch: int, t) -> bool:
    """Whether the test loss is computed after ``epoch`` (always at checkpoints and at the end)."""
    return (epoch + 1) % t.eval_every == 0 or (epoch + 1) % t.checkpoint_every == 0 or epoch == t.num_epochs - 1


def _prune_checkpoints(layout: RunLayout, spec: RunSpec, keep_below: int) -> None:
    """Remove checkpoint files that cannot belong to this run: from another configuration, past
    ``num_epochs``, at epochs the schedule never writes, or with an unreadable header."""
    every = spec.training.checkpoint_every
    for epoch, path in layout.checkpoint_files().items():
        reason = None
        if epoch >= keep_below or (epoch + 1) % every:
            reason = f"epoch {epoch} is not in this run's checkpoint schedule"
        else:
            try:
                if read_metadata(path).get("config_hash") != spec.config_hash:
                    reason = "written with a different configuration"
            except GrokpipeError:
                reason = "unreadable header"
        if reason:
            log.warning("removing %s: %s", path, reason)
            path.unlink()


def _same_content(path: Path, state_dict: dict, metadata: dict) -> bool:
    """Whether ``path`` already holds exactly these tensors and header metadata.

    Bytes are not compared: safetensors writes ``__metadata__`` in hash-map order, which varies
    between processes, so two identical checkpoints may differ in header byte order.
    """
    try:
        if read_metadata(path) != metadata:
            return False
        on_disk = read_tensors(path)
    except GrokpipeError:
        return False
    return first_difference(state_dict, on_disk) is None


def write_checkpoint(path: Path, state_dict: dict, metadata: dict) -> str:
    """Write a checkpoint unless an identical one is already there; returns the file's sha256."""
    if path.exists():
        if _same_content(path, state_dict, metadata):
            return sha256_file(path)  # written before an interruption: keep it as it is
        log.warning("%s differs from the recomputed checkpoint; replacing it", path)
    return write_bytes_atomic(path, serialize_state_dict(state_dict, metadata))


def scheduled_epochs(last_epoch: int, checkpoint_every: int) -> list[int]:
    """Every checkpoint epoch of the schedule up to and including ``last_epoch``."""
    return list(range(checkpoint_every - 1, last_epoch + 1, checkpoint_every))


def checkpoint_gaps(layout: RunLayout, progress: resume.Progress, checkpoint_every: int) -> list[int]:
    """Scheduled checkpoints up to the resume point that are missing or differ from what was written."""
    gaps = []
    for epoch in scheduled_epochs(progress.epoch, checkpoint_every):
        path = layout.checkpoint(epoch)
        recorded = progress.files.get(layout.relative(path))
        if not path.exists() or recorded is None or sha256_file(path) != recorded:
            gaps.append(epoch)
    return gaps


def resume_or_start(layout: RunLayout, model, optimizer, config_hash: str, num_epochs: int, checkpoint_every: int):
    """The progress to continue from: the resume state restored into ``model`` and ``optimizer``
    when it belongs to ``config_hash`` and every checkpoint it records is intact, else a fresh
    start (an unusable state is cleared). Returns a :class:`resume.Progress`."""
    loaded, why = resume.load(layout, config_hash, num_epochs)
    if loaded is not None:
        gaps = checkpoint_gaps(layout, loaded.progress, checkpoint_every)
        if gaps:
            # Only the latest state is kept, so the last intact point before a gap is the seeded
            # initialisation: retraining from it reproduces every epoch bit for bit.
            loaded, why = (
                None,
                (
                    f"checkpoint(s) for epoch(s) {gaps} are missing or damaged; retraining from epoch 0 "
                    "recomputes them (intact checkpoints are kept as they are)"
                ),
            )
    if loaded is not None:
        resume.restore(loaded, model, optimizer)
        log.info("%s: %s", layout.name, why)
        return loaded.progress
    if resume.exists(layout):
        log.warning("%s: not resuming: %s", layout.name, why)
        resume.clear(layout)
    log.info("%s: starting from epoch 0", layout.name)
    return resume.Progress()


def finite_or_none(value: float) -> float | None:
    """A loss as JSON can hold it: None for NaN/inf (strict JSON has no such numbers)."""
    return value if math.isfinite(value) else None


def _segment(start: int, device: str, threads: int, implementation: str) -> dict:
    """Provenance of one process's stretch of training (a resumed run has several)."""
    return {
        "first_epoch": start,
        "last_epoch": start - 1,
        "device": device,
        "threads": threads,
        "implementation": implementation,
        "torch": torch.__version__,
        "host": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": 0.0,
    }


def train(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    device: str = "cpu",
    threads: int = 1,
    grokking_threshold: float = 0.01,
    progress_bar: bool = True,
    sweep_cell: dict | None = None,
) -> dict:
    """Train (or resume) one run into ``run_dir``; returns the metadata written to metadata.json.

    ``sweep_cell``: the sweep axes' values of the run's cell (recorded in config.json). The run's
    writer lock is held throughout: a second writer is refused, not raced.
    """
    with writer_lock(run_dir, "train"):
        return _train_locked(spec, Path(run_dir), device, threads, grokking_threshold, progress_bar, sweep_cell)


class RunWriter:
    """One run's record as it trains, whatever trains it (alone, or stacked with others): its
    directories, the resume decision, each epoch's losses, checkpoints and resume states, the
    final model and metadata.json. The caller owns the model's parameters and the optimizer; the
    writer reads ``model`` and ``optimizer`` when it writes and restores into them when it resumes.
    """

    def __init__(self, spec: RunSpec, run_dir: Path, split, threshold: float, sweep_cell: dict | None):
        self.spec, self.t = spec, spec.training
        self.layout = RunLayout(run_dir)
        self.split, self.threshold, self.sweep_cell = split, threshold, sweep_cell
        self.n_train, self.n_test = len(split.train_labels), len(split.test_labels)
        self.header_extra: dict[str, str] = {}  # more header fields of every file it writes (a job's members)

    def prepare(self, model, optimizer, device: str, threads: int, implementation: str) -> None:
        """Directories, stale temporaries, the resume state (restored into ``model`` and
        ``optimizer`` when it can continue), pruning, config.json, and where training resumes."""
        layout, t = self.layout, self.t
        self.model, self.optimizer = model, optimizer
        for directory in (layout.root, layout.checkpoints_dir, layout.artifacts_dir, layout.resume_dir):
            directory.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(directory):
                log.info("removed temporary file left by an interrupted write: %s", stale)
        self.hooked_config = config_to_json(model.cfg)
        progress = resume_or_start(layout, model, optimizer, self.spec.config_hash, t.num_epochs, t.checkpoint_every)
        _prune_checkpoints(layout, self.spec, keep_below=t.num_epochs)
        # Keep the record consistent with the files that survive pruning.
        progress.checkpoint_epochs = [e for e in progress.checkpoint_epochs if layout.checkpoint(e).exists()]
        progress.files = {rel: sha for rel, sha in progress.files.items() if (layout.root / rel).exists()}
        self.progress = progress

        write_json_atomic(layout.config, _config_record(self.spec, self.hooked_config, self.sweep_cell))

        # The early-stopping rule may have changed since the run stopped: decide again from its losses.
        self.rule = t.early_stopping
        rule = self.rule
        self.first_below = None if rule is None else grokking_epoch(progress.test_losses, rule["test_loss_below"])
        self.stop_at = early_stop_epoch(self.first_below, rule, t.checkpoint_every)
        progress.stopped_at_epoch = (
            progress.epoch if self.stop_at is not None and self.stop_at <= progress.epoch else None
        )
        self.start = progress.epoch + 1
        ended = progress.diverged_at_epoch is not None or progress.stopped_at_epoch is not None
        self.last = progress.epoch if ended else t.num_epochs - 1
        self.segment = _segment(self.start, device, threads, implementation)
        if self.start <= self.last:
            progress.segments.append(self.segment)
        self.began = time.perf_counter()

    def record(self, epoch: int, train_value: float, train_correct: int, test_loss, test_correct) -> bool:
        """The losses and accuracies of ``epoch`` (test ones None when not evaluated), then the
        divergence and early-stopping rules, and the checkpoint when one is due. Returns whether
        the run ends at this epoch."""
        progress, t, layout = self.progress, self.t, self.layout
        test_accuracy = None if test_loss is None else round(test_correct / self.n_test, 6)
        progress.train_losses.append(finite_or_none(train_value))
        progress.test_losses.append(None if test_loss is None else finite_or_none(test_loss))
        # accuracies of the weights the losses were computed on (train: before this epoch's step)
        progress.train_accuracies.append(round(train_correct / self.n_train, 6))
        progress.test_accuracies.append(test_accuracy)
        progress.epoch = epoch
        self.segment.update(last_epoch=epoch, seconds=round(time.perf_counter() - self.began, 3))
        diverged = not math.isfinite(train_value) or (test_loss is not None and not math.isfinite(test_loss))
        if diverged:
            # Divergence rule: the run stops after the first epoch with a non-finite loss. AdamW
            # turns every weight non-finite from there on, so later epochs could hold nothing.
            progress.diverged_at_epoch = epoch
            log.warning(
                "%s: diverged at epoch %d (train loss %s, test loss %s); stopping the run there",
                layout.name,
                epoch,
                train_value,
                test_loss,
            )
        rule = self.rule
        if (
            rule is not None
            and self.first_below is None
            and test_loss is not None
            and test_loss < rule["test_loss_below"]
        ):
            self.first_below = epoch
            self.stop_at = early_stop_epoch(self.first_below, rule, t.checkpoint_every)
            log.info(
                "%s: test loss below %g at epoch %d; stopping at epoch %d",
                layout.name,
                rule["test_loss_below"],
                epoch,
                self.stop_at,
            )
        if epoch == self.stop_at:
            progress.stopped_at_epoch = epoch  # before the resume state below records it

        if (epoch + 1) % t.checkpoint_every == 0:
            path = layout.checkpoint(epoch)
            header = provenance(self.spec, epoch, "checkpoint", self.hooked_config) | self.header_extra
            progress.files[layout.relative(path)] = write_checkpoint(path, self.model.state_dict(), header)
            if epoch not in progress.checkpoint_epochs:
                progress.checkpoint_epochs.append(epoch)
            resume.save(layout, self.model, self.optimizer, progress, self.spec.config_hash)
            log.info(
                "epoch %d train_loss %.6g test_loss %.6g -> %s",
                epoch,
                train_value,
                test_loss,
                layout.relative(path),
            )
        return diverged or epoch == self.stop_at

    def finish(self) -> dict:
        """The final resume state (when the last epoch was no checkpoint), the final model and
        metadata.json; returns the metadata (also kept as ``self.metadata``)."""
        progress, layout = self.progress, self.layout
        final_epoch = progress.epoch
        if (final_epoch + 1) % self.t.checkpoint_every != 0 and self.start <= final_epoch:
            # The end of a run is a resume point too: growing num_epochs later continues from here.
            resume.save(layout, self.model, self.optimizer, progress, self.spec.config_hash)
        header = provenance(self.spec, final_epoch, "final", self.hooked_config) | self.header_extra
        final_data = serialize_state_dict(self.model.state_dict(), header)
        progress.files[layout.relative(layout.final_model)] = write_bytes_atomic(layout.final_model, final_data)

        metadata = self.metadata = _metadata_record(self.spec, progress, self.split, self.threshold, self.first_below)
        write_json_atomic(layout.metadata, metadata)
        log.info(
            "%s: done, %d epochs, final train_loss %s test_loss %s, grokking epoch %s%s",
            layout.name,
            final_epoch + 1,
            progress.train_losses[-1],
            progress.test_losses[-1],
            metadata["grokking_epoch"],
            "" if progress.diverged_at_epoch is None else f", DIVERGED at epoch {progress.diverged_at_epoch}",
        )
        if progress.stopped_at_epoch is not None:
            log.info("%s: %s", layout.name, metadata["stop_reason"])
        return metadata


def _train_locked(
    spec: RunSpec,
    run_dir: Path,
    device: str,
    threads: int,
    threshold: float,
    progress_bar: bool,
    sweep_cell: dict | None,
):
    # setup
    torch.set_num_threads(threads)
    device = resolve_device(device)
    t = spec.training
    split = make_split(
        spec.prime, t.frac_train, t.data_seed, device, operation=spec.operation, label_noise=t.label_noise
    )
    model = training_model(spec, device)
    unsupported = unsupported_reason(model.cfg) if t.implementation == "lean" else None
    if unsupported:
        log.info(
            "%s: lean forward does not support this model (%s); using HookedTransformer", run_dir.name, unsupported
        )
    implementation = "hooked_transformer" if unsupported else t.implementation
    # The lean implementation takes AdamW's fused kernel (one pass over each parameter instead of
    # a dozen list operations, ~2 % of a lean epoch at p = 113); hooked_transformer keeps the demo's
    # default kernel, bit-exact.
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        weight_decay=t.weight_decay,
        betas=t.betas,
        fused=implementation == "lean",
    )
    objective = objective_fn(model, implementation, (split.train_tokens, split.test_tokens), optimizer)
    writer = RunWriter(spec, run_dir, split, threshold, sweep_cell)
    writer.prepare(model, optimizer, device, threads, implementation)

    # loop
    bar = epoch_bar(writer.start, writer.last + 1, t.num_epochs, writer.layout.name, progress_bar)
    for epoch in bar:
        train_loss, train_correct = objective(split.train_tokens, split.train_labels)
        train_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        test_loss = test_correct = None
        if is_eval_epoch(epoch, t):
            with torch.inference_mode():
                test_loss, test_correct = objective(split.test_tokens, split.test_labels)
                test_loss, test_correct = test_loss.item(), test_correct.item()
        train_value = train_loss.item()
        ended = writer.record(epoch, train_value, train_correct.item(), test_loss, test_correct)
        if (epoch + 1) % t.checkpoint_every == 0:
            bar.set_postfix(train=f"{train_value:.3g}", test=f"{test_loss:.3g}")
        if ended:
            break
    bar.close()

    # finish
    return writer.finish()


def _config_record(spec: RunSpec, hooked_config: dict, sweep_cell: dict | None) -> dict:
    return {
        "model_name": spec.model_name,
        "prime": spec.prime,
        "seed": spec.seed,
        "training": spec.training.to_dict(),
        "model": spec.model,
        "task": {"operation": spec.operation},
        "hooked_transformer_config": hooked_config,
        "config_hash": spec.config_hash,
        "sweep_cell": sweep_cell or {},  # the sweep axes' values of this run's cell (dotted keys)
        "grokpipe_version": __version__,
    }


def _stop_reason(spec: RunSpec, progress: resume.Progress, first_below: int | None) -> str | None:
    if progress.stopped_at_epoch is None:
        return None
    rule = spec.training.early_stopping
    return (
        f"early stopping: test loss {progress.test_losses[first_below]:.4g} < {rule['test_loss_below']} "
        f"first at epoch {first_below}; stopped at the first checkpoint epoch at or after "
        f"{first_below} + {rule['after_epochs']}"
    )


def _metadata_record(
    spec: RunSpec, progress: resume.Progress, split, threshold: float, first_below: int | None
) -> dict:
    from importlib.metadata import version

    checkpoint_epochs = sorted(progress.checkpoint_epochs)
    last_segment = progress.segments[-1] if progress.segments else {}
    return {
        "format_version": METADATA_FORMAT_VERSION,
        "source": "trained",
        "model_name": spec.model_name,
        "prime": spec.prime,
        "seed": spec.seed,
        "operation": spec.operation,
        "num_epochs": spec.training.num_epochs,
        "checkpoint_every": spec.training.checkpoint_every,
        "epoch_convention": EPOCH_CONVENTION,
        "checkpoint_epochs": checkpoint_epochs,
        "final_epoch": progress.epoch,  # num_epochs - 1, or the epoch the run diverged or stopped at
        "diverged_at_epoch": progress.diverged_at_epoch,
        "divergence_rule": DIVERGENCE_RULE,
        "stopped_at_epoch": progress.stopped_at_epoch,
        "stop_reason": _stop_reason(spec, progress, first_below),
        "early_stopping": spec.training.early_stopping,
        "early_stopping_rule": EARLY_STOPPING_RULE if spec.training.early_stopping else None,
        "eval_every": spec.training.eval_every,
        "train_losses": progress.train_losses,  # null where not finite
        "test_losses": progress.test_losses,  # null where the epoch was not evaluated, or not finite
        "final_train_loss": progress.train_losses[-1],
        "final_test_loss": progress.test_losses[-1],
        # accuracy: the share of examples whose label has the largest logit (ties count)
        "train_accuracies": progress.train_accuracies,  # null for epochs trained before they were recorded
        "test_accuracies": progress.test_accuracies,  # null where the epoch was not evaluated
        "final_train_accuracy": progress.train_accuracies[-1],
        "final_test_accuracy": progress.test_accuracies[-1],
        "grokking_threshold": threshold,
        "grokking_epoch": grokking_epoch(progress.test_losses, threshold),
        "memorization_accuracy": MEMORIZATION_ACCURACY,
        "memorization_epoch": first_epoch_at_least(progress.train_accuracies, MEMORIZATION_ACCURACY),
        "indices_convention": INDICES_CONVENTION,
        "train_indices": split.train_indices.tolist(),
        "test_indices": split.test_indices.tolist(),
        "label_noise": spec.training.label_noise,
        "noisy_indices": split.noisy_indices.tolist(),  # training pairs whose label is noise
        "noisy_labels": split.noisy_labels.tolist(),  # the labels they were trained on
        "config_hash": spec.config_hash,
        "files": dict(sorted(progress.files.items())),
        "environment": {
            "grokpipe": __version__,
            "torch": torch.__version__,
            "transformer_lens": version("transformer-lens"),
            "python": platform.python_version(),
            # of the last process that trained; every process's own is in segments
            "device": last_segment.get("device"),
            "threads": last_segment.get("threads"),
            "implementation": last_segment.get("implementation"),
            "slurm_job_id": last_segment.get("slurm_job_id"),
            "segments": progress.segments,
        },
    }
