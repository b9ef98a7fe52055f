"""Where each file of a run lives (REQ_002's layout).

::

    {results}/{model_name}/{model_name}_p{prime}_seed{seed}/
        {model_name}_p{prime}_seed{seed}.safetensors   final model
        checkpoints/checkpoint_epoch_{epoch:05d}.safetensors
        artifacts/                                      analysis outputs
        resume/                                         optimizer state for resuming (latest only)
        metadata.json                                   losses, indices, epochs, sha256 of files
        config.json                                     model config + training hyperparameters
        verification.json                               latest ``grokpipe verify`` outcome
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .config import run_name

CHECKPOINT_RE = re.compile(r"^checkpoint_epoch_(\d{5,})\.safetensors$")
RUN_DIR_RE = re.compile(r"^(?P<model_name>.+)_p(?P<prime>\d+)_seed(?P<seed>\d+)$")


def checkpoint_filename(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:05d}.safetensors"


def epoch_of_checkpoint(path: str | Path) -> int | None:
    """Epoch label of a checkpoint file name, or None when the name is not one."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def run_dir(results_dir: str | Path, model_name: str, prime: int, seed: int) -> Path:
    return Path(results_dir) / model_name / run_name(model_name, prime, seed)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (``run_name`` defaults to the directory's own name; a
    staging directory that will be renamed into place passes the final one)."""

    root: Path
    run_name: str | None = None

    @property
    def name(self) -> str:
        return self.run_name or self.root.name

    @property
    def final_model(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def resume_dir(self) -> Path:
        return self.root / "resume"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def verification(self) -> Path:
        """The latest ``grokpipe verify`` outcome (kept even when Snakemake deletes a failed report)."""
        return self.root / "verification.json"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints_dir / checkpoint_filename(epoch)

    def checkpoint_files(self) -> dict[int, Path]:
        """Checkpoint files on disk by epoch (temporary files and other names ignored)."""
        found = {}
        if self.checkpoints_dir.is_dir():
            for entry in self.checkpoints_dir.iterdir():
                epoch = epoch_of_checkpoint(entry)
                if epoch is not None and entry.is_file():
                    found[epoch] = entry
        return dict(sorted(found.items()))

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()
