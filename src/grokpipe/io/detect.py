"""Which trainer wrote a checkpoint directory, told by its content, and the checkpoints of a run.

Order of precedence, for a directory that holds several: DeepSpeed ZeRO (``latest`` or ZeRO
optimizer states; its fp32 master weights are the most precise copy), torch.distributed.checkpoint
(``.metadata``), then Hugging Face as its loaders do: ``model.safetensors``, its index,
``pytorch_model.bin``, its index. A single model file is read as what its bytes are (a zip archive
is a ``torch.save`` pickle, anything else must parse as safetensors), whatever its name says.
"""

from __future__ import annotations

import fnmatch
import os
import re
import zipfile
from pathlib import Path

from ..errors import GrokpipeError
from .paths import regular_file

# The format readers (and torch) are imported by detect() only: the Snakefile imports this module
# for holds_checkpoint_dirs when it parses.
CHECKPOINT_DIR_RE = re.compile(r"^(?:checkpoint-|global_step)(\d+)$")


def detect(root: str | Path):
    """The checkpoint in directory ``root`` (or the one model file ``root``) as a
    :class:`~grokpipe.io.sources.CheckpointSource`, described (headers, indexes and pickled
    metadata read and checked; no tensor data)."""
    from . import hf
    from .dcp import METADATA, dcp_source
    from .deepspeed import _OPTIM_RE, deepspeed_source

    def single_file(path: Path):  # read as what its bytes are, whatever its name says
        reader = hf.bin_source if zipfile.is_zipfile(path) else hf.safetensors_source
        return reader(path.parent, None, path.name)

    root = Path(root)
    if os.path.exists(root) and not root.is_dir():
        return single_file(regular_file(root))
    if not root.is_dir():
        raise GrokpipeError(f"{root}: no such checkpoint directory or model file")
    if (root / "latest").is_file() or any(_OPTIM_RE.match(p.name) for p in root.iterdir()):
        return deepspeed_source(root)
    if (root / METADATA).is_file():
        return dcp_source(root)
    for name in (hf.SINGLE_SAFETENSORS, hf.SINGLE_BIN):
        if os.path.lexists(root / name):
            return single_file(regular_file(root / name, root=root))
    if (root / hf.SAFETENSORS_INDEX).is_file():
        return hf.safetensors_source(root, root / hf.SAFETENSORS_INDEX)
    if (root / hf.BIN_INDEX).is_file():
        return hf.bin_source(root, root / hf.BIN_INDEX)
    raise GrokpipeError(
        f"{root}: no checkpoint found (looked for DeepSpeed 'latest'/ZeRO states, DCP '.metadata', "
        f"{hf.SINGLE_SAFETENSORS}, {hf.SAFETENSORS_INDEX}, {hf.SINGLE_BIN}, {hf.BIN_INDEX})"
    )


def holds_checkpoint_dirs(path: str | Path) -> bool:
    """Whether ``path`` is a run directory of ``checkpoint-N``/``global_stepN`` directories (and
    not itself one checkpoint): what ``--all-checkpoints`` consolidates."""
    path = Path(path)
    if not path.is_dir() or CHECKPOINT_DIR_RE.match(path.name):
        return False
    return any(CHECKPOINT_DIR_RE.match(entry.name) and entry.is_dir() for entry in path.iterdir())


def checkpoint_dirs(run_dir: str | Path, pattern: str | None = None) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``checkpoint-N`` / ``global_stepN`` directly under ``run_dir``
    whose name matches the glob ``pattern``, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GrokpipeError(f"{run_dir}: not a directory")
    found = []
    for entry in run_dir.iterdir():
        match = CHECKPOINT_DIR_RE.match(entry.name)
        if match and entry.is_dir() and (pattern is None or fnmatch.fnmatch(entry.name, pattern)):
            if not entry.resolve().is_relative_to(run_dir.resolve()):
                raise GrokpipeError(f"{entry}: a link that leaves {run_dir}; refused")
            found.append((int(match.group(1)), entry))
    steps = [step for step, _ in found]
    if len(set(steps)) != len(steps):
        duplicate = next(s for s in steps if steps.count(s) > 1)
        both = sorted(path.name for step, path in found if step == duplicate)
        raise GrokpipeError(f"{run_dir}: step {duplicate} is in more than one directory ({', '.join(both)})")
    if not found:
        what = f" matching {pattern!r}" if pattern else ""
        raise GrokpipeError(f"{run_dir}: no checkpoint-N or global_stepN directories{what}")
    return sorted(found)
