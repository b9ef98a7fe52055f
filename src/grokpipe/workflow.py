"""Helpers the Snakemake rules call (kept here so they are tested directly)."""

from __future__ import annotations

import gc
import json
import os
import re
import sys
from collections.abc import Iterable

from .config import is_prime, run_spec
from .errors import GrokpipeError


def use_this_interpreter_for_jobs() -> None:
    """Put the running interpreter's bin directory first on PATH.

    Jobs then find the ``grokpipe`` CLI of the environment running Snakemake even when it was
    started as ``.venv/bin/snakemake`` without activation. A conda env activated by
    ``--sdm conda`` is prepended inside the job shell, so it still wins.
    """
    bindir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir, *[p for p in parts if p]])


def tune_gc_for_large_dags() -> None:
    """Keep CPython's cyclic garbage collector from rescanning what Snakemake keeps alive.

    A 1,000-run DAG is millions of objects that live until Snakemake exits, none of them garbage,
    yet with the default thresholds CPython runs 1,051 collections in its dry run (0.85 s, ~13 %),
    the full ones walking every module Snakemake and its plugins imported and every job made so
    far. Freezing moves what exists now (modules, the parsed config) out of the collector's reach;
    a larger first threshold makes the collections after it rare, at the cost of up to 10,000
    unreachable objects waiting a little longer: 394 in all (0.27-0.37 s), most of them during the
    imports before this is called. Garbage is collected first, so nothing already unreachable
    (say, an earlier workflow's DAG in a process driving Snakemake's API) is frozen for good.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


def _train_spec(
    config: dict, model_name: str, prime: str | int, seed: str | int, sweep_cell: dict | None = None
) -> dict:
    """One run's spec as ``grokpipe train`` takes it (``config``: the run's cell's; ``sweep_cell``:
    its axis values, recorded in config.json)."""
    prime = int(prime)
    if prime < 5 or not is_prime(prime):
        raise GrokpipeError(f"{model_name}_p{prime}_seed{seed}: p = {prime} is not a prime >= 5")
    spec = run_spec(config, prime, int(seed), model_name=model_name).to_dict()
    if sweep_cell:
        spec["sweep_cell"] = sweep_cell
    return spec


def train_spec_json(
    config: dict, model_name: str, prime: str | int, seed: str | int, sweep_cell: dict | None = None
) -> str:
    """The run spec handed to ``grokpipe train --spec``; changing it makes Snakemake rerun the run."""
    return json.dumps(_train_spec(config, model_name, prime, seed, sweep_cell), sort_keys=True)


def job_specs_json(members: list[tuple]) -> str:
    """``grokpipe train --specs`` JSON of a job's members: each (config of its cell, model_name,
    prime, seed, sweep cell values, run directory) as ``--spec`` gives it, plus ``run_dir``."""
    specs = [
        {**_train_spec(config, model_name, prime, seed, sweep_cell), "run_dir": run_dir.rstrip("/")}
        for config, model_name, prime, seed, sweep_cell, run_dir in members
    ]
    return json.dumps(specs, sort_keys=True)


def name_pattern(names: Iterable[str]) -> str:
    """A wildcard constraint matching exactly these names (never matching when there are none)."""
    names = sorted(names)
    return "|".join(map(re.escape, names)) if names else "(?!)"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a cgroup or SLURM allots)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_run(setting: int | str, cores: int | None, n_runs: int) -> int:
    """Torch threads of each training job: a number as given; ``auto`` shares the cores Snakemake
    was given (capped at this machine's CPUs, so ``--cores 4`` on 2 CPUs does not oversubscribe)
    fairly across the runs, at least one each."""
    if setting != "auto":
        return int(setting)
    usable = min(cores or available_cpus(), available_cpus())
    return max(1, usable // max(1, n_runs))
