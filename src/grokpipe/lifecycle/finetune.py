"""``grokpipe finetune``: LoRA adapters of an export, trained on another operation of the same p.

The base's weights stay frozen; each targeted matrix ``W`` gets ``W + (alpha / r) · B @ A`` per
head, with PEFT's factors (:mod:`grokpipe.lifecycle.lora_format`). Training is pretraining's:
full-batch AdamW on the target task's split of the p² pairs (train fraction and data seed: the
base's unless given), the demo's loss, the test loss every ``eval_every`` epochs. ``B`` starts at
zero and ``A`` as PEFT initialises it (uniform in ±1/sqrt(fan-in)), drawn from the fine-tune's own
seed, so epoch 0's model is the base.

The adapter's checkpoints are written as training goes (one safetensors file each, PEFT's tensor
names); the resume state follows each one, so a killed fine-tune rerun with the same command
continues bit-identically (same machine and threads). The settings and the base's sha256 are
hashed into the directory's name: other settings are another directory, never a mix.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .._version import __version__
from ..config import canonical_json
from ..errors import GrokpipeError
from ..export import choose_epoch, export, is_export
from ..io.atomic import sha256_file, write_bytes_atomic, write_json_atomic
from ..io.safetensors_io import serialize_state_dict
from ..layout import RunLayout
from ..loading import EXPORT_META, load_metadata
from ..training import resume
from ..training.cross_entropy import count_correct
from ..training.model import loss_fn
from ..training.train import (
    epoch_bar,
    finite_or_none,
    grokking_epoch,
    is_eval_epoch,
    resume_or_start,
    write_checkpoint,
)
from ..writer_lock import writer_lock
from .adapter_dir import ADAPTER_CONFIG, ADAPTER_MODEL, Base, lora_name, read_base
from .lora_format import (
    DEFAULT_MATRICES,
    adapter_config,
    check_rank,
    delta_weight,
    factor_shapes,
    parameter_shapes,
    peft_tensor_names,
    target_parameters,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tune trains: the target operation, the adapter's shape and the optimisation.
    ``frac_train`` and ``data_seed`` None: the base run's."""

    operation: str
    rank: int = 4
    alpha: float = 8.0
    matrices: tuple[str, ...] = DEFAULT_MATRICES
    num_epochs: int = 2000
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    frac_train: float | None = None
    data_seed: int | None = None
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(matrices=list(self.matrices), betas=list(self.betas))
        return data


class LoraFactors(torch.nn.Module):
    """The trainable factors of one adapter, in PEFT's layout: ``lora_A[i]``, ``lora_B[i]`` of
    ``targets[i]``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], rank: int, scaling: float, seed: int):
        super().__init__()
        self.targets, self.shapes, self.scaling = list(shapes), shapes, scaling
        generator = torch.Generator().manual_seed(seed)
        self.lora_A, self.lora_B = torch.nn.ParameterList(), torch.nn.ParameterList()
        for target in self.targets:
            a_shape, b_shape = factor_shapes(shapes[target], rank)
            bound = 1 / math.sqrt(a_shape[1])  # PEFT's kaiming_uniform_(a=sqrt(5)) of lora_A
            self.lora_A.append(torch.nn.Parameter(torch.empty(a_shape).uniform_(-bound, bound, generator=generator)))
            self.lora_B.append(torch.nn.Parameter(torch.zeros(b_shape)))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {
            target: delta_weight(a, b, self.shapes[target], self.scaling)
            for target, a, b in zip(self.targets, self.lora_A, self.lora_B)
        }

    def peft_state_dict(self, names: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
        out = {}
        for target, a, b in zip(self.targets, self.lora_A, self.lora_B):
            out[names[target][0]], out[names[target][1]] = a.detach(), b.detach()
        return out


def _check_grokked(epoch, test_loss, threshold, where: str) -> None:
    if test_loss is None or threshold is None or not test_loss < threshold:
        shown = "not evaluated" if test_loss is None else f"{test_loss:.4g}"
        raise GrokpipeError(
            f"{where}: epoch {epoch} is not grokked (test loss {shown}, threshold {threshold}); fine-tune a "
            "grokked epoch (--grokked) or pass --allow-ungrokked"
        )


def _check_base(hooked: dict, prime: int, settings: FinetuneSettings, requested_prime, where) -> list[str]:
    """The targeted parameters, after the checks that need only the base's config: the prime,
    the matrices it has, the rank."""
    if requested_prime is not None and int(requested_prime) != int(prime):
        raise GrokpipeError(
            f"{where}: --prime {requested_prime}: the base model was trained on p = {prime} (vocabulary "
            f"0..{int(prime) - 1} and '='); it cannot express a task on another p"
        )
    targets = target_parameters(hooked, settings.matrices)
    check_rank(settings.rank, parameter_shapes(hooked, targets))
    return targets


def _export_run_epoch(run_dir: Path, settings, which, epoch, out: Path, prime, allow_ungrokked) -> Path:
    """The export of a run's epoch, after every check that can fail (nothing is written for a bad
    request); exporting an epoch already exported is a no-op."""
    from ..loading import load_config

    if not (run_dir / "metadata.json").is_file():
        raise GrokpipeError(f"{run_dir}: neither an export directory nor a run directory")
    metadata, config = load_metadata(run_dir), load_config(run_dir)
    _check_base(config["hooked_transformer_config"], config["prime"], settings, prime, run_dir)
    chosen, _ = choose_epoch(RunLayout(run_dir), metadata, which, epoch)  # NeverGrokked for --grokked
    if not allow_ungrokked and which != "grokked":
        losses = metadata.get("test_losses") or []
        loss = losses[chosen] if chosen < len(losses) else None
        _check_grokked(chosen, loss, metadata.get("grokking_threshold"), str(run_dir))
    return export(run_dir, out, which, epoch)


def finetune(
    source: str | Path,
    settings: FinetuneSettings,
    *,
    out: str | Path = "models",
    which: str = "grokked",
    epoch: int | None = None,
    prime: int | None = None,
    version: str | None = None,
    allow_ungrokked: bool = False,
    threads: int = 1,
    progress_bar: bool = True,
) -> Path:
    """Train (or resume, or find done) a LoRA fine-tune of ``source``; returns its directory.

    Args:
        source: an export directory, or a run directory whose epoch (``which``: grokked, final or
            epoch, with ``epoch``) is exported into ``out`` first.
        settings: the target operation, rank, alpha, matrices and optimisation.
        out: the models directory the adapter directory goes into.
        prime: the target task's p, which must be the base's (None: the base's).
        version: appended to the directory name.
        allow_ungrokked: fine-tune a base epoch whose test loss is not below its threshold.

    Returns:
        ``out/{arch}-{size}-{source}-to-{target}-lora-.../``.

    Example:
        >>> finetune("models/tl1l-227K-modadd31-grok-s0-e2999-c1a2b3c4d", FinetuneSettings("sub", rank=4))
    """
    from ..training.model import require_hooked_transformer
    from ..training.tasks import OPERATIONS

    require_hooked_transformer("finetune")
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise GrokpipeError(f"{out}: not a directory (--out names the parent directory of adapter directories)")
    if settings.operation not in OPERATIONS:
        raise GrokpipeError(f"--operation {settings.operation!r} is unknown (operations: {', '.join(OPERATIONS)})")
    if settings.frac_train is not None and not 0 < settings.frac_train < 1:
        raise GrokpipeError(f"--frac-train {settings.frac_train} is not between 0 and 1")
    if is_export(source):
        base_dir = source
    elif source.is_dir():
        base_dir = _export_run_epoch(source, settings, which, epoch, out, prime, allow_ungrokked)
    else:
        raise GrokpipeError(f"{source}: no such export or run directory")
    base = read_base(base_dir)
    targets = _check_base(base.hooked, base.prime, settings, prime, base_dir)
    if not allow_ungrokked and base.meta.get("which") != "grokked":
        test_loss = (base.meta.get("losses") or {}).get("test")
        _check_grokked(base.meta.get("epoch"), test_loss, base.meta.get("grokking_threshold"), str(base_dir))
    base_training = base.meta.get("training") if isinstance(base.meta.get("training"), dict) else {}
    settings = replace(
        settings,
        frac_train=settings.frac_train if settings.frac_train is not None else base_training.get("frac_train", 0.3),
        data_seed=settings.data_seed if settings.data_seed is not None else base_training.get("data_seed", 598),
    )
    shapes = {t: tuple(base.state[t].shape) for t in targets}
    settings_hash = _settings_hash(settings, base)
    target = out / lora_name(base.name, settings.operation, settings.rank, settings.seed, settings_hash, version)
    with writer_lock(target, "finetune"):
        if (target / EXPORT_META).is_file():
            log.info("%s: already fine-tuned", target)
            return target
        _train(target, base, settings, settings_hash, targets, shapes, threads, progress_bar)
    return target


def _settings_hash(settings: FinetuneSettings, base: Base) -> str:
    import hashlib

    record = {"settings": settings.to_dict(), "base_sha256": base.sha256, "format": 1}
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()


def _header(base: Base, settings: FinetuneSettings, settings_hash: str, epoch: int, kind: str, name: str) -> dict:
    return {
        "format": "pt",
        "kind": kind,  # "adapter_checkpoint" or "adapter"
        "epoch": str(epoch),
        "prime": str(base.prime),
        "operation": settings.operation,
        "lora_name": name,
        "base_export": base.path.name,
        "base_sha256": base.sha256,
        "finetune_hash": settings_hash,
        "grokpipe_version": __version__,
    }


def _train(target, base, settings, settings_hash, targets, shapes, threads, progress_bar) -> None:
    from ..analysis.plots import plot_run
    from ..training.data import make_split
    from ..training.model import loaded_model
    from ..training.stacked import stack_unsupported_reason, stacked_logits

    # setup
    torch.set_num_threads(threads)
    split = make_split(base.prime, settings.frac_train, settings.data_seed, operation=settings.operation)
    model = loaded_model(base.hooked, base.state, base.path).train()
    for param in model.parameters():
        param.requires_grad_(False)
    all_params = dict(model.named_parameters())
    base_params = {t: all_params[t] for t in targets}
    names = peft_tensor_names(targets, model)
    factors = LoraFactors(shapes, settings.rank, settings.alpha / settings.rank, settings.seed)
    optimizer = torch.optim.AdamW(
        factors.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=settings.betas
    )
    layout = RunLayout(target)
    for directory in (layout.root, layout.checkpoints_dir, layout.resume_dir):
        directory.mkdir(parents=True, exist_ok=True)
    progress = resume_or_start(
        layout, factors, optimizer, settings_hash, settings.num_epochs, settings.checkpoint_every
    )
    # The stacked forward (one run) is HookedTransformer's last-position logits to float32
    # rounding at a fraction of its cost; models it does not cover use HookedTransformer itself.
    stacked = stack_unsupported_reason(model) is None
    segment = {
        "first_epoch": progress.epoch + 1,
        "threads": threads,
        "torch": torch.__version__,
        "implementation": "stacked" if stacked else "hooked_transformer",
        "seconds": 0.0,
    }
    progress.segments.append(segment)
    began = time.perf_counter()

    def objective(tokens, labels):
        params = {t: base_params[t] + delta for t, delta in factors.deltas().items()}
        if stacked:
            full = {name: params.get(name, param)[None] for name, param in all_params.items()}
            logits = stacked_logits(full, model.cfg, tokens)[0]
        else:
            logits = torch.func.functional_call(model, params, (tokens,))[:, -1]
        # the demo's loss and the runs' accuracy rule (ties count), as hooked_transformer runs train
        return loss_fn(logits, labels), count_correct(logits.detach(), labels)

    # loop
    bar = epoch_bar(progress.epoch + 1, settings.num_epochs, settings.num_epochs, target.name[:40], progress_bar)
    for epoch in bar:
        train_loss, train_correct = objective(split.train_tokens, split.train_labels)
        train_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        test_loss = test_correct = None
        if is_eval_epoch(epoch, settings):  # its eval_every, checkpoint_every and num_epochs
            with torch.inference_mode():
                test_loss, test_correct = (x.item() for x in objective(split.test_tokens, split.test_labels))
        train_value = train_loss.item()
        progress.train_losses.append(finite_or_none(train_value))
        progress.test_losses.append(None if test_loss is None else finite_or_none(test_loss))
        progress.train_accuracies.append(round(train_correct.item() / len(split.train_labels), 6))
        progress.test_accuracies.append(None if test_loss is None else round(test_correct / len(split.test_labels), 6))
        progress.epoch = epoch
        segment.update(last_epoch=epoch, seconds=round(time.perf_counter() - began, 3))
        diverged = not math.isfinite(train_value) or (test_loss is not None and not math.isfinite(test_loss))
        if (epoch + 1) % settings.checkpoint_every == 0:
            path = layout.checkpoint(epoch)
            header = _header(base, settings, settings_hash, epoch, "adapter_checkpoint", target.name)
            progress.files[layout.relative(path)] = write_checkpoint(path, factors.peft_state_dict(names), header)
            progress.checkpoint_epochs.append(epoch)
            resume.save(layout, factors, optimizer, progress, settings_hash)
        if diverged:
            progress.diverged_at_epoch = epoch
            log.warning("%s: diverged at epoch %d; stopping there", target.name, epoch)
            break
    bar.close()

    # finish: the adapter, the base's config, curves, card; export_meta.json last
    if progress.epoch < 0:
        raise GrokpipeError(f"--num-epochs {settings.num_epochs}: nothing to train")
    files = dict(progress.files)
    header = _header(base, settings, settings_hash, progress.epoch, "adapter", target.name)
    files[ADAPTER_MODEL] = write_bytes_atomic(
        target / ADAPTER_MODEL, serialize_state_dict(factors.peft_state_dict(names), header)
    )
    config = adapter_config(
        rank=settings.rank, alpha=settings.alpha, targets=targets, base_model_name_or_path=base.path.name
    )
    files[ADAPTER_CONFIG] = write_json_atomic(target / ADAPTER_CONFIG, config)
    for copied in ("config.json", "tokenizer.json"):
        if (base.path / copied).is_file():
            files[copied] = write_bytes_atomic(target / copied, (base.path / copied).read_bytes())
    meta = _meta(target, base, settings, settings_hash, targets, names, progress, split)
    curves = {
        "model_name": f"LoRA {base.operation} -> {settings.operation}, r = {settings.rank}",
        "prime": base.prime,
        "seed": settings.seed,
        **{key: meta[key] for key in ("train_losses", "test_losses", "grokking_epoch", "grokking_threshold")},
    }
    plot_run(curves, target / "loss_curve.png")
    files["loss_curve.png"] = sha256_file(target / "loss_curve.png")
    files["README.md"] = write_bytes_atomic(target / "README.md", _model_card(meta).encode())
    meta["files"] = dict(sorted(files.items()))
    write_json_atomic(target / EXPORT_META, meta)
    shutil.rmtree(layout.resume_dir, ignore_errors=True)  # done: nothing to resume
    log.info(
        "%s: %d epochs, final train loss %s, test loss %s, first epoch below %s: %s",
        target,
        progress.epoch + 1,
        meta["losses"]["train"],
        meta["losses"]["test"],
        meta["grokking_threshold"],
        meta["grokking_epoch"],
    )


def _meta(target, base: Base, settings, settings_hash, targets, names, progress, split) -> dict:
    from ..bridge import transformer_lens_version
    from ..export import parse_export_name
    from ..training.tasks import operation

    name = parse_export_name(target.name)
    threshold = base.meta.get("grokking_threshold") or 0.01
    first_below = grokking_epoch(progress.test_losses, threshold)
    return {
        "name": target.name,
        "name_parts": asdict(name),
        "training_type": "lora",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {
            "name": base.path.name,
            "path": str(base.path.resolve()),
            "model_file": "model.safetensors",
            "sha256": base.sha256,
            "operation": base.operation,
            "epoch": base.meta.get("epoch"),
            "source_run": (base.meta.get("source") or {}).get("run"),
        },
        "target": {
            "operation": settings.operation,
            "formula": operation(settings.operation).formula,
            "prime": base.prime,
        },
        "lora": {
            "rank": settings.rank,
            "alpha": settings.alpha,
            "scaling": settings.alpha / settings.rank,
            "matrices": list(settings.matrices),
            "target_parameters": targets,
            "tensor_names": {t: list(names[t]) for t in targets},
            "trainable_parameters": sum(
                int(math.prod(s)) for t in targets for s in factor_shapes(tuple(base.state[t].shape), settings.rank)
            ),
        },
        "settings": settings.to_dict(),
        "settings_hash": settings_hash,
        "epoch": progress.epoch,  # the last trained epoch: the adapter's
        "checkpoint_epochs": sorted(progress.checkpoint_epochs),
        "diverged_at_epoch": progress.diverged_at_epoch,
        "losses": {"train": progress.train_losses[-1], "test": progress.test_losses[-1]},
        "grokking_threshold": threshold,
        "grokking_epoch": first_below,  # the first epoch whose test loss is below the threshold
        "train_losses": progress.train_losses,
        "test_losses": progress.test_losses,
        "train_accuracies": progress.train_accuracies,
        "test_accuracies": progress.test_accuracies,
        "train_indices": split.train_indices.tolist(),
        "test_indices": split.test_indices.tolist(),
        "segments": progress.segments,
        "versions": {
            "grokpipe": __version__,
            "torch": torch.__version__,
            "transformer_lens": transformer_lens_version(),
        },
    }


def _model_card(meta: dict) -> str:
    lora, base, target = meta["lora"], meta["base"], meta["target"]
    first = meta["grokking_epoch"]
    test = meta["losses"]["test"]
    return f"""# {meta["name"]}

LoRA adapters (PEFT format, `adapters/`) of the grokpipe export `{base["name"]}` (trained on
`{base["operation"]}`), fine-tuned to `{target["formula"]} mod {target["prime"]}` (operation `{target["operation"]}`)
with the base's weights frozen.

| | |
|---|---|
| rank / alpha | {lora["rank"]} / {lora["alpha"]:g} (scaling {lora["scaling"]:g}) |
| matrices | {", ".join(lora["matrices"])} |
| trainable parameters | {lora["trainable_parameters"]:,} |
| epochs | {meta["epoch"] + 1} |
| final train / test loss | {meta["losses"]["train"]:.6g} / {"not evaluated" if test is None else f"{test:.6g}"} |
| first epoch with test loss < {meta["grokking_threshold"]} | {first if first is not None else "never"} |

![loss curve](loss_curve.png)

Load with the adapter applied, or merge it into an ordinary export:

```python
import grokpipe
model = grokpipe.load_model("{meta["name"]}")  # the base with W + (alpha/r)·B@A
adapter = grokpipe.load_adapter("{meta["name"]}")  # the factors and per-matrix updates
```

```bash
grokpipe merge {meta["name"]}
```

`export_meta.json` holds the base's sha256, the settings, the losses of every epoch and the sha256
of every file here.
"""
