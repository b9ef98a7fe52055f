"""Shared fixtures: tiny configs, a Snakemake runner, and one trained tiny grid per pytest run."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"

# Small model so a run of tens of epochs takes seconds; same shape of config as the demo's.
TINY_MODEL = {
    "n_layers": 1,
    "n_heads": 2,
    "d_model": 32,
    "d_head": 16,
    "d_mlp": 64,
    "act_fn": "relu",
    "normalization_type": None,
}
TINY_CONFIG = {
    "model_name": "tiny",
    "primes": [5, 7],
    "seeds": [0, 1],
    "training": {
        "frac_train": 0.6,
        "num_epochs": 30,
        "checkpoint_every": 10,
        "lr": 0.001,
        "weight_decay": 1.0,
        "betas": [0.9, 0.98],
        "data_seed": 598,
    },
    "model": TINY_MODEL,
}


def tiny_config(**overrides) -> dict:
    config = copy.deepcopy(TINY_CONFIG)
    for key, value in overrides.items():
        if key in ("training", "model"):
            config[key].update(value)
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(workdir: Path, *args: str, configfile: Path | None = None) -> list[str]:
    """The command line of the real workflow in ``workdir`` with this interpreter's snakemake."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return cmd + list(args)


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 600, check=True):
    """Run the real workflow in ``workdir`` (a temp dir) with this interpreter's snakemake."""
    cmd = snakemake_command(workdir, *args, configfile=configfile)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def jobs_planned(proc) -> dict:
    """Job counts from a dry run's 'Job stats' table."""
    counts, in_table = {}, False
    for line in proc.stdout.splitlines():
        if line.startswith("job") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
            elif counts:
                break
    return counts


def dry_jobs(stdout: str) -> list[tuple[str, str]]:
    """(rule, its output line) for every job of a dry run's printout."""
    jobs = []
    for block in stdout.split("\nrule ")[1:]:
        outputs = [line.strip() for line in block.splitlines() if line.strip().startswith("output:")]
        jobs.append((block.split(":", 1)[0], outputs[0] if outputs else ""))
    return jobs


def grokpipe_cli(*args: str, timeout: int = 600, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "grokpipe", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.fixture(scope="session")
def trained_grid(tmp_path_factory):
    """A tiny 2-prime x 2-seed grid trained through Snakemake once per pytest run."""
    workdir = tmp_path_factory.mktemp("grid")
    configfile = write_config(workdir / "config.yaml", tiny_config())
    proc = snakemake(workdir, "--cores", "2", configfile=configfile)
    return {"workdir": workdir, "configfile": configfile, "config": tiny_config(), "proc": proc}


def run_dir_of(workdir: Path, prime: int, seed: int, model_name: str = "tiny") -> Path:
    return workdir / "results" / model_name / f"{model_name}_p{prime}_seed{seed}"
