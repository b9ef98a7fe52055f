"""How long Snakemake takes to plan a sweep (``snakemake -n``), as users run it.

Prints the median of three dry runs of the real workflow for each size, back to back in one run,
both as ``snakemake -n --quiet`` (planning only) and as plain ``snakemake -n`` (which also formats and
prints every job: ~10 s more at 10,000 runs):

- the 1,000-run plain grid (20 primes x 50 seeds, no sweep: the workflow before sweeps existed);
- a 1,000-run sweep (10 primes x 10 seeds x 10 cells: weight decay x learning rate);
- a 10,000-run sweep (10 primes x 10 seeds x 100 cells: operation x weight decay x train fraction),
  one run per training job and 16 runs per job (runs_per_job: 16, the weight decays and seeds of
  one shape share jobs).

Usage: .venv/bin/python bench/bench_sweep_plan.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from grokpipe.config import is_prime  # noqa: E402

MODEL = {"n_layers": 1, "n_heads": 4, "d_model": 128, "d_head": 32, "d_mlp": 512}
PRIMES = [n for n in range(5, 200) if is_prime(n)]


def configs() -> dict[str, dict]:
    base = {"model_name": "bench", "training": {"num_epochs": 1000, "checkpoint_every": 100}, "model": MODEL}
    sweep_10k = {
        **base,
        "primes": PRIMES[:10],
        "seeds": list(range(10)),
        "sweep": {
            "task.operation": ["add", "sub", "mul", "div"],
            "training.weight_decay": [0.03, 0.1, 0.3, 1.0, 3.0],
            "training.frac_train": [0.2, 0.3, 0.4, 0.5, 0.6],
        },
    }
    return {
        "grid, 1,000 runs": {**base, "primes": PRIMES[:20], "seeds": list(range(50))},
        "sweep, 1,000 runs": {
            **base,
            "primes": PRIMES[:10],
            "seeds": list(range(10)),
            "sweep": {"training.weight_decay": [0.1, 0.3, 1.0, 3.0, 10.0], "training.lr": [3e-4, 1e-3]},
        },
        "sweep, 10,000 runs": sweep_10k,
        "the same, 16 per job": {**sweep_10k, "runs_per_job": 16},
    }


def dry_run_seconds(config: dict, workdir: Path, repeats: int, quiet: bool) -> float:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "4", "-s", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), "--configfile", str(configfile)] + (["--quiet"] if quiet else [])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# snakemake -n of the default target, median of {args.repeats} (output to /dev/null)")
    print(f"{'':<20} {'-n --quiet':>10} {'-n':>10}")
    for label, config in configs().items():
        with tempfile.TemporaryDirectory() as tmp:
            quiet = dry_run_seconds(config, Path(tmp), args.repeats, quiet=True)
            loud = dry_run_seconds(config, Path(tmp), args.repeats, quiet=False)
        print(f"{label:<20} {quiet:>8.1f} s {loud:>8.1f} s", flush=True)


if __name__ == "__main__":
    main()
