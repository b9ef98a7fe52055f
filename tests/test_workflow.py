"""The real workflow on a tiny grid: layout, strict TransformerLens loads, rerun behaviour."""

import gc
import json
import weakref

import pytest
import torch
from conftest import jobs_planned, run_dir_of, snakemake, tiny_config, write_config
from transformer_lens import HookedTransformer

import grokpipe
from grokpipe.io.safetensors_io import read_metadata
from grokpipe.workflow import tune_gc_for_large_dags

GRID = [(5, 0), (5, 1), (7, 0), (7, 1)]


@pytest.mark.parametrize("prime,seed", GRID)
def test_grid_layout(trained_grid, prime, seed):
    run = run_dir_of(trained_grid["workdir"], prime, seed)
    name = f"tiny_p{prime}_seed{seed}"
    assert (run / f"{name}.safetensors").is_file()
    assert (run / "artifacts").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_epoch_00009.safetensors",
        "checkpoint_epoch_00019.safetensors",
        "checkpoint_epoch_00029.safetensors",
    ]
    meta = json.loads((run / "metadata.json").read_text())
    for key in (
        "train_losses",
        "test_losses",
        "train_indices",
        "test_indices",
        "checkpoint_epochs",
        "grokking_epoch",
        "grokking_threshold",
        "files",
        "config_hash",
    ):
        assert key in meta, key
    assert len(meta["train_losses"]) == len(meta["test_losses"]) == 30
    assert sorted(meta["train_indices"] + meta["test_indices"]) == list(range(prime * prime))
    config = json.loads((run / "config.json").read_text())
    assert config["prime"] == prime and config["seed"] == seed
    assert config["hooked_transformer_config"]["d_vocab"] == prime + 1
    assert (trained_grid["workdir"] / "logs" / "tiny" / "train" / f"{name}.log").is_file()


@pytest.mark.parametrize("prime,seed", GRID)
def test_every_checkpoint_loads_strictly_into_hooked_transformer(trained_grid, prime, seed):
    run = run_dir_of(trained_grid["workdir"], prime, seed)
    assert grokpipe.list_epochs(run) == [9, 19, 29]
    for epoch in [*grokpipe.list_epochs(run), None]:
        model = grokpipe.load_model(run, epoch=epoch)
        assert isinstance(model, HookedTransformer)
        file = grokpipe.checkpoint_path(run, epoch)
        on_disk = grokpipe.load_state_dict(file)
        loaded = model.state_dict()
        assert loaded.keys() == on_disk.keys()
        assert all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)
        header = read_metadata(file)
        assert header["format"] == "pt"
        assert header["prime"] == str(prime) and header["seed"] == str(seed)
        assert header["model_name"] == "tiny"
        assert header["epoch"] == str(29 if epoch is None else epoch)
        assert {"grokpipe_version", "config_hash"} <= header.keys()


def test_final_model_equals_last_checkpoint_weights(trained_grid):
    run = run_dir_of(trained_grid["workdir"], 7, 1)
    final, last = grokpipe.load_state_dict(run), grokpipe.load_state_dict(run, 29)
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_log_has_progress_and_losses(trained_grid):
    log = (trained_grid["workdir"] / "logs" / "tiny" / "train" / "tiny_p5_seed0.log").read_text()
    assert "epoch 29 train_loss" in log and "test_loss" in log
    assert "30/30" in log  # tqdm progress


def test_rerun_with_nothing_changed_does_nothing(trained_grid):
    proc = snakemake(trained_grid["workdir"], "-n", "--cores", "1", configfile=trained_grid["configfile"])
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "name", ["metadata.json", "verify.json", "artifacts/loss_curves.png", "artifacts/progress_measures.csv"]
)
def test_a_deleted_output_is_made_again(trained_grid, tmp_path, name):
    path = run_dir_of(trained_grid["workdir"], 7, 1) / name
    path.rename(tmp_path / "kept")
    try:
        proc = snakemake(trained_grid["workdir"], "-n", "--cores", "1", configfile=trained_grid["configfile"])
    finally:
        (tmp_path / "kept").rename(path)  # the shared grid as it was (same mtime)
    expected = {"analyze": 1, "summarize": 1, "all": 1}
    if name == "metadata.json":  # the run resumes after its last epoch and writes it again
        expected["train"] = 1
    assert jobs_planned(proc) == {**expected, "total": len(expected)}, proc.stdout
    assert "tiny_p7_seed1/verify.json" in proc.stdout


def test_changed_hyperparameter_reruns_affected_runs(trained_grid, tmp_path):
    configfile = write_config(tmp_path / "lr.yaml", tiny_config(training={"lr": 0.002}))
    proc = snakemake(trained_grid["workdir"], "-n", "--cores", "1", configfile=configfile)
    assert jobs_planned(proc).get("train") == 4


def test_added_seed_trains_only_new_runs(trained_grid, tmp_path):
    configfile = write_config(tmp_path / "seeds.yaml", tiny_config(seeds=[0, 1, 2]))
    proc = snakemake(trained_grid["workdir"], "-n", "--cores", "1", configfile=configfile)
    assert jobs_planned(proc).get("train") == 2
    assert "tiny_p5_seed2" in proc.stdout and "tiny_p7_seed2" in proc.stdout
    train_outputs = [line for line in proc.stdout.splitlines() if line.strip().startswith("output:")]
    assert not [line for line in train_outputs if "_seed0/" in line or "_seed1/" in line]


def test_any_run_can_be_requested_by_path(trained_grid):
    target = "results/tiny/tiny_p11_seed4/metadata.json"
    proc = snakemake(trained_grid["workdir"], "-n", "--cores", "1", target, configfile=trained_grid["configfile"])
    assert jobs_planned(proc).get("train") == 1
    bad = snakemake(
        trained_grid["workdir"],
        "-n",
        "--cores",
        "1",
        "results/tiny/tiny_p9_seed0/metadata.json",
        configfile=trained_grid["configfile"],
        check=False,
    )
    assert bad.returncode != 0 and "p = 9 is not a prime" in bad.stdout + bad.stderr


@pytest.mark.parametrize("device,requested", [("cuda", "gpu=1"), ("cpu", None)])
def test_training_jobs_request_a_gpu_only_on_cuda(tmp_path, device, requested):
    configfile = write_config(tmp_path / "c.yaml", tiny_config(primes=[5], seeds=[0], device=device))
    proc = snakemake(tmp_path, "-n", "--cores", "1", configfile=configfile)
    train_block = proc.stdout.split("\nrule train:")[1].split("\n\n")[0]
    resources = [line for line in train_block.splitlines() if line.strip().startswith("resources:")]
    gpu = [item.strip() for item in resources[0].split(":", 1)[1].split(",") if item.strip().startswith("gpu")]
    assert gpu == ([requested] if requested else []), train_block


class _Cycle:
    def __init__(self):
        self.itself = self


def test_gc_tuning_freezes_the_live_heap_not_its_garbage_and_raises_only_the_first_threshold():
    before = gc.get_threshold()
    gc.disable()  # no automatic collection between making the garbage and the call
    try:
        garbage = _Cycle()
        collected = weakref.ref(garbage)
        del garbage
        tune_gc_for_large_dags()
        assert collected() is None  # collected, not frozen for good
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (10_000, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        gc.enable()


def test_lint_is_clean():
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr
