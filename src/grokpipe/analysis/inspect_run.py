"""``grokpipe inspect`` and ``grokpipe list``: what a run, a checkpoint or a legacy pickle holds.

Run directories and safetensors files are described from their JSON files and safetensors headers
alone; no tensor data is read. Legacy pickles go through the restricted loader, memory-mapped so
that tensor data is not read either.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import GrokpipeError
from ..io.paths import regular_file
from ..io.safetensors_header import HeaderError, read_header
from ..layout import RUN_DIR_RE, RunLayout


def _json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or not one (inspect describes what it can)."""
    from ..loading import read_json

    try:
        return read_json(path)
    except GrokpipeError:
        return None


def _file_summary(path: Path) -> dict:
    try:
        header = read_header(path)
    except HeaderError as exc:
        raise GrokpipeError(f"{path}: not a valid safetensors file: {exc}") from None
    metadata = dict(header.metadata)
    hooked = metadata.pop("hooked_config", None)
    return {
        "format": "safetensors",
        "path": str(path),
        "bytes": header.file_bytes,
        "header_metadata": metadata,
        "config": _config_summary(json.loads(hooked)) if hooked else None,
        "tensors": {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in header.tensors.values()},
    }


def _config_summary(hooked: dict | None) -> dict | None:
    if not hooked:
        return None
    keys = (
        "n_layers",
        "n_heads",
        "d_model",
        "d_head",
        "d_mlp",
        "act_fn",
        "normalization_type",
        "d_vocab",
        "d_vocab_out",
        "n_ctx",
        "seed",
        "dtype",
    )
    return {k: hooked.get(k) for k in keys if k in hooked}


def latest_verification(layout: RunLayout) -> dict | None:
    """The latest verify outcome of the run as it is now (one older than metadata.json is stale)."""
    for path in (layout.verification, layout.root / "verify.json"):
        try:
            current = path.stat().st_mtime_ns >= layout.metadata.stat().st_mtime_ns
        except OSError:
            continue
        report = _json(path)
        if current and report is not None:
            return report
    return None


def run_state(layout: RunLayout, verify: dict | None = None) -> tuple[str, int | None]:
    """(state, epochs done) of a run directory, from its JSON files only (``verify``: its
    latest_verification, when the caller has already read it)."""
    metadata = _json(layout.metadata)
    verify = verify if verify is not None else latest_verification(layout)
    if metadata is not None:
        if metadata.get("diverged_at_epoch") is not None:
            state = f"diverged at epoch {metadata['diverged_at_epoch']}"
        elif verify is not None and not verify.get("ok", False):
            state = "verification failed"
        elif metadata.get("stopped_at_epoch") is not None:
            state = f"stopped early at epoch {metadata['stopped_at_epoch']}" + (", verified" if verify else "")
        elif verify is not None and not verify.get("ok", False):
            state = "verification failed"
        elif metadata.get("source") == "converted":
            state = "converted from legacy"
        else:
            state = "complete" + (", verified" if verify is not None else "")
        return state, len(metadata.get("train_losses", []))
    progress = _json(layout.resume_dir / "training_state.json")
    if progress is not None and isinstance(progress.get("epoch"), int):
        return "in progress / resumable", progress["epoch"] + 1
    if layout.checkpoint_files():
        return "in progress", max(layout.checkpoint_files()) + 1
    return "empty", None


def inspect_run(run_dir: Path) -> dict:
    layout = RunLayout(run_dir)
    metadata = _json(layout.metadata) or {}
    config = _json(layout.config) or {}
    verification = latest_verification(layout)
    state, done = run_state(layout, verification)
    final = _file_summary(layout.final_model) if layout.final_model.exists() else None
    return {
        "format": "grokpipe run directory",
        "path": str(run_dir),
        "state": state,
        "source": metadata.get("source", "trained" if metadata else None),
        "model_name": config.get("model_name"),
        "prime": config.get("prime"),
        "seed": config.get("seed"),
        "operation": (config.get("task") or {}).get("operation", "add") if config else None,
        "sweep_cell": config.get("sweep_cell") or None,
        "training": config.get("training"),
        "config": _config_summary(config.get("hooked_transformer_config")),
        "epochs_done": done,
        "checkpoint_epochs": list(layout.checkpoint_files()),
        "final_train_loss": metadata.get("final_train_loss"),
        "final_test_loss": metadata.get("final_test_loss"),
        "grokking_epoch": metadata.get("grokking_epoch"),
        "grokking_threshold": metadata.get("grokking_threshold"),
        "memorization_epoch": metadata.get("memorization_epoch"),
        "final_train_accuracy": metadata.get("final_train_accuracy"),
        "final_test_accuracy": metadata.get("final_test_accuracy"),
        "diverged_at_epoch": metadata.get("diverged_at_epoch"),
        "stop_reason": metadata.get("stop_reason"),
        "noisy_labels": len(metadata["noisy_indices"]) if metadata.get("noisy_indices") else None,
        "verification_problems": (verification or {}).get("problems"),
        "final_model": final,
    }


def inspect_legacy(path: Path) -> dict:
    """A legacy pickle, read and checked as ``convert`` reads it, tensor data memory-mapped, not read."""
    from ..io.legacy import read_legacy

    run = read_legacy(path, mmap=True)
    return {
        "format": "legacy pickle (read through grokpipe's restricted loader)",
        "path": str(path),
        "prime": run.prime,
        "config": _config_summary(run.config),
        "checkpoint_epochs": run.checkpoint_epochs,
        "epochs_done": len(run.train_losses),
        "final_train_loss": run.train_losses[-1],
        "final_test_loss": run.test_losses[-1],
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in run.model.items()
        },
    }


def inspect_export(path: Path) -> dict:
    """A ``grokpipe export`` directory: its name parts, source, epoch, losses and model file."""
    from ..export import EXPORT_META, verify_export

    meta = _json(path / EXPORT_META) or {}
    lora = meta.get("training_type") == "lora"
    return {
        "format": "grokpipe LoRA adapter directory (PEFT)" if lora else "grokpipe export (model directory)",
        "path": str(path),
        "name": meta.get("name"),
        "name_parts": meta.get("name_parts"),
        "source": (meta.get("source") or {}).get("run"),
        "epoch": meta.get("epoch"),
        "which": meta.get("which"),
        "parameters": meta.get("parameters"),
        "losses": meta.get("losses"),
        "grokking_epoch": meta.get("grokking_epoch"),
        "state": "ok" if not (problems := verify_export(path)) else "damaged",
        "problems": problems,
        **_model_or_adapter(path, meta),
    }


def _model_or_adapter(path: Path, meta: dict) -> dict:
    """An export's model file, or a LoRA directory's base, target task, rank and adapter file."""
    from ..export import MODEL_FILE
    from ..lifecycle.adapter_dir import ADAPTER_MODEL

    if (path / MODEL_FILE).is_file():
        return {"final_model": _file_summary(path / MODEL_FILE)}
    lora = meta.get("lora") or {}
    return {
        "base": (meta.get("base") or {}).get("name"),
        "target_operation": (meta.get("target") or {}).get("operation"),
        "rank": lora.get("rank"),
        "alpha": lora.get("alpha"),
        "target_parameters": lora.get("target_parameters"),
        "adapter": _file_summary(path / ADAPTER_MODEL),
    }


def inspect_consolidated(path: Path) -> dict:
    """A ``grokpipe consolidate`` output directory: its record and model file."""
    from ..consolidate import MODEL_FILE, RECORD_FILE

    record = _json(path / RECORD_FILE) or {}
    source = record.get("source") or {}
    return {
        "format": "consolidated checkpoint (grokpipe consolidate)",
        "path": str(path),
        "source": f"{source.get('format')} at {source.get('path')}",
        "tensor_count": record.get("tensor_count"),
        "non_tensor_entries": record.get("non_tensor_entries"),
        "final_model": _file_summary(path / MODEL_FILE),
    }


def inspect_path(path: str | Path) -> dict:
    from ..consolidate import RECORD_FILE
    from ..export import is_export
    from ..lifecycle.adapter_dir import is_lora_dir

    path = Path(path)
    if path.is_dir() and (is_export(path) or is_lora_dir(path) and (path / "export_meta.json").is_file()):
        return inspect_export(path)
    if path.is_dir() and (path / RECORD_FILE).is_file():
        return inspect_consolidated(path)
    if path.is_dir():
        return inspect_run(path)
    if not path.exists():
        raise GrokpipeError(f"{path}: no such file or run directory")
    regular_file(path)  # a FIFO or device is refused, never opened
    if path.suffix == ".safetensors":
        return _file_summary(path)
    return inspect_legacy(path)


def config_value(config: dict, key: str):
    """The value of ``key`` (``prime``, ``seed``, ``model_name`` or a dotted ``training.*``,
    ``model.*``, ``task.*`` key) in a run's config.json (absent keys, as in runs written before
    the key existed: the schema's default)."""
    section, _, name = key.partition(".")
    if not name:
        return config.get(key)
    values = config.get(section) or {}
    return values[name] if name in values else _schema_default(section, name)


@functools.cache
def _schema_default(section: str, name: str):
    from ..config import load_schema

    return load_schema()["properties"].get(section, {}).get("properties", {}).get(name, {}).get("default")


def matches(value, wanted: str) -> bool:
    """Whether a config value equals a value written on the command line (numbers by value)."""
    from ..sweep import format_value

    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    return wanted == format_value(value) or wanted == str(value)


def parse_filters(filters: list[str]) -> list[tuple[str, str]]:
    """``KEY=VALUE`` strings as (key, value) pairs; a malformed one is an error naming it."""
    pairs = []
    for text in filters:
        key, sep, value = text.partition("=")
        if not sep or not key or not value:
            raise GrokpipeError(f"--where {text!r}: expected KEY=VALUE, e.g. training.weight_decay=0.3")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _run_dirs(results_dir: Path):
    """(model directory, run directory) of every run under a results tree, or under one model
    directory (results/{model_name}) when that is what is given."""
    model_dirs = [results_dir] if any(_is_run_of(d, results_dir) for d in results_dir.iterdir()) else []
    model_dirs = model_dirs or sorted(p for p in results_dir.iterdir() if p.is_dir())
    for model_dir in model_dirs:
        for run_dir in model_dir.iterdir():
            if _is_run_of(run_dir, model_dir):
                yield run_dir


def _is_run_of(run_dir: Path, model_dir: Path) -> bool:
    named = RUN_DIR_RE.match(run_dir.name)
    return bool(named) and named["model_name"] == model_dir.name and run_dir.is_dir()


def list_runs(results_dir: str | Path, where: list[tuple[str, str]] = ()) -> list[dict]:
    """Every run directory under ``results_dir`` (``{model_name}/{model_name}_p{prime}_seed{seed}``,
    or the runs of one ``results/{model_name}``) whose config.json has every ``(key, value)`` of
    ``where`` (:func:`config_value`, e.g. ``("training.weight_decay", "0.3")``)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise GrokpipeError(f"{results_dir}: no such results directory")
    rows = []
    for run_dir in _run_dirs(results_dir):
        named = RUN_DIR_RE.match(run_dir.name)
        layout = RunLayout(run_dir)
        config = _json(layout.config) or {}
        if not all(matches(config_value(config, key), value) for key, value in where):
            continue
        state, done = run_state(layout)
        metadata = _json(layout.metadata) or {}
        rows.append(
            {
                "model_name": named["model_name"],
                "prime": int(named["prime"]),
                "seed": int(named["seed"]),
                "operation": config_value(config, "task.operation") if config else None,
                "sweep_cell": config.get("sweep_cell") or {},
                "epochs_done": done,
                "num_epochs": metadata.get("num_epochs"),
                "state": state,
                "grokking_epoch": metadata.get("grokking_epoch"),
                "final_test_loss": metadata.get("final_test_loss"),
                "path": str(run_dir),
            }
        )
    return sorted(rows, key=lambda r: (r["model_name"], r["prime"], r["seed"]))


def format_inspection(info: dict) -> str:
    """Human-readable text of an inspect_path() result."""
    lines = [f"=== {info['format']} ===", f"path: {info['path']}"]
    for key in (
        "state",
        "name",
        "epoch",
        "which",
        "parameters",
        "losses",
        "tensor_count",
        "diverged_at_epoch",
        "source",
        "model_name",
        "prime",
        "seed",
        "operation",
        "sweep_cell",
        "epochs_done",
        "final_train_loss",
        "final_test_loss",
        "final_train_accuracy",
        "final_test_accuracy",
        "grokking_epoch",
        "grokking_threshold",
        "memorization_epoch",
        "stop_reason",
        "noisy_labels",
        "base",
        "target_operation",
        "rank",
        "alpha",
        "target_parameters",
        "bytes",
    ):
        if info.get(key) is not None:
            lines.append(f"{key}: {info[key]}")
    problems = info.get("verification_problems") or info.get("problems")
    if problems:
        lines.append("verification problems:")
        lines += [f"  {problem}" for problem in problems]
    if info.get("training"):
        lines.append("training: " + ", ".join(f"{k}={v}" for k, v in info["training"].items()))
    if info.get("config"):
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    epochs = info.get("checkpoint_epochs")
    if epochs is not None:
        shown = epochs if len(epochs) <= 6 else [*epochs[:3], "...", *epochs[-2:]]
        lines.append(f"checkpoints: {len(epochs)} ({', '.join(map(str, shown))})")
    if info.get("keys"):
        lines.append("keys: " + ", ".join(info["keys"]))
    file_info = info.get("final_model") or info.get("adapter") or info
    if file_info.get("header_metadata"):
        lines.append("header: " + ", ".join(f"{k}={v}" for k, v in file_info["header_metadata"].items()))
    if file_info.get("tensors"):
        lines.append("tensors:")
        lines += [f"  {name:<28} {t['dtype']:<8} {t['shape']}" for name, t in file_info["tensors"].items()]
    return "\n".join(lines)


def format_listing(rows: list[dict]) -> str:
    width = max([16, *(len(r["model_name"]) for r in rows)])
    header = f"{'model_name':<{width}} {'p':>5} {'seed':>5} {'epochs':>13} {'grokked at':>10} {'test loss':>10}  state"
    lines = [header]
    for r in rows:
        epochs = f"{r['epochs_done'] if r['epochs_done'] is not None else '-'}/{r['num_epochs'] or '?'}"
        grok = "-" if r["grokking_epoch"] is None else str(r["grokking_epoch"])
        loss = "-" if r["final_test_loss"] is None else f"{r['final_test_loss']:.3g}"
        run = f"{r['model_name']:<{width}} {r['prime']:>5} {r['seed']:>5}"
        lines.append(f"{run} {epochs:>13} {grok:>10} {loss:>10}  {r['state']}")
    return "\n".join(lines)


def format_exports(rows: list[dict]) -> str:
    header = f"{'name':<44} {'epoch':>7} {'which':>8} {'test loss':>10}  source run"
    lines = [header]
    for r in rows:
        loss = "-" if r["test_loss"] is None else f"{r['test_loss']:.3g}"
        lines.append(f"{r['name']:<44} {r['epoch']:>7} {r['which']:>8} {loss:>10}  {r['source_run']}")
    return "\n".join(lines)
