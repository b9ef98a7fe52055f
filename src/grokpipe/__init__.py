"""grokpipe: reproducible, crash-safe grokking experiments.

Loading API (TransformerLens is imported only when a model is built)::

    import grokpipe
    model = grokpipe.load_model("results/grokking/grokking_p31_seed0", epoch=2999)
    meta = grokpipe.load_metadata("results/grokking/grokking_p31_seed0")
"""

from ._version import __version__
from .errors import ConfigError, GrokpipeError
from .loading import (
    checkpoint_path,
    hooked_config_dict,
    list_epochs,
    load_config,
    load_metadata,
    load_model,
    load_state_dict,
)

__all__ = [
    "__version__",
    "ConfigError",
    "GrokpipeError",
    "checkpoint_path",
    "hooked_config_dict",
    "list_epochs",
    "load_config",
    "load_metadata",
    "load_model",
    "load_state_dict",
]
