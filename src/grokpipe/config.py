"""The workflow configuration: schema validation, semantic checks, and per-run specs.

The JSON schema (``schemas/config.schema.yaml``, also at ``workflow/schemas/``) is the contract; what a
schema cannot say (primality, non-empty splits) is checked here. Snakemake validates with the same
schema through ``snakemake.utils.validate`` and then calls :func:`check_semantics`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, GrokpipeError

SCHEMA_FILE = "config.schema.yaml"


def schema_path() -> Path:
    """Path of the installed config schema."""
    return Path(str(resources.files("grokpipe").joinpath("schemas", SCHEMA_FILE)))


def load_schema() -> dict:
    return yaml.safe_load(schema_path().read_text())


def read_config_file(path: str | Path) -> dict:
    """Read a YAML (or JSON) config file; a missing or unparsable file is a GrokpipeError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise GrokpipeError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GrokpipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise GrokpipeError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    k = 3
    while k * k <= n:
        if n % k == 0:
            return False
        k += 2
    return True


def _key_of(error) -> str:
    """Dotted config key of a jsonschema error; for unknown keys, the unknown key itself."""
    parts = list(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        if unknown:
            parts.append(unknown[0])
    elif error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        if missing:
            parts.append(missing[0])
    key = ""
    for part in parts:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "<top level>"


def _problem_of(error) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"unknown key (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        return "is required but missing"
    return error.message


def schema_error_to_config_error(error, source: str | None = None) -> ConfigError:
    """Turn a jsonschema ValidationError into a ConfigError that names the offending key."""
    return ConfigError(_key_of(error), _problem_of(error), source)


def describe_validation_failure(exc: BaseException, source: str | None = None) -> str:
    """One line naming the bad key, for a ConfigError or for snakemake.utils.validate's WorkflowError
    (which carries the jsonschema ValidationError as its context)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and hasattr(cause, "absolute_path"):
        return str(schema_error_to_config_error(cause, source))
    return str(exc)


def validate_config(config: dict, source: str | None = None) -> dict:
    """Validate against the schema (filling defaults, like snakemake.utils.validate) and semantically.

    Returns a new dict with defaults filled in. Raises ConfigError naming the first bad key.
    """
    import jsonschema
    from jsonschema import validators

    config = copy.deepcopy(config)
    schema = load_schema()
    base = validators.validator_for(schema)

    def set_defaults(validator, properties, instance, subschema):
        for name, prop in properties.items():
            if isinstance(instance, dict) and "default" in prop:
                instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from base.VALIDATORS["properties"](validator, properties, instance, subschema)

    validator_cls = validators.extend(base, {"properties": set_defaults})
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise schema_error_to_config_error(jsonschema.exceptions.best_match(errors), source)
    check_semantics(config, source)
    return config


def _check_strict_types(schema: dict, value, key: str, source: str | None) -> None:
    """What JSON schema lets through but a config must not hold: JSON schema calls ``10.0`` an
    integer and lets NaN pass every bound (comparisons with NaN are false), and YAML writes
    ``.nan``/``.inf`` as floats. Integers must be Python ints (not floats, not booleans) and every
    number finite."""
    kind = schema.get("type")
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(key, f"{value!r} is not an integer", source)
    if kind == "number" and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is not a finite number", source)
    if isinstance(value, dict):
        for name, sub in value.items():
            prop = schema.get("properties", {}).get(name)
            if prop is not None:
                _check_strict_types(prop, sub, f"{key}.{name}" if key else name, source)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _check_strict_types(schema["items"], item, f"{key}[{i}]", source)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is not a finite number", source)


def check_semantics(config: dict, source: str | None = None) -> None:
    """Checks the schema cannot express. ``config`` must already satisfy the schema."""
    _check_strict_types(load_schema(), config, "", source)
    for i, p in enumerate(config["primes"]):
        if not is_prime(p):
            raise ConfigError(f"primes[{i}]", f"{p} is not a prime", source)
    if config.get("sweep"):
        from .sweep import expand

        expand(config, source)  # validates every axis value, then each cell
    else:
        check_cell_semantics(config, source)


def check_cell_semantics(config: dict, source: str | None = None) -> None:
    """The checks that depend on training/model/task settings together (run once per sweep cell);
    ``config`` must satisfy the schema and its primes be prime."""
    from .training.tasks import n_pairs

    training = config["training"]
    operation = config.get("task", {}).get("operation", "add")
    for p in config["primes"]:
        n = n_pairs(p, operation)
        n_train = int(n * training.get("frac_train", 0.3))
        if n_train < 1 or n_train >= n:
            raise ConfigError(
                "training.frac_train",
                f"with p = {p} and operation {operation} the split leaves {n_train} of {n} pairs for training; "
                "both train and test sets must be non-empty",
                source,
            )
    model = config["model"]
    if not model.get("attn_only", False) and "d_mlp" not in model:
        raise ConfigError("model.d_mlp", "is required unless model.attn_only is true", source)


@dataclass(frozen=True)
class TrainingSpec:
    """Optimisation hyperparameters of one run (the demo's names)."""

    num_epochs: int
    checkpoint_every: int
    frac_train: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    data_seed: int = 598
    eval_every: int = 1
    implementation: str = "lean"
    label_noise: float = 0.0
    early_stopping: dict | None = None  # {"test_loss_below": float, "after_epochs": int}

    def to_dict(self) -> dict:
        return {
            "frac_train": self.frac_train,
            "num_epochs": self.num_epochs,
            "checkpoint_every": self.checkpoint_every,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "betas": list(self.betas),
            "data_seed": self.data_seed,
            "eval_every": self.eval_every,
            "implementation": self.implementation,
            "label_noise": self.label_noise,
            "early_stopping": None if self.early_stopping is None else dict(self.early_stopping),
        }


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one (prime, seed) training run (``model_name``: its sweep cell's name)."""

    model_name: str
    prime: int
    seed: int
    training: TrainingSpec
    model: dict = field(default_factory=dict)
    operation: str = "add"

    @property
    def run_name(self) -> str:
        return run_name(self.model_name, self.prime, self.seed)

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "prime": self.prime,
            "seed": self.seed,
            "training": self.training.to_dict(),
            "model": dict(self.model),
            "task": {"operation": self.operation},
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        t = dict(data["training"])
        t["betas"] = tuple(t.get("betas", (0.9, 0.98)))
        return cls(
            model_name=data["model_name"],
            prime=int(data["prime"]),
            seed=int(data["seed"]),
            training=TrainingSpec(**t),
            model=dict(data["model"]),
            operation=data.get("task", {}).get("operation", "add"),
        )

    @property
    def config_hash(self) -> str:
        """sha256 of the settings that determine the training trajectory.

        ``num_epochs`` and ``early_stopping`` are left out on purpose: a longer run shares every
        epoch of a shorter one, so growing it (or dropping the rule) continues training instead of
        starting over. ``eval_every`` only decides which epochs get a test loss, so it is left out
        too. A default operation and zero label noise are left out, so runs keep the hash they had
        before those settings existed.
        """
        d = self.to_dict()
        for key in ("num_epochs", "eval_every", "early_stopping"):
            del d["training"][key]
        if d["training"]["label_noise"] == 0:
            del d["training"]["label_noise"]
        if d["task"]["operation"] == "add":
            del d["task"]
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()

    def hooked_config_kwargs(self) -> dict:
        """Keyword arguments of HookedTransformerConfig for this run (the demo's derivations)."""
        return {
            **self.model,
            "d_vocab": self.prime + 1,
            "d_vocab_out": self.prime,
            "n_ctx": 3,
            "init_weights": True,
            "seed": self.seed,
        }


LEAN_ACT_FNS = ("relu", "gelu", "silu")  # activations the lean forward and the progress measures compute


def progress_unsupported_reason(model: dict, operation: str = "add") -> str | None:
    """Why the progress measures cannot be computed for a model with these HookedTransformerConfig
    fields on this operation (None when they can); absent fields take HookedTransformerConfig's defaults."""
    if operation != "add":
        return (
            f"operation {operation!r}: the measures (Nanda et al. 2023) are defined for modular addition, "
            "whose logits are sums of cos(w(a + b - c))"
        )
    if model.get("n_layers") != 1 or model.get("attn_only", False):
        return "the progress measures are defined for one-layer models with an MLP"
    if model.get("normalization_type") is not None:
        return f"normalization_type {model['normalization_type']!r} (the measures read the raw residual stream)"
    if model.get("act_fn", "relu") not in LEAN_ACT_FNS:
        return f"act_fn {model['act_fn']!r}"
    if model.get("positional_embedding_type", "standard") != "standard":
        return "non-standard positional embedding"
    return None


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def run_name(model_name: str, prime: int, seed: int) -> str:
    return f"{model_name}_p{prime}_seed{seed}"


def run_spec(config: dict, prime: int, seed: int, model_name: str | None = None) -> RunSpec:
    """The spec of one run of a validated config (``model_name`` defaults to the config's)."""
    return RunSpec.from_dict(
        {
            "model_name": model_name or config["model_name"],
            "prime": prime,
            "seed": seed,
            "training": config["training"],
            "model": config["model"],
            "task": config.get("task", {}),
        }
    )


def grid(config: dict) -> list[RunSpec]:
    """Every (prime, seed) run of a validated config, primes outer."""
    return [run_spec(config, p, s) for p in config["primes"] for s in config["seeds"]]
