"""Loading our files into TransformerLens 4 (``TransformerBridge``), which removed ``HookedTransformer``.

The bridge is built natively from the stored HookedTransformerConfig fields
(``TransformerBridgeConfig.from_dict`` + ``TransformerBridge.boot_native``: no hub access), the
weights mapped onto its key layout by TransformerLens' own ``convert_tl_checkpoint`` and loaded
strictly. Construction runs under ``torch.random.fork_rng``, so the caller's global RNG is untouched.

The native model reproduces our configs' forward pass exactly (relu, gelu, gelu_new, silu, solu_ln;
no norm, LN, LNPre, RMS, RMSPre; attention-only; any depth). HookedTransformer options it does not
implement are refused by :func:`bridge_unsupported_reason`, never approximated.

Known hook differences (TL 4.3 bridge vs TL 3.9 HookedTransformer), checked by tests/tl4/:

- equal on both: ``hook_embed``, ``hook_pos_embed``, ``blocks.{i}.hook_resid_pre/mid/post``,
  ``hook_attn_out``, ``hook_mlp_out``, ``attn.hook_q/k/v/z``, ``attn.hook_pattern``,
  ``mlp.hook_pre/hook_post`` (TL 4 keeps them as aliases of the bridge's own ``hook_in``/``hook_out``
  points, which it also fires);
- ``attn.hook_attn_scores`` differs: TL 4.3's native bridge records the post-softmax pattern there,
  not the pre-softmax scores (recompute scores from ``hook_q``/``hook_k``, or load under TL 3);
- TL 3's ``ln*.hook_scale``/``hook_normalized`` are ``ln*.hook_in``/``hook_out`` in TL 4;
  attention-only blocks have no ``hook_resid_mid`` or MLP hooks in either.
"""

from __future__ import annotations

import importlib.metadata

import torch

from .errors import GrokpipeError

BRIDGE_ACT_FNS = ("relu", "gelu", "gelu_new", "silu", "solu_ln")
# HookedTransformerConfig fields whose non-default values change the forward pass in ways the TL 4
# native model does not implement: (field, the default that is fine).
UNSUPPORTED_FIELDS = (
    ("scale_attn_by_inverse_layer_idx", False),
    ("use_local_attn", False),
    ("parallel_attn_mlp", False),
    ("post_embedding_ln", False),
    ("use_qk_norm", False),
    ("num_experts", None),
    ("rotary_adjacent_pairs", False),
    ("use_NTK_by_parts_rope", False),
    ("use_normalization_before_and_after", False),
    ("rmsnorm_uses_offset", False),
    ("relative_attention_num_buckets", None),
    ("attention_dir", "causal"),
)


def transformer_lens_version() -> str | None:
    """The installed TransformerLens version, without importing it (None when it is missing)."""
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return None


def transformer_lens_major() -> int:
    """The installed TransformerLens major version (3 or 4)."""
    version = transformer_lens_version()
    if version is None:  # pragma: no cover - a dependency
        raise GrokpipeError("TransformerLens is not installed (pip install 'transformer-lens>=3.9,<5')")
    return int(version.split(".")[0])


def bridge_unsupported_reason(hooked: dict) -> str | None:
    """Why TL 4's native model cannot reproduce ``hooked`` exactly, or None when it can."""
    act_fn = hooked.get("act_fn")
    if not hooked.get("attn_only") and act_fn not in BRIDGE_ACT_FNS:
        return f"act_fn {act_fn!r} (TransformerLens 4's native model has {', '.join(BRIDGE_ACT_FNS)})"
    positional = hooked.get("positional_embedding_type", "standard")
    if positional != "standard":
        return f"positional_embedding_type {positional!r} (only 'standard' is loaded into TransformerLens 4)"
    for field, default in UNSUPPORTED_FIELDS:
        if hooked.get(field, default) != default:
            return f"{field}={hooked[field]!r} (not implemented by TransformerLens 4's native model)"
    return None


def _with_solu_ln_identity(weights: dict[str, torch.Tensor], hooked: dict) -> dict[str, torch.Tensor]:
    """HookedTransformer's mid-MLP norm of ``solu_ln`` is a parameter-free LayerNormPre unless the model
    uses LN; the native model always has an affine LayerNorm, which with weight 1 and bias 0
    computes the same normalisation."""
    if hooked.get("act_fn") != "solu_ln" or hooked.get("normalization_type") == "LN" or hooked.get("attn_only"):
        return weights
    d_mlp, dtype = hooked["d_mlp"], getattr(torch, str(hooked.get("dtype", "float32")).removeprefix("torch."))
    for layer in range(hooked["n_layers"]):
        weights.setdefault(f"blocks.{layer}.mlp.ln.weight", torch.ones(d_mlp, dtype=dtype))
        weights.setdefault(f"blocks.{layer}.mlp.ln.bias", torch.zeros(d_mlp, dtype=dtype))
    return weights


def bridge_model(hooked: dict, state_dict: dict[str, torch.Tensor], source, device: str = "cpu"):
    """A TransformerBridge holding ``state_dict`` (HookedTransformer layout), strict load, eval mode."""
    reason = bridge_unsupported_reason(hooked)
    if reason is not None:
        raise GrokpipeError(
            f"{source}: cannot be loaded into TransformerLens 4: {reason}; load it with transformer-lens 3.9 "
            "(pip install 'transformer-lens==3.9.0') instead"
        )
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native import boot
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    fields = {k: v for k, v in hooked.items() if k not in ("device", "n_devices", "seed", "init_weights")}
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = getattr(torch, fields["dtype"])
    fields.update(init_weights=False, seed=None, architecture=None)
    try:
        cfg = TransformerBridgeConfig.from_dict(fields)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init would draw from the global RNG
            bridge = boot(cfg, device=device)
        weights = _with_solu_ln_identity(convert_tl_checkpoint(state_dict, cfg), hooked)
        bridge.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrokpipeError(f"{source}: weights do not fit TransformerLens 4's model ({first})") from None
    return bridge.eval()
