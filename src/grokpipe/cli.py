"""The ``grokpipe`` command line; the Snakemake rules call it, and so can people.

User mistakes (bad config, damaged or hostile files) print one ``grokpipe: error: ...`` line and exit
non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path

from .errors import GrokpipeError


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear an active tqdm progress bar."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill a run
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("grokpipe")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _train_spec(args) -> tuple:
    """([(RunSpec, run_dir), ...], device, threads, threshold, [sweep cell per run]) from --spec,
    --specs or --config (several runs with several --seed values)."""
    from .config import read_config_file, run_spec, validate_config
    from .layout import run_dir

    if args.specs is not None:
        return _job_specs(args)
    if args.spec is not None:
        config, prime, seed, sweep_cell = _spec_object(_json_argument(args.spec, "--spec"), "--spec")
        seeds, source = [seed], "--spec"
    else:
        config = validate_config(read_config_file(args.config), source=str(args.config))
        prime, seeds = args.prime, args.seed
        if prime is None or not seeds:
            raise GrokpipeError("--config needs --prime and --seed")
        if len(set(seeds)) != len(seeds):
            raise GrokpipeError("--seed: a seed is given twice")
        config, sweep_cell = _chosen_cell(config, args.cell, str(args.config))
        # The chosen runs are validated like a grid of the same config.
        config = validate_config({**config, "primes": [prime], "seeds": seeds}, source=str(args.config))
        source = str(args.config)
    if args.run_dir and len(seeds) > 1:
        raise GrokpipeError("RUN_DIR names one run; with several --seed values the runs go to the config's results_dir")
    runs = []
    for seed in seeds:
        spec = run_spec(config, prime, seed)
        out = Path(args.run_dir) if args.run_dir else run_dir(config["results_dir"], spec.model_name, prime, seed)
        if out.name != spec.run_name:
            raise GrokpipeError(f"{out}: a run directory must be named {spec.run_name} (from {source})")
        runs.append((spec, out))
    return (runs, *_run_options(args, config), [sweep_cell] * len(runs))


def _json_argument(text: str, flag: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GrokpipeError(f"{flag} is not valid JSON ({exc})") from None


def _spec_object(raw, source: str) -> tuple[dict, int, int, dict]:
    """(validated one-run config, prime, seed, sweep cell) of a ``--spec`` object."""
    from .config import validate_config

    if not isinstance(raw, dict):
        raise GrokpipeError(f"{source} must be a JSON object")
    raw = dict(raw)
    prime, seed = raw.pop("prime", None), raw.pop("seed", None)
    sweep_cell = raw.pop("sweep_cell", None) or {}
    if not isinstance(sweep_cell, dict):
        raise GrokpipeError(f"{source}: sweep_cell must be a JSON object")
    return validate_config({**raw, "primes": [prime], "seeds": [seed]}, source=source), prime, seed, sweep_cell


def _run_options(args, config: dict) -> tuple[str, int, float]:
    """(device, threads, grokking threshold): the flags, else the config's."""
    from .workflow import threads_per_run

    device = args.device or config["device"]
    threads = args.threads or threads_per_run(config["threads_per_run"], None, 1)
    return device, threads, args.grokking_threshold or config["grokking_threshold"]


def _job_specs(args) -> tuple:
    """The members of a workflow job of several runs: ``--specs``, a JSON list of ``--spec``
    objects, each with its ``run_dir``."""
    from .config import run_spec

    members = _json_argument(args.specs, "--specs")
    if not isinstance(members, list) or not members:
        raise GrokpipeError("--specs must be a JSON list of run specs")
    runs, cells = [], []
    for index, raw in enumerate(members):
        source = f"--specs[{index}]"
        out = raw.pop("run_dir", None) if isinstance(raw, dict) else None
        if not isinstance(out, str):
            raise GrokpipeError(f"{source}: needs a run_dir string")
        config, prime, seed, cell = _spec_object(raw, source)
        spec = run_spec(config, prime, seed)
        if Path(out).name != spec.run_name:
            raise GrokpipeError(f"{out}: a run directory must be named {spec.run_name} (from {source})")
        runs.append((spec, Path(out)))
        cells.append(cell)
    return (runs, *_run_options(args, config), cells)


def _chosen_cell(config: dict, name: str | None, source: str) -> tuple[dict, dict]:
    """(config, axis values) of the sweep cell ``name`` of a validated config (the config itself
    and no values when it has no sweep)."""
    from .sweep import cells_by_name

    cells = cells_by_name(config, source)
    if name is None and len(cells) == 1:
        (cell,) = cells.values()
    elif name in cells:
        cell = cells[name]
    else:
        what = f"has no sweep cell {name!r}" if name else "is a sweep: choose a cell with --cell"
        raise GrokpipeError(f"{source} {what} (cells: {', '.join(cells)})")
    return cell.config, cell.settings


def _keep_freed_memory_in_process() -> None:
    """Stop glibc from returning large freed blocks to the OS on every free.

    Each epoch allocates the same large temporaries; with glibc's defaults they are mmap'd and
    unmapped every time, and the page faults cost ~7 % of a lean epoch (~25 % of a HookedTransformer
    one) at p = 113 (bench/bench_training.py). RSS then stays at the working set, flat.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def gc_freeze_and_keep_memory() -> None:
    """What a training process sets up before its loop: freed memory kept in the process (see
    :func:`_keep_freed_memory_in_process`) and the imports' objects frozen for the collector."""
    import gc

    _keep_freed_memory_in_process()
    # Each epoch leaves a few hundred short-lived objects, so the collector's full collections
    # come every few hundred epochs; with transformers imported each rescans ~430,000 objects
    # (0.2 s, ~1 ms/epoch at p = 113). Frozen, they skip what the imports made.
    gc.freeze()


def cmd_train(args) -> int:
    from .training.train import train

    gc_freeze_and_keep_memory()
    runs, device, threads, threshold, cells = _train_spec(args)
    options = dict(device=device, threads=threads, grokking_threshold=threshold, progress_bar=not args.no_progress)
    if len(runs) == 1:
        (spec, out), *_ = runs
        train(spec, out, sweep_cell=cells[0], **options)
    else:  # several runs: one process, trained stacked
        from .training.stacked import train_group

        specs, outs = zip(*runs)
        train_group(list(specs), list(outs), sweep_cells=cells, **options)
    if args.record:
        from .io.atomic import sha256_file, write_json_atomic
        from .layout import RunLayout

        members = [{"run_dir": str(out), "metadata_sha256": sha256_file(RunLayout(out).metadata)} for _, out in runs]
        write_json_atomic(args.record, {"runs_per_job": len(runs), "members": members})
    return 0


def _config_of(args) -> tuple[dict, str]:
    """(validated config, where it came from) of a report's ``--config`` or ``--config-json``."""
    from .config import read_config_file, validate_config

    if args.config is not None:
        raw, source = read_config_file(args.config), str(args.config)
    else:
        raw, source = _json_argument(args.config_json, "--config-json"), "--config-json"
    return validate_config(raw, source=source), source


def cmd_sweep_report(args) -> int:
    from .analysis.sweep_report import write_sweep_report

    config, _ = _config_of(args)
    out = args.out_dir or Path(config["results_dir"]) / "_sweeps" / config["model_name"]
    rows = write_sweep_report(config, out, x=args.x, y=args.y)
    counts = Counter(row["outcome"] for row in rows)
    print(f"{out}: {len(rows)} runs ({', '.join(f'{n} {name}' for name, n in sorted(counts.items()))})")
    return 0


def cmd_transfer_report(args) -> int:
    from .lifecycle.transfer import finetune_plan, write_transfer_report
    from .sweep import cells_by_name

    config, source = _config_of(args)
    plan = finetune_plan(config, cells_by_name(config, source), source)
    out = args.out_dir or Path(config["results_dir"]) / "_finetune" / config["model_name"]
    rows = write_transfer_report(config, plan, out)
    print(f"{out}: {len(rows)} fine-tunes compared with training from scratch")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    convert(
        args.legacy,
        args.run_dir,
        model_name=args.model_name,
        prime=args.prime,
        seed=args.seed,
        grokking_threshold=args.grokking_threshold,
        force=args.force,
    )
    return 0


def cmd_consolidate(args) -> int:
    import gc

    from .consolidate import consolidate, consolidate_all

    # Readers collect garbage after each shard (torch.load's cycles hold memory maps); freezing what
    # the imports made keeps those collections from rescanning a million long-lived objects.
    gc.freeze()

    if args.filter is not None and not args.all_checkpoints:
        raise GrokpipeError("--filter selects checkpoints of --all-checkpoints; pass both")
    options = dict(
        dtype=args.dtype,
        dry_run=args.dry_run,
        force=args.force,
        allow_overflow=args.allow_overflow,
    )
    if args.max_output_ratio is not None:
        options["max_output_ratio"] = args.max_output_ratio
    if args.all_checkpoints:
        progress = not args.no_progress
        result = consolidate_all(args.input, args.out_dir, pattern=args.filter, progress=progress, **options)
    else:
        result = consolidate(args.input, args.out_dir, **options)
    if args.dry_run:
        print(result)
        print("dry run: nothing was written")
    return 0


def _record_verification(args, report) -> None:
    """The outcome stays in the run, where list and inspect see it, even when Snakemake deletes
    the failed job's --report output."""
    from .io.atomic import write_json_atomic
    from .layout import RunLayout

    if Path(args.run_dir).is_dir():
        write_json_atomic(RunLayout(Path(args.run_dir)).verification, report.to_dict())
    if args.report:
        write_json_atomic(args.report, report.to_dict())


def cmd_verify(args) -> int:
    from .analysis.verify import Report, verify_run
    from .training.model import require_hooked_transformer

    # Before anything is checked: under TransformerLens 4 every strict load would "fail" and the run
    # would be recorded as damaged.
    require_hooked_transformer("verify")
    try:
        report = verify_run(args.run_dir, recompute=args.recompute)
    except Exception as exc:
        # A verification that could not finish is a failed one: it replaces the previous verdict,
        # so list and inspect never keep saying "verified" about a run that no longer is.
        report = Report(Path(args.run_dir))
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        report.problem(args.run_dir, f"verification could not finish ({detail})")
        _record_verification(args, report)
        raise GrokpipeError(report.problems[0]) from None
    _record_verification(args, report)
    for line in report.problems:
        print(line)
    checked = report.checked
    summary = (
        f"{checked.get('headers', 0)} files, {checked.get('sha256', 0)} hashes, "
        f"{checked.get('strict_loads', 0)} strict loads, "
        f"{len(checked.get('recomputed_test_losses', []))} test losses recomputed"
    )
    if report.ok:
        print(f"verify: {args.run_dir}: ok ({summary})")
        return 0
    print(f"verify: {args.run_dir}: {len(report.problems)} problem(s) ({summary})", file=sys.stderr)
    return 1


def cmd_inspect(args) -> int:
    from .analysis.inspect_run import format_inspection, inspect_path

    info = inspect_path(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_list(args) -> int:
    from .analysis.inspect_run import format_exports, format_listing, list_runs, parse_filters
    from .export import list_exports

    exports = list_exports(args.results_dir) if Path(args.results_dir).is_dir() else []
    if exports:  # a models/ directory of exports
        print(json.dumps(exports, indent=2) if args.json else format_exports(exports))
        return 0
    rows = list_runs(args.results_dir, parse_filters(args.where))
    if not rows:
        what = f" with {' and '.join(args.where)}" if args.where else ""
        raise GrokpipeError(f"{args.results_dir}: no run directories{what} (nor exports)")
    print(json.dumps(rows, indent=2) if args.json else format_listing(rows))
    return 0


def cmd_export(args) -> int:
    from .export import NeverGrokked, export
    from .io.atomic import write_json_atomic

    which = "grokked" if args.grokked else "epoch" if args.epoch is not None else "final"
    try:
        target = export(args.run_dir, args.out, which, args.epoch, args.version, args.force)
    except NeverGrokked as exc:
        if not args.skip_ungrokked:
            raise
        print(f"grokpipe: skipped: {exc}", file=sys.stderr)
        record = {"which": which, "export": None, "skipped": str(exc)}
    else:
        print(target)
        record = {"which": which, "export": str(target), "name": target.name}
    if args.record:
        write_json_atomic(args.record, record)
    return 0


def cmd_finetune(args) -> int:
    from .export import NeverGrokked
    from .io.atomic import write_json_atomic
    from .lifecycle.finetune import FinetuneSettings, finetune

    gc_freeze_and_keep_memory()
    settings = FinetuneSettings(
        operation=args.operation,
        rank=args.rank,
        alpha=args.alpha,
        matrices=tuple(args.matrices),
        num_epochs=args.num_epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        frac_train=args.frac_train,
        data_seed=args.data_seed,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
    )
    which = "grokked" if args.grokked else "final" if args.final else "epoch" if args.epoch is not None else "grokked"
    try:
        target = finetune(
            args.source,
            settings,
            out=args.out,
            which=which,
            epoch=args.epoch,
            prime=args.prime,
            version=args.version,
            allow_ungrokked=args.allow_ungrokked,
            threads=args.threads,
            progress_bar=not args.no_progress,
        )
    except NeverGrokked as exc:
        if not args.skip_ungrokked:
            raise
        print(f"grokpipe: skipped: {exc}", file=sys.stderr)
        record = {"adapter": None, "skipped": str(exc)}
    else:
        print(target)
        record = {"adapter": str(target), "name": target.name}
    if args.record:
        write_json_atomic(args.record, {"operation": args.operation, "rank": args.rank, "seed": args.seed, **record})
    return 0


def cmd_merge(args) -> int:
    from .io.atomic import write_json_atomic
    from .lifecycle.merge import merge
    from .loading import read_json

    source = Path(args.lora_dir)
    if source.is_file() and source.suffix == ".json":  # the record of `grokpipe finetune --record`
        adapter = read_json(source).get("adapter")
        if adapter is None:
            print(f"grokpipe: skipped: {source} records no adapter (its fine-tune was skipped)", file=sys.stderr)
            if args.record:
                write_json_atomic(args.record, {"merged": None, "skipped": f"{source}: no adapter"})
            return 0
        source = Path(adapter)
    target = merge(source, out=args.out, force=args.force)
    print(target)
    if args.record:
        write_json_atomic(args.record, {"merged": str(target), "name": target.name, "adapter": str(source)})
    return 0


def cmd_plot(args) -> int:
    from .analysis.plots import plot_run
    from .loading import load_metadata

    out = Path(args.run_dir) / "artifacts"
    plot_run(load_metadata(args.run_dir), out / "loss_curves.png", out / "loss_curves.svg")
    return 0


def cmd_summarize(args) -> int:
    from .analysis.plots import plot_grid, summary_rows, write_summary
    from .analysis.progress_measures import read_progress
    from .loading import load_metadata

    metadatas = [load_metadata(run) for run in args.run_dirs]
    progress = [(read_progress(run) or (None, None))[1] for run in args.run_dirs]
    out = Path(args.out_dir)
    write_summary(summary_rows(metadatas, progress), out / "summary.csv", out / "summary.md")
    plot_grid(metadatas, out / "test_curves.png", out / "test_curves.svg")
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def recompute_choice(text: str) -> str | int:
    if text in ("auto", "all"):
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, all or a positive number of checkpoints") from None


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one ``grokpipe: error: ...`` line naming the flag, exit status 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("grokpipe").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"grokpipe: error: {where}{message} (see {self.prog} --help)\n")


# Shown by `grokpipe COMMAND --help`; each also in docs/cli.md, which a test keeps in step.
EXAMPLES = {
    "train": [
        "grokpipe train --config config/config.yaml --prime 31 --seed 0",
        "grokpipe train --config config/sweep.yaml --cell grokking-sub-wd0.3 --prime 31 --seed 0 --threads 2",
        "grokpipe train --config config/config.yaml --prime 31 --seed 0 1 2 3",
    ],
    "convert": ["grokpipe convert old_runs/grokking.pth results/grokking/grokking_p113_seed999"],
    "consolidate": [
        "grokpipe consolidate ckpts/qwen-tiny/checkpoint-196 models/qwen-tiny-196 --dtype bfloat16",
        "grokpipe consolidate ckpts/qwen-tiny models/all --all-checkpoints --filter 'checkpoint-1*'",
        "grokpipe consolidate ckpts/qwen-tiny/checkpoint-196 models/x --dry-run",
    ],
    "verify": ["grokpipe verify results/grokking/grokking_p31_seed0 --report verify.json"],
    "inspect": [
        "grokpipe inspect results/grokking/grokking_p31_seed0",
        "grokpipe inspect results/grokking/grokking_p31_seed0/checkpoints/checkpoint_epoch_00999.safetensors --json",
    ],
    "export": [
        "grokpipe export results/grokking/grokking_p31_seed0 --grokked",
        "grokpipe export results/grokking/grokking_p31_seed0 --epoch 999 --out models --version v2",
    ],
    "list": [
        "grokpipe list results",
        "grokpipe list results --where task.operation=sub --where training.weight_decay=0.3 --json",
        "grokpipe list models",
    ],
    "finetune": [
        "grokpipe finetune results/grokking/grokking_p31_seed0 --grokked --operation sub --rank 4",
        "grokpipe finetune models/tl1l-218K-modadd31-grok-s0-e799-c0123abcd --operation mul --matrices W_in W_out",
    ],
    "merge": ["grokpipe merge models/tl1l-218K-modadd31-to-modsub31-lora-s0-e799-c0123abcd-r4-f0-l4567cdef"],
    "plot": ["grokpipe plot results/grokking/grokking_p31_seed0"],
    "progress": ["grokpipe progress results/grokking/grokking_p31_seed0 --key-frequencies 3,7,11"],
    "analyze": ["grokpipe analyze results/grokking/grokking_p31_seed0 --report verify.json --progress"],
    "sweep-report": ["grokpipe sweep-report --config config/sweep.yaml --x training.weight_decay --y task.operation"],
    "transfer-report": ["grokpipe transfer-report --config config/finetune.yaml"],
    "summarize": ["grokpipe summarize --out-dir results/grokking results/grokking/grokking_p31_seed*"],
}


def _add_examples(subparsers) -> None:
    """Every command's --help ends with its examples and the reference page."""
    for command, parser in subparsers.choices.items():
        lines = "\n".join(f"  {example}" for example in EXAMPLES[command])
        parser.epilog = f"examples:\n{lines}\n\nreference: docs/cli.md#{command}"
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def cmd_progress(args) -> int:
    from .analysis.progress_measures import write_progress

    _keep_freed_memory_in_process()  # the same large temporaries for every checkpoint
    rows, record = write_progress(args.run_dir, args.key_frequencies)
    print(
        f"progress: {args.run_dir}: {len(rows)} checkpoints, key frequencies {record['key_frequencies']}, "
        f"restricted loss below the grokking threshold from epoch {record['restricted_grokking_epoch']}"
    )
    return 0


def cmd_analyze(args) -> int:
    """What the workflow's analysis job does with one run, in one process (one torch import): the
    loss curves (from metadata.json alone), the verification, then, for a run that passed, the
    progress measures. The exit status is the verification's."""
    cmd_plot(args)
    status = cmd_verify(args)
    if status == 0 and args.progress:
        cmd_progress(args)
    return status


def frequency_list(text: str) -> list[int] | None:
    """``--key-frequencies``: comma-separated positive integers, or ``auto``."""
    if text == "auto":
        return None
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or comma-separated positive integers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="grokpipe",
        description=__doc__.splitlines()[0],
        epilog="Each command's --help shows examples; reference: docs/cli.md",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    p = sub.add_parser("train", help="train (or resume) one (prime, seed) run")
    p.add_argument("run_dir", nargs="?", help="run directory (default: from the config's results_dir)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="workflow config YAML (as config/config.yaml); needs --prime and --seed")
    src.add_argument("--spec", help="one run as JSON: model_name, prime, seed, training, model (what the rule passes)")
    src.add_argument("--specs", help="several runs of one shape as a JSON list of --spec objects with run_dir (a job)")
    p.add_argument("--prime", type=positive_int, help="with --config: the run's prime")
    p.add_argument(
        "--seed",
        type=non_negative_int,
        nargs="+",
        help="with --config: the run's seed; several seeds train together in this one process, stacked",
    )
    p.add_argument("--cell", help="with --config of a sweep: the cell to train (its name, as in results/)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's device")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: threads_per_run)")
    p.add_argument("--grokking-threshold", type=positive_float, help="default: the config's grokking_threshold")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--record", help="also write the trained runs and their metadata.json hashes as JSON to this file")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="convert a legacy grokking pickle (.pth) into a run directory, safely")
    p.add_argument("legacy", help="the legacy torch.save file (read only, through a restricted unpickler)")
    p.add_argument("run_dir", help="target run directory, named {model_name}_p{prime}_seed{seed}")
    p.add_argument("--model-name", help="default: from the run directory name")
    p.add_argument("--prime", type=positive_int, help="default: from the run directory name")
    p.add_argument("--seed", type=non_negative_int, help="default: from the run directory name")
    p.add_argument(
        "--grokking-threshold", type=positive_float, default=0.01, help="test loss below this is grokked (0.01)"
    )
    p.add_argument("--force", action="store_true", help="replace a run that already exists at run_dir")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "consolidate",
        help="another trainer's checkpoint (HF sharded, DCP/FSDP, DeepSpeed ZeRO) into one model.safetensors",
        description="Consolidate a checkpoint directory into OUT_DIR/model.safetensors (+ consolidation.json, "
        "config.json when present). Formats, detected by content: Hugging Face sharded safetensors or .bin with "
        "their index, a single model.safetensors or pytorch_model.bin, torch.distributed.checkpoint (FSDP), "
        "DeepSpeed ZeRO 1/2/3 (fp32 master weights, without DeepSpeed). Pickled inputs are read only through "
        "grokpipe's restricted loader; trainer extras (optimizer.pt, rng_state.pth, training_args.bin, "
        "scheduler.pt) are never opened. There is no pickle (.bin) output: safetensors only.",
    )
    p.add_argument("input", help="checkpoint directory or one model file (--all-checkpoints: the run directory)")
    p.add_argument("out_dir", help="output directory (with --all-checkpoints: one {name}_step_{N}/ per checkpoint)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors (default: keep)")
    p.add_argument("--dry-run", action="store_true", help="print what would be read and written; write nothing")
    p.add_argument("--all-checkpoints", action="store_true", help="every checkpoint-N / global_stepN under INPUT")
    p.add_argument("--filter", help="with --all-checkpoints: only checkpoint directories matching this glob")
    p.add_argument("--force", action="store_true", help="replace existing output directories")
    p.add_argument(
        "--max-output-ratio",
        type=positive_float,
        default=None,
        help="refuse to write more than this many bytes per byte read (default 4)",
    )
    p.add_argument(
        "--allow-overflow",
        action="store_true",
        help="with --dtype: write values that overflow to inf (counted in consolidation.json) instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("verify", help="check that a run directory loads and is consistent")
    p.add_argument("run_dir", help="a run directory, results/{model_name}/{model_name}_p{prime}_seed{seed}")
    p.add_argument("--report", help="also write the findings as JSON to this file")
    p.add_argument(
        "--recompute",
        default="auto",
        type=recompute_choice,
        help="checkpoints whose test loss is recomputed: auto (all within a budget), all, or a number",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "inspect", help="describe a run directory, a checkpoint, or a legacy pickle (no tensor data read)"
    )
    p.add_argument("path", help="a run directory, a .safetensors file, an export or consolidated directory, a .pth")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "export",
        help="one epoch of a run as a standalone model directory models/{arch}-{size}-{dataset}-{type}-{version}/",
        description="Write model.safetensors, config.json, tokenizer.json, export_meta.json, loss_curve.png and a "
        "README.md model card for one epoch of RUN_DIR into OUT/{architecture}-{size}-{dataset}-{training_type}-"
        "{version}/, e.g. models/tl1l-227K-modadd113-grok-s999-e24999-c1a2b3c4d (see docs/file-formats.md).",
    )
    p.add_argument("run_dir", help="a run directory, results/{model_name}/{model_name}_p{prime}_seed{seed}")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=non_negative_int, help="a checkpoint epoch")
    which.add_argument("--grokked", action="store_true", help="the first checkpoint at or after the grokking epoch")
    which.add_argument("--final", action="store_true", help="the final model (the default)")
    p.add_argument("--out", default="models", help="parent directory of the export (default: models)")
    p.add_argument("--version", help="appended to the name's version part (letters, digits, '.', '_')")
    p.add_argument("--force", action="store_true", help="replace an existing export of the same name")
    p.add_argument("--record", help="also write what was exported (or skipped) as JSON to this file")
    p.add_argument(
        "--skip-ungrokked", action="store_true", help="with --grokked: skip (not fail on) a run that never grokked"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "finetune",
        help="LoRA adapters of a grokked model on another operation of the same p (PEFT format)",
        description="Train LoRA adapters (base frozen; full-batch AdamW like pretraining) of SOURCE on the "
        "operation --operation of the same p, into OUT/{arch}-{size}-{source}-to-{target}-lora-{version}/ with "
        "adapters/adapter_config.json and adapters/adapter_model.safetensors in PEFT's format (see docs/lora.md). "
        "Rerunning the same command resumes a killed fine-tune, or finds it done.",
    )
    p.add_argument("source", help="an export directory, or a run directory (its --grokked epoch by default)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=non_negative_int, help="with a run directory: this checkpoint epoch")
    which.add_argument("--grokked", action="store_true", help="with a run directory: its grokked checkpoint (default)")
    which.add_argument("--final", action="store_true", help="with a run directory: its final model")
    p.add_argument("--operation", required=True, help="the target task (add, sub, mul, div, ...) on the base's p")
    p.add_argument("--prime", type=positive_int, help="the target task's p: must be the base's (default: the base's)")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--alpha", type=positive_float, default=8.0, help="LoRA alpha; updates are scaled by alpha/r (8)")
    p.add_argument(
        "--matrices",
        nargs="+",
        default=["W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"],
        metavar="M",
        help="matrices adapted in every layer: W_Q W_K W_V W_O (per head) W_in W_out, and W_E W_pos W_U "
        "(embeddings, off by default); default: the attention and MLP ones",
    )
    p.add_argument("--num-epochs", type=positive_int, default=2000, help="epochs of fine-tuning (2000)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (0.001)")
    p.add_argument("--weight-decay", type=float, default=1.0, help="AdamW weight decay of the factors (1.0)")
    p.add_argument("--frac-train", type=positive_float, help="train fraction of the target task (default: the base's)")
    p.add_argument("--data-seed", type=non_negative_int, help="seed of the target task's split (default: the base's)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the adapter's initialisation (0)")
    p.add_argument("--checkpoint-every", type=positive_int, default=100, help="adapter checkpoint interval (100)")
    p.add_argument("--eval-every", type=positive_int, default=1, help="test loss every this many epochs (1)")
    p.add_argument("--out", default="models", help="parent directory of the adapter directory (default: models)")
    p.add_argument("--version", help="appended to the directory name (letters, digits, '.', '_')")
    p.add_argument("--allow-ungrokked", action="store_true", help="fine-tune an epoch whose test loss is not low")
    p.add_argument(
        "--skip-ungrokked", action="store_true", help="with --grokked: skip (not fail on) a run that never grokked"
    )
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (1)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--record", help="also write what was fine-tuned (or skipped) as JSON to this file")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "merge",
        help="a LoRA directory merged into an ordinary export (W + alpha/r * B@A), ...-merged-.../",
    )
    p.add_argument("lora_dir", help="a grokpipe finetune directory (or the JSON record finetune --record wrote)")
    p.add_argument("--out", help="parent directory of the merged export (default: beside the LoRA directory)")
    p.add_argument("--force", action="store_true", help="replace an existing merged export made from another adapter")
    p.add_argument("--record", help="also write what was merged (or skipped) as JSON to this file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("list", help="every run in a results tree (or every export in a models/ directory)")
    p.add_argument(
        "results_dir", nargs="?", default="results", help="a results tree, one results/{model_name}, or models/"
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only runs whose config has this value (repeatable), e.g. --where task.operation=sub "
        "--where training.weight_decay=0.3",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("plot", help="loss curves of a run into its artifacts/ (PNG and SVG)")
    p.add_argument("run_dir", help="a run directory, results/{model_name}/{model_name}_p{prime}_seed{seed}")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "progress", help="progress measures of every checkpoint (restricted/excluded loss, Gini, ...) into artifacts/"
    )
    p.add_argument("run_dir", help="a run directory, results/{model_name}/{model_name}_p{prime}_seed{seed}")
    p.add_argument(
        "--key-frequencies",
        type=frequency_list,
        default=None,
        help="comma-separated key frequencies (default auto: from the final model's embedding)",
    )
    p.set_defaults(func=cmd_progress)

    p = sub.add_parser(
        "analyze",
        help="plot, verify and (with --progress) the progress measures of a run: the workflow's analysis job",
    )
    p.add_argument("run_dir", help="a run directory, results/{model_name}/{model_name}_p{prime}_seed{seed}")
    p.add_argument("--report", help="also write the verification's findings as JSON to this file")
    p.add_argument("--recompute", default="auto", type=recompute_choice, help="as for verify")
    p.add_argument("--progress", action="store_true", help="also the progress measures, if the run verifies")
    p.add_argument("--key-frequencies", type=frequency_list, default=None, help="as for progress")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "sweep-report",
        help="a sweep's table (one row per run) and phase diagrams into results/_sweeps/{model_name}/",
        description="Write sweep.csv (every axis value, grokking and memorization epochs, final losses and "
        "accuracies, diverged/stopped epochs, wall time, outcome class) and grokking_epoch.png, outcome.png, "
        "grokking_vs_axis.png for the runs of a sweep config.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the sweep's config YAML")
    source.add_argument("--config-json", help="the sweep's config as JSON (what the workflow passes)")
    p.add_argument("--out-dir", help="default: {results_dir}/_sweeps/{model_name}")
    p.add_argument("--x", help="axis (dotted key) across the heat maps (default: sweep_figures.x, else the first)")
    p.add_argument("--y", help="axis (dotted key) down the heat maps (default: sweep_figures.y, else the second)")
    p.set_defaults(func=cmd_sweep_report)

    p = sub.add_parser(
        "transfer-report",
        help="LoRA fine-tunes vs training from scratch: results/_finetune/{model_name}/transfer.{csv,md}",
        description="For the config's finetune: section, one row per fine-tune (base run, target operation, rank, "
        "seed): the first epoch whose test loss is below the grokking threshold for the LoRA from the grokked base "
        "and for the same task trained from scratch, and their final test losses; the Markdown file adds the medians "
        "per target operation and rank.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the config YAML")
    source.add_argument("--config-json", help="the config as JSON (what the workflow passes)")
    p.add_argument("--out-dir", help="default: {results_dir}/_finetune/{model_name}")
    p.set_defaults(func=cmd_transfer_report)

    p = sub.add_parser("summarize", help="summary table (CSV, Markdown) and test-curve figure of several runs")
    p.add_argument("--out-dir", required=True, help="where summary.{csv,md} and test_curves.{png,svg} go")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.set_defaults(func=cmd_summarize)
    _add_examples(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except GrokpipeError as exc:
        print(f"grokpipe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("grokpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
