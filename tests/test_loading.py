"""The loading API: by epoch, single files, clear errors."""

import shutil

import pytest
import torch
from conftest import run_dir_of

import grokpipe
from grokpipe.errors import GrokpipeError


def test_one_checkpoint_file_alone_loads(trained_grid, tmp_path):
    """Loading an epoch needs that one file only: copied alone elsewhere, it still loads strictly."""
    run = run_dir_of(trained_grid["workdir"], 7, 0)
    lone = tmp_path / "lone.safetensors"
    shutil.copy(run / "checkpoints" / "checkpoint_epoch_00019.safetensors", lone)
    model = grokpipe.load_model(lone)
    expected = grokpipe.load_state_dict(run, 19)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert model.cfg.d_vocab == 8 and model.cfg.seed == 0
    assert str(model.cfg.device) == "cpu"


def test_loading_does_not_reseed_global_rng(trained_grid):
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    grokpipe.load_model(run_dir_of(trained_grid["workdir"], 5, 1), epoch=9)
    assert torch.equal(torch.rand(4), expected)


def test_missing_epoch_is_a_clear_error(trained_grid):
    run = run_dir_of(trained_grid["workdir"], 5, 0)
    with pytest.raises(GrokpipeError, match="no checkpoint for epoch 10; available: 9, 19, 29"):
        grokpipe.load_model(run, epoch=10)


def test_epoch_mismatch_for_a_file_is_refused(trained_grid):
    file = run_dir_of(trained_grid["workdir"], 5, 0) / "checkpoints" / "checkpoint_epoch_00009.safetensors"
    with pytest.raises(GrokpipeError, match="holds epoch 9, not 19"):
        grokpipe.load_state_dict(file, epoch=19)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(GrokpipeError, match="no such file or run directory"):
        grokpipe.load_model(tmp_path / "nope")
    with pytest.raises(GrokpipeError, match="missing"):
        grokpipe.load_metadata(tmp_path)


def test_metadata_and_config_helpers(trained_grid):
    run = run_dir_of(trained_grid["workdir"], 7, 1)
    meta, config = grokpipe.load_metadata(run), grokpipe.load_config(run)
    assert meta["checkpoint_epochs"] == grokpipe.list_epochs(run) == [9, 19, 29]
    assert config["training"]["num_epochs"] == 30
    assert grokpipe.hooked_config_dict(run, 9) == config["hooked_transformer_config"]


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 7)
    with pytest.raises(GrokpipeError, match="not a readable safetensors file"):
        grokpipe.load_model(bad)
