"""The documentation works: the example notebook runs, and the reference pages match the code."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import REPO, run_dir_of, write_config
from nbclient import NotebookClient

NOTEBOOK = REPO / "examples" / "grokking_tour.ipynb"


def test_example_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_example_notebook_runs_top_to_bottom_on_a_run(trained_grid, monkeypatch):
    """Executed as a researcher would (a real Jupyter kernel), on a tiny trained run."""
    run = run_dir_of(trained_grid["workdir"], 7, 0)
    monkeypatch.setenv("GROKPIPE_RUN", str(run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute(env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "tiny_p7_seed0: p = 7, operation add, 3 checkpoints (9 .. 29)" in text
    assert "epoch 29: train accuracy" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4  # curves, Fourier norms, progress measures, attention pattern
    if not (run / "artifacts" / "progress_measures.csv").exists():
        pytest.fail("the workflow wrote no progress measures for the notebook to read")


README = REPO / "README.md"
RUNNABLE = re.compile(r"<!-- runnable -->\n```(\w+)\n(.*?)```", re.DOTALL)


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every README block marked ``<!-- runnable -->``, in order."""
    return RUNNABLE.findall(text)


def test_readme_opens_with_the_two_commands_and_stays_short():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == [
        "bash scripts/setup.sh && .venv/bin/snakemake --cores all",
        "bash scripts/setup.sh && .venv/bin/python -m pytest",
    ]
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in (REPO / ".ci" / "run").read_text()
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", text):
        assert (REPO / link).exists(), link


def test_readme_runnable_blocks_work_as_written(tmp_path):
    """Every block marked runnable, in order, in a copy of the repository whose configs are tiny
    (the same keys; fewer epochs, one prime and seed), with this environment as .venv/."""
    blocks = runnable_blocks(README.read_text())
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash", "bash"]
    for part in ("Snakefile", "workflow", "config", "profiles", "src"):
        source = REPO / part
        target = tmp_path / part
        shutil.copytree(source, target, symlinks=True) if source.is_dir() else shutil.copy(source, target)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # this environment, as the README's .venv/
    bin_dir = tmp_path / ".venv" / "bin"
    for name in ("config.yaml", "sweep.yaml"):
        config = yaml.safe_load((REPO / "config" / name).read_text())
        config["primes"], config["seeds"] = [31], [0]
        config["training"].update(num_epochs=200, checkpoint_every=100)
        if config.get("sweep"):
            config["sweep"]["training.weight_decay"] = [0.3]
        write_config(tmp_path / "config" / name, config)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for lang, code in blocks:
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [str(bin_dir / "python"), "-c", code]
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{lang} block failed:\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if lang == "python":
            assert "[99, 199]" in proc.stdout and "attention pattern: (961, 4, 3, 3)" in proc.stdout
    assert (tmp_path / "results" / "grokking" / "grokking_p31_seed0" / "verify.json").exists()
    (export,) = (tmp_path / "models").glob("tl*")
    assert re.fullmatch(r"tl1l-206K-modadd31-grok-s0-e199-c[0-9a-f]{8}", export.name), export.name
    assert (tmp_path / "results" / "_sweeps" / "grokking" / "sweep.csv").exists()


def schema_keys(schema: dict) -> dict[str, dict]:
    """Every documented key of the config schema (dotted under training, model, task, finetune) -> its schema."""
    keys = {}
    for name, prop in schema["properties"].items():
        if name in ("training", "model", "task", "finetune"):
            for sub, sub_prop in prop["properties"].items():
                keys[f"{name}.{sub}"] = {**sub_prop, "required": sub in prop.get("required", [])}
        else:
            keys[name] = {**prop, "required": name in schema.get("required", [])}
    return keys


def test_configuration_page_matches_the_schema_key_by_key():
    from grokpipe.config import load_schema

    rows = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        match = re.match(r"\| `([a-z_.]+)` \| [^|]+ \| ([^|]+) \|", line)
        if match:
            rows[match[1]] = match[2].strip()
    keys = schema_keys(load_schema())
    assert set(rows) == set(keys), set(rows) ^ set(keys)
    for key, prop in keys.items():
        if prop["required"]:
            assert rows[key] == "required", key
        elif "default" in prop:
            assert rows[key].startswith("`") and yaml.safe_load(rows[key].strip("`")) == prop["default"], key
        else:
            assert rows[key] == "—", key


def subcommands():
    import argparse

    from grokpipe.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_cli_page_has_every_command_flag_and_example():
    from grokpipe.cli import EXAMPLES

    page = (REPO / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## ([a-z-]+)\n(.*?)(?=^## |\Z)", page, re.DOTALL | re.MULTILINE))
    assert set(sections) == set(subcommands())
    for name, parser in subcommands().items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in sections[name], (name, flag)
        for example in EXAMPLES[name]:
            assert example in sections[name], (name, example)


def test_every_command_help_ends_with_examples_that_parse():
    from grokpipe.cli import EXAMPLES, build_parser

    for name, parser in subcommands().items():
        help_text = parser.format_help()
        assert "examples:\n  grokpipe " + name in help_text and f"docs/cli.md#{name}" in help_text
        for example in EXAMPLES[name]:
            args = build_parser().parse_args(example.split()[1:])  # every example is a valid command line
            assert args.command == name
