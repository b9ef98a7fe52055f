"""The config's ``finetune:`` section: which fine-tunes the workflow runs, the from-scratch runs they
are compared with, and the comparison table.

For each chosen base run (a run of the grid, by name), target operation, rank and seed, the workflow
fine-tunes the run's grokked checkpoint (``grokpipe finetune``) and merges the adapter. Each target
operation is also trained from scratch on the base's p with the base cell's settings (same train
fraction and data seed) and the fine-tunes' seeds: the runs of cell ``{base cell}-scratch-{operation}``.
The table compares, per row and per target operation, the first epoch whose test loss is below the
grokking threshold: LoRA from the grokked base against training from scratch.
"""

from __future__ import annotations

import copy
import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check_cell_semantics, run_name
from ..errors import ConfigError, GrokpipeError
from ..io.atomic import write_bytes_atomic
from ..layout import RUN_DIR_RE
from ..sweep import Cell

Run = tuple[str, str, str]  # (model_name, prime, seed) as the workflow's wildcards hold them


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune of the workflow: its base run, target operation, rank and seed."""

    base: Run
    operation: str
    rank: int
    seed: int

    @property
    def record_name(self) -> str:
        """The job's record under the base run's finetunes/ (its merge's: ``.merged.json``)."""
        return f"{self.operation}-r{self.rank}-f{self.seed}"

    @property
    def scratch(self) -> Run:
        """The from-scratch run this fine-tune is compared with."""
        return (scratch_cell_name(self.base[0], self.operation), self.base[1], str(self.seed))


@dataclass
class FinetunePlan:
    jobs: list[FinetuneJob] = field(default_factory=list)
    scratch_cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def scratch_runs(self) -> list[Run]:
        return sorted({job.scratch for job in self.jobs})


def scratch_cell_name(cell: str, operation: str) -> str:
    return f"{cell}-scratch-{operation}"


def finetune_plan(config: dict, cells: dict[str, Cell], source: str | None = None) -> FinetunePlan:
    """The fine-tunes and from-scratch cells of a validated config (``cells``: its sweep cells).

    A name in ``finetune.runs`` that is no run of the grid is a ConfigError naming it.

    Example:
        >>> plan = finetune_plan(config, cells_by_name(config))  # finetune: {runs: [grokking_p31_seed0]}
        >>> [job.record_name for job in plan.jobs], list(plan.scratch_cells)
        (['sub-r4-f0'], ['grokking-scratch-sub'])
    """
    section = config.get("finetune") or {}
    plan = FinetunePlan()
    for index, name in enumerate(section.get("runs") or []):
        parsed = RUN_DIR_RE.match(name)
        if (
            not parsed
            or parsed["model_name"] not in cells
            or int(parsed["prime"]) not in config["primes"]
            or int(parsed["seed"]) not in config["seeds"]
            or run_name(parsed["model_name"], int(parsed["prime"]), int(parsed["seed"])) != name
        ):
            example = run_name(next(iter(cells)), config["primes"][0], config["seeds"][0])
            raise ConfigError(
                f"finetune.runs[{index}]", f"{name!r} is not a run of the grid (names like {example!r})", source
            )
        base = (parsed["model_name"], parsed["prime"], parsed["seed"])
        for operation in section["operations"]:
            cell = cells[base[0]]
            scratch = scratch_cell_name(cell.name, operation)
            if scratch not in plan.scratch_cells:
                plan.scratch_cells[scratch] = _scratch_cell(cell, scratch, operation, source)
            for rank in section["ranks"]:
                for seed in section["seeds"]:
                    plan.jobs.append(FinetuneJob(base, operation, rank, seed))
    return plan


def _scratch_cell(cell: Cell, name: str, operation: str, source) -> Cell:
    config = copy.deepcopy(cell.config)
    config["task"] = {**config.get("task", {}), "operation": operation}
    config["model_name"] = name
    try:
        check_cell_semantics(config, source)
    except ConfigError as exc:
        raise ConfigError("finetune.operations", f"{exc.problem} (training {operation} from scratch)", source) from None
    return Cell(name, {**cell.settings, "task.operation": operation}, config)


def finetune_flags(config: dict) -> str:
    """The settings of ``grokpipe finetune`` every job of the config shares, as flags."""
    section = config["finetune"]
    flags = [
        f"--alpha {section['alpha']}",
        "--matrices " + " ".join(section["matrices"]),
        f"--num-epochs {section['num_epochs']}",
        f"--checkpoint-every {section['checkpoint_every']}",
        f"--lr {section['lr']}",
        f"--weight-decay {section['weight_decay']}",
    ]
    return " ".join(flags)


COLUMNS = (
    "base_run",
    "operation",
    "rank",
    "seed",
    "lora_epoch_below_threshold",
    "lora_final_test_loss",
    "lora_epochs",
    "scratch_run",
    "scratch_epoch_below_threshold",
    "scratch_final_test_loss",
    "scratch_epochs",
    "adapter",
)


def transfer_rows(config: dict, plan: FinetunePlan) -> list[dict]:
    """One row per fine-tune: the epochs to the threshold (first epoch whose test loss is below
    it; empty when never) of the LoRA and of the from-scratch run, and their final test losses."""
    from ..layout import run_dir
    from ..loading import EXPORT_META, load_metadata, read_json

    rows = []
    for job in plan.jobs:
        base_dir = run_dir(config["results_dir"], *_typed(job.base))
        record = read_json(base_dir / "finetunes" / f"{job.record_name}.json")
        row = {"base_run": base_dir.name, "operation": job.operation, "rank": job.rank, "seed": job.seed}
        if record.get("adapter"):
            meta = read_json(Path(record["adapter"]) / EXPORT_META)
            row.update(
                lora_epoch_below_threshold=meta.get("grokking_epoch"),
                lora_final_test_loss=(meta.get("losses") or {}).get("test"),
                lora_epochs=(meta.get("epoch") or 0) + 1,
                adapter=Path(record["adapter"]).name,
            )
        else:
            row["adapter"] = "skipped: " + str(record.get("skipped", "no adapter"))
        scratch = load_metadata(run_dir(config["results_dir"], *_typed(job.scratch)))
        row.update(
            scratch_run=run_name(*_typed(job.scratch)),
            scratch_epoch_below_threshold=scratch.get("grokking_epoch"),
            scratch_final_test_loss=scratch.get("final_test_loss"),
            scratch_epochs=scratch.get("final_epoch", 0) + 1,
        )
        rows.append({column: row.get(column) for column in COLUMNS})
    return rows


def _typed(run: Run) -> tuple[str, int, int]:
    return run[0], int(run[1]), int(run[2])


def _median(values: list) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "never"
    text = f"{statistics.median(known):g}"
    return text if len(known) == len(values) else f"{text} ({len(values) - len(known)} never)"


def write_transfer_report(config: dict, plan: FinetunePlan, out_dir: str | Path) -> list[dict]:
    """transfer.csv (every row) and transfer.md (per target operation and rank: the median epoch
    to the threshold of LoRA and of training from scratch, and every row) into ``out_dir``."""
    rows = transfer_rows(config, plan)
    if not rows:
        raise GrokpipeError("finetune.runs is empty: no fine-tunes to report")
    out = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    write_bytes_atomic(out / "transfer.csv", buffer.getvalue().encode())
    threshold = config["grokking_threshold"]
    lines = [
        f"# LoRA transfer from grokked bases vs training from scratch ({config['model_name']})",
        "",
        f"First epoch whose test loss is below {threshold} (0-based; `never` within the epochs trained).",
        "",
        "| target operation | rank | fine-tunes | LoRA (median) | runs from scratch | from scratch (median) |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["operation"], row["rank"]), []).append(row)
    for (operation, rank), members in groups.items():
        done = [r for r in members if r["lora_epochs"] is not None]  # not skipped (the base never grokked)
        skipped = f" ({len(members) - len(done)} skipped: base never grokked)" if len(done) < len(members) else ""
        lora = _median([r["lora_epoch_below_threshold"] for r in done]) if done else "-"
        scratch_runs = {r["scratch_run"]: r["scratch_epoch_below_threshold"] for r in members}  # shared by rows
        scratch = _median(list(scratch_runs.values()))
        lines.append(f"| {operation} | {rank} | {len(done)}{skipped} | {lora} | {len(scratch_runs)} | {scratch} |")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in COLUMNS) + " |")
    write_bytes_atomic(out / "transfer.md", ("\n".join(lines) + "\n").encode())
    return rows
