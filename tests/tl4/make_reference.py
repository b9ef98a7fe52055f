"""Runs made under TransformerLens 3.9 (.venv/), with HookedTransformer's logits and cached
activations on every input, for tests/tl4/test_tl4_loading.py to compare TransformerLens 4 loads
against. Usage: .venv/bin/python tests/tl4/make_reference.py OUT_DIR (scripts/check-tl4.sh)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conftest import tiny_config  # noqa: E402
from legacy_fixtures import save_legacy, train_demo  # noqa: E402

import grokpipe  # noqa: E402
from grokpipe.config import grid, validate_config  # noqa: E402
from grokpipe.convert import convert  # noqa: E402
from grokpipe.export import export  # noqa: E402
from grokpipe.lifecycle.finetune import FinetuneSettings, finetune  # noqa: E402
from grokpipe.lifecycle.merge import merge  # noqa: E402
from grokpipe.training.train import train  # noqa: E402

# Model options of our config schema, each loaded by TL 4's native model.
SUPPORTED = {
    "relu_1l": {"n_layers": 1, "act_fn": "relu", "normalization_type": None},
    "gelu_new_ln_2l": {"n_layers": 2, "act_fn": "gelu_new", "normalization_type": "LN"},
    "solu_ln_lnpre": {"act_fn": "solu_ln", "normalization_type": "LNPre"},
    "silu_rms": {"act_fn": "silu", "normalization_type": "RMS"},
    "gelu_rmspre": {"act_fn": "gelu", "normalization_type": "RMSPre"},
    "attn_only_2l": {"n_layers": 2, "attn_only": True},
}
UNSUPPORTED = {"gelu_fast": {"act_fn": "gelu_fast"}}  # TL 4's native model has no gelu_fast


def hooks(n_layers: int, attn_only: bool) -> list[str]:
    names = ["hook_embed", "hook_pos_embed"]
    for i in range(n_layers):
        block = f"blocks.{i}"
        names += [f"{block}.hook_resid_pre", f"{block}.hook_resid_post", f"{block}.hook_attn_out"]
        # not attn.hook_attn_scores: TL 4.3 records the pattern there (grokpipe.bridge's docstring)
        names += [f"{block}.attn.hook_{h}" for h in ("q", "k", "v", "z", "pattern")]
        if not attn_only:
            names += [f"{block}.hook_resid_mid", f"{block}.hook_mlp_out", f"{block}.mlp.hook_pre"]
            names += [f"{block}.mlp.hook_post"]
    return names


def reference(path, epoch, prime: int, out: Path, hook_names: list[str]) -> str:
    """HookedTransformer's logits and cached activations on all p^2 inputs, into ``out``."""
    model = grokpipe.load_model(path, epoch)
    tokens = torch.tensor([[a, b, prime] for a in range(prime) for b in range(prime)])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    save_file(
        {"logits": logits.clone(), **{k: cache[k].clone().contiguous() for k in hook_names}}, str(out)
    )  # hooks may alias
    return out.name


def trained(root: Path, name: str, model: dict) -> dict:
    config = validate_config(
        tiny_config(primes=[5], seeds=[1], training={"num_epochs": 6, "checkpoint_every": 3}, model=model)
    )
    run = root / name / "tiny_p5_seed1"
    train(grid(config)[0], run, progress_bar=False)
    return {"run": str(run), "prime": 5, "model": model}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"supported": {}, "unsupported": {}}
    for name, model in SUPPORTED.items():
        case = trained(out, name, model)
        names = hooks(model.get("n_layers", 1), model.get("attn_only", False))
        case["hooks"] = names
        case["references"] = {
            str(e): reference(case["run"], e, 5, out / f"{name}_e{e}.safetensors", names)
            for e in grokpipe.list_epochs(case["run"])
        }
        case["references"]["final"] = reference(case["run"], None, 5, out / f"{name}_final.safetensors", names)
        manifest["supported"][name] = case
    for name, model in UNSUPPORTED.items():
        manifest["unsupported"][name] = trained(out, name, model)

    (out / "legacy").mkdir()
    demo = train_demo()  # the demo's own loop, saved as TL 2.x did (with its causal-mask buffer)
    legacy = save_legacy(demo, out / "legacy" / "grokking_p11_seed999.pth", style="tl2")
    converted = out / "converted" / "grokking_p11_seed999"
    convert(legacy, converted)
    names = hooks(1, False)
    epoch = grokpipe.list_epochs(converted)[-1]
    manifest["converted"] = {
        "run": str(converted),
        "legacy": str(legacy),
        "prime": 11,
        "epoch": epoch,
        "hooks": names,
        "reference": reference(converted, epoch, 11, out / "converted.safetensors", names),
    }
    exported = export(manifest["supported"]["relu_1l"]["run"], out / "models")
    manifest["export"] = {"path": str(exported), "reference": manifest["supported"]["relu_1l"]["references"]["final"]}
    # the model lifecycle: a LoRA fine-tune of that export (tiny: it need not solve sub) and its merge
    settings = FinetuneSettings("sub", rank=2, num_epochs=6, checkpoint_every=3)
    lora = finetune(exported, settings, out=out / "models", allow_ungrokked=True, progress_bar=False)
    merged = merge(lora)
    names = hooks(1, False)
    manifest["lora"] = {
        "prime": 5,
        "hooks": names,
        "lora": str(lora),
        "merged": str(merged),
        "reference": reference(lora, None, 5, out / "lora.safetensors", names),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"TL 3.9 references written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
