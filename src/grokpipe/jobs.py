"""Training jobs of several runs (config key ``runs_per_job``): which runs may share a process, and
how they are grouped, deterministically, into jobs.

Runs may share a job when they see the same inputs every epoch: the same prime, operation, model
shape, data split (train fraction, data seed, label noise) and schedule (epochs, checkpoints,
evaluation, implementation); they may differ in seed, lr, weight decay, betas and early stopping.
Such runs are ordered by (cell, prime, seed) and cut into jobs of up to N runs. A job's name is a
hash of its members' run names, so adding runs regroups only the shape they join. Torch-free: the
Snakefile groups at parse time.
"""

from __future__ import annotations

import hashlib
import json
import math

from .config import RunSpec
from .errors import ConfigError

# runs_per_job: auto: runs whose epoch is mostly per-operation overhead (p² small) share a job of
# up to AUTO_RUNS_PER_JOB; at larger p a lone run's folded forward is faster than the stack's
# (bench/bench_runs_per_job.py, snakemake --cores 2: 2.1x at p = 13 and 1.6x at p = 31 with 4 per
# job; 4 per job beat 8 at both). At p = 47 a stacked epoch costs as much per run as a lone one
# (8.4-8.7 against 8.5-9.9 ms in-process) and at p = 113 more (84 against 51 ms).
AUTO_RUNS_PER_JOB = 4
AUTO_MAX_PRIME = 31
VARYING = ("lr", "weight_decay", "betas", "early_stopping")


def group_key(spec: RunSpec) -> str:
    """What the members of one job must share: everything but the seed and AdamW's settings."""
    training = {k: v for k, v in spec.training.to_dict().items() if k not in VARYING}
    shape = {"prime": spec.prime, "operation": spec.operation, "model": spec.model, "training": training}
    return json.dumps(shape, sort_keys=True)


def runs_per_job(setting: int | str, prime: int) -> int:
    """The job size the config's ``runs_per_job`` gives runs of this prime."""
    if setting == "auto":
        return AUTO_RUNS_PER_JOB if prime <= AUTO_MAX_PRIME else 1
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise ConfigError("runs_per_job", f"{setting!r} is not a positive integer or auto")
    return setting


def job_name(members: list[RunSpec]) -> str:
    """``job-{hash}`` of the members' run directories (model name, prime, seed)."""
    names = "\n".join(f"{s.model_name}/{s.run_name}" for s in members)
    return "job-" + hashlib.sha256(names.encode()).hexdigest()[:12]


def train_jobs(specs: list[RunSpec], setting: int | str) -> dict[str, list[RunSpec]]:
    """The jobs of several runs: job name -> its members (jobs of one run are left out: those
    runs train alone, as without ``runs_per_job``).

    Example:
        >>> jobs = train_jobs(grid(config), 4)  # 8 seeds of one shape -> 2 jobs of 4 runs
    """
    shapes: dict[str, list[RunSpec]] = {}
    for spec in sorted(specs, key=lambda s: (s.model_name, s.prime, s.seed)):
        shapes.setdefault(group_key(spec), []).append(spec)
    jobs = {}
    for members in shapes.values():
        size = runs_per_job(setting, members[0].prime)
        if size == 1 or len(members) == 1:
            continue
        count = math.ceil(len(members) / size)
        # even jobs (10 runs by 8 -> 5 + 5, not 8 + 2): the same wall time for each
        bounds = [round(i * len(members) / count) for i in range(count + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi - lo > 1:
                jobs[job_name(members[lo:hi])] = members[lo:hi]
    return jobs
