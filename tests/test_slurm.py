"""The workflow on a real one-node SLURM cluster through snakemake-executor-plugin-slurm.

scripts/slurm-up.sh installs and starts munge + slurmctld + slurmd (root, Debian, as in CI);
scripts/slurm-down.sh stops exactly what it started.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import REPO, run_dir_of, snakemake_command, tiny_config, write_config

import grokpipe

# Opt-in: these tests install Debian's slurm and write /etc/slurm, so they never run by surprise on a
# developer's machine. .ci/run sets GROKPIPE_TEST_SLURM=1.
pytestmark = pytest.mark.skipif(
    os.environ.get("GROKPIPE_TEST_SLURM") != "1"
    or os.geteuid() != 0
    or shutil.which("apt-get") is None
    and shutil.which("slurmctld") is None,
    reason="set GROKPIPE_TEST_SLURM=1 to run them (they need root and Debian's slurm packages; CI opts in)",
)

# Snakemake polls with squeue (no accounting database, so no sacct) and checks early.
SLURM_ARGS = [
    "--workflow-profile",
    str(REPO / "profiles" / "slurm"),
    "--default-resources",
    "slurm_partition=debug",
    "runtime=10",
    "mem_mb=500",
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "2",
    "--jobs",
    "4",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "GROKPIPE_SLURM_DIR": str(state)}
    up = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm-up.sh")], capture_output=True, text=True, env=env, timeout=600
    )
    assert up.returncode == 0, up.stdout + up.stderr
    yield env
    down = subprocess.run(["bash", str(REPO / "scripts" / "slurm-down.sh")], capture_output=True, text=True, env=env)
    assert down.returncode == 0, down.stderr
    for line in (state / "started.pids").read_text().splitlines():
        pytest.fail(f"daemon still recorded after slurm-down: {line}")


def slurm_snakemake(workdir, configfile, env, *extra, wait=True):
    cmd = snakemake_command(workdir, *SLURM_ARGS, *extra, configfile=configfile)
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_grid_runs_as_slurm_jobs(cluster, tmp_path):
    configfile = write_config(tmp_path / "config.yaml", tiny_config(seeds=[0]))
    proc = slurm_snakemake(tmp_path, configfile, cluster)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_ids = set()
    for prime in (5, 7):
        run = run_dir_of(tmp_path, prime, 0)
        meta = grokpipe.load_metadata(run)
        job_ids.add(meta["environment"]["slurm_job_id"])
        assert json.loads((run / "verify.json").read_text())["ok"]
        assert grokpipe.list_epochs(run) == [9, 19, 29]
        grokpipe.load_model(run, epoch=19)
    assert None not in job_ids and len(job_ids) == 2, "each training run must be its own SLURM job"
    output = proc.stdout + proc.stderr
    submitted = [line for line in output.splitlines() if "has been submitted with SLURM jobid" in line]
    rules = sorted(rule for line in submitted for rule in ("rule_train", "rule_analyze") if rule in line)
    assert len(submitted) == 4 and rules == ["rule_analyze"] * 2 + ["rule_train"] * 2, output[-3000:]
    assert "localrule summarize" in output  # the grid's summary stays on the login node
    for prime in (5, 7):  # the analyze job also drew the loss curves and computed the progress measures
        artifacts = run_dir_of(tmp_path, prime, 0) / "artifacts"
        assert (artifacts / "loss_curves.png").stat().st_size > 1000
        assert len((artifacts / "progress_measures.csv").read_text().splitlines()) == 1 + 3


def test_scancel_mid_training_retries_and_resumes(cluster, tmp_path):
    config = tiny_config(primes=[7], seeds=[0], training={"num_epochs": 4000, "checkpoint_every": 20})
    configfile = write_config(tmp_path / "config.yaml", config)
    run = run_dir_of(tmp_path, 7, 0)
    proc = slurm_snakemake(tmp_path, configfile, cluster, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((run / "checkpoints").glob("checkpoint_*"))) < 10:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    jobs = subprocess.run(
        ["squeue", "-h", "-o", "%i %j", "-t", "RUNNING"], capture_output=True, text=True, env=cluster
    ).stdout.split("\n")
    train_jobs = [line.split()[0] for line in jobs if line.strip()]
    assert train_jobs, "no running SLURM job to cancel"
    subprocess.run(["scancel", *train_jobs], check=True, env=cluster)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    log = (tmp_path / "logs" / "tiny" / "train" / "tiny_p7_seed0.log").read_text()
    assert "resuming after epoch" in log, log[-2000:]
    meta = grokpipe.load_metadata(run)
    assert len(meta["train_losses"]) == 4000 and meta["environment"]["slurm_job_id"] not in train_jobs
    assert json.loads((run / "verify.json").read_text())["ok"]
