"""Which stored configs TransformerLens 4 can load (the TL 4 loads themselves: tests/tl4/)."""

import pytest

from grokpipe.bridge import bridge_unsupported_reason, transformer_lens_major
from grokpipe.training.model import loaded_model

BASE = {"n_layers": 1, "act_fn": "relu", "normalization_type": None, "positional_embedding_type": "standard"}


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"act_fn": "gelu_new", "normalization_type": "LN"},
        {"act_fn": "solu_ln", "normalization_type": "LNPre"},
        {"attn_only": True, "act_fn": None},
    ],
)
def test_configs_the_native_model_reproduces(change):
    assert bridge_unsupported_reason({**BASE, **change}) is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"act_fn": "gelu_fast"}, "act_fn 'gelu_fast'"),
        ({"positional_embedding_type": "shortformer"}, "positional_embedding_type 'shortformer'"),
        ({"use_local_attn": True}, "use_local_attn=True"),
        ({"parallel_attn_mlp": True}, "parallel_attn_mlp=True"),
        ({"attention_dir": "bidirectional"}, "attention_dir='bidirectional'"),
    ],
)
def test_options_it_cannot_reproduce_are_named(change, named):
    assert named in bridge_unsupported_reason({**BASE, **change})


def test_this_environment_loads_hooked_transformers():
    from transformer_lens import HookedTransformer

    assert transformer_lens_major() == 3, "the pipeline's own lock keeps TransformerLens 3.9"
    hooked = {
        **BASE,
        "n_heads": 1,
        "d_model": 4,
        "d_head": 4,
        "d_mlp": 4,
        "d_vocab": 6,
        "d_vocab_out": 5,
        "n_ctx": 3,
        "init_weights": True,
        "seed": 1,
    }
    model = loaded_model(hooked, _state(hooked), "test")
    assert isinstance(model, HookedTransformer)


def _state(hooked):
    from grokpipe.training.model import config_from_json, empty_model

    return empty_model(config_from_json(hooked)).state_dict()
