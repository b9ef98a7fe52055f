"""grokpipe: reproducible, crash-safe grokking experiments.

Loading API (TransformerLens is imported only when a model is built)::

    import grokpipe
    model = grokpipe.load_model("results/grokking/grokking_p31_seed0", epoch=2999)
    meta = grokpipe.load_metadata("results/grokking/grokking_p31_seed0")

The loading functions are imported on first use: ``import grokpipe.config`` (what the Snakefile
does when it parses) then costs no torch import.
"""

from ._version import __version__
from .errors import ConfigError, GrokpipeError

_LOADING = (
    "checkpoint_path",
    "hooked_config_dict",
    "list_epochs",
    "load_adapter",
    "load_config",
    "load_metadata",
    "load_model",
    "load_state_dict",
    "run_dataset",
    "RunDataset",
)

__all__ = ["__version__", "ConfigError", "GrokpipeError", *_LOADING]


def __getattr__(name: str):
    if name in _LOADING:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'grokpipe' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
