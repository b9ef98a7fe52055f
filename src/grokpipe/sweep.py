"""Sweeps: a config's ``sweep:`` axes expanded into cells, each a grid of primes x seeds.

A cell is one combination of the axes' values. It is a complete config of its own (the base
config with those values set) and has a name that stands in for ``model_name`` in the results
layout: ``results/{cell}/{cell}_p{prime}_seed{seed}/``. Names are the model name followed by one
part per axis, in the order the config lists the axes (``grokking-wd0.3-frac0.5-sub``): readable,
deterministic, filesystem-safe, and distinct for distinct cells. A config without axes has one
cell, named ``model_name``, exactly the layout of an unswept grid.

Values are validated once per axis value against the schema of the key they set; the checks that
depend on several keys together (the split's size, d_mlp) run once per cell. Neither grows with
primes x seeds.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Any

from .config import _check_strict_types, canonical_json, check_cell_semantics, load_schema
from .errors import ConfigError

# Short name parts of the usual axes; an empty prefix names the cell by the value alone (an
# operation or activation reads as itself). Other keys use their last part without underscores.
AXIS_PREFIXES = {
    "task.operation": "",
    "training.weight_decay": "wd",
    "training.frac_train": "frac",
    "training.lr": "lr",
    "training.label_noise": "noise",
    "training.betas": "betas",
    "training.data_seed": "data",
    "training.num_epochs": "epochs",
    "model.act_fn": "",
    "model.d_model": "d",
    "model.d_mlp": "mlp",
    "model.n_heads": "heads",
    "model.n_layers": "layers",
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # model_name's pattern in the schema


@dataclass(frozen=True)
class Cell:
    """One combination of the sweep's values: its name, those values by dotted key, its config."""

    name: str
    settings: dict[str, Any]
    config: dict


def axis_prefix(key: str) -> str:
    """The name part before an axis value (``training.weight_decay`` -> ``wd``)."""
    return AXIS_PREFIXES.get(key, key.rpartition(".")[2].replace("_", ""))


def format_value(value: Any) -> str:
    """A value as it appears in a cell name: shortest round-trip floats without exponent padding
    (``1e-05`` -> ``1e-5``), ``true``/``false``, ``none``, lists joined by ``_``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, list | tuple):
        return "_".join(format_value(v) for v in value)
    return str(value)


def cell_name(model_name: str, settings: dict[str, Any]) -> str:
    """``model_name`` followed by ``-{prefix}{value}`` per axis, in the settings' order."""
    return "-".join([model_name, *(f"{axis_prefix(key)}{format_value(v)}" for key, v in settings.items())])


def axes(config: dict) -> dict[str, list]:
    """The sweep's axes (dotted key -> values), in the config's order; empty without a sweep."""
    return dict(config.get("sweep") or {})


def _key_schema(schema: dict, key: str, source: str | None) -> dict:
    section, _, name = key.partition(".")
    properties = schema["properties"][section].get("properties", {})
    if name not in properties:
        raise ConfigError(
            f"sweep.{key}", f"unknown key (sweepable {section} keys: {', '.join(sorted(properties))})", source
        )
    return properties[name]


def _validate_values(key: str, values: list, key_schema: dict, source: str | None) -> None:
    from jsonschema import validators

    validator = validators.validator_for(key_schema)(key_schema)
    for i, value in enumerate(values):
        where = f"sweep.{key}[{i}]"
        error = next(iter(validator.iter_errors(value)), None)
        if error is not None:
            raise ConfigError(where, f"{value!r} is not a valid {key} ({error.message})", source)
        _check_strict_types(key_schema, value, where, source)


def _set(config: dict, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    config.setdefault(section, {})[name] = copy.deepcopy(value)


def expand(config: dict, source: str | None = None) -> list[Cell]:
    """The cells of a config that satisfies the schema (defaults filled), in a deterministic order:
    the product of the axes' values, the first axis outermost.

    Raises ConfigError naming ``sweep.{key}[{i}]`` for a bad value, or the cell and key for a
    combination that cannot train.

    Example:
        >>> cells = expand(config)  # sweep: {training.weight_decay: [0.3, 1.0], task.operation: [add, sub]}
        >>> [cell.name for cell in cells]
        ['grokking-wd0.3-add', 'grokking-wd0.3-sub', 'grokking-wd1.0-add', 'grokking-wd1.0-sub']
    """
    sweep = axes(config)
    base = {k: v for k, v in config.items() if k != "sweep"}
    if not sweep:
        return [Cell(config["model_name"], {}, base)]
    schema = load_schema()
    for key, values in sweep.items():
        _validate_values(key, values, _key_schema(schema, key, source), source)
    cells = []
    for combination in itertools.product(*sweep.values()):
        settings = dict(zip(sweep, combination))
        cell_config = copy.deepcopy(base)
        for key, value in settings.items():
            _set(cell_config, key, value)
        cells.append(Cell(cell_name(config["model_name"], settings), settings, cell_config))
    cells = _distinct_names(cells)
    for cell in cells:
        try:
            check_cell_semantics(cell.config, source)
        except ConfigError as exc:
            key = f"sweep.{exc.key}" if exc.key in sweep else exc.key
            raise ConfigError(key, f"{exc.problem} (in sweep cell {cell.name})", source) from None
        cell.config["model_name"] = cell.name
    return cells


def _distinct_names(cells: list[Cell]) -> list[Cell]:
    """Keep the readable names where they are distinct and valid; otherwise append a short hash of
    the cell's settings (two values that print alike, such as 1 and 1.0 of different keys' types)."""
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.name] = counts.get(cell.name, 0) + 1
    out = []
    for cell in cells:
        name = cell.name
        if counts[name] > 1 or not NAME_RE.match(name):
            digest = hashlib.sha256(canonical_json(cell.settings).encode()).hexdigest()[:8]
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + f"-{digest}"
        out.append(Cell(name, cell.settings, cell.config))
    return out


def cells_by_name(config: dict, source: str | None = None) -> dict[str, Cell]:
    """:func:`expand` as a mapping from cell name to cell, in the same order."""
    return {cell.name: cell for cell in expand(config, source)}
