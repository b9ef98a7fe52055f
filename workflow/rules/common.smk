# Shared helpers: config validation, paths and the per-run spec handed to `grokpipe train`.

import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from grokpipe.config import ConfigError, check_semantics, describe_validation_failure
from grokpipe.errors import GrokpipeError
from grokpipe.layout import RUN_DIR_RE
from grokpipe.workflow import train_spec_json, use_this_interpreter_for_jobs

# Schema (filling defaults) via snakemake.utils.validate, then what a schema cannot say (primality,
# non-empty splits); either failure is one line naming the key, before any job is scheduled.
try:
    validate(config, schema="../schemas/config.schema.yaml")
    check_semantics(config, "config")
except (WorkflowError, ConfigError) as exc:
    raise WorkflowError(describe_validation_failure(exc, "config")) from None

RESULTS = config["results_dir"]
RUN = f"{RESULTS}/{{model_name}}/{{model_name}}_p{{prime}}_seed{{seed}}"
LEGACY = config["legacy_dir"]

# Jobs call the `grokpipe` CLI of the environment running Snakemake (see the function's docstring).
use_this_interpreter_for_jobs()
CONDA_ENV = "../envs/grokpipe.yaml"


wildcard_constraints:
    model_name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    prime=r"\d+",
    seed=r"\d+",


def run_dir(wildcards):
    return RUN.format(**wildcards)


def train_spec(wildcards):
    """JSON spec of the requested run; a params value, so changing a hyperparameter reruns it."""
    try:
        return train_spec_json(
            config, wildcards.model_name, wildcards.prime, wildcards.seed
        )
    except GrokpipeError as exc:
        raise WorkflowError(str(exc)) from None


def legacy_runs():
    """(model_name, prime, seed) of every legacy pickle placed under legacy_dir."""
    found = glob_wildcards(f"{LEGACY}/{{model_name}}/{{name}}.pth")
    runs = []
    for model_name, name in zip(found.model_name, found.name):
        parsed = RUN_DIR_RE.match(name)
        if parsed and parsed["model_name"] == model_name:
            runs.append((model_name, parsed["prime"], parsed["seed"]))
    return runs


def runs():
    """(model_name, prime, seed) of every run: the configured grid and every legacy pickle."""
    grid = [
        (config["model_name"], str(p), str(s))
        for p in config["primes"]
        for s in config["seeds"]
    ]
    return sorted(set(grid + legacy_runs()))


def run_file(run, name):
    model_name, prime, seed = run
    return f"{RUN.format(model_name=model_name, prime=prime, seed=seed)}/{name}"


def runs_of_model(wildcards):
    """metadata.json of every run of one model name (the input of its grid summary)."""
    return [
        run_file(run, "metadata.json")
        for run in runs()
        if run[0] == wildcards.model_name
    ]


def run_dirs_of(wildcards, input):
    return [os.path.dirname(path) for path in input]


def final_targets():
    """Per run: metadata, verification and loss curves; per model name: the grid summary."""
    per_run = [
        run_file(run, name)
        for run in runs()
        for name in ("metadata.json", "verify.json", "artifacts/loss_curves.png")
    ]
    per_model = [
        f"{RESULTS}/{model_name}/summary.csv"
        for model_name in sorted({run[0] for run in runs()})
    ]
    return per_run + per_model
