"""Legacy grokking pickles in the TransformerLens demo's exact format, and hostile ones."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import torch
from demo_reference import demo_loop

LEGACY_MODEL = {
    "n_layers": 1,
    "n_heads": 2,
    "d_model": 32,
    "d_head": 16,
    "d_mlp": 64,
    "act_fn": "relu",
    "normalization_type": None,
}
TL2_MODULE = "transformer_lens.HookedTransformerConfig"


def train_demo(p=11, seed=999, num_epochs=12, checkpoint_every=4, frac_train=0.3):
    """The demo's save dict from a short run with a small model (config: the real TL 3.x object)."""
    return demo_loop(p, frac_train, num_epochs, checkpoint_every, seed, model_fields=LEGACY_MODEL)


def as_tl2_state_dict(state):
    """TransformerLens 2.x saved a real (n_ctx, n_ctx) causal mask buffer."""
    state = dict(state)
    for name in list(state):
        if name.endswith("attn.mask"):
            state[name] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    return state


def _tl2_config_class(fields: dict):
    """A stand-in class importable as transformer_lens.HookedTransformerConfig.HookedTransformerConfig."""
    module = types.ModuleType(TL2_MODULE)
    cls = dataclasses.make_dataclass("HookedTransformerConfig", list(fields))
    cls.__module__ = TL2_MODULE
    module.HookedTransformerConfig = cls
    return module, cls


def save_legacy(run: dict, path: Path, style: str = "tl2", cuda: bool = False) -> Path:
    """torch.save the demo dict with its config as TL 2.x object, TL 3.x object, or plain dict."""
    data = dict(run)
    fields = dict(run["config"].to_dict())  # to_dict() returns the live __dict__
    if cuda:
        fields["device"] = "cuda"
    if style in ("tl2", "tl2-cuda"):
        data["model"] = as_tl2_state_dict(run["model"])
        data["checkpoints"] = [as_tl2_state_dict(c) for c in run["checkpoints"]]
    module, cls = _tl2_config_class(fields)
    saved_module = sys.modules.get(TL2_MODULE)
    sys.modules[TL2_MODULE] = module
    real_tag = torch.serialization.location_tag
    try:
        if style == "tl2":
            data["config"] = cls(**fields)
        elif style == "dict":
            data["config"] = fields
        # style "tl3" keeps the real transformer_lens.config.hooked_transformer_config object
        if cuda:  # what a GPU-trained file records for every storage
            torch.serialization.location_tag = lambda storage: "cuda:0"
        torch.save(data, path)
    finally:
        torch.serialization.location_tag = real_tag
        if saved_module is None:
            sys.modules.pop(TL2_MODULE, None)
        else:
            sys.modules[TL2_MODULE] = saved_module
    return path


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious pickle does on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args
