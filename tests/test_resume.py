"""Killed or failed runs resume from their last checkpoint and end bit-identical to uninterrupted ones."""

import errno
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import run_dir_of, snakemake, snakemake_command, tiny_config, write_config

import grokpipe
from grokpipe import cli
from grokpipe.config import grid, validate_config
from grokpipe.io import atomic
from grokpipe.layout import RunLayout
from grokpipe.training import resume
from grokpipe.training.train import train


def spec_for(prime=5, seed=0, **training):
    return grid(validate_config(tiny_config(primes=[prime], seeds=[seed], training=training)))[0]


def assert_runs_identical(a, b):
    ma, mb = grokpipe.load_metadata(a), grokpipe.load_metadata(b)
    for key in ("train_losses", "test_losses", "checkpoint_epochs", "train_indices", "test_indices"):
        assert ma[key] == mb[key], key
    assert grokpipe.list_epochs(a) == grokpipe.list_epochs(b)
    for epoch in [*grokpipe.list_epochs(a), None]:
        wa, wb = grokpipe.load_state_dict(a, epoch), grokpipe.load_state_dict(b, epoch)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"epoch {epoch}"


def file_identities(run):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "checkpoints").iterdir()}


def wait_for_checkpoints(runs, at_least, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("workflow finished before it could be killed; make the runs longer")
        if all(len(list((r / "checkpoints").glob("checkpoint_*"))) >= at_least for r in runs if r.exists()) and all(
            r.exists() for r in runs
        ):
            return
        time.sleep(0.2)
    pytest.fail("no checkpoints appeared")


# ~10 s of training per run: long enough that both runs are killed mid-way whatever their start times.
KILL_TRAINING = {"num_epochs": 3000, "checkpoint_every": 20}
KILL_CONFIG = tiny_config(primes=[5, 7], seeds=[0], training=KILL_TRAINING)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    configfile = write_config(workdir / "config.yaml", KILL_CONFIG)
    snakemake(workdir, "--cores", "2", configfile=configfile)
    return workdir


def test_sigkill_of_the_workflow_resumes_bit_identical(tmp_path, uninterrupted):
    configfile = write_config(tmp_path / "config.yaml", KILL_CONFIG)
    runs = [run_dir_of(tmp_path, p, 0) for p in (5, 7)]
    cmd = snakemake_command(tmp_path, "--cores", "2", configfile=configfile)
    before = {}
    for kill_after in (6, 30):  # kill twice, at different points of the runs (150 checkpoints each)
        proc = subprocess.Popen(
            cmd + ["--rerun-incomplete"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_checkpoints(runs, kill_after, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # let the killed jobs be reaped
        for run in runs:
            before[run] = {**before.get(run, {}), **file_identities(run)}
        assert not any((run / "metadata.json").exists() for run in runs), (
            f"a run finished before the kill at {kill_after}"
        )
        # What the README tells users to type after a kill:
        snakemake(tmp_path, "--unlock", configfile=configfile)
    snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", configfile=configfile)
    for run in runs:
        assert_runs_identical(run, run_dir_of(uninterrupted, int(run.name.split("_p")[1].split("_")[0]), 0))
        after = file_identities(run)
        kept = {name: ident for name, ident in before[run].items() if not name.startswith(".")}
        assert all(after[name] == ident for name, ident in kept.items()), "checkpoint files were rewritten"
        log = (tmp_path / "logs" / "tiny" / "train" / f"{run.name}.log").read_text()
        assert "resuming after epoch" in log
        assert not any(atomic.is_temporary(p) for p in (run / "checkpoints").iterdir())


def test_killed_training_job_resumes_on_plain_rerun(tmp_path, uninterrupted):
    config = tiny_config(primes=[7], seeds=[0], training=KILL_TRAINING)
    configfile = write_config(tmp_path / "config.yaml", config)
    run = run_dir_of(tmp_path, 7, 0)
    cmd = snakemake_command(tmp_path, "--cores", "1", configfile=configfile)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_checkpoints([run], 10, proc)
    trainer = subprocess.run(
        ["pgrep", "-f", f"grokpipe train {run.relative_to(tmp_path)}"], capture_output=True, text=True
    ).stdout.split()
    assert trainer, "training process not found"
    for pid in trainer:
        os.kill(int(pid), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # Snakemake reports the failed job and exits
    snakemake(tmp_path, "--cores", "1", configfile=configfile)
    assert_runs_identical(run, run_dir_of(uninterrupted, 7, 0))


def test_write_error_during_checkpoint_keeps_earlier_ones(tmp_path, monkeypatch, capsys):
    reference = tmp_path / "ref" / "tiny_p5_seed0"
    train(spec_for(num_epochs=40, checkpoint_every=10), reference, progress_bar=False)

    real_replace = os.replace

    def replace_fails_on_epoch_29(src, dst):
        if str(dst).endswith("checkpoint_epoch_00029.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_fails_on_epoch_29)
    run = tmp_path / "run" / "tiny_p5_seed0"
    spec = json.dumps({**spec_for(num_epochs=40, checkpoint_every=10).to_dict()})
    assert cli.main(["train", str(run), "--spec", spec, "--no-progress", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint_epoch_00029.safetensors: write failed (No space left on device)" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_epoch_00009.safetensors",
        "checkpoint_epoch_00019.safetensors",
    ]
    for epoch in (9, 19):
        ours, ref = grokpipe.load_state_dict(run, epoch), grokpipe.load_state_dict(reference, epoch)
        assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not (run / "metadata.json").exists()
    assert json.loads((run / "resume" / "training_state.json").read_text())["epoch"] == 19

    monkeypatch.setattr(atomic.os, "replace", real_replace)  # disk freed: the rerun resumes
    assert cli.main(["train", str(run), "--spec", spec, "--no-progress", "--threads", "1"]) == 0
    assert "resuming after epoch 19" in capsys.readouterr().err
    assert_runs_identical(run, reference)


def test_growing_num_epochs_continues(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="grokpipe")
    direct = tmp_path / "direct" / "tiny_p5_seed0"
    train(spec_for(num_epochs=45, checkpoint_every=10), direct, progress_bar=False)
    run = tmp_path / "grown" / "tiny_p5_seed0"
    train(spec_for(num_epochs=25, checkpoint_every=10), run, progress_bar=False)  # ends off-checkpoint
    first = file_identities(run)
    train(spec_for(num_epochs=45, checkpoint_every=10), run, progress_bar=False)
    assert "resuming after epoch 24" in caplog.text
    assert_runs_identical(run, direct)
    assert all(file_identities(run)[name] == ident for name, ident in first.items())


def test_changed_hyperparameter_starts_fresh_with_a_message(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="grokpipe")
    run = tmp_path / "run" / "tiny_p5_seed0"
    train(spec_for(num_epochs=30, checkpoint_every=10), run, progress_bar=False)
    train(spec_for(num_epochs=30, checkpoint_every=10, lr=0.003), run, progress_bar=False)
    assert "not resuming" in caplog.text and "different configuration" in caplog.text
    fresh = tmp_path / "fresh" / "tiny_p5_seed0"
    train(spec_for(num_epochs=30, checkpoint_every=10, lr=0.003), fresh, progress_bar=False)
    assert_runs_identical(run, fresh)


def test_shrinking_num_epochs_starts_fresh_and_drops_later_checkpoints(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="grokpipe")
    run = tmp_path / "run" / "tiny_p5_seed0"
    train(spec_for(num_epochs=40, checkpoint_every=10), run, progress_bar=False)
    train(spec_for(num_epochs=20, checkpoint_every=10), run, progress_bar=False)
    assert "beyond num_epochs=20" in caplog.text
    assert grokpipe.list_epochs(run) == [9, 19]
    direct = tmp_path / "direct" / "tiny_p5_seed0"
    train(spec_for(num_epochs=20, checkpoint_every=10), direct, progress_bar=False)
    assert_runs_identical(run, direct)


def test_damaged_resume_state_starts_fresh_and_temporaries_are_cleared(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="grokpipe")
    run = tmp_path / "run" / "tiny_p5_seed0"
    train(spec_for(num_epochs=30, checkpoint_every=10), run, progress_bar=False)
    layout = RunLayout(run)
    for tensors in layout.resume_dir.glob("state_epoch_*"):
        tensors.write_bytes(b"damaged")
    (layout.checkpoints_dir / ".checkpoint_epoch_00039.safetensors.tmp-x1").write_bytes(b"torn")
    train(spec_for(num_epochs=40, checkpoint_every=10), run, progress_bar=False)
    assert "does not match" in caplog.text and "removed temporary file" in caplog.text
    direct = tmp_path / "direct" / "tiny_p5_seed0"
    train(spec_for(num_epochs=40, checkpoint_every=10), direct, progress_bar=False)
    assert_runs_identical(run, direct)


def test_only_the_latest_resume_state_is_kept(tmp_path):
    run = tmp_path / "tiny_p5_seed0"
    train(spec_for(num_epochs=30, checkpoint_every=5), run, progress_bar=False)
    files = sorted(p.name for p in (run / "resume").iterdir())
    assert files == ["state_epoch_00029.safetensors", "training_state.json"]
    state = json.loads((run / "resume" / resume.STATE_JSON).read_text())
    assert state["epoch"] == 29 and len(state["train_losses"]) == 30
    tensors = grokpipe.load_state_dict(run / "resume" / "state_epoch_00029.safetensors")
    assert "optimizer.embed.W_E.exp_avg" in tensors and "optimizer.embed.W_E.step" in tensors
    assert "optimizer.embed.b_E.exp_avg" not in tensors  # frozen biases have no optimizer state
