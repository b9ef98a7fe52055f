"""Consolidating a 600 MB sharded checkpoint: ``grokpipe consolidate`` as a user runs it (the CLI,
defaults) vs the naive path (load every shard, ``safetensors.torch.save_file`` the merged dict), each
in a fresh process, back to back, in one run. Reports wall time and peak RSS (ru_maxrss of the
process) of both, above a tiny model's peak with the same code, and the ratios.

Formats: Hugging Face sharded safetensors (6 x 100 MB) and the same weights as ``.bin`` shards.
The naive ``.bin`` path uses ``torch.load(weights_only=True)``, the safest plain-torch load.

Usage: .venv/bin/python bench/bench_consolidate.py [--mb 600] [--shards 6] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Peak RSS is the child's own VmHWM, read as it exits: ru_maxrss would carry over the parent's peak
# through fork + exec.
PEAK = """
import atexit, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK", int(line.split()[1]) * 1024, file=sys.stderr)
atexit.register(_peak)
"""
OURS = (
    PEAK
    + """
from grokpipe.cli import main
sys.exit(main(["consolidate", *sys.argv[1:], "--force", "--no-progress"]))
"""
)
NAIVE = (
    PEAK
    + """
import sys, glob, os, torch
from safetensors.torch import load_file, save_file
source, out = sys.argv[1], sys.argv[2]
state = {}
shards = sorted(glob.glob(os.path.join(source, "*.safetensors")) + glob.glob(os.path.join(source, "*.bin")))
for shard in shards:
    state.update(load_file(shard) if shard.endswith(".safetensors") else torch.load(shard, weights_only=True))
os.makedirs(out, exist_ok=True)
save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
"""
)


def make_checkpoint(root: Path, megabytes: int, shards: int, fmt: str) -> Path:
    """HF's sharded layout: ``shards`` files of 5 tensors each, an index naming them."""
    root.mkdir(parents=True)
    per_tensor = megabytes * 2**20 // (shards * 5 * 4)
    weight_map = {}
    for k in range(shards):
        tensors = {f"layers.{k}.w{j}": torch.randn(per_tensor) for j in range(5)}
        if fmt == "safetensors":
            name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(tensors, root / name)
        else:
            name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
            torch.save(tensors, root / name)
        weight_map.update(dict.fromkeys(tensors, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (root / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK ")]
    return seconds, int(peak[-1].split()[1])


def ours(source: Path, out: Path) -> list[str]:
    """``grokpipe consolidate SOURCE OUT --force`` through the CLI's main (as the console script)."""
    return [sys.executable, "-c", OURS, str(source), str(out)]


def naive(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", NAIVE, str(source), str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=600)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs each")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grokpipe-bench-consolidate-"))
    try:
        print(f"# consolidate benchmark: {args.mb} MB in {args.shards} shards, best of {args.repeat}, fresh processes")
        print("| format | path | seconds | peak RSS | above a 1 MB model | time ratio | memory ratio (above) |")
        print("|---|---|---|---|---|---|---|")
        for fmt in ("safetensors", "bin"):
            tiny = make_checkpoint(work / f"tiny-{fmt}", 1, 1, fmt)
            big = make_checkpoint(work / f"big-{fmt}", args.mb, args.shards, fmt)
            results = {}
            for label, command in (("naive", naive), ("grokpipe", ours)):
                shutil.rmtree(work / "tiny-out", ignore_errors=True)
                _, base = measure(command(tiny, work / "tiny-out"))
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(work / "out", ignore_errors=True)
                    runs.append(measure(command(big, work / "out")))
                seconds, peak = min(r[0] for r in runs), min(r[1] for r in runs)
                results[label] = (seconds, peak, peak - base)
            (t_naive, _, m_naive), (t_ours, _, m_ours) = results["naive"], results["grokpipe"]
            for label, (seconds, peak, above) in results.items():
                ratios = f"{t_ours / t_naive:.2f}x | {m_ours / m_naive:.2f}x" if label == "grokpipe" else "1 | 1"
                sizes = f"{peak / 2**20:.0f} MB | {above / 2**20:.0f} MB"
                print(f"| {fmt} | {label} | {seconds:.2f} | {sizes} | {ratios} |")
            shutil.rmtree(big)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
