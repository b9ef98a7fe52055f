"""Config validation: the schema and semantic checks, directly and through Snakemake."""

import pytest
from conftest import snakemake, tiny_config, write_config

from grokpipe.config import grid, is_prime, validate_config
from grokpipe.errors import ConfigError

# (what to change, key the message must name)
INVALID = [
    ({"primes": [33]}, "primes[0]"),  # not a prime
    ({"primes": [3]}, "primes[0]"),  # too small
    ({"primes": [2]}, "primes[0]"),
    ({"training": {"frac_train": 1.0}}, "training.frac_train"),
    ({"training": {"frac_train": 0.0}}, "training.frac_train"),
    ({"training": {"frac_train": 0.01}}, "training.frac_train"),  # leaves an empty train set at p=5
    ({"training": {"num_epochs": 0}}, "training.num_epochs"),
    ({"training": {"checkpoint_every": -5}}, "training.checkpoint_every"),
    ({"training": {"learning_rate": 0.1}}, "training.learning_rate"),  # unknown key
    ({"model": {"d_vocab": 10}}, "model.d_vocab"),  # derived, may not be set
    ({"bogus_key": 1}, "bogus_key"),
    ({"seeds": [-1]}, "seeds[0]"),
    ({"primes": "31"}, "primes"),
]


@pytest.mark.parametrize("change,key", INVALID, ids=[k for _, k in INVALID])
def test_invalid_config_names_the_key(change, key):
    with pytest.raises(ConfigError) as info:
        validate_config(tiny_config(**change))
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_valid_config_gets_defaults():
    config = {
        "primes": [31],
        "seeds": [0],
        "training": {"num_epochs": 10, "checkpoint_every": 5},
        "model": {"n_layers": 1, "n_heads": 4, "d_model": 128, "d_head": 32, "d_mlp": 512},
    }
    out = validate_config(config)
    assert out["model_name"] == "grokking"
    assert out["training"]["frac_train"] == 0.3 and out["training"]["data_seed"] == 598
    assert out["training"]["betas"] == [0.9, 0.98]
    assert out["model"]["act_fn"] == "relu" and out["model"]["normalization_type"] is None
    assert "frac_train" not in config["training"], "validation must not mutate its input"


def test_is_prime():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


def test_config_hash_ignores_only_num_epochs():
    base = grid(validate_config(tiny_config()))[0]
    longer = grid(validate_config(tiny_config(training={"num_epochs": 99})))[0]
    other_lr = grid(validate_config(tiny_config(training={"lr": 0.002})))[0]
    assert base.config_hash == longer.config_hash
    assert base.config_hash != other_lr.config_hash
    assert grid(validate_config(tiny_config()))[1].config_hash != base.config_hash  # other seed


@pytest.mark.parametrize(
    "change,key",
    [INVALID[0], INVALID[3], INVALID[6], INVALID[7], INVALID[8], INVALID[10]],
    ids=["not-prime", "frac_train", "num_epochs", "checkpoint_every", "unknown-training-key", "unknown-top-key"],
)
def test_snakemake_refuses_invalid_config_before_scheduling(tmp_path, change, key):
    configfile = write_config(tmp_path / "config.yaml", tiny_config(**change))
    proc = snakemake(tmp_path, "--cores", "1", configfile=configfile, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"config key '{key}'" in output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "logs").exists()
