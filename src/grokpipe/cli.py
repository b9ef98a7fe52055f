"""The ``grokpipe`` command line; the Snakemake rules call it, and so can people.

User mistakes (bad config, damaged or hostile files) print one ``grokpipe: error: ...`` line and exit
non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import GrokpipeError


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear an active tqdm progress bar."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never kill a run
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("grokpipe")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _train_spec(args) -> tuple:
    """(RunSpec, run_dir, device, threads, threshold) from --spec or --config."""
    from .config import read_config_file, run_spec, validate_config
    from .layout import run_dir

    if args.spec is not None:
        try:
            raw = json.loads(args.spec)
        except ValueError as exc:
            raise GrokpipeError(f"--spec is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise GrokpipeError("--spec must be a JSON object")
        prime, seed = raw.pop("prime", None), raw.pop("seed", None)
        config = validate_config({**raw, "primes": [prime], "seeds": [seed]}, source="--spec")
        source = "--spec"
    else:
        config = validate_config(read_config_file(args.config), source=str(args.config))
        prime, seed = args.prime, args.seed
        if prime is None or seed is None:
            raise GrokpipeError("--config needs --prime and --seed")
        # The chosen run is validated like a one-run grid of the same config.
        config = validate_config({**config, "primes": [prime], "seeds": [seed]}, source=str(args.config))
        source = str(args.config)
    spec = run_spec(config, prime, seed)
    out = Path(args.run_dir) if args.run_dir else run_dir(config["results_dir"], spec.model_name, prime, seed)
    if out.name != spec.run_name:
        raise GrokpipeError(f"{out}: a run directory must be named {spec.run_name} (from {source})")
    device = args.device or config["device"]
    threads = args.threads or config["threads_per_run"]
    threshold = args.grokking_threshold or config["grokking_threshold"]
    return spec, out, device, threads, threshold


def cmd_train(args) -> int:
    from .train import train

    spec, out, device, threads, threshold = _train_spec(args)
    train(spec, out, device=device, threads=threads, grokking_threshold=threshold,
          progress_bar=not args.no_progress)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    convert(args.legacy, args.run_dir, model_name=args.model_name, prime=args.prime, seed=args.seed,
            grokking_threshold=args.grokking_threshold)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) one (prime, seed) run")
    p.add_argument("run_dir", nargs="?", help="run directory (default: from the config's results_dir)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="workflow config YAML (as config/config.yaml); needs --prime and --seed")
    src.add_argument("--spec", help="one run as JSON: model_name, prime, seed, training, model (what the rule passes)")
    p.add_argument("--prime", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: threads_per_run)")
    p.add_argument("--grokking-threshold", type=float)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="convert a legacy grokking pickle (.pth) into a run directory, safely")
    p.add_argument("legacy", help="the legacy torch.save file (read only, through a restricted unpickler)")
    p.add_argument("run_dir", help="target run directory, named {model_name}_p{prime}_seed{seed}")
    p.add_argument("--model-name", help="default: from the run directory name")
    p.add_argument("--prime", type=int, help="default: from the run directory name")
    p.add_argument("--seed", type=int, help="default: from the run directory name")
    p.add_argument("--grokking-threshold", type=float, default=0.01)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except GrokpipeError as exc:
        print(f"grokpipe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("grokpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
