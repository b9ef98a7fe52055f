"""``grokpipe export``: one epoch of a run as a standalone, self-describing model directory.

Directory name (the ``models/`` convention: ``{architecture}-{size}-{dataset}-{training_type}-{version}``)::

    tl1l-227K-modadd113-grok-s999-e24999-c1a2b3c4d[-v1]

- architecture: ``tl{n_layers}l``, a TransformerLens transformer of that many layers (``tl{n}lattn``
  when attention-only);
- size: the parameter count (every parameter, frozen biases included; buffers not): below 1,000 as
  is, then ``{n/1e3}K``, ``{n/1e6}M``, ``{n/1e9}B``, three significant digits at most (227313 -> 227K,
  1834000 -> 1.83M);
- dataset: ``mod{operation}{p}``: ``modadd113`` (a + b mod p), ``modsub113``, ``modsq_sum113``, ...
  (the operations of :mod:`grokpipe.training.tasks`);
- training_type: ``grok`` (trained on the grokking task, or converted from the demo's pickle);
- version: ``s{seed}-e{epoch}-c{config hash[:8]}`` (runs that differ only in a hyperparameter share
  p, seed and architecture; the hash tells them apart), then ``-{--version}`` when given: it names
  the run and the epoch. An existing export of another run is never replaced.

:func:`parse_export_name` reads a name back into these parts. The directory holds
``model.safetensors`` (the epoch's weights, the run's provenance in the header), ``config.json``,
``tokenizer.json`` (a Hugging Face ``tokenizers`` word-level vocabulary: ``0``..``p-1`` and ``=``),
``export_meta.json`` (source, epoch, hashes, losses, versions), ``loss_curve.png`` and a ``README.md``
model card. It is built in a staging directory beside it and renamed into place.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
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
from .io.safetensors_io import read_metadata, write_verified_model_file
from .layout import RunLayout
from .loading import EXPORT_META, load_checked_state_dict, load_config, load_metadata, read_json
from .writer_lock import writer_lock

# Two exports of one run (--grokked and --final as concurrent jobs) can name one directory: the
# second waits for the first, then finds it done.
EXPORT_LOCK_WAIT_SECONDS = 600.0

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
BUFFER_SUFFIXES = (".mask", ".IGNORE", "rotary_sin", "rotary_cos")  # HookedTransformer's buffers
STAGING_MARKERS = (".exporting-", ".replaced-")
_DATASET = r"mod[a-z_]*[a-z]\d+"
_NAME_RE = re.compile(
    rf"^(?P<architecture>tl\d+l(?:attn)?)-(?P<size>\d+(?:\.\d+)?[KMB]?)-(?P<dataset>{_DATASET}(?:-to-{_DATASET})?)-"
    r"(?P<training_type>[a-z]+)-(?P<version>s\d+-e\d+(?:-c[0-9a-f]{8})?(?:-r\d+-f\d+-l[0-9a-f]{8})?"
    r"(?:-[A-Za-z0-9][A-Za-z0-9._]*)?)$"
)
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._]*$")
_DATASET_RE = re.compile(r"^mod(?P<operation>[a-z_]*[a-z])(?P<prime>\d+)$")
_RUN_VERSION_RE = re.compile(r"^s\d+-e\d+(?:-c[0-9a-f]{8})?")
# A LoRA fine-tune and its merge name source and target task: {source}-to-{target}
ADAPTED_TYPES = ("lora", "merged")


class NeverGrokked(GrokpipeError):
    """``--grokked`` for a run whose test loss never fell below its threshold."""


@dataclass(frozen=True, order=True)
class ExportName:
    architecture: str
    size: str
    dataset: str
    training_type: str
    version: str

    def __str__(self) -> str:
        return f"{self.architecture}-{self.size}-{self.dataset}-{self.training_type}-{self.version}"

    @property
    def source_dataset(self) -> str:
        return self.dataset.split("-to-")[0]

    @property
    def operation(self) -> str:
        """The operation the base model was trained on (a LoRA's source task)."""
        return _DATASET_RE.match(self.source_dataset)["operation"]

    @property
    def target_operation(self) -> str | None:
        """The operation a LoRA fine-tune (and its merge) adapts to; None for other exports."""
        _, _, target = self.dataset.partition("-to-")
        return _DATASET_RE.match(target)["operation"] if target else None

    @property
    def prime(self) -> int:
        return int(_DATASET_RE.match(self.source_dataset)["prime"])

    @property
    def seed(self) -> int:
        return int(self.version.split("-")[0][1:])

    @property
    def epoch(self) -> int:
        return int(self.version.split("-")[1][1:])

    @property
    def run_version(self) -> str:
        """``s{seed}-e{epoch}[-c{hash}]``: the run and epoch the (base) weights come from."""
        return _RUN_VERSION_RE.match(self.version)[0]


def parse_export_name(name: str) -> ExportName:
    """The parts of an export directory name; a name that does not follow the rule is an error."""
    match = _NAME_RE.match(name)
    if match:
        from .training.tasks import OPERATIONS

        datasets = match["dataset"].split("-to-")
        adapted = len(datasets) == 2
        if any(_DATASET_RE.match(d)["operation"] not in OPERATIONS for d in datasets):
            match = None
        elif (
            adapted != (match["training_type"] in ADAPTED_TYPES)
            or len({_DATASET_RE.match(d)["prime"] for d in datasets}) != 1
        ):
            match = None  # {source}-to-{target} on one p is what a LoRA or merge is, and only they
    if not match:
        rule = "{architecture}-{size}-{dataset}-{training_type}-{version}"
        raise GrokpipeError(
            f"{name!r} is not an export name ({rule}, e.g. tl1l-227K-modadd113-grok-s999-e24999-c1a2b3c4d or "
            "tl1l-227K-modadd113-to-modsub113-lora-s999-e24999-c1a2b3c4d-r4-f0-l0f1e2d3c)"
        )
    return ExportName(**match.groupdict())


def format_size(count: int) -> str:
    """A parameter count as the name's size part: 999, 227K, 1.83M, 12.5B."""
    for divisor, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            value = count / divisor
            digits = max(0, 2 - int(math.floor(math.log10(value))))
            text = f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"
            return text + unit
    return str(count)


def parameter_count(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for name, t in state_dict.items() if not name.endswith(BUFFER_SUFFIXES))


def check_version(version: str | None) -> None:
    """A ``--version`` suffix of an export or adapter name: letters, digits, '.' and '_'."""
    if version is not None and not _VERSION_RE.match(version):
        raise GrokpipeError(f"--version {version!r}: letters, digits, '.' and '_' only (no '-', no '/')")


def export_name(
    hooked: dict,
    prime: int,
    seed: int,
    epoch: int,
    count: int,
    version: str | None,
    *,
    operation: str = "add",
    config_hash: str | None = None,
) -> ExportName:
    """The export directory name of one epoch (see the module docstring); ``config_hash``: the
    run's config hash, whose first 8 digits tell it from runs that differ only in a setting."""
    check_version(version)
    architecture = f"tl{hooked['n_layers']}l" + ("attn" if hooked.get("attn_only") else "")
    run_version = f"s{seed}-e{epoch}" + (f"-c{config_hash[:8]}" if config_hash else "")
    run_version += f"-{version}" if version else ""
    return ExportName(architecture, format_size(count), f"mod{operation}{prime}", "grok", run_version)


def choose_epoch(layout: RunLayout, metadata: dict, which: str, epoch: int | None) -> tuple[int, Path]:
    """``(epoch, file)`` for ``--epoch E``, ``--grokked`` (the first checkpoint at or after the
    grokking epoch) or ``--final``."""
    checkpoints = layout.checkpoint_files()
    final_epoch = metadata.get("final_epoch", len(metadata.get("train_losses", [])) - 1)
    if which == "final":
        if not layout.final_model.exists():
            raise GrokpipeError(f"{layout.root}: no final model (the run is unfinished?); export an --epoch instead")
        return final_epoch, layout.final_model
    if which == "grokked":
        grok = metadata.get("grokking_epoch")
        if grok is None:
            losses = [x for x in metadata.get("test_losses", []) if x is not None]
            lowest = f"; its lowest test loss is {min(losses):.4g}" if losses else ""
            raise NeverGrokked(
                f"{layout.root}: the run never grokked (test loss never fell below "
                f"{metadata.get('grokking_threshold')}{lowest}); export --final or an --epoch instead"
            )
        after = [e for e in checkpoints if e >= grok]
        if after:
            return after[0], checkpoints[after[0]]
        return final_epoch, layout.final_model
    if epoch in checkpoints:
        return epoch, checkpoints[epoch]
    if epoch == final_epoch and layout.final_model.exists():
        return epoch, layout.final_model
    nearest = sorted(checkpoints, key=lambda e: abs(e - epoch))[:3]
    raise GrokpipeError(f"{layout.root}: no checkpoint for epoch {epoch}; nearest: {sorted(nearest)}")


def tokenizer_json(prime: int) -> str:
    """Our vocabulary as a Hugging Face ``tokenizers`` file: ``"a b ="`` encodes to ``[a, b, p]``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {str(i): i for i in range(prime)} | {"=": prime}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="="))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return tokenizer.to_str(pretty=True)


def model_config(hooked: dict, prime: int, operation: str = "add") -> dict:
    """config.json: readable in the Hugging Face style, with the full HookedTransformerConfig."""
    from .training.tasks import operation as task

    return {
        "architectures": ["HookedTransformer"],
        "model_type": "transformer_lens",
        "task": f"logits over c = ({task(operation).formula}) mod p at the last position of [a, b, =]",
        "operation": operation,
        "prime": prime,
        "input_format": ["a", "b", "="],
        "vocab_size": hooked["d_vocab"],
        "output_size": hooked["d_vocab_out"],
        "num_hidden_layers": hooked["n_layers"],
        "hidden_size": hooked["d_model"],
        "num_attention_heads": hooked["n_heads"],
        "head_dim": hooked["d_head"],
        "intermediate_size": hooked.get("d_mlp"),
        "hidden_act": hooked.get("act_fn"),
        "max_position_embeddings": hooked["n_ctx"],
        "normalization_type": hooked.get("normalization_type"),
        "torch_dtype": hooked.get("dtype", "float32"),
        "hooked_transformer_config": hooked,
    }


def _model_card(name: ExportName, meta: dict) -> str:
    """The export's README.md: Markdown, with the code to load it in a fenced block."""
    from .training.tasks import operation

    task = operation(name.operation)
    losses = meta["losses"]
    grok = meta["grokking_epoch"]
    versions = " / ".join(str(meta["versions"][k]) for k in ("grokpipe", "torch", "transformer_lens"))
    test = "not evaluated at this epoch" if losses["test"] is None else f"{losses['test']:.6g}"
    return f"""# {name}

A one-run, one-epoch export of a grokpipe run: a TransformerLens transformer trained on
`{task.formula} mod {name.prime}` (operation `{task.name}`; `add` is the TransformerLens grokking demo's task).

| | |
|---|---|
| source run | `{meta["source"]["run"]}` ({meta["source"]["kind"]}) |
| epoch | {meta["epoch"]} ({meta["which"]}) |
| parameters | {meta["parameters"]:,} |
| train loss at this epoch | {losses["train"]:.6g} |
| test loss at this epoch | {test} |
| grokking epoch | {grok if grok is not None else "never (test loss stayed above the threshold)"} |
| grokpipe / torch / TransformerLens | {versions} |

![loss curve](loss_curve.png)

Input: the token ids `[a, b, p]` (`tokenizer.json`: `"a b ="`); output: logits over the {name.prime}
classes at the last position. Load with:

```python
import grokpipe
model = grokpipe.load_model("{name}")  # HookedTransformer (TL 3) / TransformerBridge (TL 4)
```

`export_meta.json` holds the sha256 of the source checkpoint and of every file here.
"""


def export(run_dir, out="models", which: str = "final", epoch: int | None = None, version=None, force=False) -> Path:
    """Export one epoch of ``run_dir`` into ``out/{name}/``; returns the directory."""
    from .analysis.plots import plot_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GrokpipeError(f"{run_dir}: not a run directory")
    layout = RunLayout(run_dir)
    metadata, config = load_metadata(run_dir), load_config(run_dir)
    chosen, source_file = choose_epoch(layout, metadata, which, epoch)
    # The run's own file as written (hash and header checked), never a link to another run's.
    state = load_checked_state_dict(run_dir, None if source_file == layout.final_model else chosen, metadata=metadata)
    hooked = config["hooked_transformer_config"]
    prime, seed = int(config["prime"]), int(config["seed"])
    count = parameter_count(state)
    operation = config.get("task", {}).get("operation", "add")
    # The config hash in the name: runs that differ only in a hyperparameter never share a name.
    name = export_name(
        hooked, prime, seed, chosen, count, version, operation=operation, config_hash=config.get("config_hash")
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GrokpipeError(f"{out}: not a directory (--out names the parent directory of exports)")
    target = out / str(name)
    source_sha = sha256_file(source_file)
    with writer_lock(target, "export", wait=EXPORT_LOCK_WAIT_SECONDS):
        if os.path.lexists(target):
            existing = _existing_source(target)
            if existing.get("run") != str(run_dir.resolve()):
                holder = (
                    f"an export of another run ({existing['run']})" if existing.get("run") else "no export of this run"
                )
                raise GrokpipeError(
                    f"{target}: holds {holder}; it is never replaced, even with --force: remove it, or give "
                    "this export a --version"
                )
            if existing.get("sha256") == source_sha and existing.get("epoch") == chosen:
                log.info("%s already holds this export of %s epoch %d", target, run_dir, chosen)
                return target  # the same file of the same run: nothing to do
            if not force:
                raise GrokpipeError(f"{target}: already exists; pass --force to replace it (nothing was written)")
        with staged_directory(target, "exporting", STAGING_MARKERS) as staging:
            header = {
                **read_metadata(source_file),
                "source": "exported",
                "exported_from": str(source_file.resolve()),
                "export_name": str(name),
            }
            hashes = {MODEL_FILE: write_verified_model_file(staging / MODEL_FILE, state, header, "export")}
            hashes["config.json"] = write_json_atomic(staging / "config.json", model_config(hooked, prime, operation))
            hashes["tokenizer.json"] = write_bytes_atomic(staging / "tokenizer.json", tokenizer_json(prime).encode())
            plot_run(metadata, staging / "loss_curve.png", mark_epoch=chosen)
            hashes["loss_curve.png"] = sha256_file(staging / "loss_curve.png")
            meta = _export_meta(run_dir, metadata, config, source_file, chosen, which, name, count)
            card = _model_card(name, meta)
            hashes["README.md"] = write_bytes_atomic(staging / "README.md", card.encode())
            meta["files"] = dict(sorted(hashes.items()))
            write_json_atomic(staging / EXPORT_META, meta)
    log.info("exported %s epoch %d -> %s", run_dir, chosen, target)
    return target


def _existing_source(target: Path) -> dict:
    """What an existing export directory was made from: its source run, file hash and epoch
    (empty when it holds no readable export_meta.json, i.e. it is no export of ours)."""
    try:
        meta = read_json(target / EXPORT_META)
    except GrokpipeError:
        return {}
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return {"run": source.get("run"), "sha256": source.get("sha256"), "epoch": meta.get("epoch")}


def _export_meta(run_dir, metadata, config, source_file, epoch, which, name, count) -> dict:
    from .bridge import transformer_lens_version

    train_losses, test_losses = metadata.get("train_losses", []), metadata.get("test_losses", [])
    return {
        "name": str(name),
        "name_parts": asdict(name),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "run": str(Path(run_dir).resolve()),
            "kind": metadata.get("source", "trained"),
            "model_name": config.get("model_name"),
            "prime": config.get("prime"),
            "seed": config.get("seed"),
            "config_hash": config.get("config_hash"),
            "file": str(source_file.relative_to(run_dir)),
            "sha256": sha256_file(source_file),
        },
        "epoch": epoch,
        "which": which,
        "parameters": count,
        "losses": {
            "train": train_losses[epoch] if epoch < len(train_losses) else None,
            "test": test_losses[epoch] if epoch < len(test_losses) else None,
        },
        "grokking_epoch": metadata.get("grokking_epoch"),
        "grokking_threshold": metadata.get("grokking_threshold"),
        "training": config.get("training"),
        "versions": {
            "grokpipe": __version__,
            "torch": torch.__version__,
            "transformer_lens": transformer_lens_version(),
        },
    }


def verify_export(path: Path) -> list[str]:
    """Problems of an export directory: a file listed in export_meta.json missing or changed."""
    from .loading import read_json

    problems = []
    for name, digest in (read_json(path / EXPORT_META).get("files") or {}).items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif sha256_file(file) != digest:
            problems.append(f"{file}: sha256 differs from export_meta.json (changed or damaged)")
    return problems


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / EXPORT_META).is_file() and (path / MODEL_FILE).is_file()


def list_exports(models_dir: str | Path) -> list[dict]:
    """Every export directly under ``models_dir``, with its name parts and source."""
    from .loading import read_json

    rows = []
    for entry in sorted(Path(models_dir).iterdir()):
        # exports, merged exports and finished LoRA directories (adapters/ instead of a model file)
        adapter = (entry / "adapters" / "adapter_model.safetensors").is_file()
        if entry.is_dir() and (entry / EXPORT_META).is_file() and (adapter or is_export(entry)):
            meta = read_json(entry / EXPORT_META)
            rows.append(
                {
                    "name": entry.name,
                    **meta.get("name_parts", {}),
                    "epoch": meta.get("epoch"),
                    "which": meta.get("which"),
                    "test_loss": (meta.get("losses") or {}).get("test"),
                    "source_run": (meta.get("source") or {}).get("run"),
                    "path": str(entry),
                }
            )
    return rows
