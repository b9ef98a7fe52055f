"""Training is the demo's loop, deterministic, checkpointed without retaining anything in memory."""

import gc
import json

import pytest
import torch
from conftest import tiny_config
from demo_reference import DEMO_MODEL, demo_loop

import grokpipe
from grokpipe.config import grid, validate_config
from grokpipe.io.safetensors_io import read_metadata
from grokpipe.layout import RunLayout
from grokpipe.training import resume
from grokpipe.training.data import make_split
from grokpipe.training.lean_forward import objective_fn
from grokpipe.training.model import loss_fn
from grokpipe.training.train import grokking_epoch, train


def spec_for(prime=7, seed=0, **training):
    config = validate_config(tiny_config(primes=[prime], seeds=[seed], training=training))
    return grid(config)[0]


def test_training_equals_the_demo_loop_bit_for_bit(tmp_path):
    torch.set_num_threads(1)
    demo = demo_loop(p=11, frac_train=0.3, num_epochs=12, checkpoint_every=4, seed=999)
    config = validate_config(
        {
            "model_name": "demo",
            "primes": [11],
            "seeds": [999],
            "model": DEMO_MODEL,
            "training": {
                "frac_train": 0.3,
                "num_epochs": 12,
                "checkpoint_every": 4,
                "implementation": "hooked_transformer",
            },
        }
    )
    run = tmp_path / "demo_p11_seed999"
    meta = train(grid(config)[0], run, threads=1, progress_bar=False)
    assert meta["train_losses"] == demo["train_losses"]
    assert meta["test_losses"] == demo["test_losses"]
    assert meta["checkpoint_epochs"] == demo["checkpoint_epochs"] == [3, 7, 11]
    assert meta["train_indices"] == demo["train_indices"].tolist()
    assert meta["test_indices"] == demo["test_indices"].tolist()
    for epoch, expected in zip(demo["checkpoint_epochs"], demo["checkpoints"]):
        ours = grokpipe.load_state_dict(run, epoch)
        assert ours.keys() == expected.keys()
        assert all(torch.equal(ours[k], expected[k]) for k in expected), f"epoch {epoch} differs"
    final = grokpipe.load_state_dict(run)
    assert all(torch.equal(final[k], demo["model"][k]) for k in final)


def test_same_seed_gives_identical_weights_and_other_seed_does_not(tmp_path):
    a = train(spec_for(seed=3), tmp_path / "a" / "tiny_p7_seed3", progress_bar=False)
    b = train(spec_for(seed=3), tmp_path / "b" / "tiny_p7_seed3", progress_bar=False)
    train(spec_for(seed=4), tmp_path / "c" / "tiny_p7_seed4", progress_bar=False)
    assert a["train_losses"] == b["train_losses"] and a["test_losses"] == b["test_losses"]
    wa = grokpipe.load_state_dict(tmp_path / "a" / "tiny_p7_seed3")
    wb = grokpipe.load_state_dict(tmp_path / "b" / "tiny_p7_seed3")
    wc = grokpipe.load_state_dict(tmp_path / "c" / "tiny_p7_seed4")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["embed.W_E"], wc["embed.W_E"])
    for rel in a["files"]:  # same content; header byte order may differ (safetensors hash-map order)
        assert read_metadata(tmp_path / "a" / "tiny_p7_seed3" / rel) == read_metadata(
            tmp_path / "b" / "tiny_p7_seed3" / rel
        )


def test_recorded_test_loss_recomputes_from_checkpoint_weights(tmp_path):
    spec = spec_for(prime=7, num_epochs=25, checkpoint_every=5)
    run = tmp_path / spec.run_name
    meta = train(spec, run, progress_bar=False)
    split = make_split(7, spec.training.frac_train, spec.training.data_seed)
    assert meta["environment"]["implementation"] == "lean"
    for epoch in meta["checkpoint_epochs"]:
        model = grokpipe.load_model(run, epoch=epoch)
        with torch.inference_mode():
            objective = objective_fn(model, "lean", (split.train_tokens, split.test_tokens))  # as train() builds it
            same_forward = objective(split.test_tokens, split.test_labels)[0].item()
            hooked = loss_fn(model(split.test_tokens), split.test_labels).item()
        assert same_forward == meta["test_losses"][epoch]  # bit-exact with the forward that trained it
        assert hooked == pytest.approx(meta["test_losses"][epoch], rel=1e-5)  # and HookedTransformer agrees


def test_no_checkpoint_is_retained_in_memory(tmp_path, monkeypatch):
    """Live tensors and bytes objects stay level however many checkpoints have been written."""
    counts = []
    original_save = resume.save

    def counting_save(*args, **kwargs):
        gc.collect()
        counts.append(sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)))
        return original_save(*args, **kwargs)

    monkeypatch.setattr(resume, "save", counting_save)
    spec = spec_for(prime=5, num_epochs=24, checkpoint_every=2)
    train(spec, tmp_path / spec.run_name, progress_bar=False)
    assert len(counts) == 12
    # A list of state_dict copies would add ~20 tensors per checkpoint; allow no growth at all.
    assert max(counts[2:]) == min(counts[2:]), counts


def test_run_layout_and_metadata(tmp_path):
    spec = spec_for(prime=5, num_epochs=25, checkpoint_every=10)
    run = tmp_path / spec.run_name
    meta = train(spec, run, progress_bar=False, grokking_threshold=0.5)
    layout = RunLayout(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["artifacts", "checkpoints", "resume", "config.json", "metadata.json", "tiny_p5_seed0.safetensors"]
    )
    assert [p.name for p in sorted(layout.checkpoints_dir.iterdir())] == [
        "checkpoint_epoch_00009.safetensors",
        "checkpoint_epoch_00019.safetensors",
    ]
    on_disk = json.loads(layout.metadata.read_text())
    assert on_disk == meta
    assert len(meta["train_losses"]) == len(meta["test_losses"]) == 25
    below = [epoch for epoch, loss in enumerate(meta["test_losses"]) if loss < 0.5]
    assert meta["grokking_epoch"] == (below[0] if below else None)
    assert set(meta["files"]) == {
        "checkpoints/checkpoint_epoch_00009.safetensors",
        "checkpoints/checkpoint_epoch_00019.safetensors",
        "tiny_p5_seed0.safetensors",
    }
    config = json.loads(layout.config.read_text())
    hooked = config["hooked_transformer_config"]
    assert hooked["dtype"] == "float32" and hooked["d_vocab"] == 6 and hooked["d_vocab_out"] == 5
    assert hooked["n_ctx"] == 3 and hooked["seed"] == 0
    assert config["training"]["checkpoint_every"] == 10


def test_grokking_epoch():
    assert grokking_epoch([3.0, 0.5, 0.009, 0.001], 0.01) == 2
    assert grokking_epoch([3.0, 0.5], 0.01) is None
