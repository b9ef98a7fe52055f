"""Loss-curve figures (matplotlib, headless) and the per-grid summary table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import write_bytes_atomic  # noqa: E402


def _series(losses: list) -> tuple[list[int], list[float]]:
    """(epochs, values) of the evaluated epochs (test losses may be null between evaluations)."""
    points = [(e, v) for e, v in enumerate(losses) if v is not None]
    return [e for e, _ in points], [max(v, 1e-300) for _, v in points]  # log scale needs > 0


def _save(fig, *paths: Path) -> None:
    for path in paths:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")
        write_bytes_atomic(path, buffer.getvalue())
    plt.close(fig)


def plot_run(metadata: dict, *paths: Path) -> None:
    """Train and test loss (log scale) of one run, the grokking epoch marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_losses", "train"), ("test_losses", "test")):
        ax.plot(*_series(metadata[key]), label=label, linewidth=1)
    grok = metadata.get("grokking_epoch")
    if grok is not None:
        ax.axvline(
            grok,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"grokking epoch {grok} (test loss < {metadata.get('grokking_threshold')})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{metadata['model_name']}  p = {metadata['prime']}  seed = {metadata['seed']}")
    ax.legend(loc="best", fontsize=8)
    _save(fig, *paths)


def plot_grid(metadatas: list[dict], *paths: Path) -> None:
    """Every run's test loss on one figure."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for meta in metadatas:
        ax.plot(*_series(meta["test_losses"]), linewidth=1, label=f"p={meta['prime']} seed={meta['seed']}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test loss")
    ax.set_title(f"test loss of {len(metadatas)} runs")
    ax.legend(loc="best", fontsize=7, ncol=2)
    _save(fig, *paths)


SUMMARY_COLUMNS = (
    "model_name",
    "prime",
    "seed",
    "source",
    "num_epochs",
    "final_train_loss",
    "final_test_loss",
    "grokking_epoch",
    "grokking_threshold",
    "diverged_at_epoch",
)


def summary_rows(metadatas: list[dict]) -> list[dict]:
    rows = [{c: meta.get(c, "trained" if c == "source" else None) for c in SUMMARY_COLUMNS} for meta in metadatas]
    return sorted(rows, key=lambda r: (r["model_name"], r["prime"], r["seed"]))


def write_summary(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(csv_path, buffer.getvalue().encode())

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in SUMMARY_COLUMNS) + " |" for row in rows]
    write_bytes_atomic(md_path, ("\n".join(lines) + "\n").encode())
