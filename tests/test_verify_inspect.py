"""verify, inspect and list on clean, damaged, converted and unfinished runs; artifacts and report."""

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import grokpipe_cli, run_dir_of, snakemake

import grokpipe
from grokpipe.analysis import inspect_run
from grokpipe.analysis.inspect_run import inspect_path, list_runs
from grokpipe.analysis.verify import sample_epochs, verify_run
from grokpipe.io import safetensors_header
from grokpipe.io.safetensors_header import HeaderError, read_header


@pytest.fixture
def run_copy(trained_grid, tmp_path):
    """A private copy of a trained tiny run to damage."""
    target = tmp_path / "results" / "tiny" / "tiny_p7_seed1"
    shutil.copytree(run_dir_of(trained_grid["workdir"], 7, 1), target)
    for name in ("verify.json", "verification.json"):
        (target / name).unlink(missing_ok=True)
    return target


def checkpoint(run, epoch):
    return run / "checkpoints" / f"checkpoint_epoch_{epoch:05d}.safetensors"


def test_workflow_verified_every_run_and_made_artifacts(trained_grid):
    for prime, seed in [(5, 0), (5, 1), (7, 0), (7, 1)]:
        run = run_dir_of(trained_grid["workdir"], prime, seed)
        report = json.loads((run / "verify.json").read_text())
        assert report["ok"] and report["problems"] == []
        assert report["checked"]["strict_loads"] == 4 and report["checked"]["recomputed_test_losses"] == [9, 19, 29]
        assert (run / "artifacts" / "loss_curves.png").stat().st_size > 1000
        assert (run / "artifacts" / "loss_curves.svg").read_text().lstrip().startswith("<?xml")
    summary = trained_grid["workdir"] / "results" / "tiny"
    lines = (summary / "summary.csv").read_text().splitlines()
    assert lines[0].startswith("model_name,prime,seed,source") and len(lines) == 5
    assert (summary / "summary.md").read_text().count("| tiny |") == 4
    assert (summary / "test_curves.png").exists()
    assert "grokking threshold 0.01" in (summary / "test_curves.svg").read_text()  # the line and its legend


def test_report_builds(trained_grid):
    report = trained_grid["workdir"] / "report.html"
    snakemake(trained_grid["workdir"], "--report", str(report), configfile=trained_grid["configfile"])
    assert report.stat().st_size > 10_000
    text = report.read_text(errors="replace")
    assert "loss_curves.png" in text and "test_curves.png" in text


def test_verify_clean_run_cli(run_copy):
    proc = grokpipe_cli("verify", str(run_copy), "--report", str(run_copy / "verify.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok (4 files, 4 hashes, 4 strict loads, 3 test losses recomputed)" in proc.stdout


def test_analyze_cli_draws_verifies_then_measures_only_a_run_that_verifies(run_copy):
    artifacts = run_copy / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)
    report = run_copy / "verify.json"
    proc = grokpipe_cli("analyze", str(run_copy), "--report", str(report), "--progress", "--key-frequencies", "1,2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(report.read_text())["ok"] and (artifacts / "loss_curves.png").stat().st_size > 1000
    rows = (artifacts / "progress_measures.csv").read_text().splitlines()
    assert len(rows) == 1 + len(grokpipe.list_epochs(run_copy))
    assert json.loads((artifacts / "key_frequencies.json").read_text())["key_frequencies"] == [1, 2]

    shutil.rmtree(artifacts)
    report.unlink()
    path, _ = truncate(run_copy)
    proc = grokpipe_cli("analyze", str(run_copy), "--report", str(report), "--progress")
    assert proc.returncode == 1 and f"{path}:" in proc.stdout and "Traceback" not in proc.stderr
    assert not json.loads((run_copy / "verification.json").read_text())["ok"]  # kept in the run
    assert (artifacts / "loss_curves.png").exists()  # from metadata.json alone, before the check
    assert not (artifacts / "progress_measures.csv").exists(), "no measures of a run that failed verification"


def truncate(run):
    path = checkpoint(run, 19)
    path.write_bytes(path.read_bytes()[:-100])
    return path, "truncated"


def header_past_end(run):
    path = checkpoint(run, 9)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    path.write_bytes(bytes(data))
    return path, "points past the end"


def flip_data_byte(run):
    path = checkpoint(run, 29)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, "sha256 differs"


def delete_checkpoint(run):
    path = checkpoint(run, 19)
    path.unlink()
    return path, "missing on disk"


def metadata_lengths(run):
    path = run / "metadata.json"
    meta = json.loads(path.read_text())
    meta["test_losses"] = meta["test_losses"][:-1]
    path.write_text(json.dumps(meta))
    return path, "test_losses has 29 entries for final_epoch 29"


def config_mismatch(run):
    path = run / "config.json"
    config = json.loads(path.read_text())
    config["hooked_transformer_config"]["d_mlp"] = 65
    path.write_text(json.dumps(config))
    return checkpoint(run, 9), "does not load strictly into the HookedTransformer of config.json"


def tampered_loss(run):
    path = run / "metadata.json"
    meta = json.loads(path.read_text())
    meta["test_losses"][19] *= 1.01
    path.write_text(json.dumps(meta))
    return checkpoint(run, 19), "test loss recomputed from its weights"


def bad_indices(run):
    path = run / "metadata.json"
    meta = json.loads(path.read_text())
    meta["test_indices"][0] = meta["train_indices"][0]
    path.write_text(json.dumps(meta))
    return path, "do not partition the 49 pairs"


@pytest.mark.parametrize(
    "damage",
    [
        truncate,
        header_past_end,
        flip_data_byte,
        delete_checkpoint,
        metadata_lengths,
        config_mismatch,
        tampered_loss,
        bad_indices,
    ],
    ids=lambda f: f.__name__,
)
def test_each_kind_of_damage_is_caught_and_named(run_copy, damage):
    path, expected = damage(run_copy)
    report = verify_run(run_copy)
    assert not report.ok
    assert any(line.startswith(f"{path}:") and expected in line for line in report.problems), report.problems
    if damage not in (truncate, flip_data_byte, config_mismatch):
        return  # the CLI path (one line per problem, exit 1) is exercised on three representative kinds
    proc = grokpipe_cli("verify", str(run_copy))
    assert proc.returncode == 1
    assert f"{path}:" in proc.stdout and expected in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_list_shows_every_state(trained_grid, run_copy, tmp_path):
    results = run_copy.parent.parent
    for seed in (0, 1):  # a complete run and one whose verification failed
        target = results / "tiny" / f"tiny_p5_seed{seed}"
        shutil.copytree(run_dir_of(trained_grid["workdir"], 5, seed), target)
    flip_data_byte(results / "tiny" / "tiny_p5_seed1")
    grokpipe_cli(
        "verify",
        str(results / "tiny" / "tiny_p5_seed1"),
        "--report",
        str(results / "tiny" / "tiny_p5_seed1" / "verify.json"),
    )
    unfinished = results / "tiny" / "tiny_p11_seed0"  # killed mid-run: checkpoints + resume state only
    shutil.copytree(run_dir_of(trained_grid["workdir"], 7, 0), unfinished)
    for name in ("metadata.json", "config.json", "verify.json", "verification.json", "tiny_p7_seed0.safetensors"):
        (unfinished / name).unlink()
    state = json.loads((unfinished / "resume" / "training_state.json").read_text())
    rows = {(r["prime"], r["seed"]): r for r in list_runs(results)}
    assert rows[(5, 0)]["state"] == "complete, verified"
    assert rows[(5, 1)]["state"] == "verification failed"
    assert rows[(7, 1)]["state"] == "complete"
    assert rows[(11, 0)]["state"] == "in progress / resumable"
    assert rows[(11, 0)]["epochs_done"] == state["epoch"] + 1
    proc = grokpipe_cli("list", str(results))
    assert proc.returncode == 0 and "verification failed" in proc.stdout and "grokked at" in proc.stdout
    listed = json.loads(grokpipe_cli("list", str(results), "--json").stdout)
    assert len(listed) == 4


def test_list_marks_converted_runs(tmp_path):
    from legacy_fixtures import save_legacy, train_demo

    from grokpipe.convert import convert

    legacy = save_legacy(train_demo(), tmp_path / "old.pth")
    convert(legacy, tmp_path / "results" / "grokking" / "grokking_p11_seed999")
    [row] = list_runs(tmp_path / "results")
    assert row["state"] == "converted from legacy" and row["epochs_done"] == 12
    report = verify_run(tmp_path / "results" / "grokking" / "grokking_p11_seed999")
    assert report.ok, report.problems
    info = inspect_path(legacy)
    assert info["checkpoint_epochs"] == [3, 7, 11] and info["config"]["d_vocab_out"] == 11
    assert info["tensors"]["embed.W_E"] == {"dtype": "float32", "shape": [12, 32]}


def test_inspect_reads_headers_only(trained_grid, monkeypatch):
    """With every tensor loader disabled and file reads counted, inspect still describes runs and files."""
    import safetensors
    import safetensors.torch

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data was read")

    for module, name in [(safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr("grokpipe.io.safetensors_io.safe_open", forbidden)
    monkeypatch.setattr("grokpipe.io.safetensors_io.load_file", forbidden)
    read = {"bytes": 0}
    real_open = open

    class CountingFile:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            read["bytes"] += len(data)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(
        safetensors_header, "open", lambda path, mode="r": CountingFile(real_open(path, mode)), raising=False
    )
    run = run_dir_of(trained_grid["workdir"], 5, 0)
    info = inspect_path(run)
    assert info["state"] == "complete, verified" and info["checkpoint_epochs"] == [9, 19, 29]
    assert info["final_model"]["tensors"]["embed.W_E"] == {"dtype": "F32", "shape": [6, 32]}
    assert info["final_model"]["header_metadata"]["epoch"] == "29"
    read["bytes"] = 0
    file_info = inspect_path(run / "checkpoints" / "checkpoint_epoch_00019.safetensors")
    assert file_info["header_metadata"]["kind"] == "checkpoint"
    assert read["bytes"] < file_info["bytes"] / 2, "more than the header was read"
    proc = grokpipe_cli("inspect", str(run), "--json")
    assert json.loads(proc.stdout)["prime"] == 5
    assert inspect_run.format_inspection(info).count("\n") > 10


def craft(tmp_path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header,data,expected",
    [
        ({"a\x00b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "NUL"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "trailing bytes"),
        ({"a": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
        ({"__metadata__": ["format", "pt"]}, b"", "must be an object"),
        ({"__metadata__": False}, b"", "must be an object"),
        ({"__metadata__": None}, b"", "must be an object"),
    ],
)
def test_hostile_headers(tmp_path, header, data, expected):
    with pytest.raises(HeaderError, match=expected):
        read_header(craft(tmp_path, header, data))


def craft_raw(tmp_path, raw: bytes, data: bytes = b"") -> Path:
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "raw,data,expected",
    [
        (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested too deeply"),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
            "names 'a' twice",
        ),
    ],
    ids=["deep-nesting", "duplicate-name"],
)
def test_hostile_header_json_is_refused_by_the_parser_and_the_cli(tmp_path, raw, data, expected):
    path = craft_raw(tmp_path, raw, data)
    with pytest.raises(HeaderError, match=expected):
        read_header(path)
    proc = grokpipe_cli("inspect", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stderr and expected in proc.stderr


def test_sample_epochs_is_all_when_cheap_else_even():
    epochs = list(range(99, 25000, 100))
    assert sample_epochs(epochs[:10], test_size=1000) == epochs[:10]
    chosen = sample_epochs(epochs, test_size=100_000, budget=2_000_000)
    assert len(chosen) == 20 and chosen[0] == 99 and chosen[-1] == 24999
