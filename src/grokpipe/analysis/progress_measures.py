"""Progress measures over every checkpoint of a run (Nanda et al., "Progress measures for grokking via
mechanistic interpretability", ICLR 2023), as the TransformerLens Grokking_Demo computes them.

Inputs: all p² pairs ``[a, b, =]`` in lexicographic order (index a·p + b); loss = mean −log_softmax of
the float64 last-position logits at the label; the run's own train/test split.

- Fourier basis F over Z_p: rows [constant, sin 1, cos 1, ..., sin (p−1)/2, cos (p−1)/2] of
  sin/cos(2πkx/p), each row divided by its own L2 norm.
- Key frequencies: norms = ‖F @ W_E[:p]‖ per row on the FINAL model; keep components i > 0 with
  norm > max(norms)/4; key frequencies = sorted set of (i+1)//2. Used for every checkpoint (a config
  key or ``--key-frequencies`` may override them).
- For each key frequency f, unit vectors c_f, s_f over the p² pairs: normalised cos/sin(2πf(a+b)/p).
- Restricted loss: N = MLP post-activations at the last position (p² × d_mlp); approx = mean over
  pairs of N + Σ_f [c_f(c_fᵀN) + s_f(s_fᵀN)]; logits_R = approx · W_out · W_U, shifted so that its
  mean over pairs equals the mean of the real logits (per output class); loss on the TEST pairs.
- Excluded loss: N_excl = N − Σ_f [c_f(c_fᵀN) + s_f(s_fᵀN)]; logits = (N_excl · W_out + resid_mid at
  the last position) · W_U; loss on the TRAIN pairs.
- Sum of squared weights: Σ over all parameters (not buffers) of param².
- Gini coefficients, G(x) = 2Σ i·x₍ᵢ₎/(nΣx) − (n+1)/n on sorted x ≥ 0 (i from 1), of the p Fourier
  component norms of W_E[:p] and of the neuron-logit map W_L = (W_out·W_U)ᵀ (norm over neurons of
  F @ W_L).

Cost: one last-position forward per checkpoint feeds every measure. The attention output comes from
per-token tables (as in the lean forward); the only p² × d_mlp product is N itself, which reaches the
logits through M = W_out·W_U. Restricted and excluded logits reuse it through the rank-2K projection
(C, CᵀN): excluded logits = logits − C(CᵀN)M − biases, never another p² × d_mlp matrix.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import progress_unsupported_reason
from ..errors import GrokpipeError
from ..io.atomic import write_bytes_atomic, write_json_atomic
from ..layout import RunLayout
from ..training.data import all_pairs
from ..training.folded import ACTIVATIONS, single_layer_resid_mid
from ..training.model import config_from_json, empty_model, loss_fn

COLUMNS = (
    "epoch",
    "train_loss",
    "test_loss",
    "train_accuracy",
    "test_accuracy",
    "restricted_loss",
    "excluded_loss",
    "sum_squared_weights",
    "gini_W_E",
    "gini_W_L",
)
KEY_FREQUENCY_RULE = (
    "components i > 0 of (F @ W_E[:p]).norm(dim=-1) on the final model with norm > max/4; key frequency = (i + 1) // 2"
)


def fourier_basis(p: int) -> torch.Tensor:
    """(p, p): constant, then sin k, cos k for k = 1..(p-1)/2, each row of unit L2 norm."""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, p // 2 + 1):
        rows += [torch.sin(2 * math.pi * k * x / p), torch.cos(2 * math.pi * k * x / p)]
    basis = torch.stack(rows[:p])
    return basis / basis.norm(dim=-1, keepdim=True)


def gini(x: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n-1)/n when one holds everything."""
    x = x.to(torch.float64).flatten().sort().values
    n, total = x.numel(), x.sum()
    if total <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(2 * (i * x).sum() / (n * total) - (n + 1) / n)


def fourier_norms(basis: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Norm of each Fourier component of the p rows of ``W`` (``basis``: fourier_basis(p))."""
    return (basis @ W.detach().to(torch.float64)).norm(dim=-1)


def key_frequencies(W_E: torch.Tensor, p: int) -> list[int]:
    norms = fourier_norms(fourier_basis(p), W_E[:p])
    keep = [i for i in range(1, p) if norms[i] > norms.max() / 4]
    return sorted({(i + 1) // 2 for i in keep})


def frequency_vectors(p: int, frequencies: list[int]) -> torch.Tensor:
    """(p², 2K): the unit vectors c_f, s_f over all pairs (index a·p + b) for each frequency f."""
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    columns = []
    for f in frequencies:
        for fn in (torch.cos, torch.sin):
            v = fn(2 * math.pi * f * (a + b) / p)
            columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


@dataclass
class Inputs:
    """What every checkpoint of a run is measured on."""

    tokens: torch.Tensor
    labels: torch.Tensor
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    basis: torch.Tensor  # (p², 2K) float32, the c_f and s_f columns
    fourier: torch.Tensor  # (p, p) float64, the Fourier basis over Z_p
    p: int


def measure(model, inputs: Inputs) -> dict:
    """Every measure of one checkpoint (the model already holds its weights)."""
    mlp, W_U, b_U = model.blocks[0].mlp, model.unembed.W_U, model.unembed.b_U
    act = ACTIVATIONS[model.cfg.act_fn]
    with torch.inference_mode():
        resid_mid = single_layer_resid_mid(model, inputs.tokens)  # (p², d_model)
        N = act(torch.addmm(mlp.b_in, resid_mid, mlp.W_in))  # the one p² × d_mlp activation
        M = mlp.W_out @ W_U  # (d_mlp, p): neuron -> logit
        bias = mlp.b_out @ W_U + b_U
        logits = torch.addmm(torch.addmm(bias, resid_mid, W_U), N, M)  # = (resid_mid + N W_out + b_out) W_U + b_U
        C = inputs.basis
        P = C.T @ N  # (2K, d_mlp): the key-frequency components of every neuron
        key_logits = C @ (P @ M)  # what the key frequencies of N contribute to the logits
        restricted = N.mean(dim=0, keepdim=True) @ M + key_logits
        restricted = restricted + (logits.mean(dim=0, keepdim=True) - restricted.mean(dim=0, keepdim=True))
        excluded = logits - bias - key_logits  # = (N_excl W_out + resid_mid) W_U
        W_L = M.T  # (p, d_mlp)
        params = [param.detach().to(torch.float64) for param in model.parameters()]
        train, test = inputs.train_idx, inputs.test_idx
        predictions = logits.argmax(dim=-1) == inputs.labels
        return {
            "train_loss": loss_fn(logits[train], inputs.labels[train]).item(),
            "test_loss": loss_fn(logits[test], inputs.labels[test]).item(),
            "train_accuracy": predictions[train].double().mean().item(),
            "test_accuracy": predictions[test].double().mean().item(),
            "restricted_loss": loss_fn(restricted[test], inputs.labels[test]).item(),
            "excluded_loss": loss_fn(excluded[train], inputs.labels[train]).item(),
            "sum_squared_weights": float(sum((q**2).sum() for q in params)),
            "gini_W_E": gini(fourier_norms(inputs.fourier, model.embed.W_E[: inputs.p])),
            "gini_W_L": gini(fourier_norms(inputs.fourier, W_L)),
        }


def progress_measures(run_dir: str | Path, frequencies: list[int] | None = None) -> tuple[list[dict], dict]:
    """(one row per checkpoint, the key-frequency record) of a trained or converted run."""
    from ..loading import load_checked_state_dict, load_config, load_metadata

    layout = RunLayout(Path(run_dir))
    metadata, config = load_metadata(layout.root), load_config(layout.root)
    model = empty_model(config_from_json(config["hooked_transformer_config"]))
    reason = progress_unsupported_reason(model.cfg.to_dict(), metadata.get("operation", "add"))
    if reason:
        raise GrokpipeError(f"{layout.root}: no progress measures: {reason}")
    p = int(metadata["prime"])
    final_epoch = metadata.get("final_epoch")
    if frequencies is None:
        final = load_checked_state_dict(layout.root, metadata=metadata)
        frequencies = key_frequencies(final["embed.W_E"], p)
        record = {"key_frequencies": frequencies, "from_epoch": final_epoch, "rule": KEY_FREQUENCY_RULE}
    else:
        bad = [f for f in frequencies if not 1 <= f <= (p - 1) // 2]
        if bad:
            raise GrokpipeError(f"key frequencies {bad} are outside 1..{(p - 1) // 2} for p = {p}")
        frequencies = sorted(set(frequencies))
        record = {"key_frequencies": frequencies, "from_epoch": None, "rule": "given by the user"}
    tokens, labels = all_pairs(p)
    inputs = Inputs(
        tokens=tokens,
        labels=labels,
        train_idx=torch.tensor(metadata["train_indices"], dtype=torch.long),
        test_idx=torch.tensor(metadata["test_indices"], dtype=torch.long),
        basis=frequency_vectors(p, frequencies).to(torch.float32),
        fourier=fourier_basis(p),
        p=p,
    )
    rows = []
    # Every checkpoint of the run's record, each checked to be the run's own file as written: a
    # missing one is an error (as for verify), a swapped or edited one is refused.
    for epoch in metadata.get("checkpoint_epochs") or []:
        model.load_state_dict(load_checked_state_dict(layout.root, epoch, metadata=metadata), strict=True)
        rows.append({"epoch": epoch, **measure(model, inputs)})
    return rows, record


def restricted_grokking_epoch(rows: list[dict], threshold: float) -> int | None:
    """First checkpoint epoch whose restricted loss is below the grokking threshold."""
    for row in rows:
        if row["restricted_loss"] < threshold:
            return row["epoch"]
    return None


def write_progress(run_dir: str | Path, frequencies: list[int] | None = None) -> tuple[list[dict], dict]:
    """Compute and write artifacts/progress_measures.csv, key_frequencies.json and the figure."""
    from ..loading import load_metadata
    from .plots import plot_progress

    layout = RunLayout(Path(run_dir))
    rows, record = progress_measures(layout.root, frequencies)
    metadata = load_metadata(layout.root)
    record["restricted_grokking_epoch"] = restricted_grokking_epoch(rows, metadata.get("grokking_threshold", 0.01))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out = layout.artifacts_dir
    write_bytes_atomic(out / "progress_measures.csv", buffer.getvalue().encode())
    write_json_atomic(out / "key_frequencies.json", record)
    plot_progress(metadata, rows, record, out / "progress_measures.png", out / "progress_measures.svg")
    return rows, record


def read_progress(run_dir: str | Path) -> tuple[list[dict], dict] | None:
    """The written measures of a run (None when there are none)."""
    out = RunLayout(Path(run_dir)).artifacts_dir
    try:
        text = (out / "progress_measures.csv").read_text()
    except OSError:
        return None
    rows = [
        {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))
    ]
    from ..loading import read_json

    return rows, read_json(out / "key_frequencies.json")
