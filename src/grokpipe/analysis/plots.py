"""Loss-curve figures (matplotlib, headless) and the per-grid summary table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from ..io.atomic import write_bytes_atomic  # noqa: E402


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


def plot_run(metadata: dict, *paths: Path, mark_epoch: int | None = None) -> None:
    """Train and test loss (log scale) of one run, the grokking epoch (and ``mark_epoch``) marked."""
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
    if mark_epoch is not None:
        ax.axvline(mark_epoch, color="tab:red", linewidth=1, label=f"exported epoch {mark_epoch}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{metadata['model_name']}  p = {metadata['prime']}  seed = {metadata['seed']}")
    ax.legend(loc="best", fontsize=8)
    _save(fig, *paths)


def _legend_below(ax, ncol: int = 2, fontsize: int = 7) -> None:
    """The legend under the axes, where it never covers a curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=fontsize, frameon=False)


def plot_grid(metadatas: list[dict], *paths: Path) -> None:
    """Every run's test loss on one figure, the grokking threshold drawn as a line."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for meta in metadatas:
        ax.plot(*_series(meta["test_losses"]), linewidth=1, label=f"p={meta['prime']} seed={meta['seed']}")
    thresholds = {meta.get("grokking_threshold") for meta in metadatas} - {None}
    for threshold in sorted(thresholds):
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"grokking threshold {threshold}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test loss")
    ax.set_title(f"test loss of {len(metadatas)} runs")
    _legend_below(ax, ncol=4)
    _save(fig, *paths)


def plot_progress(metadata: dict, rows: list[dict], record: dict, *paths: Path) -> None:
    """The paper's figure 6 shape: train, test, restricted and excluded loss (log scale) over the
    checkpoints with the grokking epoch marked; train and test accuracy, the sum of squared weights
    and the Gini coefficients beside. Legends sit under their panels."""
    epochs = [row["epoch"] for row in rows]
    fig, (ax_loss, ax_accuracy, ax_weights, ax_gini) = plt.subplots(1, 4, figsize=(19, 4.6))
    fig.subplots_adjust(wspace=0.3)
    for key, label in (
        ("train_loss", "train"),
        ("test_loss", "test"),
        ("restricted_loss", "restricted (test pairs)"),
        ("excluded_loss", "excluded (train pairs)"),
    ):
        ax_loss.plot(epochs, [max(row[key], 1e-300) for row in rows], label=label, linewidth=1)
    marks = (
        (metadata.get("grokking_epoch"), "--", "grokking epoch"),
        (record.get("restricted_grokking_epoch"), ":", "restricted loss below threshold"),
    )
    for ax in (ax_loss, ax_accuracy):
        for epoch, style, label in marks:
            if epoch is not None:
                ax.axvline(epoch, color="grey", linestyle=style, linewidth=1, label=f"{label} {epoch}")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    _legend_below(ax_loss)
    for key, label in (("train_accuracy", "train accuracy"), ("test_accuracy", "test accuracy")):
        if all(key in row for row in rows):  # older progress tables have no accuracies
            ax_accuracy.plot(epochs, [row[key] for row in rows], label=label, linewidth=1)
    ax_accuracy.set_ylim(-0.02, 1.02)
    ax_accuracy.set_ylabel("accuracy")
    _legend_below(ax_accuracy)
    ax_weights.plot(epochs, [row["sum_squared_weights"] for row in rows], linewidth=1)
    ax_weights.set_ylabel("sum of squared weights")
    for key, label in (("gini_W_E", "Gini of W_E Fourier norms"), ("gini_W_L", "Gini of W_L Fourier norms")):
        ax_gini.plot(epochs, [row[key] for row in rows], label=label, linewidth=1)
    _legend_below(ax_gini, ncol=1)
    for ax in (ax_loss, ax_accuracy, ax_weights, ax_gini):
        ax.set_xlabel("epoch")
    fig.suptitle(
        f"{metadata['model_name']}  p = {metadata['prime']}  seed = {metadata['seed']}  "
        f"key frequencies {record.get('key_frequencies')}"
    )
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
    "key_frequencies",
    "restricted_grokking_epoch",
)


def summary_rows(metadatas: list[dict], progress: list[dict | None] | None = None) -> list[dict]:
    """One row per run; ``progress`` holds each run's key-frequency record (or None)."""
    progress = progress or [None] * len(metadatas)
    rows = []
    for meta, record in zip(metadatas, progress):
        row = {c: meta.get(c, "trained" if c == "source" else None) for c in SUMMARY_COLUMNS}
        if record is not None:
            row["key_frequencies"] = " ".join(map(str, record.get("key_frequencies", [])))
            row["restricted_grokking_epoch"] = record.get("restricted_grokking_epoch")
        rows.append(row)
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
