"""Training on a GPU (``device: cuda``), alone and stacked: skipped where no CUDA device is visible
(CI has none; run them on a GPU machine with ``pytest tests/test_cuda.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

import grokpipe
from grokpipe.config import grid, validate_config
from grokpipe.training.stacked import train_group
from grokpipe.training.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def specs(seeds=(0, 1, 2), epochs=60):
    config = tiny_config(primes=[13], seeds=list(seeds), training={"num_epochs": epochs, "checkpoint_every": 20})
    return grid(validate_config(config))


def relative_deviation(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b) if x is not None and y is not None)


def test_a_run_trained_on_cuda_equals_the_cpu_run_and_loads_on_cpu(tmp_path):
    (spec, *_) = specs()
    on_gpu = train(spec, tmp_path / "gpu" / spec.run_name, device="cuda", progress_bar=False)
    on_cpu = train(spec, tmp_path / "cpu" / spec.run_name, device="cpu", progress_bar=False)
    assert relative_deviation(on_gpu["train_losses"][:20], on_cpu["train_losses"][:20]) < 1e-4
    assert on_gpu["environment"]["device"] == "cuda"
    model = grokpipe.load_model(tmp_path / "gpu" / spec.run_name, epoch=39)
    assert next(model.parameters()).device.type == "cpu"


def test_a_stacked_job_on_cuda_equals_its_lone_runs_and_resumes(tmp_path):
    members = specs()
    dirs = [tmp_path / "job" / s.run_name for s in members]
    job = train_group(members, dirs, device="cuda", progress_bar=False)
    for spec, meta in zip(members, job):
        alone = train(spec, tmp_path / "alone" / spec.run_name, device="cuda", progress_bar=False)
        assert relative_deviation(meta["train_losses"][:20], alone["train_losses"][:20]) < 1e-4
        assert meta["environment"]["implementation"] == "stacked"
    # a job grown to more epochs continues every member from its end
    longer = specs(epochs=80)
    grown = train_group(longer, dirs, device="cuda", progress_bar=False)
    assert all(len(meta["train_losses"]) == 80 for meta in grown)
    assert all(g["train_losses"][:60] == m["train_losses"] for g, m in zip(grown, job))
