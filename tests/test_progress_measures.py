"""Progress measures: checked against an independent computation through HookedTransformer.run_with_cache
(the TransformerLens Grokking_Demo's way), the grokking story on a run that groks, and the artifacts."""

import csv
import json
import math

import pytest
import torch
from conftest import grokpipe_cli, run_dir_of, snakemake, tiny_config, write_config

import grokpipe
from grokpipe.analysis.progress_measures import COLUMNS, write_progress
from grokpipe.config import grid, progress_unsupported_reason, validate_config
from grokpipe.training.train import train

P = 23


@pytest.fixture(scope="module")
def grokking_run(tmp_path_factory):
    """A small run that groks within 500 epochs (p = 23, 70 % train), a checkpoint every 10 epochs."""
    config = validate_config(
        tiny_config(
            primes=[P],
            seeds=[0],
            training={"num_epochs": 500, "checkpoint_every": 10, "lr": 0.005, "frac_train": 0.7},
            model={"d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 256},
        )
    )
    run = tmp_path_factory.mktemp("grok") / f"tiny_p{P}_seed0"
    meta = train(grid(config)[0], run, threads=2, progress_bar=False)
    rows, record = write_progress(run)
    return {"run": run, "meta": meta, "rows": rows, "record": record}


def demo_measures(model, p, train_idx, test_idx, key_freqs):
    """The Grokking_Demo's computations, written independently of grokpipe (run_with_cache, loops)."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    labels = (a + b) % p

    def loss(logits, y):
        return -logits.double().log_softmax(-1).gather(-1, y[:, None])[:, 0].mean().item()

    logits, cache = model.run_with_cache(tokens)
    logits = logits[:, -1]
    acts = cache["post", 0, "mlp"][:, -1]
    resid = cache["resid_mid", 0][:, -1]
    W_out, W_U = model.blocks[0].mlp.W_out, model.unembed.W_U
    approx = torch.zeros_like(acts) + acts.mean(0)
    excluded = acts.clone()
    for f in key_freqs:
        for fn in (torch.cos, torch.sin):
            vec = fn(2 * torch.pi * f * (a + b) / p)
            vec = (vec / vec.norm())[:, None]
            approx += (acts * vec).sum(0) * vec
            excluded -= (acts * vec).sum(0) * vec
    restricted = approx @ W_out @ W_U
    restricted += logits.mean(0, keepdim=True) - restricted.mean(0, keepdim=True)
    excluded_logits = (excluded @ W_out + resid) @ W_U

    x = torch.arange(p, dtype=torch.float64)
    basis = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, p // 2 + 1):
        basis += [torch.sin(2 * torch.pi * k * x / p), torch.cos(2 * torch.pi * k * x / p)]
    F = torch.stack(basis)
    F = F / F.norm(dim=1, keepdim=True)

    def gini(v):  # mean absolute difference form
        v = v.double()
        return ((v[:, None] - v[None, :]).abs().sum() / (2 * len(v) ** 2 * v.mean())).item()

    correct = logits.argmax(-1) == labels
    return {
        "train_loss": loss(logits[train_idx], labels[train_idx]),
        "test_loss": loss(logits[test_idx], labels[test_idx]),
        "train_accuracy": correct[train_idx].double().mean().item(),
        "test_accuracy": correct[test_idx].double().mean().item(),
        "restricted_loss": loss(restricted[test_idx], labels[test_idx]),
        "excluded_loss": loss(excluded_logits[train_idx], labels[train_idx]),
        "sum_squared_weights": sum((q.double() ** 2).sum().item() for q in model.parameters()),
        "gini_W_E": gini((F @ model.embed.W_E[:p].double()).norm(dim=-1)),
        "gini_W_L": gini((F @ (W_out @ W_U).T.double()).norm(dim=-1)),
    }


def test_measures_equal_an_independent_run_with_cache_computation(grokking_run):
    run, meta, rows = grokking_run["run"], grokking_run["meta"], grokking_run["rows"]
    freqs = grokking_run["record"]["key_frequencies"]
    final = grokpipe.load_model(run)
    x = torch.arange(P, dtype=torch.float64)
    F = torch.stack(
        [torch.ones(P, dtype=torch.float64)]
        + [fn(2 * torch.pi * k * x / P) for k in range(1, P // 2 + 1) for fn in (torch.sin, torch.cos)]
    )
    norms = ((F / F.norm(dim=1, keepdim=True)) @ final.embed.W_E[:P].double()).norm(dim=-1)
    assert freqs == sorted({(i + 1) // 2 for i in range(1, P) if norms[i] > norms.max() / 4})
    train_idx, test_idx = torch.tensor(meta["train_indices"]), torch.tensor(meta["test_indices"])
    by_epoch = {row["epoch"]: row for row in rows}
    assert list(by_epoch) == grokpipe.list_epochs(run)
    for epoch in (9, 99, 299, 499):
        expected = demo_measures(grokpipe.load_model(run, epoch), P, train_idx, test_idx, freqs)
        for key, value in expected.items():
            assert math.isclose(by_epoch[epoch][key], value, rel_tol=1e-4, abs_tol=1e-9), (epoch, key)
        assert by_epoch[epoch]["test_loss"] == pytest.approx(meta["test_losses"][epoch], rel=1e-4)


def test_the_grokking_story(grokking_run):
    rows, record, meta = grokking_run["rows"], grokking_run["record"], grokking_run["meta"]
    grokked = meta["grokking_epoch"]
    assert grokked is not None
    # Restricted loss falls below the threshold before the test loss does: the point of the measure.
    assert record["restricted_grokking_epoch"] is not None and record["restricted_grokking_epoch"] < grokked
    # Excluded loss rises while the train loss is already near zero (circuit formation).
    first = rows[0]["excluded_loss"]
    memorised = [row for row in rows if row["epoch"] < grokked and row["train_loss"] < 0.05]
    assert memorised and max(row["excluded_loss"] for row in memorised) > 2 * first
    # Weights shrink once the general circuit takes over, and the embedding becomes sparse in Fourier space.
    assert rows[-1]["sum_squared_weights"] < max(row["sum_squared_weights"] for row in rows)
    assert rows[-1]["gini_W_E"] > rows[0]["gini_W_E"] + 0.2


def test_artifacts_and_cli(grokking_run, tmp_path):
    out = grokking_run["run"] / "artifacts"
    with open(out / "progress_measures.csv") as fh:
        reader = csv.reader(fh)
        assert tuple(next(reader)) == COLUMNS
        assert sum(1 for _ in reader) == len(grokpipe.list_epochs(grokking_run["run"]))
    record = json.loads((out / "key_frequencies.json").read_text())
    assert record["from_epoch"] == 499 and record["key_frequencies"] == grokking_run["record"]["key_frequencies"]
    assert (out / "progress_measures.png").stat().st_size > 10_000
    svg = (out / "progress_measures.svg").read_text()
    assert "test accuracy" in svg and "restricted loss below threshold" in svg
    proc = grokpipe_cli("progress", str(grokking_run["run"]), "--key-frequencies", "1,2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "key_frequencies.json").read_text())["key_frequencies"] == [1, 2]
    bad = grokpipe_cli("progress", str(grokking_run["run"]), "--key-frequencies", "40")
    assert bad.returncode == 1 and "outside 1..11" in bad.stderr and "Traceback" not in bad.stderr


def test_the_workflow_makes_them_for_every_run_and_the_summary(trained_grid):
    workdir = trained_grid["workdir"]
    for prime in (5, 7):
        for seed in (0, 1):
            out = run_dir_of(workdir, prime, seed) / "artifacts"
            assert (out / "progress_measures.csv").exists() and (out / "progress_measures.png").exists()
    with open(workdir / "results" / "tiny" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(row["key_frequencies"] for row in rows)
    assert "restricted_grokking_epoch" in rows[0]


def test_the_workflow_asks_for_them_only_where_they_are_defined(tmp_path):
    assert progress_unsupported_reason(tiny_config()["model"]) is None
    for change in ({"act_fn": "gelu_new"}, {"n_layers": 2}, {"attn_only": True}, {"normalization_type": "LN"}):
        assert progress_unsupported_reason({**tiny_config()["model"], **change}) is not None, change
    configfile = write_config(tmp_path / "config.yaml", tiny_config(model={"act_fn": "gelu_new"}))
    dry = snakemake(tmp_path, "-n", "--cores", "1", configfile=configfile)
    assert "rule train:" in dry.stdout and "rule progress:" not in dry.stdout
