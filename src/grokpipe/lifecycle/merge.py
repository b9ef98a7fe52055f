"""``grokpipe merge``: a LoRA directory folded into an ordinary export, ``W + (alpha/r)·B@A``.

The merged directory is named as the adapter with ``merged`` for ``lora`` and holds what every
export holds (model.safetensors, config.json, tokenizer.json, export_meta.json, loss_curve.png,
README.md), so everything that loads exports loads it. It is built in a staging directory beside
it and renamed into place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .._version import __version__
from ..errors import GrokpipeError
from ..export import MODEL_FILE, STAGING_MARKERS, model_config, parameter_count, tokenizer_json
from ..io.atomic import (
    sha256_file,
    staged_directory,
    write_bytes_atomic,
    write_json_atomic,
)
from ..io.safetensors_io import read_metadata, write_verified_model_file
from ..loading import EXPORT_META, read_json
from ..writer_lock import writer_lock
from .adapter_dir import ADAPTER_MODEL, merged_name, read_adapter

log = logging.getLogger(__name__)


def merge(lora_dir: str | Path, *, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the merge of ``lora_dir`` into ``out`` (default: beside it); returns the directory.

    Args:
        lora_dir: a finished ``grokpipe finetune`` directory (checked as :func:`read_adapter` does).
        out: the parent directory of the merged export.
        force: replace an existing merge of another adapter file.

    Returns:
        ``out/{arch}-{size}-{source}-to-{target}-merged-.../``.

    Example:
        >>> merge("models/tl1l-227K-modadd31-to-modsub31-lora-s0-e2999-c1a2b3c4d-r4-f0-l0f1e2d3c")
    """
    from ..analysis.plots import plot_run

    adapter = read_adapter(lora_dir)
    out = Path(out) if out is not None else adapter.path.parent
    if out.exists() and not out.is_dir():
        raise GrokpipeError(f"{out}: not a directory (--out names the parent directory of the merged export)")
    name = merged_name(adapter.name)
    target = out / str(name)
    adapter_sha = sha256_file(adapter.path / ADAPTER_MODEL)
    with writer_lock(target, "merge"):
        if target.exists():
            existing = _existing(target)
            if existing == adapter_sha:
                log.info("%s already holds the merge of %s", target, adapter.path)
                return target
            if not force:
                raise GrokpipeError(f"{target}: already exists; pass --force to replace it (nothing was written)")
        state = adapter.merged_state_dict()
        with staged_directory(target, "exporting", STAGING_MARKERS) as staging:
            operation = adapter.meta["target"]["operation"]
            base_header = read_metadata(adapter.base.path / MODEL_FILE)
            header = {
                **base_header,
                "source": "merged",
                "operation": operation,
                "export_name": str(name),
                "merged_from": adapter.path.name,
                "adapter_sha256": adapter_sha,
                "base_sha256": adapter.base.sha256,
            }
            hashes = {MODEL_FILE: write_verified_model_file(staging / MODEL_FILE, state, header, "merge")}
            config = model_config(adapter.base.hooked, adapter.base.prime, operation)
            hashes["config.json"] = write_json_atomic(staging / "config.json", config)
            tokenizer = tokenizer_json(adapter.base.prime).encode()
            hashes["tokenizer.json"] = write_bytes_atomic(staging / "tokenizer.json", tokenizer)
            meta = _merged_meta(adapter, name, adapter_sha, parameter_count(state))
            curves = {
                "model_name": f"merged LoRA {adapter.base.operation} -> {operation}",
                "prime": adapter.base.prime,
                "seed": adapter.meta["settings"]["seed"],
                **{k: adapter.meta[k] for k in ("train_losses", "test_losses", "grokking_epoch", "grokking_threshold")},
            }
            plot_run(curves, staging / "loss_curve.png")
            hashes["loss_curve.png"] = sha256_file(staging / "loss_curve.png")
            hashes["README.md"] = write_bytes_atomic(staging / "README.md", _model_card(meta).encode())
            meta["files"] = dict(sorted(hashes.items()))
            write_json_atomic(staging / EXPORT_META, meta)
    log.info("merged %s -> %s", adapter.path, target)
    return target


def _existing(target: Path) -> str | None:
    """The adapter file hash an existing merged directory was made from (None: not a merge)."""
    try:
        return (read_json(target / EXPORT_META).get("lora") or {}).get("adapter_sha256")
    except GrokpipeError:
        return None


def _merged_meta(adapter, name, adapter_sha: str, count: int) -> dict:
    from ..bridge import transformer_lens_version

    base_meta = adapter.base.meta
    return {
        "name": str(name),
        "name_parts": asdict(name),
        "training_type": "merged",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # an export's source: the run the base weights come from
        "source": {**(base_meta.get("source") or {}), "kind": "merged"},
        "epoch": base_meta.get("epoch"),
        "which": "merged",
        "parameters": count,
        "losses": adapter.meta["losses"],  # the fine-tune's last epoch, on the target task
        "grokking_epoch": adapter.meta["grokking_epoch"],
        "grokking_threshold": adapter.meta["grokking_threshold"],
        "training": base_meta.get("training"),
        "base": adapter.meta["base"],
        "target": adapter.meta["target"],
        "lora": {
            "directory": adapter.path.name,
            "path": str(adapter.path.resolve()),
            "adapter_sha256": adapter_sha,
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "target_parameters": adapter.targets,
            "rule": "W + (lora_alpha / r) * B_h @ A_h per targeted matrix (docs/lora.md)",
        },
        "versions": {
            "grokpipe": __version__,
            "torch": torch.__version__,
            "transformer_lens": transformer_lens_version(),
        },
    }


def _model_card(meta: dict) -> str:
    target, lora = meta["target"], meta["lora"]
    test = meta["losses"]["test"]
    return f"""# {meta["name"]}

The LoRA adapter `{lora["directory"]}` (rank {lora["rank"]}, alpha {lora["alpha"]:g}) merged into its base
`{meta["base"]["name"]}`: every targeted matrix is `W + (alpha / r) · B @ A`. A TransformerLens
transformer computing `{target["formula"]} mod {target["prime"]}` (operation `{target["operation"]}`).

| | |
|---|---|
| parameters | {meta["parameters"]:,} |
| test loss (the fine-tune's last epoch) | {"not evaluated" if test is None else f"{test:.6g}"} |
| first fine-tune epoch with test loss < {meta["grokking_threshold"]} | {meta["grokking_epoch"]} |

![loss curve](loss_curve.png)

```python
import grokpipe
model = grokpipe.load_model("{meta["name"]}")  # HookedTransformer (TL 3) / TransformerBridge (TL 4)
```
"""
