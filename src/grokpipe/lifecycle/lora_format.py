"""LoRA adapters of TransformerLens models in PEFT's format: names, shapes, the low-rank update.

grokpipe's adapters target TransformerLens' raw parameters (PEFT's ``target_parameters``; its
``target_modules`` stays empty). PEFT wraps each targeted parameter in a ``lora.ParamWrapper`` and
stores two matrices per parameter. For a parameter of shape ``[n, d_in, d_out]`` (TransformerLens'
per-head ``W_Q``/``W_K``/``W_V`` ``[n_heads, d_model, d_head]`` and ``W_O`` ``[n_heads, d_head,
d_model]``; a 2-D parameter ``[d_in, d_out]`` such as ``W_in``, ``W_out``, ``W_E``, ``W_pos``, ``W_U``
is the case ``n = 1``) and rank ``r``:

- ``lora_A.weight`` is ``[r·n, d_out]``: row ``h·r + k`` is row ``k`` of head ``h``'s ``A_h``
  (``[r, d_out]``);
- ``lora_B.weight`` is ``[d_in, r·n]``: column ``k·n + h`` is column ``k`` of head ``h``'s ``B_h``
  (``[d_in, r]``);
- the update is ``ΔW[h] = (lora_alpha / r) · B_h @ A_h``, the shape of ``W[h]``.

So ``x @ (W[h] + ΔW[h])`` passes ``x`` through ``B_h`` first: PEFT's ParamWrapper swaps the roles of
in and out features for 3-D parameters, and 2-D ones follow PEFT's ``nn.Linear`` rule (weight
``[out, in]`` = TransformerLens' ``[d_in, d_out]``), which is the same formula.

Tensor names are those PEFT saves (``adapter_model.safetensors``, adapter name removed). PEFT
nests one wrapper per targeted parameter of a module, in the order the module registered its
parameters, the first innermost: TransformerLens 3.9's attention registers ``W_Q, W_O, W_K, W_V``,
so with all four targeted ``base_model.model.blocks.0.attn.base_layer.base_layer.base_layer.lora_A.weight``
is ``W_Q``'s and ``base_model.model.blocks.0.attn.lora_A.weight`` is ``W_V``'s. The names are
computed from the model's own modules when an adapter is written and recorded in its
export_meta.json. tests/test_lora.py checks every rule here against the real ``peft`` package.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import GrokpipeError

PEFT_VERSION = "0.21.2"  # the PEFT release whose format this follows (tested)
ATTENTION_MATRICES = ("W_Q", "W_K", "W_V", "W_O")
MLP_MATRICES = ("W_in", "W_out")
EMBEDDING_MATRICES = ("W_E", "W_pos", "W_U")
MATRICES = ATTENTION_MATRICES + MLP_MATRICES + EMBEDDING_MATRICES
DEFAULT_MATRICES = ATTENTION_MATRICES + MLP_MATRICES  # embeddings are off by default
_EMBEDDING_PARAMETERS = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "W_U": "unembed.W_U"}


def target_parameters(hooked: dict, matrices: Iterable[str]) -> list[str]:
    """The TransformerLens parameter names ``matrices`` (short names, e.g. ``W_Q``) select, every
    layer, in the model's order; a matrix the model does not have is an error.

    Example:
        >>> target_parameters({"n_layers": 1}, ["W_Q", "W_in"])
        ['blocks.0.attn.W_Q', 'blocks.0.mlp.W_in']
    """
    chosen = list(dict.fromkeys(matrices))
    unknown = [m for m in chosen if m not in MATRICES]
    if unknown:
        raise GrokpipeError(f"unknown matrices {unknown} (choose from {', '.join(MATRICES)})")
    if not chosen:
        raise GrokpipeError("no matrices chosen for the adapter")
    if hooked.get("attn_only") and any(m in MLP_MATRICES for m in chosen):
        raise GrokpipeError("the base model is attention-only: it has no W_in/W_out to adapt")
    names = [_EMBEDDING_PARAMETERS[m] for m in ("W_E", "W_pos") if m in chosen]
    for layer in range(int(hooked["n_layers"])):
        names += [f"blocks.{layer}.attn.{m}" for m in ATTENTION_MATRICES if m in chosen]
        names += [f"blocks.{layer}.mlp.{m}" for m in MLP_MATRICES if m in chosen]
    if "W_U" in chosen:
        names.append(_EMBEDDING_PARAMETERS["W_U"])
    return names


def parameter_shapes(hooked: dict, targets: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of TransformerLens parameters from the model's config (no weights needed)."""
    heads, d_model, d_head = int(hooked["n_heads"]), int(hooked["d_model"]), int(hooked["d_head"])
    by_matrix = {
        "W_Q": (heads, d_model, d_head),
        "W_K": (heads, d_model, d_head),
        "W_V": (heads, d_model, d_head),
        "W_O": (heads, d_head, d_model),
        "W_in": (d_model, hooked.get("d_mlp") or 0),
        "W_out": (hooked.get("d_mlp") or 0, d_model),
        "W_E": (int(hooked["d_vocab"]), d_model),
        "W_pos": (int(hooked["n_ctx"]), d_model),
        "W_U": (d_model, int(hooked["d_vocab_out"])),
    }
    return {target: tuple(int(n) for n in by_matrix[target.rpartition(".")[2]]) for target in targets}


def check_rank(rank: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """A rank at most each targeted matrix's smaller dimension (a larger one adds nothing a full
    update could not, and PEFT's factors would be wider than the matrix)."""
    for name, shape in shapes.items():
        limit = min(shape[-2:])
        if rank > limit:
            raise GrokpipeError(
                f"--rank {rank} is above the dimensions of {name} ({list(shape)}: a rank of at most {limit})"
            )


def peft_tensor_names(targets: Iterable[str], model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """``target -> (lora_A name, lora_B name)`` as PEFT saves them for ``model`` (see the module
    docstring): the wrappers of one module nest in its parameters' registration order."""
    by_module: dict[str, list[str]] = {}
    for target in targets:
        module, _, parameter = target.rpartition(".")
        by_module.setdefault(module, []).append(parameter)
    names = {}
    for module, parameters in by_module.items():
        registered = [name for name, _ in model.get_submodule(module).named_parameters(recurse=False)]
        ordered = [name for name in registered if name in parameters]
        for index, parameter in enumerate(ordered):
            prefix = f"base_model.model.{module}." + "base_layer." * (len(ordered) - 1 - index)
            names[f"{module}.{parameter}"] = (prefix + "lora_A.weight", prefix + "lora_B.weight")
    return names


def factor_shapes(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lora_A shape, lora_B shape) of a parameter of ``shape``: ``[r·n, d_out]``, ``[d_in, r·n]``."""
    n, d_in, d_out = (1, *shape) if len(shape) == 2 else shape
    return (rank * n, d_out), (d_in, rank * n)


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, shape: tuple[int, ...], scaling: float) -> torch.Tensor:
    """``ΔW`` of one parameter of ``shape`` from its PEFT factors: ``scaling · B_h @ A_h`` per head."""
    n, d_in, d_out = (1, *shape) if len(shape) == 2 else shape
    rank = lora_a.shape[0] // n
    a = lora_a.reshape(n, rank, d_out)  # A_h = a[h]
    b = lora_b.reshape(d_in, rank, n).permute(2, 0, 1)  # B_h = b[h], (n, d_in, r)
    return (torch.bmm(b, a) * scaling).reshape(shape)


def adapter_config(
    *, rank: int, alpha: float, targets: list[str], base_model_name_or_path: str, inference_mode: bool = True
) -> dict:
    """adapter_config.json: every field of PEFT's ``LoraConfig`` as it saves them, for an adapter of
    raw parameters (``target_parameters``; no dropout, bias or variant, which ParamWrapper refuses)."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": inference_mode,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "qalora_group_size": 16,
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": [],
        "target_parameters": list(targets),
        "task_type": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def parse_adapter_config(config: dict, source) -> tuple[int, float, list[str]]:
    """(rank, alpha, target parameters) of an adapter_config.json; anything grokpipe's adapters
    cannot be (another PEFT method, modules instead of parameters, dropout, rsLoRA, per-layer
    ranks, DoRA) is an error naming ``source``."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_parameters")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems.append(f"r {rank!r} is not a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        problems.append(f"lora_alpha {alpha!r} is not a positive number")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append("target_parameters is not a non-empty list of parameter names")
    if config.get("target_modules"):
        problems.append("target_modules is not empty (grokpipe adapters target parameters only)")
    for key, fine in (("use_rslora", False), ("use_dora", False), ("lora_dropout", 0.0), ("lora_bias", False)):
        if config.get(key, fine) != fine:
            problems.append(f"{key} is {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set (one rank and alpha for every matrix)")
    if problems:
        raise GrokpipeError(f"{source}: not a grokpipe LoRA adapter config: {'; '.join(problems)}")
    return rank, float(alpha), list(targets)
