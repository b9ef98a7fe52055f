"""Sweeps: operations, label noise, early stopping, cell names, the sweep table and figures."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODEL, dry_jobs, grokpipe_cli, jobs_planned, snakemake, tiny_config, write_config

import grokpipe
from grokpipe.analysis.verify import verify_run
from grokpipe.config import ConfigError, RunSpec, grid, load_schema, validate_config
from grokpipe.export import export, parse_export_name
from grokpipe.sweep import Cell, _distinct_names, cell_name, expand
from grokpipe.training.data import make_split
from grokpipe.training.model import loss_fn
from grokpipe.training.tasks import OPERATION_NAMES, labels_of, pair_ids
from grokpipe.training.train import train


def brute_force(operation: str, a: int, b: int, p: int) -> int | None:
    """Each operation from its definition, with Python integers (None: undefined)."""
    inverse = pow(b, p - 2, p) if b % p else None  # Fermat: b^(p-2) = b^-1 mod p
    return {
        "add": (a + b) % p,
        "sub": (a - b) % p,
        "mul": (a * b) % p,
        "div": None if inverse is None else (a * inverse) % p,
        "sq_sum": (a**2 + b**2) % p,
        "sq_sum_ab": (a**2 + a * b + b**2) % p,
        "sq_sum_ab_a": (a**2 + a * b + b**2 + a) % p,
        "cube_ab": (a**3 + a * b) % p,
        "cube_ab2_b": (a**3 + a * b**2 + b) % p,
        "div_odd_sub": (a * inverse) % p if b % 2 == 1 else (a - b) % p,
        "add_even_mul": (a + b) % p if a % 2 == 0 else (a * b) % p,
    }[operation]


@pytest.mark.parametrize("operation", OPERATION_NAMES)
def test_each_operation_matches_its_definition(operation):
    p = 11
    expected = {a * p + b: brute_force(operation, a, b, p) for a in range(p) for b in range(p)}
    defined = [i for i, label in expected.items() if label is not None]
    ids = pair_ids(p, operation)
    assert ids.tolist() == defined
    assert labels_of(ids, p, operation).tolist() == [expected[i] for i in defined]


def test_schema_lists_exactly_the_operations():
    assert load_schema()["properties"]["task"]["properties"]["operation"]["enum"] == list(OPERATION_NAMES)


def test_split_of_addition_is_the_demos_and_division_leaves_out_b_zero():
    generator = torch.Generator().manual_seed(598)
    perm = torch.randperm(13 * 13, generator=generator)
    split = make_split(13, 0.3, 598)
    assert torch.equal(split.train_indices, perm[: int(169 * 0.3)])
    div = make_split(13, 0.3, 598, operation="div")
    ids = torch.cat([div.train_indices, div.test_indices])
    assert sorted(ids.tolist()) == [i for i in range(169) if i % 13 != 0]
    assert len(div.train_indices) == int(13 * 12 * 0.3)


def test_label_noise_count_determinism_and_clean_test_set():
    clean = make_split(13, 0.5, 598, operation="sub")
    noisy = make_split(13, 0.5, 598, operation="sub", label_noise=0.2)
    again = make_split(13, 0.5, 598, operation="sub", label_noise=0.2)
    n_train = len(clean.train_indices)
    assert len(noisy.noisy_indices) == round(0.2 * n_train)
    assert torch.equal(noisy.train_indices, clean.train_indices)  # the split does not depend on the noise
    assert torch.equal(noisy.test_labels, clean.test_labels)
    assert torch.equal(noisy.noisy_indices, again.noisy_indices) and torch.equal(noisy.train_labels, again.train_labels)
    changed = (noisy.train_labels != clean.train_labels).nonzero()[:, 0]
    assert sorted(noisy.train_indices[changed].tolist()) == noisy.noisy_indices.tolist()  # each one really wrong
    position = {int(i): k for k, i in enumerate(noisy.train_indices)}
    assert [int(noisy.train_labels[position[int(i)]]) for i in noisy.noisy_indices] == noisy.noisy_labels.tolist()
    other_seed = make_split(13, 0.5, 599, operation="sub", label_noise=0.2)
    assert not torch.equal(other_seed.train_labels, noisy.train_labels)


def sweep_config(**sweep) -> dict:
    return validate_config({**tiny_config(primes=[7], seeds=[0]), "sweep": sweep})


def test_cells_are_the_product_in_config_order_with_readable_names():
    config = sweep_config(**{"training.weight_decay": [0.3, 1.0], "task.operation": ["add", "sub"]})
    cells = expand(config)
    assert [c.name for c in cells] == ["tiny-wd0.3-add", "tiny-wd0.3-sub", "tiny-wd1.0-add", "tiny-wd1.0-sub"]
    last = cells[-1]
    assert last.settings == {"training.weight_decay": 1.0, "task.operation": "sub"}
    assert last.config["training"]["weight_decay"] == 1.0 and last.config["task"]["operation"] == "sub"
    assert last.config["model_name"] == "tiny-wd1.0-sub" and "sweep" not in last.config
    assert cell_name("g", {"training.lr": 1e-05, "training.betas": [0.9, 0.98]}) == "g-lr1e-5-betas0.9_0.98"
    assert [c.name for c in expand(validate_config(tiny_config()))] == ["tiny"]  # no sweep: as before


def test_names_that_would_collide_get_a_hash():
    cells = [Cell("g-x1", {"a.x": 1}, {}), Cell("g-x1", {"a.x": "1"}, {}), Cell("g-x2", {"a.x": 2}, {})]
    names = [c.name for c in _distinct_names(cells)]
    assert len(set(names)) == 3 and names[2] == "g-x2" and all(n.startswith("g-x1-") for n in names[:2])


@pytest.mark.parametrize(
    ("sweep", "key"),
    [
        ({"training.lr": [0.1, -1]}, "sweep.training.lr[1]"),
        ({"training.bogus": [1]}, "sweep.training.bogus"),
        ({"task.operation": ["add", "pow"]}, "sweep.task.operation[1]"),
        ({"training.num_epochs": [10, 2.5]}, "sweep.training.num_epochs[1]"),
        ({"training.frac_train": [0.5, 0.01]}, "sweep.training.frac_train"),
        ({"training.label_noise": [0.1, 1.0]}, "sweep.training.label_noise[1]"),
        ({"training.lr": []}, "sweep.training.lr"),
        ({"seeds": [1, 2]}, "sweep"),
    ],
)
def test_bad_sweep_values_are_refused_by_name(sweep, key):
    with pytest.raises(ConfigError) as raised:
        validate_config({**tiny_config(), "sweep": sweep}, source="config.yaml")
    assert f"config key '{key}" in str(raised.value)


def test_bad_sweep_value_stops_snakemake_before_any_job(tmp_path):
    configfile = write_config(tmp_path / "config.yaml", {**tiny_config(), "sweep": {"training.weight_decay": [1, -2]}})
    proc = snakemake(tmp_path, "-n", configfile=configfile, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "sweep.training.weight_decay[1]" in output and "Traceback" not in output
    assert not (tmp_path / "results").exists()


def test_config_hash_is_unchanged_for_add_without_noise_and_differs_otherwise():
    base = grid(validate_config(tiny_config()))[0]
    stored = RunSpec.from_dict({k: v for k, v in base.to_dict().items() if k != "task"})  # an older config.json
    assert stored.config_hash == base.config_hash
    sub = grid(validate_config({**tiny_config(), "task": {"operation": "sub"}}))[0]
    noisy = grid(validate_config(tiny_config(training={"label_noise": 0.1})))[0]
    assert len({base.config_hash, sub.config_hash, noisy.config_hash}) == 3


def accuracy(model, tokens, labels) -> float:
    with torch.inference_mode():
        logits = model(tokens)[:, -1]
    return (logits.gather(1, labels[:, None])[:, 0] >= logits.amax(-1)).float().mean().item()


def test_accuracies_and_noise_are_recorded_and_match_the_checkpoints(tmp_path):
    config = validate_config({**tiny_config(primes=[7], seeds=[0]), "task": {"operation": "mul"}})
    config["training"].update(label_noise=0.25, num_epochs=40)
    spec = grid(config)[0]
    meta = train(spec, tmp_path / spec.run_name, progress_bar=False)
    assert meta["operation"] == "mul" and len(meta["noisy_indices"]) == round(0.25 * len(meta["train_indices"]))
    assert set(meta["noisy_indices"]) <= set(meta["train_indices"])
    split = make_split(7, 0.6, 598, operation="mul", label_noise=0.25)
    for epoch in (9, 19, 29):
        model = grokpipe.load_model(tmp_path / spec.run_name, epoch=epoch)
        # train accuracy of epoch e is measured before its step: on checkpoint e - 1's weights
        assert meta["train_accuracies"][epoch + 1] == pytest.approx(
            accuracy(model, split.train_tokens, split.train_labels), abs=1e-6
        )
        assert meta["test_accuracies"][epoch] == pytest.approx(
            accuracy(model, split.test_tokens, split.test_labels), abs=1e-6
        )
    report = verify_run(tmp_path / spec.run_name)
    assert report.ok, report.problems
    data = grokpipe.run_dataset(tmp_path / spec.run_name)  # the public view of the same data
    assert torch.equal(data.train_tokens, split.train_tokens) and torch.equal(data.train_labels, split.train_labels)
    assert torch.equal(data.test_tokens, split.test_tokens) and torch.equal(data.test_labels, split.test_labels)
    assert torch.equal(data.noisy_indices, split.noisy_indices) and data.operation == "mul"
    assert not torch.equal(data.labels[data.train_indices], data.train_labels)  # the noise is there


def test_run_dataset_of_division_marks_the_undefined_pairs(tmp_path):
    config = validate_config({**tiny_config(primes=[5], seeds=[0]), "task": {"operation": "div"}})
    config["training"].update(num_epochs=10, checkpoint_every=10)
    spec = grid(config)[0]
    train(spec, tmp_path / spec.run_name, progress_bar=False)
    data = grokpipe.run_dataset(tmp_path / spec.run_name)
    assert data.tokens.shape == (25, 3) and torch.equal(data.tokens[7], torch.tensor([1, 2, 5]))
    assert (data.labels[data.tokens[:, 1] == 0] == -1).all() and (data.labels[data.tokens[:, 1] != 0] >= 0).all()
    assert data.labels[1 * 5 + 2] == 3  # 1 / 2 = 3 mod 5
    assert len(data.train_indices) + len(data.test_indices) == 20
    meta_path = tmp_path / spec.run_name / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["test_indices"][0] = 5  # (1, 0): division by zero is not a pair of the task
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(grokpipe.GrokpipeError, match="metadata.json: test_indices holds pair ids outside"):
        grokpipe.run_dataset(tmp_path / spec.run_name)


def early_spec(num_epochs=200):
    config = validate_config(tiny_config(primes=[5], seeds=[0]))
    # test loss starts near ln 5 < 3: the rule fires at epoch 0, so the run stops at the first
    # checkpoint epoch at or after 0 + 25, epoch 29
    config["training"].update(num_epochs=num_epochs, early_stopping={"test_loss_below": 3.0, "after_epochs": 25})
    return grid(config)[0]


def test_early_stopping_ends_on_a_checkpoint_verifies_and_continues_without_the_rule(tmp_path):
    spec = early_spec()
    run = tmp_path / spec.run_name
    meta = train(spec, run, progress_bar=False)
    assert meta["stopped_at_epoch"] == 29 == meta["final_epoch"]
    assert "test loss" in meta["stop_reason"] and len(meta["train_losses"]) == 30
    assert meta["checkpoint_epochs"] == [9, 19, 29]
    assert verify_run(run).ok
    # the rule dropped (not part of the config hash): training continues from epoch 30
    longer = RunSpec.from_dict({**spec.to_dict(), "training": {**spec.to_dict()["training"], "early_stopping": None}})
    assert longer.config_hash == spec.config_hash
    meta = train(longer, run, progress_bar=False)
    assert meta["stopped_at_epoch"] is None and meta["final_epoch"] == 199
    assert meta["environment"]["segments"][1]["first_epoch"] == 30


def test_early_stopping_run_killed_resumes_bit_identical(tmp_path):
    spec = early_spec(num_epochs=3000)
    spec = RunSpec.from_dict(
        {
            **spec.to_dict(),
            "training": {
                **spec.to_dict()["training"],
                "checkpoint_every": 20,
                "early_stopping": {"test_loss_below": 3.0, "after_epochs": 2000},
            },
        }
    )
    reference = tmp_path / "reference" / spec.run_name
    expected = train(spec, reference, progress_bar=False)
    assert expected["stopped_at_epoch"] == 2019
    run = tmp_path / "killed" / spec.run_name
    cmd = ["-m", "grokpipe", "train", str(run), "--spec", json.dumps(spec.to_dict()), "--threads", "1"]
    proc = subprocess.Popen([sys.executable, *cmd], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((run / "checkpoints").glob("checkpoint_*"))) < 20 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metadata.json").exists(), "the run finished before it was killed"
    resumed = train(spec, run, threads=1, progress_bar=False)
    assert resumed["stopped_at_epoch"] == 2019
    for key in ("train_losses", "test_losses", "train_accuracies", "checkpoint_epochs", "stop_reason"):
        assert resumed[key] == expected[key], key
    for epoch in [*grokpipe.list_epochs(run), None]:
        a, b = grokpipe.load_state_dict(run, epoch), grokpipe.load_state_dict(reference, epoch)
        assert all(torch.equal(a[k], b[k]) for k in a), epoch


SWEEP = {"training.weight_decay": [0.3, 1.0], "task.operation": ["add", "sub"]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A real Snakemake run of a tiny sweep: 2 weight decays x 2 operations x 2 seeds at p = 7."""
    workdir = tmp_path_factory.mktemp("sweep")
    config = {**tiny_config(primes=[7], seeds=[0, 1], training={"num_epochs": 20}), "sweep": SWEEP}
    configfile = write_config(workdir / "config.yaml", config)
    snakemake(workdir, "--cores", "2", configfile=configfile)
    return workdir, configfile, config


def test_sweep_trains_every_cell_with_its_own_settings_and_labels(swept):
    workdir, _, _ = swept
    cells = sorted(p.name for p in (workdir / "results").iterdir() if p.name != "_sweeps")
    assert cells == ["tiny-wd0.3-add", "tiny-wd0.3-sub", "tiny-wd1.0-add", "tiny-wd1.0-sub"]
    for cell in cells:
        weight_decay, operation = float(cell.split("-")[1][2:]), cell.split("-")[2]
        for seed in (0, 1):
            run = workdir / "results" / cell / f"{cell}_p7_seed{seed}"
            config, meta = grokpipe.load_config(run), grokpipe.load_metadata(run)
            assert config["training"]["weight_decay"] == weight_decay and config["task"]["operation"] == operation
            assert config["sweep_cell"] == {"training.weight_decay": weight_decay, "task.operation": operation}
            assert meta["operation"] == operation
            assert json.loads((run / "verify.json").read_text())["ok"]
            # the recorded test loss of the final model equals HookedTransformer's on labels
            # recomputed from the operation's definition
            ids = meta["test_indices"]
            labels = torch.tensor([brute_force(operation, i // 7, i % 7, 7) for i in ids])
            tokens = torch.tensor([[i // 7, i % 7, 7] for i in ids])
            with torch.inference_mode():
                loss = loss_fn(grokpipe.load_model(run)(tokens), labels).item()
            assert loss == pytest.approx(meta["final_test_loss"], rel=1e-5)
            assert (run / "artifacts" / "progress_measures.csv").exists() == (operation == "add")


def test_sweep_table_and_figures(swept):
    workdir, _, _ = swept
    out = workdir / "results" / "_sweeps" / "tiny"
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 8
    assert {(r["training.weight_decay"], r["task.operation"]) for r in rows} == {
        (w, o) for w in ("0.3", "1.0") for o in ("add", "sub")
    }
    assert all(r["outcome"] in ("generalised", "memorised", "neither", "diverged") for r in rows)
    for row in rows:
        meta = grokpipe.load_metadata(workdir / row["run_dir"])
        assert row["final_test_loss"] == str(meta["final_test_loss"])
    for figure in ("grokking_epoch.png", "outcome.png", "grokking_vs_axis.png"):
        assert (out / figure).stat().st_size > 10_000


def test_changing_one_axis_value_retrains_only_its_cells(swept, tmp_path):
    workdir, _, config = swept
    changed = write_config(
        tmp_path / "config.yaml", {**config, "sweep": {**SWEEP, "training.weight_decay": [0.3, 0.5]}}
    )
    proc = snakemake(workdir, "-n", configfile=changed)
    assert jobs_planned(proc)["train"] == 4  # the two wd0.5 cells x 2 seeds; wd0.3's runs stay
    trained = [output for rule, output in dry_jobs(proc.stdout) if rule == "train"]
    assert len(trained) == 4 and all("-wd0.5-" in output for output in trained)


def test_list_filters_by_axis_and_exports_name_operation_and_cell(swept, tmp_path):
    workdir, _, _ = swept
    proc = grokpipe_cli(
        "list", str(workdir / "results"), "--where", "task.operation=sub", "--where", "training.weight_decay=1"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tiny-wd1.0-sub") == 2 and "add" not in proc.stdout
    run = workdir / "results" / "tiny-wd1.0-sub" / "tiny-wd1.0-sub_p7_seed0"
    exported = export(run, tmp_path / "models", "final")
    name = parse_export_name(exported.name)
    assert name.operation == "sub" and name.prime == 7 and "-c" in name.version
    other = export(workdir / "results" / "tiny-wd0.3-sub" / "tiny-wd0.3-sub_p7_seed0", tmp_path / "models")
    assert other.name != exported.name  # cells that differ only in weight decay never share an export


def test_train_cli_chooses_a_cell_of_a_sweep_config(tmp_path):
    configfile = write_config(tmp_path / "sweep.yaml", {**tiny_config(training={"num_epochs": 5}), "sweep": SWEEP})
    proc = grokpipe_cli("train", "--config", str(configfile), "--prime", "5", "--seed", "0", cwd=tmp_path)
    assert proc.returncode != 0 and "choose a cell with --cell" in proc.stderr and "tiny-wd0.3-add" in proc.stderr
    args = ["train", "--config", str(configfile), "--prime", "5", "--seed", "0", "--cell", "tiny-wd1.0-sub"]
    proc = grokpipe_cli(*args, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = grokpipe.load_config(tmp_path / "results" / "tiny-wd1.0-sub" / "tiny-wd1.0-sub_p5_seed0")
    assert config["task"]["operation"] == "sub" and config["model"] == {**TINY_MODEL, **config["model"]}


def test_example_sweep_config_is_valid_and_named_as_documented():
    config = validate_config(yaml.safe_load((REPO / "config" / "sweep.yaml").read_text()))
    names = [cell.name for cell in expand(config)]
    assert len(names) == len(set(names)) >= 4
    assert "grokking-sub-wd0.3" in names  # the name README.md and docs/sweeps.md show
