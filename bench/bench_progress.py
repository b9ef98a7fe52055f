"""Progress measures over 250 checkpoints at p = 113 (the reference run's shape): grokpipe vs the
TransformerLens Grokking_Demo's run_with_cache computation, measured back to back in one run.

A p = 113 run of the demo's model is trained for 250 checkpoints (every --every epochs; the cost of
the measures does not depend on which epochs the weights come from). Then ``grokpipe progress`` is
timed as a user runs the CLI on all 250, with five key frequencies as a grokked p = 113 run has
(this short run has not grokked, so its automatic choice would be every frequency: timed too, as the
worst case), and the demo-style computation on an evenly spaced sample of the same checkpoints
(HookedTransformer.run_with_cache once per checkpoint feeding every measure: cheaper than the
notebook, which calls it once per measure).

Usage: .venv/bin/python bench/bench_progress.py [--every 4] [--sample 25]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

import grokpipe
from grokpipe.config import grid, validate_config
from grokpipe.training.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from demo_reference import DEMO_MODEL  # noqa: E402
from test_progress_measures import demo_measures  # noqa: E402  (the independent reference computation)

P = 113
KEY_FREQUENCIES = [14, 35, 41, 42, 52]  # five, as the demo's grokked p = 113 run has


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--sample", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(tempfile.mkdtemp(prefix="grokpipe-bench-")) / "bench_p113_seed999"
    config = validate_config(
        {
            "model_name": "bench",
            "primes": [P],
            "seeds": [999],
            "model": DEMO_MODEL,
            "training": {"frac_train": 0.3, "num_epochs": 250 * args.every, "checkpoint_every": args.every},
        }
    )
    train(grid(config)[0], run, threads=2, progress_bar=False)
    epochs = grokpipe.list_epochs(run)
    print(f"# progress measures benchmark: p={P}, {len(epochs)} checkpoints, {torch.get_num_threads()} threads")

    def cli_seconds(*extra):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "grokpipe", "progress", str(run), *extra], check=True, capture_output=True
        )
        return time.perf_counter() - start

    worst = cli_seconds()
    ours = cli_seconds("--key-frequencies", ",".join(map(str, KEY_FREQUENCIES)))

    import json

    freqs = json.loads((run / "artifacts" / "key_frequencies.json").read_text())["key_frequencies"]
    meta = grokpipe.load_metadata(run)
    train_idx, test_idx = torch.tensor(meta["train_indices"]), torch.tensor(meta["test_indices"])
    sample = epochs[:: max(1, len(epochs) // args.sample)][: args.sample]
    start = time.perf_counter()
    for epoch in sample:
        model = grokpipe.load_model(run, epoch)
        with torch.inference_mode():
            demo_measures(model, P, train_idx, test_idx, freqs)
    demo_per = (time.perf_counter() - start) / len(sample)
    print(
        f"grokpipe progress (CLI, all {len(epochs)} checkpoints, process start included): {ours:.1f} s "
        f"= {1000 * ours / len(epochs):.0f} ms/checkpoint"
    )
    print(
        f"  with every frequency (56: an un-grokked final model, the worst case): {worst:.1f} s "
        f"= {1000 * worst / len(epochs):.0f} ms/checkpoint"
    )
    print(
        f"demo-style run_with_cache ({len(sample)} of them): {1000 * demo_per:.0f} ms/checkpoint "
        f"-> {demo_per * len(epochs):.0f} s for all {len(epochs)}; speed-up {demo_per * len(epochs) / ours:.1f}x"
    )


if __name__ == "__main__":
    main()
