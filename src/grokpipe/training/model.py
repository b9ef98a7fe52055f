"""HookedTransformer construction, its config as JSON, and the demo's loss."""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager

import torch

from ..config import RunSpec


@contextmanager
def _quiet_transformer_lens():
    # TL 3.x marks HookedTransformer deprecated in favour of TransformerBridge; it is the model of
    # record here (4.x removed it, hence the 3.x pin), so the warning is noise for our users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="transformer_lens")
        yield


def resolve_device(device: str) -> str:
    """``auto`` means cuda when one is visible, else cpu; ``cuda`` without a GPU is a user error."""
    from ..errors import GrokpipeError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GrokpipeError("device 'cuda' was requested but no CUDA device is available (use 'auto' or 'cpu')")
    return device


def require_hooked_transformer(what: str) -> None:
    """Training and analysis use HookedTransformer, which TransformerLens 4 removed."""
    from ..bridge import transformer_lens_major
    from ..errors import GrokpipeError

    if transformer_lens_major() >= 4:
        raise GrokpipeError(
            f"{what} needs TransformerLens 3.9 (HookedTransformer, the demo's model); this environment has "
            "TransformerLens 4, which grokpipe supports for loading only (pip install 'transformer-lens==3.9.0')"
        )


def training_model(spec: RunSpec, device: str):
    """The demo's model: seeded init, every bias (``b_*``) frozen."""
    require_hooked_transformer("training")
    with _quiet_transformer_lens():
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(**spec.hooked_config_kwargs(), device=device)
        model = HookedTransformer(cfg)
    freeze_biases(model)
    return model


def freeze_biases(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if "b_" in name.split(".")[-1]:
            param.requires_grad = False


def json_value(value):
    """A config value as JSON-ready data: dtype as its name (``float32``), device as a string,
    numpy scalars (TransformerLens computes some fields with numpy) as plain numbers."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def config_to_json(cfg) -> dict:
    """Every HookedTransformerConfig field as JSON-ready data."""
    return {key: json_value(value) for key, value in cfg.to_dict().items()}


def config_from_json(data: dict, device: str = "cpu"):
    """A HookedTransformerConfig for loading weights: no init, no RNG side effects, on ``device``.

    Fields this TransformerLens version does not know are dropped; ``seed`` is restored after
    construction because HookedTransformerConfig reseeds every global RNG when given one.
    """
    require_hooked_transformer("this analysis")
    with _quiet_transformer_lens():
        from transformer_lens import HookedTransformerConfig

    known = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    kwargs = {k: v for k, v in data.items() if k in known}
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    seed = kwargs.pop("seed", None)
    kwargs.update(init_weights=False, device=device, n_devices=1)
    with _quiet_transformer_lens():
        cfg = HookedTransformerConfig(**kwargs)
    cfg.seed = seed
    return cfg


def empty_model(cfg):
    """An uninitialised HookedTransformer for ``cfg``, to be filled by ``load_state_dict``."""
    require_hooked_transformer("this analysis")
    with _quiet_transformer_lens():
        from transformer_lens import HookedTransformer

        return HookedTransformer(cfg, move_to_device=True)


def loaded_model(hooked_config: dict, state_dict: dict, source, device: str = "cpu"):
    """A HookedTransformer built from ``hooked_config`` holding ``state_dict`` (strict load), in eval
    mode; weights that do not fit the config are a GrokpipeError naming ``source``. Under
    TransformerLens 4 the same weights load into a TransformerBridge (see :mod:`grokpipe.bridge`)."""
    from ..bridge import bridge_model, transformer_lens_major
    from ..errors import GrokpipeError

    if transformer_lens_major() >= 4:
        return bridge_model(hooked_config, state_dict, source, device)

    model = empty_model(config_from_json(hooked_config, device=device))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise GrokpipeError(f"{source}: weights do not fit the model config ({exc})") from None
    return model.eval()


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of −log_softmax of the float64 logits at the last position, at the label (the demo's)."""
    if logits.ndim == 3:
        logits = logits[:, -1]
    log_probs = logits.to(torch.float64).log_softmax(dim=-1)
    return -log_probs.gather(dim=-1, index=labels[:, None])[:, 0].mean()
