"""``grokpipe consolidate``: a checkpoint from another trainer (Hugging Face sharded safetensors or
``.bin``, a single model file, torch.distributed.checkpoint, DeepSpeed ZeRO 1/2/3) into one
self-contained ``model.safetensors`` with a ``consolidation.json`` record.

The output directory is built in a staging directory beside it and renamed into place, so bad
input (found while the source is described, before anything is written) or a crash leaves nothing
in it. Tensors stream from the source into the file one at a time (see
:mod:`grokpipe.io.safetensors_stream`); the source files are hashed on a second thread meanwhile.
There is deliberately no pickle output.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ._version import __version__
from .errors import GrokpipeError
from .io.atomic import (
    sha256_file,
    staged_directory,
    write_bytes_atomic,
    write_json_atomic,
)
from .io.detect import checkpoint_dirs, detect
from .io.safetensors_io import consolidated_header
from .io.safetensors_stream import output_dtype, output_nbytes, verify_streamed, write_streaming
from .io.sources import CheckpointSource, dtype_name
from .writer_lock import writer_lock

log = logging.getLogger(__name__)

# Output bytes allowed per input byte: a float16 or bfloat16 source cast to float32 doubles, tied
# weights written apart double again. Above this, --max-output-ratio must say so.
MAX_OUTPUT_RATIO = 4.0
EXPANSION_SLACK_BYTES = 1 << 20  # tiny checkpoints: container overhead is not expansion

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODEL_FILE = "model.safetensors"
RECORD_FILE = "consolidation.json"
CONFIG_FILE = "config.json"
STAGING_MARKERS = (".consolidating-", ".replaced-")


def _cast(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise GrokpipeError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}") from None


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _output_bytes(source: CheckpointSource, cast: torch.dtype | None) -> int:
    return sum(output_nbytes(entry, cast) for entry in source.tensors.values())


def check_expansion(source: CheckpointSource, dtype: str | None, max_ratio: float) -> None:
    """The output may be at most ``max_ratio`` times the input (the files read). A real checkpoint
    grows only by casts to wider dtypes and by names that share one storage (tied weights): a few
    times at most. A small file claiming a huge model is refused before anything is allocated."""
    out_bytes = _output_bytes(source, _cast(dtype))
    in_bytes = sum(path.stat().st_size for path in source.files)
    if out_bytes > max_ratio * in_bytes + EXPANSION_SLACK_BYTES:
        raise GrokpipeError(
            f"{source.root}: would write {_size(out_bytes)} from {_size(in_bytes)} of input, more than "
            f"{max_ratio:g} times as much (names sharing storage, or sizes the data cannot hold); pass "
            "--max-output-ratio to allow it"
        )


def describe(source: CheckpointSource, out_dir: Path, dtype: str | None) -> str:
    """What consolidating ``source`` into ``out_dir`` reads and writes (the ``--dry-run`` text)."""
    cast = _cast(dtype)
    out_bytes = _output_bytes(source, cast)
    lines = [f"{source.root}: {source.format}" + "".join(f", {k} {v}" for k, v in source.details.items())]
    lines += [f"  reads {path} ({_size(path.stat().st_size)})" for path in source.files]
    counts: dict[str, int] = {}
    for entry in source.tensors.values():
        key = f"{dtype_name(entry.dtype)}->{dtype_name(output_dtype(entry, cast))}"
        counts[key] = counts.get(key, 0) + 1
    lines.append(
        f"  {len(source.tensors)} tensors, {_size(source.nbytes)} ({', '.join(f'{v} {k}' for k, v in counts.items())})"
    )
    if source.extras:
        lines.append(f"  non-tensor entries: {', '.join(sorted(source.extras))}")
    lines.append(f"  would write {out_dir / MODEL_FILE} ({_size(out_bytes)}), {out_dir / RECORD_FILE}")
    if source.config is not None:
        lines.append(f"  would copy {source.config} to {out_dir / CONFIG_FILE}")
    return "\n".join(lines)


def _record(source: CheckpointSource, dtype: str | None, hashes: dict[Path, str], model_bytes: int, copied):
    """consolidation.json: where the weights came from and what was done to them."""
    cast = _cast(dtype)
    files = [
        {"path": str(path.relative_to(source.root)), "bytes": path.stat().st_size, "sha256": hashes[path]}
        for path in source.files
    ]
    return {
        "grokpipe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"format": source.format, "path": str(source.root.resolve()), **source.details, "files": files},
        "output": {
            "file": MODEL_FILE,
            "bytes": model_bytes,
            "verified": "every tensor read back and compared with the source"
            + (f" cast to {dtype} (see cast_changes)" if dtype else ""),
        },
        "dtype": dtype or "as the source",
        "tensor_count": len(source.tensors),
        "tensor_bytes": _output_bytes(source, cast),
        "tensors": {
            name: {
                "dtype": dtype_name(output_dtype(entry, cast)),
                "source_dtype": dtype_name(entry.dtype),
                "shape": list(entry.shape),
            }
            for name, entry in source.tensors.items()
        },
        "config": copied,  # the copied config.json: its source and sha256
        "non_tensor_entries": source.extras,
    }


def _write(source: CheckpointSource, directory: Path, dtype: str | None, allow_overflow: bool) -> dict:
    """Everything of one consolidated checkpoint into the (staging) ``directory``."""
    cast = _cast(dtype)
    metadata = consolidated_header(source.format, str(source.root.resolve()), dtype or "as the source")
    model = directory / MODEL_FILE
    # The sources are hashed on a second thread beside the copy and the read-back (hashlib frees
    # the GIL). The output is not hashed: the read-back already compares every byte of it.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = {path: pool.submit(sha256_file, path) for path in source.files}
        changes = write_streaming(
            model, source.tensors, source.read, cast, metadata, raw=source.raw, allow_overflow=allow_overflow
        )
        verify_streamed(model, source.tensors, source.read, cast)
        hashes = {path: future.result() for path, future in pending.items()}
    copied = None
    if source.config is not None:  # a regular file inside the input (checked when it was found)
        config_bytes = source.config.read_bytes()
        copied = {
            "file": CONFIG_FILE,
            "source": str(source.config.relative_to(source.root)),
            "bytes": len(config_bytes),
            "sha256": write_bytes_atomic(directory / CONFIG_FILE, config_bytes),
        }
    record = _record(source, dtype, hashes, model.stat().st_size, copied)
    record["cast_changes"] = changes  # per tensor: values the cast turned into inf or zero
    write_json_atomic(directory / RECORD_FILE, record)
    return record


def _write_into_place(
    source: CheckpointSource, out_dir: Path, dtype: str | None, force: bool, allow_overflow: bool = False
) -> dict:
    """Stage, write and rename one consolidated checkpoint (the caller holds the writer lock)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise GrokpipeError(f"{out_dir}: already exists; pass --force to replace it (nothing was written)")
    with staged_directory(out_dir, "consolidating", STAGING_MARKERS) as staging:
        record = _write(source, staging, dtype, allow_overflow)
    log.info("consolidated %s (%s, %d tensors) -> %s", source.root, source.format, len(source.tensors), out_dir)
    return record


def _check_apart(source: Path, out_dir: Path) -> None:
    """Inputs are never modified: OUT_DIR may not be INPUT, lie inside it, or contain it."""
    src, out = source.resolve(), out_dir.resolve()
    if out == src or out.is_relative_to(src) or src.is_relative_to(out):
        raise GrokpipeError(f"{out_dir}: must not be {source}, inside it or around it (inputs are never modified)")
    if Path.cwd().resolve().is_relative_to(out):  # replacing it would replace the directory we work in
        raise GrokpipeError(f"{out_dir}: is the working directory or contains it; name a new directory for the output")


def consolidate(
    input_dir,
    out_dir,
    dtype: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    max_output_ratio: float = MAX_OUTPUT_RATIO,
    allow_overflow: bool = False,
):
    """Consolidate one checkpoint directory into ``out_dir``; returns the record (or the
    ``--dry-run`` description)."""
    _cast(dtype)
    _check_apart(Path(input_dir), Path(out_dir))
    source = detect(Path(input_dir))
    check_expansion(source, dtype, max_output_ratio)
    if dry_run:
        return describe(source, Path(out_dir), dtype)
    with writer_lock(out_dir, "consolidate"):
        return _write_into_place(source, Path(out_dir), dtype, force, allow_overflow)


def consolidate_all(
    run_dir,
    out_dir,
    dtype=None,
    pattern=None,
    dry_run=False,
    force=False,
    progress=True,
    max_output_ratio: float = MAX_OUTPUT_RATIO,
    allow_overflow: bool = False,
):
    """Every ``checkpoint-N``/``global_stepN`` of ``run_dir`` into ``out_dir/{name}_step_{N}/``.
    All checkpoints are described (and so checked) before the first is written."""
    _cast(dtype)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_apart(run_dir, out_dir)
    name = run_dir.resolve().name
    plans = [(detect(path), out_dir / f"{name}_step_{step}") for step, path in checkpoint_dirs(run_dir, pattern)]
    for source, _ in plans:
        check_expansion(source, dtype, max_output_ratio)
    if dry_run:
        return "\n".join(describe(source, target, dtype) for source, target in plans)
    if not force:
        existing = [target for _, target in plans if target.exists()]
        if existing:
            raise GrokpipeError(f"{existing[0]}: already exists; pass --force to replace it (nothing was written)")
    from tqdm import tqdm

    with writer_lock(out_dir, "consolidate"):  # one lock, beside OUT_DIR, for all of it
        bar = tqdm(plans, desc="consolidating", unit="checkpoint", disable=not progress)
        return [_write_into_place(source, target, dtype, force, allow_overflow) for source, target in bar]
