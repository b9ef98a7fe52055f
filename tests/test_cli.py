"""The CLI: one clear line and a non-zero exit for user mistakes, never a traceback."""

import json

import pytest
from conftest import grokpipe_cli, tiny_config, write_config


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--config", "missing.yaml", "--prime", "5", "--seed", "0"], "missing.yaml: cannot read config file"),
        (["train", "--spec", "{not json", "x"], "--spec is not valid JSON"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, expected):
    proc = grokpipe_cli(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_config_names_key(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(training={"frac_train": 2}))
    proc = grokpipe_cli("train", "--config", str(config), "--prime", "5", "--seed", "0", cwd=tmp_path)
    assert proc.returncode == 1 and "config key 'training.frac_train'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


def test_non_prime_on_command_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config())
    proc = grokpipe_cli("train", "--config", str(config), "--prime", "9", "--seed", "0", cwd=tmp_path)
    assert proc.returncode == 1 and "9 is not a prime" in proc.stderr


def test_train_from_config_outside_snakemake(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(training={"num_epochs": 12, "checkpoint_every": 6}))
    proc = grokpipe_cli("train", "--config", str(config), "--prime", "5", "--seed", "2", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "results" / "tiny" / "tiny_p5_seed2" / "metadata.json").read_text())
    assert meta["checkpoint_epochs"] == [5, 11]


def test_run_dir_name_must_match(tmp_path):
    spec = {"model_name": "tiny", "prime": 5, "seed": 0, **{k: tiny_config()[k] for k in ("training", "model")}}
    proc = grokpipe_cli("train", str(tmp_path / "wrong_name"), "--spec", json.dumps(spec), cwd=tmp_path)
    assert proc.returncode == 1 and "must be named tiny_p5_seed0" in proc.stderr
