"""Verifying a run directory, trained or converted: everything loads and is consistent.

Checks, each reported as one line naming the file and what is wrong:

- every checkpoint and the final model is a well-formed safetensors file (header parsed
  defensively before any tensor is touched, see safetensors_header);
- the sha256 of every file equals the one recorded in metadata.json when it was written, and every
  model file on disk is recorded;
- every file loads strictly into a HookedTransformer built from config.json;
- the checkpoint epochs of metadata.json match the files on disk and their headers; loss arrays have
  num_epochs entries; train and test indices partition the p² pairs;
- the test loss recomputed from a checkpoint's weights equals the recorded one. All checkpoints are
  recomputed when that costs at most RECOMPUTE_BUDGET test examples in total; otherwise an evenly
  spaced sample within that budget (always the first and last checkpoint). Recomputation uses the
  forward implementation and thread count of the process that trained that epoch (each resume is a
  segment with its own environment in metadata.json). An epoch grokpipe trained on CPU
  reproduces bit-exactly, and a difference beyond 1e-5 relative (+1e-9 absolute) is reported; for a
  run trained on a GPU or converted from a legacy pickle (other hardware, unknown thread count) float32
  rounding of tiny losses differs more, and 1e-3 relative (+1e-7 absolute) is accepted, still far
  below the change between checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..errors import GrokpipeError
from ..io.atomic import sha256_file
from ..io.safetensors_header import HeaderError, read_header
from ..layout import RunLayout
from ..loading import read_json

RECOMPUTE_BUDGET = 2_000_000  # test examples
SAME_MACHINE_TOLERANCE = (1e-5, 1e-9)  # (relative, absolute): grokpipe-trained on CPU
OTHER_MACHINE_TOLERANCE = (1e-3, 1e-7)  # trained on a GPU, or converted from a legacy pickle


@dataclass
class Report:
    run: Path
    problems: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, path, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def to_dict(self) -> dict:
        return {
            "run": str(self.run),
            "ok": self.ok,
            "problems": self.problems,
            "checked": self.checked,
            "grokpipe_version": __version__,
        }


def _read_json(report: Report, path: Path) -> dict | None:
    """The JSON object at ``path``, or None with the problem reported."""
    try:
        return read_json(path)
    except GrokpipeError as exc:
        report.problems.append(str(exc))
        return None


def sample_epochs(epochs: list[int], test_size: int, budget: int = RECOMPUTE_BUDGET) -> list[int]:
    """All epochs if recomputing them costs at most ``budget`` examples, else an even sample."""
    if not epochs:
        return []
    n = max(2, budget // max(test_size, 1))
    if len(epochs) <= n:
        return list(epochs)
    step = (len(epochs) - 1) / (n - 1)
    return sorted({epochs[round(i * step)] for i in range(n)})


@contextmanager
def _threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def verify_run(run_dir: str | Path, recompute: str | int = "auto") -> Report:
    """Check a run directory; ``recompute`` is "auto" (budgeted), "all", or a number of checkpoints."""
    layout = RunLayout(Path(run_dir))
    report = Report(layout.root)
    if not layout.root.is_dir():
        report.problem(layout.root, "not a run directory")
        return report
    metadata = _read_json(report, layout.metadata)
    config = _read_json(report, layout.config)

    files = {**{e: p for e, p in layout.checkpoint_files().items()}, None: layout.final_model}
    headers = {}
    for epoch, path in files.items():
        if not path.exists():
            report.problem(path, "missing")
            continue
        try:
            headers[epoch] = read_header(path)
        except HeaderError as exc:
            report.problem(path, f"not a valid safetensors file: {exc}")
    report.checked["headers"] = len(headers)

    intact = set(headers)
    if metadata is not None:
        intact &= _check_hashes(report, layout, metadata, files)
        _check_metadata(report, layout, metadata, headers)
    if config is not None and metadata is not None and metadata.get("source", "trained") == "trained":
        _check_split(report, layout, metadata, config)
    if config is not None:
        well_formed = {epoch: path for epoch, path in files.items() if epoch in headers}
        loaded = _check_strict_loads(report, layout, config, well_formed, intact)
        if metadata is not None and loaded:
            _check_recomputed_losses(report, layout, metadata, loaded, recompute)
    return report


def _check_hashes(report: Report, layout: RunLayout, metadata: dict, files: dict) -> set:
    """Compare sha256 with the recorded ones; returns the epochs whose file matches."""
    recorded = metadata.get("files")
    if not isinstance(recorded, dict):
        report.problem(layout.metadata, "has no 'files' record of sha256 hashes")
        return set()
    matching = set()
    on_disk = {layout.relative(path): epoch for epoch, path in files.items() if path.exists()}
    for rel, expected in recorded.items():
        path = layout.root / rel
        if not path.exists():
            report.problem(path, "recorded in metadata.json but missing on disk")
        elif sha256_file(path) != expected:
            report.problem(path, "sha256 differs from the one recorded when it was written (file changed or damaged)")
        elif rel in on_disk:
            matching.add(on_disk[rel])
    for rel in sorted(set(on_disk) - set(recorded)):
        report.problem(layout.root / rel, "model file not recorded in metadata.json")
    report.checked["sha256"] = len(recorded)
    return matching


def _check_metadata(report: Report, layout: RunLayout, metadata: dict, headers: dict) -> None:
    meta_path = layout.metadata
    on_disk = sorted(e for e in layout.checkpoint_files())
    listed = metadata.get("checkpoint_epochs")
    if listed != on_disk:
        missing = sorted(set(listed or []) - set(on_disk))
        extra = sorted(set(on_disk) - set(listed or []))
        detail = "; ".join(
            filter(
                None, [missing and f"no file for epochs {missing}", extra and f"files not listed for epochs {extra}"]
            )
        )
        report.problem(meta_path, f"checkpoint_epochs do not match the files on disk ({detail or 'order differs'})")
    for epoch, header in headers.items():
        label = header.metadata.get("epoch")
        want = metadata.get("final_epoch") if epoch is None else epoch
        if label is not None and want is not None and label != str(want):
            report.problem(
                layout.checkpoint(epoch) if epoch is not None else layout.final_model,
                f"header says epoch {label}, expected {want}",
            )
        for key in ("prime", "seed", "operation"):
            recorded = metadata.get(key, "add" if key == "operation" else None)
            if key in header.metadata and str(recorded) != header.metadata[key]:
                report.problem(
                    layout.checkpoint(epoch) if epoch is not None else layout.final_model,
                    f"header {key} {header.metadata[key]} differs from metadata.json ({recorded})",
                )
    _check_schedule(report, layout, metadata, on_disk)
    final_epoch = metadata.get("final_epoch")
    for key in ("train_losses", "test_losses"):
        losses = metadata.get(key)
        if not isinstance(final_epoch, int) or not isinstance(losses, list) or len(losses) != final_epoch + 1:
            n = len(losses) if isinstance(losses, list) else "no"
            report.problem(meta_path, f"{key} has {n} entries for final_epoch {final_epoch}")
    diverged = metadata.get("diverged_at_epoch")
    if diverged is not None:
        report.problem(
            meta_path,
            f"the run diverged at epoch {diverged} (a non-finite loss) and stopped there; "
            "its weights from that epoch on are not usable",
        )
    from ..training.tasks import OPERATIONS, pair_ids

    prime, operation = metadata.get("prime"), metadata.get("operation", "add")
    train, test = metadata.get("train_indices"), metadata.get("test_indices")
    if operation not in OPERATIONS:
        report.problem(meta_path, f"unknown operation {operation!r}")
    elif not isinstance(prime, int) or not isinstance(train, list) or not isinstance(test, list):
        report.problem(meta_path, "prime, train_indices or test_indices missing")
    elif sorted(train + test) != pair_ids(prime, operation).tolist():
        report.problem(
            meta_path,
            f"train_indices and test_indices do not partition the {len(pair_ids(prime, operation))} pairs "
            f"of {operation} with p = {prime}",
        )


def _check_split(report: Report, layout: RunLayout, metadata: dict, config: dict) -> None:
    """A trained run's split and label noise, recomputed from config.json, equal metadata.json's."""
    from ..config import RunSpec
    from ..training.data import make_split

    try:
        spec = RunSpec.from_dict(config)
        t = spec.training
        split = make_split(spec.prime, t.frac_train, t.data_seed, operation=spec.operation, label_noise=t.label_noise)
    except (KeyError, TypeError, ValueError) as exc:
        report.problem(layout.config, f"does not describe a run's data ({exc})")
        return
    for key, recomputed in (
        ("train_indices", split.train_indices),
        ("test_indices", split.test_indices),
        ("noisy_indices", split.noisy_indices),
        ("noisy_labels", split.noisy_labels),
    ):
        if metadata.get(key, []) != recomputed.tolist():
            report.problem(layout.metadata, f"{key} differ from the split config.json's settings give")


def _check_schedule(report: Report, layout: RunLayout, metadata: dict, on_disk: list[int]) -> None:
    """Every checkpoint the run should have must be on disk: for a trained run, every epoch E with
    (E + 1) % checkpoint_every == 0 up to final_epoch; for a converted one, every epoch its pickle held."""
    from ..training.train import scheduled_epochs

    every, final_epoch = metadata.get("checkpoint_every"), metadata.get("final_epoch")
    if metadata.get("source", "trained") == "trained":
        if not isinstance(every, int) or every < 1 or not isinstance(final_epoch, int):
            report.problem(layout.metadata, "checkpoint_every or final_epoch missing or invalid")
            return
        expected = scheduled_epochs(final_epoch, every)
        recover = "retrain the run to recompute it (snakemake --forcerun on its metadata.json, or grokpipe train)"
    else:
        expected = metadata.get("checkpoint_epochs") or []
        recover = "convert the legacy file again (grokpipe convert --force)"
    for epoch in sorted(set(expected) - set(on_disk)):
        report.problem(layout.checkpoint(epoch), f"scheduled checkpoint of epoch {epoch} is missing; {recover}")


def _check_strict_loads(report: Report, layout: RunLayout, config: dict, files: dict, intact: set) -> dict:
    """Strictly load every well-formed file into a HookedTransformer built from config.json.
    Returns {epoch: model} for the intact checkpoints (hash-verified), for loss recomputation."""
    from ..errors import GrokpipeError
    from ..io.safetensors_io import read_tensors
    from ..training.model import config_from_json, empty_model

    hooked = config.get("hooked_transformer_config")
    try:
        model = empty_model(config_from_json(hooked))
    except Exception as exc:  # a damaged config.json: report, do not crash
        report.problem(layout.config, f"hooked_transformer_config does not build a HookedTransformer ({exc})")
        return {}
    states, strict_ok = {}, 0
    for epoch, path in files.items():  # only files whose header parsed: the others are reported already
        try:
            state = read_tensors(path)
            model.load_state_dict(state, strict=True)
        except (GrokpipeError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
            message = str(exc).split("\n\t")[0] if isinstance(exc, RuntimeError) else str(exc).split(": ", 1)[-1]
            report.problem(path, f"does not load strictly into the HookedTransformer of config.json ({message})")
            continue
        strict_ok += 1
        if epoch is not None and epoch in intact:
            states[epoch] = state
    report.checked["strict_loads"] = strict_ok
    return {"model": model, "states": states} if states else {}


def segment_of(metadata: dict, epoch: int) -> dict:
    """The training environment of the process that trained ``epoch`` (its segment; runs written
    before segments were recorded, and converted runs, have one environment for all epochs)."""
    environment = metadata.get("environment") or {}
    for segment in environment.get("segments") or []:
        if isinstance(segment, dict) and segment.get("first_epoch", 0) <= epoch <= segment.get("last_epoch", -1):
            return segment
    return environment


def _check_recomputed_losses(report: Report, layout: RunLayout, metadata: dict, loaded: dict, recompute) -> None:
    from ..training.lean_forward import objective_fn
    from ..training.tasks import labels_of, tokens_of

    prime, test_losses = metadata.get("prime"), metadata.get("test_losses")
    try:
        test_idx = torch.tensor(metadata["test_indices"], dtype=torch.long)
        train_idx = torch.tensor(metadata["train_indices"], dtype=torch.long)
        test_tokens, train_tokens = tokens_of(test_idx, prime), tokens_of(train_idx, prime)
        # the test set is clean whatever the label noise: the operation's own labels
        test_labels = labels_of(test_idx, prime, metadata.get("operation", "add"))
    except (TypeError, KeyError, IndexError, RuntimeError, ValueError):
        return  # already reported by the metadata checks
    trained = metadata.get("source", "trained") == "trained"
    epochs = sorted(loaded["states"])
    if recompute == "all":
        chosen = epochs
    elif recompute == "auto":
        chosen = sample_epochs(epochs, len(test_idx))
    else:
        chosen = sample_epochs(epochs, 1, budget=int(recompute))
    model = loaded["model"]
    objectives = {}  # one per implementation: its token plans are built once, not per epoch
    for epoch in chosen:
        if not isinstance(test_losses, list) or epoch >= len(test_losses) or test_losses[epoch] is None:
            continue
        # Recompute as the process that trained this epoch did (a resumed run may have changed
        # thread count or device between segments); bit-exact only for grokpipe's own CPU training.
        env = segment_of(metadata, epoch)
        implementation = env.get("implementation") or "hooked_transformer"
        exact = trained and env.get("device") == "cpu" and implementation != "stacked"
        rel_tol, abs_tol = SAME_MACHINE_TOLERANCE if exact else OTHER_MACHINE_TOLERANCE
        if implementation == "stacked":  # trained with other runs: the lean forward is the same function
            implementation = "lean"
        if implementation not in objectives:
            # The token tensors training gave its forward: the same table layout, the same arithmetic.
            objectives[implementation] = objective_fn(model, implementation, (train_tokens, test_tokens))
        with _threads(env.get("threads")), torch.inference_mode():
            model.load_state_dict(loaded["states"][epoch], strict=True)
            value = objectives[implementation](test_tokens, test_labels)[0].item()
        recorded = test_losses[epoch]
        if abs(value - recorded) > rel_tol * abs(recorded) + abs_tol:
            report.problem(
                layout.checkpoint(epoch),
                f"test loss recomputed from its weights is {value!r}, metadata.json records {recorded!r}",
            )
    report.checked["recomputed_test_losses"] = chosen
