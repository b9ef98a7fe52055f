"""Under TransformerLens 4 (.venv-tl4/): runs trained and converted under TL 3.9 load into a
TransformerBridge whose logits and cached activations equal HookedTransformer's (references written
by make_reference.py; scripts/check-tl4.sh runs both). Skipped under TL 3.x, where the main suite runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grokpipe
from grokpipe.bridge import transformer_lens_major
from grokpipe.errors import GrokpipeError

pytestmark = pytest.mark.skipif(transformer_lens_major() < 4, reason="TransformerLens 4 checks (scripts/check-tl4.sh)")
REFERENCE = Path(os.environ.get("GROKPIPE_TL4_REFERENCE", "missing"))


@pytest.fixture(scope="module")
def manifest():
    if not (REFERENCE / "manifest.json").is_file():
        pytest.fail("GROKPIPE_TL4_REFERENCE must name make_reference.py's output (run scripts/check-tl4.sh)")
    return json.loads((REFERENCE / "manifest.json").read_text())


def compare(model, prime: int, reference: Path, hooks: list[str]) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    assert isinstance(model, TransformerBridge)
    expected = load_file(reference)
    tokens = torch.tensor([[a, b, prime] for a in range(prime) for b in range(prime)])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
    for name in hooks:
        assert name in cache, f"hook {name} did not fire"
        got, want = cache[name], expected[name]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # The documented difference: TL 4.3 records the post-softmax pattern under hook_attn_scores.
    torch.testing.assert_close(cache["blocks.0.attn.hook_attn_scores"], cache["blocks.0.attn.hook_pattern"])


def test_trained_runs_load_as_bridges_equal_to_tl3(manifest):
    for name, case in manifest["supported"].items():
        for epoch, reference in case["references"].items():
            rng = torch.random.get_rng_state()
            model = grokpipe.load_model(case["run"], None if epoch == "final" else int(epoch))
            assert torch.equal(rng, torch.random.get_rng_state()), f"{name}: loading moved the global RNG"
            compare(model, case["prime"], REFERENCE / reference, case["hooks"])


def test_converted_and_legacy_and_exported_runs(manifest):
    case = manifest["converted"]
    reference = REFERENCE / case["reference"]
    compare(grokpipe.load_model(case["run"], case["epoch"]), case["prime"], reference, case["hooks"])
    with pytest.warns(UserWarning, match="loading legacy pickle"):
        legacy = grokpipe.load_model(case["legacy"], case["epoch"])
    compare(legacy, case["prime"], reference, case["hooks"])
    exported = manifest["export"]
    relu = manifest["supported"]["relu_1l"]
    compare(grokpipe.load_model(exported["path"]), relu["prime"], REFERENCE / exported["reference"], relu["hooks"])


def test_lora_directories_and_merged_exports_load_as_bridges(manifest):
    case = manifest["lora"]
    reference = REFERENCE / case["reference"]
    compare(grokpipe.load_model(case["lora"]), case["prime"], reference, case["hooks"])
    compare(grokpipe.load_model(case["merged"]), case["prime"], reference, case["hooks"])
    adapter = grokpipe.load_adapter(case["lora"])
    assert set(adapter.deltas()) == set(adapter.targets)


def test_unsupported_options_are_refused(manifest):
    case = manifest["unsupported"]["gelu_fast"]
    with pytest.raises(GrokpipeError, match="cannot be loaded into TransformerLens 4: act_fn 'gelu_fast'"):
        grokpipe.load_model(case["run"])


def test_training_under_tl4_is_refused_in_one_line(manifest, tmp_path):
    model = {"n_layers": 1, "n_heads": 2, "d_model": 32, "d_head": 16, "d_mlp": 64}
    spec = {"model_name": "tiny", "prime": 5, "seed": 0, "model": model}
    spec["training"] = {"num_epochs": 2, "checkpoint_every": 1}
    proc = subprocess.run(
        [sys.executable, "-m", "grokpipe", "train", str(tmp_path / "tiny_p5_seed0"), "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs TransformerLens 3.9" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_verify_under_tl4_is_refused_without_marking_the_run(manifest):
    run = manifest["supported"]["relu_1l"]["run"]
    reports = sorted(p.name for p in Path(run).glob("verif*.json"))
    proc = subprocess.run([sys.executable, "-m", "grokpipe", "verify", run], capture_output=True, text=True)
    assert proc.returncode == 1 and "verify needs TransformerLens 3.9" in proc.stderr, proc.stderr
    assert sorted(p.name for p in Path(run).glob("verif*.json")) == reports, "no verification report written"
