"""Hardening: permissions, silent checkpoint gaps, divergence, concurrent writers, provenance across
resumes, config edge cases, and verification failures that stay visible."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import grokpipe_cli, run_dir_of, snakemake, tiny_config, write_config

import grokpipe
from grokpipe.analysis.inspect_run import list_runs
from grokpipe.analysis.verify import verify_run
from grokpipe.config import grid, validate_config
from grokpipe.errors import GrokpipeError
from grokpipe.io.safetensors_io import first_difference
from grokpipe.layout import RunLayout
from grokpipe.training.train import train
from grokpipe.writer_lock import lock_path, writer_lock


def spec_for(prime=7, seed=0, **training):
    return grid(validate_config(tiny_config(primes=[prime], seeds=[seed], training=training)))[0]


def strict_json(path):
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def tree_modes(root):
    """{relative path: permission bits} of every file and directory under root (root included)."""
    modes = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        modes[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return modes


def run_cli_with_umask(umask, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "grokpipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: os.umask(umask),
    )


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_and_directories_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    configfile = write_config(tmp_path / "config.yaml", tiny_config(training={"num_epochs": 20}))
    run = tmp_path / "results" / "tiny" / "tiny_p5_seed0"
    proc = run_cli_with_umask(umask, "train", str(run), "--config", str(configfile), "--prime", "5", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    modes = tree_modes(run)
    assert "checkpoints/checkpoint_epoch_00019.safetensors" in modes and "resume/training_state.json" in modes
    for rel, mode in modes.items():
        expected = dir_mode if (run / rel).is_dir() else file_mode
        assert mode == expected, f"{rel}: {oct(mode)} != {oct(expected)}"
    assert stat.S_IMODE(lock_path(run).stat().st_mode) == file_mode


def test_a_checkpoint_lost_before_the_resume_point_is_caught_and_recomputed(tmp_path):
    spec = spec_for(num_epochs=40, checkpoint_every=10)
    reference = tmp_path / "reference" / spec.run_name
    train(spec, reference, progress_bar=False)
    run = tmp_path / "damaged" / spec.run_name
    shutil.copytree(reference, run)
    layout = RunLayout(run)
    layout.checkpoint(9).unlink()  # deleted
    damaged = layout.checkpoint(29)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF  # a flipped weight byte
    damaged.write_bytes(bytes(data))
    # What a resume used to do: drop the missing file from the record, so nothing looked wrong.
    meta = json.loads(layout.metadata.read_text())
    meta["checkpoint_epochs"].remove(9)
    del meta["files"]["checkpoints/checkpoint_epoch_00009.safetensors"]
    layout.metadata.write_text(json.dumps(meta))

    report = verify_run(run)
    assert any(
        line.startswith(f"{layout.checkpoint(9)}:") and "scheduled checkpoint" in line for line in report.problems
    )
    assert any(line.startswith(f"{damaged}:") and "sha256 differs" in line for line in report.problems)

    intact_inode = layout.checkpoint(19).stat().st_ino
    meta = train(spec, run, progress_bar=False)  # the rerun recomputes both, bit for bit
    assert meta["checkpoint_epochs"] == [9, 19, 29, 39]
    for epoch in (9, 19, 29, 39):
        assert (
            first_difference(grokpipe.load_state_dict(reference, epoch), grokpipe.load_state_dict(run, epoch)) is None
        )
    assert layout.checkpoint(19).stat().st_ino == intact_inode, "an intact checkpoint was rewritten"
    assert meta["train_losses"] == json.loads((reference / "metadata.json").read_text())["train_losses"]
    assert verify_run(run).ok


def test_divergence_is_detected_recorded_as_strict_json_and_never_ok(tmp_path):
    spec = spec_for(num_epochs=40, checkpoint_every=10, lr=1e30)
    run = tmp_path / "results" / "tiny" / spec.run_name
    meta = train(spec, run, progress_bar=False)
    diverged = meta["diverged_at_epoch"]
    assert diverged is not None and diverged < 39
    on_disk = strict_json(run / "metadata.json")
    assert on_disk["diverged_at_epoch"] == diverged and on_disk["final_epoch"] == diverged
    assert len(on_disk["train_losses"]) == diverged + 1 and None in on_disk["train_losses"] + on_disk["test_losses"]
    assert grokpipe.list_epochs(run) == [e for e in (9, 19, 29, 39) if e <= diverged]
    strict_json(run / "resume" / "training_state.json")

    report = verify_run(run)
    assert not report.ok and any(f"diverged at epoch {diverged}" in line for line in report.problems)
    proc = grokpipe_cli("verify", str(run))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert list_runs(tmp_path / "results")[0]["state"] == f"diverged at epoch {diverged}"
    assert train(spec, run, progress_bar=False)["final_epoch"] == diverged, "a rerun must not train on"


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    configfile = write_config(tmp_path / "config.yaml", tiny_config(training={"num_epochs": 100_000}))
    run = tmp_path / "results" / "tiny" / "tiny_p5_seed0"
    args = ["train", str(run), "--config", str(configfile), "--prime", "5", "--seed", "0", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "grokpipe", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "resume" / "training_state.json").exists():
            time.sleep(0.2)
        assert str(first.pid) in lock_path(run).read_text()
        second = grokpipe_cli(*args)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and "another grokpipe process" in second.stderr
        with pytest.raises(GrokpipeError, match=f"pid {first.pid}"):
            with writer_lock(run, "convert"):
                pass
        assert first.poll() is None, "the first writer was disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with writer_lock(run, "test"):  # the kernel released the killed holder's lock
        pass


def test_provenance_records_every_segment_and_verify_follows_it(tmp_path):
    run = tmp_path / "tiny_p7_seed0"
    train(spec_for(num_epochs=20, checkpoint_every=10), run, threads=1, progress_bar=False)
    meta = train(spec_for(num_epochs=40, checkpoint_every=10), run, threads=2, progress_bar=False)
    segments = meta["environment"]["segments"]
    assert [(s["first_epoch"], s["last_epoch"], s["threads"]) for s in segments] == [(0, 19, 1), (20, 39, 2)]
    assert all(s["device"] == "cpu" and s["seconds"] > 0 for s in segments)
    report = verify_run(run, recompute="all")
    assert report.ok, report.problems
    assert report.checked["recomputed_test_losses"] == [9, 19, 29, 39]


BAD_CONFIGS = [
    ({"training": {"num_epochs": 10.0}}, "training.num_epochs", "not an integer"),
    ({"primes": [31.0]}, "primes[0]", "not an integer"),
    ({"training": {"frac_train": float("nan")}}, "training.frac_train", "not a finite number"),
    ({"training": {"lr": float("inf")}}, "training.lr", "not a finite number"),
    ({"seeds": [2**63]}, "seeds[0]", "maximum"),
    ({"grokking_threshold": float("nan")}, "grokking_threshold", "not a finite number"),
]


@pytest.mark.parametrize("overrides,key,problem", BAD_CONFIGS, ids=[c[1] for c in BAD_CONFIGS])
def test_config_edge_cases_are_refused_before_any_job(tmp_path, overrides, key, problem):
    configfile = write_config(tmp_path / "config.yaml", tiny_config(**overrides))
    proc = snakemake(tmp_path, "--cores", "1", configfile=configfile, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"config key '{key}'" in out and problem in out, out
    assert not (tmp_path / "results").exists()
    cli = grokpipe_cli("train", "--config", str(configfile), "--prime", "5", "--seed", "0", cwd=tmp_path)
    assert cli.returncode == 1 and f"config key '{key}'" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.parametrize(
    "args,flag",
    [
        (["train", "--config", "c.yaml", "--prime", "5", "--seed", "0", "--threads", "-1"], "--threads"),
        (["verify", "x", "--recompute", "abc"], "--recompute"),
        (["train", "--config", "c.yaml", "--prime", "5", "--seed", "0", "--grokking-threshold", "-5"], "--grokking"),
        (["convert", "a.pth", "b", "--seed", "-3"], "--seed"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(args, flag):
    proc = grokpipe_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grokpipe: error:") and flag in lines[0], proc.stderr


def test_a_failed_verification_inside_snakemake_stays_visible(trained_grid, tmp_path):
    workdir = tmp_path / "grid"
    shutil.copytree(trained_grid["workdir"], workdir)
    run = run_dir_of(workdir, 7, 1)
    path = RunLayout(run).checkpoint(19)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (run / "verify.json").unlink()
    proc = snakemake(workdir, "--cores", "2", configfile=workdir / "config.yaml", check=False)
    assert proc.returncode != 0 and not (run / "verify.json").exists()  # Snakemake removed the failed output
    rows = {(r["prime"], r["seed"]): r["state"] for r in list_runs(workdir / "results")}
    assert rows[(7, 1)] == "verification failed" and rows[(5, 0)] == "complete, verified"
    inspected = grokpipe_cli("inspect", str(run))
    named = str(path.relative_to(workdir))  # Snakemake runs verify from the workdir
    assert "verification failed" in inspected.stdout and f"{named}: sha256 differs" in inspected.stdout


def test_first_difference_compares_bits():
    nan = torch.tensor([float("nan"), 1.0])
    assert first_difference({"x": nan}, {"x": nan.clone()}) is None  # identical NaNs are equal
    assert first_difference({"x": torch.tensor([0.0])}, {"x": torch.tensor([-0.0])}) == "tensor x differs"
    assert first_difference({"x": torch.zeros(2)}, {"x": torch.zeros(2, dtype=torch.float64)}) == "tensor x differs"
    assert first_difference({"x": torch.zeros(2)}, {"y": torch.zeros(2)}) == "tensor names differ"


# --- Round two: every reader checks what it reads ----------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs that differ only in the learning rate (same p, seed, architecture), and one of
    another prime; trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for key, prime, lr in (("a", 7, 0.001), ("b", 7, 0.003), ("p5", 5, 0.001)):
        spec = spec_for(prime=prime, seed=0, lr=lr)
        runs[key] = root / key / spec.run_name
        train(spec, runs[key], progress_bar=False)
    return runs


def copy_run(run, tmp_path):
    target = tmp_path / run.name.split("_p")[0] / run.name  # results/{model_name}/{run}
    shutil.copytree(run, target)
    return target


def set_header_shape(path, name, shape):
    """Rewrite one tensor's shape in a safetensors header (a hostile edit; data left as it is)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header[name]["shape"] = shape
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def test_a_dimension_of_two_to_the_63_is_refused_and_replaces_the_verdict(two_runs, tmp_path, capsys):
    from safetensors.torch import save_file

    from grokpipe.cli import main
    from grokpipe.io.safetensors_header import HeaderError, read_header

    empty = tmp_path / "empty.safetensors"
    save_file({"x": torch.zeros(0, 3)}, empty)
    set_header_shape(empty, "x", [2**63, 0])
    with pytest.raises(HeaderError, match="larger than any tensor"):
        read_header(empty)
    run = copy_run(two_runs["a"], tmp_path)
    assert main(["verify", str(run)]) == 0
    assert json.loads((run / "verification.json").read_text())["ok"]
    capsys.readouterr()
    checkpoint = run / "checkpoints" / "checkpoint_epoch_00019.safetensors"
    state = grokpipe.load_state_dict(run, 19)
    save_file(
        {**state, "huge": torch.zeros(0)},
        checkpoint,
        metadata=grokpipe.io.safetensors_io.read_metadata(run / "checkpoints" / "checkpoint_epoch_00009.safetensors"),
    )
    set_header_shape(checkpoint, "huge", [2**63, 0])
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "larger than any tensor" in out.out
    verdict = json.loads((run / "verification.json").read_text())
    assert not verdict["ok"]  # the old "verified" is gone
    (row,) = [row for row in list_runs(run.parent.parent) if row["path"].endswith(run.name)]
    assert row["state"] == "verification failed", row


def test_a_verification_that_cannot_finish_records_a_failure(two_runs, tmp_path, capsys, monkeypatch):
    from grokpipe.analysis import verify
    from grokpipe.cli import main

    run = copy_run(two_runs["a"], tmp_path)
    assert main(["verify", str(run)]) == 0
    capsys.readouterr()

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(verify, "_check_recomputed_losses", broken)
    assert main(["verify", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("grokpipe: error: ") and "verification could not finish" in err and len(err.splitlines()) == 1
    assert not json.loads((run / "verification.json").read_text())["ok"]


@pytest.mark.parametrize(
    "tamper, expected",
    [
        ("link to another run", "a link (the checkpoint of epoch 29 must be the run's own file)"),
        ("another prime's file", "sha256 differs from the one recorded"),
        ("edited", "sha256 differs from the one recorded"),
    ],
)
def test_export_and_progress_read_only_the_runs_own_files(two_runs, tmp_path, capsys, tamper, expected):
    from grokpipe.cli import main

    run = copy_run(two_runs["a"], tmp_path)
    checkpoint = run / "checkpoints" / "checkpoint_epoch_00029.safetensors"
    checkpoint.unlink()
    if tamper == "link to another run":
        checkpoint.symlink_to(two_runs["b"] / "checkpoints" / checkpoint.name)
    elif tamper == "another prime's file":
        shutil.copy(two_runs["p5"] / "checkpoints" / checkpoint.name, checkpoint)
    else:
        shutil.copy(two_runs["b"] / "checkpoints" / checkpoint.name, checkpoint)
    for args in (["export", str(run), "--epoch", "29", "--out", str(tmp_path / "models")], ["progress", str(run)]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("grokpipe: error: ") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert not (run / "artifacts" / "progress_measures.csv").exists()


def test_progress_refuses_a_missing_checkpoint(two_runs, tmp_path, capsys):
    from grokpipe.cli import main

    run = copy_run(two_runs["a"], tmp_path)
    (run / "checkpoints" / "checkpoint_epoch_00019.safetensors").unlink()
    assert main(["progress", str(run)]) == 1
    assert "checkpoint_epoch_00019.safetensors: missing" in capsys.readouterr().err


def test_a_header_naming_another_run_is_refused_even_with_a_matching_hash(two_runs, tmp_path):
    run = copy_run(two_runs["a"], tmp_path)
    metadata = json.loads((run / "metadata.json").read_text())
    other = two_runs["p5"] / "checkpoints" / "checkpoint_epoch_00009.safetensors"
    target = run / "checkpoints" / "checkpoint_epoch_00009.safetensors"
    shutil.copy(other, target)
    metadata["files"]["checkpoints/checkpoint_epoch_00009.safetensors"] = (
        __import__("hashlib").sha256(other.read_bytes()).hexdigest()
    )  # the record rewritten to match: the header still tells
    with pytest.raises(GrokpipeError, match="its header says prime '5', but this run's is '7'"):
        grokpipe.loading.load_checked_state_dict(run, 9, metadata=metadata)


def test_runs_that_differ_in_one_setting_never_share_an_export(two_runs, tmp_path, capsys):
    from grokpipe.cli import main
    from grokpipe.export import export

    a = export(two_runs["a"], tmp_path, "final")
    b = export(two_runs["b"], tmp_path, "final")
    assert a != b and a.name.rsplit("-c", 1)[0] == b.name.rsplit("-c", 1)[0]
    # a copy of run a (same name) never replaces a's export, not even with --force
    twin = copy_run(two_runs["a"], tmp_path / "copies")
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    assert main(["export", str(twin), "--final", "--out", str(tmp_path), "--force"]) == 1
    assert "holds an export of another run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before


def test_grokked_and_final_exports_of_one_run_as_concurrent_jobs(two_runs, tmp_path):
    run = two_runs["a"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "grokpipe", "export", str(run), which, "--out", str(tmp_path), "--force"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for which in ("--final", "--final", "--epoch=29")
    ]
    results = [proc.communicate(timeout=300) + (proc.returncode,) for proc in procs]
    assert all(code == 0 for *_, code in results), results
    assert len({out.strip() for out, _, _ in results}) == 1  # one directory, written once or found done
    assert grokpipe.load_state_dict(Path(results[0][0].strip()))


def test_export_out_that_is_a_file_is_one_line(two_runs, tmp_path, capsys):
    from grokpipe.cli import main

    (tmp_path / "models").write_text("not a directory")
    assert main(["export", str(two_runs["a"]), "--out", str(tmp_path / "models")]) == 1
    err = capsys.readouterr().err.strip()
    assert "models: not a directory" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
