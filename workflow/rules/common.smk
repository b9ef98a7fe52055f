# Shared helpers: config validation, paths and the per-run spec handed to `grokpipe train`.

import functools
import json
import os

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from grokpipe.config import (
    ConfigError,
    run_spec,
    check_semantics,
    describe_validation_failure,
    progress_unsupported_reason,
)
from grokpipe.errors import GrokpipeError
from grokpipe.io.detect import holds_checkpoint_dirs
from grokpipe.jobs import train_jobs
from grokpipe.lifecycle.transfer import finetune_flags, finetune_plan
from grokpipe.layout import RUN_DIR_RE
from grokpipe.sweep import cells_by_name
from grokpipe.workflow import (
    job_specs_json,
    name_pattern,
    threads_per_run,
    train_spec_json,
    tune_gc_for_large_dags,
    use_this_interpreter_for_jobs,
)

# Schema (filling defaults) via snakemake.utils.validate, then what a schema cannot say (primality,
# non-empty splits); either failure is one line naming the key, before any job is scheduled.
try:
    validate(config, schema="../schemas/config.schema.yaml")
    check_semantics(config, "config")
except (WorkflowError, ConfigError) as exc:
    raise WorkflowError(describe_validation_failure(exc, "config")) from None

# The sweep's cells (one, named model_name, without a sweep): each a grid of primes x seeds with
# its own settings, at results/{cell}/. Expanded once per parse, never per job.
GRID_CELLS = cells_by_name(config, "config")
SWEEP = config["model_name"] if config["sweep"] else None
# The finetune: section's LoRA jobs and the cells that train their target tasks from scratch.
try:
    FINETUNE = finetune_plan(config, GRID_CELLS, "config")
except ConfigError as exc:
    raise WorkflowError(describe_validation_failure(exc, "config")) from None
CELLS = {**GRID_CELLS, **FINETUNE.scratch_cells}

RESULTS = config["results_dir"]
RUN = f"{RESULTS}/{{model_name}}/{{model_name}}_p{{prime}}_seed{{seed}}"
LEGACY = config["legacy_dir"]
IMPORTS = config["imports_dir"]
CONSOLIDATED = config["consolidated_dir"]

# Snakemake's modules and plugins are loaded by now; the DAG is built next (see the docstring).
tune_gc_for_large_dags()

# Jobs call the `grokpipe` CLI of the environment running Snakemake (see the function's docstring).
use_this_interpreter_for_jobs()
CONDA_ENV = "../envs/grokpipe.yaml"


wildcard_constraints:
    model_name=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    prime=r"\d+",
    seed=r"\d+",
    name=r"[^/]+",


def run_dir(wildcards):
    return RUN.format(**wildcards)


def train_spec(wildcards):
    """JSON spec of the requested run (its cell's settings); a params value, so changing a
    hyperparameter reruns it."""
    cell = CELLS.get(wildcards.model_name)
    try:
        return train_spec_json(
            cell.config if cell else config,
            wildcards.model_name,
            wildcards.prime,
            wildcards.seed,
            cell.settings if cell else None,
        )
    except GrokpipeError as exc:
        raise WorkflowError(str(exc)) from None


@functools.cache  # the globbing is done once per parse, not once per run
def legacy_runs():
    """(model_name, prime, seed) of every legacy pickle placed under legacy_dir."""
    found = glob_wildcards(f"{LEGACY}/{{model_name}}/{{name}}.pth")
    runs = []
    for model_name, name in zip(found.model_name, found.name):
        parsed = RUN_DIR_RE.match(name)
        if parsed and parsed["model_name"] == model_name:
            runs.append((model_name, parsed["prime"], parsed["seed"]))
    return runs


def legacy_pattern(wildcard):
    """Regex of the values ``wildcard`` (model_name, prime or seed) takes in the legacy pickles
    found, for the convert rule: without it Snakemake tries convert first for every run and falls
    back to train on its missing input (~13 % of a 1,000-run dry run). It never matches when there
    are none."""
    # legacy_runs() holds (model_name, prime, seed) tuples
    field = ("model_name", "prime", "seed").index(wildcard)
    return name_pattern({run[field] for run in legacy_runs()})


@functools.cache
def runs():
    """(model_name, prime, seed) of every run: every cell's grid and every legacy pickle."""
    grid = [
        (name, str(p), str(s))
        for name in GRID_CELLS
        for p in config["primes"]
        for s in config["seeds"]
    ]
    return sorted(set(grid + legacy_runs() + FINETUNE.scratch_runs))


@functools.cache
def jobs():
    """Training jobs of several runs (runs_per_job > 1): job name -> member runs
    (model_name, prime, seed). Runs in no job train alone (rule train)."""
    if config["runs_per_job"] == 1:
        return {}
    specs = [
        run_spec(CELLS[name].config, int(prime), int(seed), model_name=name)
        for name, prime, seed in runs()
        if name in CELLS and (name, prime, seed) not in LEGACY_RUNS
    ]
    found = train_jobs(specs, config["runs_per_job"])
    return {
        job: [(s.model_name, str(s.prime), str(s.seed)) for s in members]
        for job, members in found.items()
    }


@functools.cache
def job_of_run():
    return {run: job for job, members in jobs().items() for run in members}


def trained_inputs(wildcards):
    """What a run's analysis, progress and export jobs wait for: the run's training outputs, or
    the record of the job of several runs it trained in."""
    run = (wildcards.model_name, wildcards.prime, wildcards.seed)
    return trained_files(run)


def trained_files(run):
    job = job_of_run().get(run)
    if job is not None:
        return {"job": f"{RESULTS}/_jobs/{job}.json"}
    model_name, prime, seed = run
    return {
        "model": run_file(run, f"{model_name}_p{prime}_seed{seed}.safetensors"),
        "config": run_file(run, "config.json"),
        "metadata": run_file(run, "metadata.json"),
    }


def trained_marker(run):
    """The one file that says a run is trained: its metadata.json, or its job's record."""
    trained = trained_files(run)
    return trained.get("metadata", trained.get("job"))


def job_specs(wildcards):
    """The members of a job of several runs as `grokpipe train --specs` JSON (a params value:
    changing a member's settings reruns the job, whose unchanged members resume at their end).
    """
    members = jobs()[wildcards.job]
    return job_specs_json(
        [
            (
                CELLS[name].config,
                name,
                prime,
                seed,
                CELLS[name].settings,
                run_file((name, prime, seed), ""),
            )
            for name, prime, seed in members
        ]
    )


def train_threads():
    """Threads of each training job (threads_per_run, ``auto`` resolved against --cores and the
    number of training jobs: lone runs plus jobs of several runs). A cluster executor has no local
    core budget (--jobs instead of --cores): the profile's set-threads decide.
    """
    try:
        cores = workflow.cores
    except WorkflowError:
        cores = None
    grouped = sum(len(members) for members in jobs().values())
    return threads_per_run(
        config["threads_per_run"], cores, len(runs()) - grouped + len(jobs())
    )


def run_file(run, name):
    model_name, prime, seed = run
    return f"{RUN.format(model_name=model_name, prime=prime, seed=seed)}/{name}"


# Progress measures need modular addition on a one-layer model with an MLP: legacy runs (the
# demo's) and the cells whose settings are such. The analysis rules split on the model name.
PROGRESS_CELLS = {
    name
    for name, cell in CELLS.items()
    if progress_unsupported_reason(
        cell.config["model"], cell.config["task"]["operation"]
    )
    is None
}
LEGACY_RUNS = set(legacy_runs())
LEGACY_NAMES = {run[0] for run in LEGACY_RUNS}


def has_progress(run):
    return run[0] in PROGRESS_CELLS or run in LEGACY_RUNS


def analyzed_with_progress():
    """Model names whose runs' analysis job computes the progress measures."""
    return name_pattern(PROGRESS_CELLS | (LEGACY_NAMES - set(CELLS)))


def analyzed_without_progress():
    return name_pattern(set(CELLS) - PROGRESS_CELLS)


def legacy_without_progress_cell():
    """Model names of legacy runs in a cell whose own runs have no progress measures."""
    return name_pattern(LEGACY_NAMES & (set(CELLS) - PROGRESS_CELLS))


def key_frequencies_flag():
    frequencies = config.get("key_frequencies")
    return ",".join(map(str, frequencies)) if frequencies else "auto"


def run_outputs(run):
    """The files `all` asks for per run. Snakemake remakes a missing file only if a job that
    must run needs it or it is asked for here, not when it is an up-to-date job's input.
    """
    names = ["verify.json", "artifacts/loss_curves.png"]
    if has_progress(run):
        names.append("artifacts/progress_measures.csv")
    names += [f"exports/{which}.json" for which in config["export"]]
    return [trained_marker(run)] + [run_file(run, n) for n in names]


def runs_of_model(wildcards):
    """Training outputs (and progress measures) of every run of one model: its summary's input."""
    files = []
    for run in runs():
        if run[0] == wildcards.model_name:
            files.append(trained_marker(run))
            if has_progress(run):
                files.append(run_file(run, "artifacts/progress_measures.csv"))
    return sorted(set(files))


def run_dirs_of(wildcards):
    return [run_file(run, "")[:-1] for run in runs() if run[0] == wildcards.model_name]


@functools.cache
def imports():
    """Names of the checkpoint directories placed under imports_dir."""
    if not os.path.isdir(IMPORTS):
        return []
    return sorted(
        entry.name
        for entry in os.scandir(IMPORTS)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def consolidate_mode(wildcards, input):
    """--all-checkpoints for a run directory of checkpoint-N/global_stepN directories."""
    return "--all-checkpoints" if holds_checkpoint_dirs(input[0]) else ""


def consolidate_dtype_flag():
    dtype = config.get("consolidate_dtype")
    return f"--dtype {dtype}" if dtype else ""


def sweep_inputs(wildcards):
    """Training outputs of every run of the sweep: its report's input."""
    return sorted({trained_marker(run) for run in runs() if run[0] in GRID_CELLS})


def finetune_record(job, suffix=".json"):
    return run_file(job.base, f"finetunes/{job.record_name}{suffix}")


def transfer_inputs(wildcards):
    """Every fine-tune's merge record (after its adapter) and every from-scratch run's training."""
    records = [finetune_record(job, ".merged.json") for job in FINETUNE.jobs]
    return records + sorted({trained_marker(run) for run in FINETUNE.scratch_runs})


def finetune_options():
    return finetune_flags(config)


def sweep_config_json(wildcards):
    """The workflow's config as JSON for `grokpipe sweep-report`, which expands it itself."""
    return json.dumps(config)  # key order kept: the axes' order names the cells


def final_targets():
    """Per run: its training and analysis (run_outputs); per model: the grid summary; per sweep:
    its table and figures; per imported checkpoint: its consolidation; with fine-tunes: their
    comparison table (which asks for every fine-tune and merge)."""
    per_run = [path for run in runs() for path in run_outputs(run)]
    per_model = [
        f"{RESULTS}/{model_name}/summary.csv"
        for model_name in sorted({run[0] for run in runs()})
    ]
    per_sweep = [f"{RESULTS}/_sweeps/{SWEEP}/sweep.csv"] if SWEEP else []
    per_import = [f"{CONSOLIDATED}/{name}" for name in imports()]
    per_finetune = (
        [f"{RESULTS}/_finetune/{config['model_name']}/transfer.csv"]
        if FINETUNE.jobs
        else []
    )
    return per_run + per_model + per_sweep + per_import + per_finetune
