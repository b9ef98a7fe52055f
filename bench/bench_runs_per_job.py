"""Training several runs per job (config key ``runs_per_job``) against one run per job, as users run
it: the real pipeline, ``snakemake --cores 2 --until train train_job`` (training only) on a fresh
results tree, the two settings back to back and alternated, printed as runs x epochs per second.

Cases: 8 seeds at p = 13 and at p = 31 (the model of config/config.yaml, 30 % train), and p = 113
with ``auto`` (which trains such runs alone). Each ratio compares runs measured side by side.
With ``--device cuda`` (a GPU machine): 64 seeds at p = 113 with 1, 8 and 64 runs per job.

Usage: .venv/bin/python bench/bench_runs_per_job.py [--epochs 1000] [--repeats 2] [--device cuda] [--cores 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["model"]


def pipeline_seconds(config: dict, cores: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        workdir = Path(tmp)
        configfile = workdir / "config.yaml"
        configfile.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
        command += ["--configfile", str(configfile), "--cores", str(cores), "--until", "train", "train_job", "--quiet"]
        began = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    args = parser.parse_args()
    print(
        f"# runs_per_job benchmark: snakemake --cores {args.cores}, device {args.device}, {args.epochs} epochs, "
        f"{os.cpu_count()} CPUs"
    )
    if args.device == "cuda":
        cases = [("p=113, 64 seeds", 113, 64, [1, 8, 64])]
    else:
        cases = [
            ("p=13, 8 seeds", 13, 8, [1, 4, 8]),
            ("p=31, 8 seeds", 31, 8, [1, 4, 8]),
            ("p=113, 2 seeds", 113, 2, [1, "auto"]),
        ]
    for label, prime, seeds, settings in cases:
        epochs = args.epochs if prime < 100 or args.device == "cuda" else max(args.epochs // 5, 100)
        base = {
            "model_name": "bench",
            "primes": [prime],
            "seeds": list(range(seeds)),
            "training": {"num_epochs": epochs, "checkpoint_every": 100, "frac_train": 0.3},
            "model": MODEL,
            "device": args.device,
        }
        times: dict = {setting: [] for setting in settings}
        for _ in range(args.repeats):  # alternated, so drift hits every setting alike
            for setting in settings:
                times[setting].append(pipeline_seconds({**base, "runs_per_job": setting}, args.cores))
        work = seeds * epochs
        one = statistics.median(times[settings[0]])
        parts = []
        for setting in settings:
            seconds = statistics.median(times[setting])
            parts.append(
                f"runs_per_job {setting}: {seconds:.1f} s, {work / seconds:.0f} run-epochs/s ({one / seconds:.2f}x)"
            )
        print(f"{label:15s} {epochs} epochs   " + "   ".join(parts))


if __name__ == "__main__":
    main()
