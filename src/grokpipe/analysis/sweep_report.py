"""A sweep's table (one row per run) and its phase diagrams.

Outcome classes, per run (thresholds from the run's metadata.json):

- ``diverged``: a loss became non-finite (``diverged_at_epoch``);
- ``generalised``: the test loss fell below the grokking threshold (a grokking epoch exists);
- ``memorised``: not generalised, but the train accuracy reached 99 % (a memorization epoch exists);
- ``neither``: none of these (still learning at the end, or never fitting the train set).

A cell's outcome in the figures is its most frequent class over the seeds (ties go to the earlier
class in the list above); its grokking epoch is the median over the seeds (the lower middle one for
an even number of seeds), a seed that never grokked counting as later than any epoch, so a cell
whose median seed never grokked is marked "never".
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import GrokpipeError
from ..io.atomic import write_bytes_atomic
from ..layout import RunLayout, run_dir
from ..sweep import Cell, axes, expand, format_value
from .plots import _save, plt

log = logging.getLogger(__name__)

OUTCOMES = ("generalised", "memorised", "neither", "diverged")
OUTCOME_COLORS = {"generalised": "#1b9e77", "memorised": "#e6ab02", "neither": "#bdbdbd", "diverged": "#d95f02"}
RUN_COLUMNS = (
    "prime",
    "seed",
    "outcome",
    "grokking_epoch",
    "memorization_epoch",
    "final_train_loss",
    "final_test_loss",
    "final_train_accuracy",
    "final_test_accuracy",
    "diverged_at_epoch",
    "stopped_at_epoch",
    "final_epoch",
    "wall_seconds",
    "run_dir",
)
FIGURES = ("grokking_epoch.png", "outcome.png", "grokking_vs_axis.png")


@dataclass(frozen=True)
class SweepRuns:
    """The runs of a sweep: its axes (dotted keys), cells, and each run's directory."""

    axes: list[str]
    cells: list[Cell]
    primes: list[int]
    seeds: list[int]
    results_dir: Path

    @classmethod
    def of_config(cls, config: dict) -> SweepRuns:
        """The runs a validated config describes."""
        return cls(list(axes(config)), expand(config), config["primes"], config["seeds"], Path(config["results_dir"]))

    def run_dirs(self) -> Iterable[tuple[Cell, int, int, Path]]:
        for cell in self.cells:
            for p in self.primes:
                for s in self.seeds:
                    yield cell, p, s, run_dir(self.results_dir, cell.name, p, s)


def outcome(metadata: dict) -> str:
    """The run's outcome class (module docstring)."""
    if metadata.get("diverged_at_epoch") is not None:
        return "diverged"
    if metadata.get("grokking_epoch") is not None:
        return "generalised"
    if metadata.get("memorization_epoch") is not None:
        return "memorised"
    return "neither"


def run_row(cell: Cell, run_axes: list[str], path: Path, prime: int, seed: int) -> dict:
    """One table row: the cell's axis values and the run's results (``outcome`` "missing" when the
    run has no metadata.json yet)."""
    from ..loading import read_json

    row = {"cell": cell.name, **{key: cell.settings[key] for key in run_axes}, "prime": prime, "seed": seed}
    row["run_dir"] = str(path)
    metadata_path = RunLayout(path).metadata
    if not metadata_path.exists():
        return {**{c: None for c in RUN_COLUMNS}, **row, "outcome": "missing"}
    metadata = read_json(metadata_path)
    segments = (metadata.get("environment") or {}).get("segments") or []
    row.update({key: metadata.get(key) for key in RUN_COLUMNS if key not in row})
    row["outcome"] = outcome(metadata)
    row["wall_seconds"] = round(sum(s.get("seconds", 0.0) for s in segments), 1)
    return row


def sweep_rows(runs: SweepRuns) -> list[dict]:
    """One row per run, in the sweep's order (cells, then primes, then seeds)."""
    return [run_row(cell, runs.axes, path, p, s) for cell, p, s, path in runs.run_dirs()]


def write_table(rows: list[dict], run_axes: list[str], path: Path) -> None:
    """The table as CSV: cell, one column per axis (its dotted key), then RUN_COLUMNS."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["cell", *run_axes, *RUN_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format_value(v) if isinstance(v, list) else v for k, v in row.items()})
    write_bytes_atomic(path, buffer.getvalue().encode())


def _sort_key(value):
    return (0, value, "") if isinstance(value, int | float) and not isinstance(value, bool) else (1, 0, str(value))


def axis_values(rows: list[dict], key: str) -> list:
    """The distinct values of an axis, numbers ascending, others in name order."""
    seen = []
    for row in rows:
        value = row[key]
        if value not in seen:
            seen.append(value)
    return sorted(seen, key=_sort_key)


def is_log_spaced(values: list) -> bool:
    """Positive numbers spanning a factor of 10 or more: shown on a log axis."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return len(numbers) == len(values) >= 2 and min(numbers) > 0 and max(numbers) / min(numbers) >= 10


def median_grokking_epoch(rows: list[dict]) -> float | None:
    """Median grokking epoch over seeds (the lower middle one for an even count), a seed that never
    grokked counting as infinitely late (None: the median seed never grokked)."""
    epochs = [math.inf if r["grokking_epoch"] is None else r["grokking_epoch"] for r in rows]
    median = statistics.median_low(epochs) if epochs else math.inf
    return None if math.isinf(median) else median


def majority_outcome(rows: list[dict]) -> tuple[str, int]:
    """The most frequent outcome over the seeds (ties: earlier in OUTCOMES) and its count."""
    counts = {name: sum(r["outcome"] == name for r in rows) for name in OUTCOMES}
    best = max(OUTCOMES, key=lambda name: (counts[name], -OUTCOMES.index(name)))
    return best, counts[best]


def _panels(rows: list[dict], x: str, y: str | None, run_axes: list[str]) -> dict[str, list[dict]]:
    """Rows grouped by prime and by the values of the axes not drawn (one figure panel each)."""
    others = [key for key in run_axes if key not in (x, y)]
    panels: dict[str, list[dict]] = {}
    for row in rows:
        title = "  ".join([f"p = {row['prime']}", *(f"{key} = {format_value(row[key])}" for key in others)])
        panels.setdefault(title, []).append(row)
    return panels


def _grid(n: int) -> tuple[int, int]:
    columns = min(n, 3)
    return -(-n // columns), columns


def _label(value) -> str:
    return format_value(value) if not isinstance(value, float) else f"{value:g}"


def plot_heat_maps(rows: list[dict], x: str, y: str | None, run_axes: list[str], grok_path: Path, outcome_path: Path):
    """Median grokking epoch and majority outcome per (x, y) cell, one panel per prime and per
    combination of the other axes."""
    panels = _panels(rows, x, y, run_axes)
    xs = axis_values(rows, x)
    ys = axis_values(rows, y) if y else [None]
    n_rows, n_columns = _grid(len(panels))
    size = (max(4.5, 0.9 * len(xs) + 2.5) * n_columns, max(3.0, 0.6 * len(ys) + 2) * n_rows)
    fig_grok, grok_axes = plt.subplots(n_rows, n_columns, figsize=size, squeeze=False)
    fig_outcome, outcome_axes = plt.subplots(n_rows, n_columns, figsize=size, squeeze=False)
    vmax = max([r["grokking_epoch"] for r in rows if r["grokking_epoch"] is not None] or [1])
    cmap = plt.get_cmap("viridis")
    for index, (title, panel_rows) in enumerate(panels.items()):
        ax_g, ax_o = grok_axes.flat[index], outcome_axes.flat[index]
        for i, yv in enumerate(ys):
            for j, xv in enumerate(xs):
                seeds = [r for r in panel_rows if r[x] == xv and (y is None or r[y] == yv)]
                if not seeds:
                    continue
                grok = median_grokking_epoch(seeds)
                n_grokked = sum(r["grokking_epoch"] is not None for r in seeds)
                if grok is None:  # hatched grey, never a number
                    ax_g.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#eeeeee", hatch="///"))
                    ax_g.text(j, i, f"never\n{n_grokked}/{len(seeds)}", ha="center", va="center", fontsize=7)
                else:
                    ax_g.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=cmap(grok / vmax)))
                    color = "white" if grok / vmax < 0.6 else "black"
                    text = f"{grok:g}\n{n_grokked}/{len(seeds)}"
                    ax_g.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
                name, count = majority_outcome(seeds)
                ax_o.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=OUTCOME_COLORS[name]))
                ax_o.text(j, i, f"{name}\n{count}/{len(seeds)}", ha="center", va="center", fontsize=7)
        for ax in (ax_g, ax_o):
            ax.set_xlim(-0.5, len(xs) - 0.5)
            ax.set_ylim(-0.5, len(ys) - 0.5)
            ax.set_xticks(range(len(xs)), [_label(v) for v in xs], fontsize=8)
            ax.set_yticks(range(len(ys)), [_label(v) if y else "" for v in ys], fontsize=8)
            ax.set_xlabel(x)
            ax.set_ylabel(y or "")
            ax.set_title(title, fontsize=9)
    for axes_grid in (grok_axes, outcome_axes):
        for ax in axes_grid.flat[len(panels) :]:
            ax.set_visible(False)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig_grok.colorbar(mappable, ax=grok_axes, label="median grokking epoch over seeds", shrink=0.8)
    fig_grok.suptitle("grokking epoch (cell text: median, seeds grokked / seeds)", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=OUTCOME_COLORS[name]) for name in OUTCOMES]
    fig_outcome.legend(handles, OUTCOMES, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig_outcome.suptitle("outcome of most seeds (cell text: class, seeds in it / seeds)", fontsize=10)
    _save(fig_grok, grok_path)
    _save(fig_outcome, outcome_path)


def plot_against_axis(rows: list[dict], x: str, y: str | None, run_axes: list[str], path: Path) -> None:
    """Grokking epoch against axis ``x``: every seed as a dot, the median as a line, one line per
    value of ``y``, one panel per prime (and other axes); seeds that never grokked as crosses above."""
    panels = _panels(rows, x, y, run_axes)
    xs = axis_values(rows, x)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs)
    position = {v: (v if numeric else i) for i, v in enumerate(xs)}
    n_rows, n_columns = _grid(len(panels))
    fig, axes_grid = plt.subplots(n_rows, n_columns, figsize=(5.5 * n_columns, 4 * n_rows), squeeze=False)
    top = max([r["grokking_epoch"] for r in rows if r["grokking_epoch"] is not None] or [1]) * 1.15
    for index, (title, panel_rows) in enumerate(panels.items()):
        ax = axes_grid.flat[index]
        for k, yv in enumerate(axis_values(panel_rows, y) if y else [None]):
            color = plt.get_cmap("tab10")(k % 10)
            line_x, line_y = [], []
            for xv in xs:
                seeds = [r for r in panel_rows if r[x] == xv and (y is None or r[y] == yv)]
                grokked = [r["grokking_epoch"] for r in seeds if r["grokking_epoch"] is not None]
                ax.scatter([position[xv]] * len(grokked), grokked, color=color, s=12, alpha=0.6)
                never = len(seeds) - len(grokked)
                if never:
                    ax.scatter([position[xv]] * never, [top] * never, color=color, marker="x", s=20)
                median = median_grokking_epoch(seeds) if seeds else None
                if median is not None:
                    line_x.append(position[xv])
                    line_y.append(median)
            label = f"{y} = {_label(yv)}" if y else "median over seeds"
            ax.plot(line_x, line_y, color=color, linewidth=1.2, marker="o", markersize=5, label=label)
        ax.axhline(top, color="grey", linewidth=0.5, linestyle=":")
        ax.text(0.01, top, " never grokked (x)", transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
        if numeric and is_log_spaced(xs):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
        ax.set_ylim(bottom=0, top=top * 1.08)
        ax.set_xlabel(x)
        ax.set_ylabel("grokking epoch")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes_grid.flat[len(panels) :]:
        ax.set_visible(False)
    _save(fig, path)


def plotted_axes(run_axes: list[str], x: str | None, y: str | None) -> tuple[str, str | None]:
    """The axes drawn: ``x``/``y`` as given (each must be an axis), else the first two axes."""
    for name, key in (("x", x), ("y", y)):
        if key is not None and key not in run_axes:
            raise GrokpipeError(
                f"sweep figure axis {name} = {key!r} is not an axis of the sweep ({', '.join(run_axes)})"
            )
    if x is None:
        x = run_axes[0]
    if y is None:
        rest = [key for key in run_axes if key != x]
        y = rest[0] if rest else None
    if x == y:
        raise GrokpipeError(f"sweep figure axes x and y are both {x!r}")
    return x, y


def write_sweep_report(config: dict, out_dir: str | Path, *, x: str | None = None, y: str | None = None) -> list[dict]:
    """Write ``sweep.csv`` and the figures (FIGURES) of a validated sweep config into ``out_dir``.

    Args:
        config: a validated config with a ``sweep:`` section.
        out_dir: where the table and figures go (created).
        x, y: the axes of the heat maps (default: ``sweep_figures`` of the config, else the first two).

    Returns:
        The table's rows.

    Example:
        >>> write_sweep_report(validate_config(read_config_file("config/sweep.yaml")), "results/_sweeps/grokking")
    """
    runs = SweepRuns.of_config(config)
    if not runs.axes:
        raise GrokpipeError("the config has no sweep: axes (nothing to tabulate across cells)")
    figures = config.get("sweep_figures") or {}
    x, y = plotted_axes(runs.axes, x or figures.get("x"), y or figures.get("y"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(runs)
    write_table(rows, runs.axes, out_dir / "sweep.csv")
    done = [row for row in rows if row["outcome"] != "missing"]
    missing = len(rows) - len(done)
    if missing:
        log.warning("%d of %d runs have no metadata.json yet; the figures leave them out", missing, len(rows))
    if done:
        plot_heat_maps(done, x, y, runs.axes, out_dir / FIGURES[0], out_dir / FIGURES[1])
        plot_against_axis(done, x, y, runs.axes, out_dir / FIGURES[2])
    return rows
