"""Several runs of one shape trained together (grokpipe.training.stacked): each member stays an
ordinary run, equal to the lone run to float32 rounding, and a job resumes bit-identically."""

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config, write_config

import grokpipe
from grokpipe.analysis.verify import verify_run
from grokpipe.config import grid, validate_config
from grokpipe.io.safetensors_io import read_metadata
from grokpipe.jobs import group_key
from grokpipe.training.cross_entropy import cross_entropy_and_correct, stacked_cross_entropy_and_correct
from grokpipe.training.data import make_split
from grokpipe.training.model import training_model
from grokpipe.training.stacked import StackedAdamW, stacked_logits, train_group
from grokpipe.training.train import train

# Largest relative deviation of a member's losses from the lone run's (tiny model, p = 7, the folded
# stacked forward): over the first 50 epochs measured 1.5e-8 to 3.7e-7 (float32 rounding); over 500
# epochs 7.5e-4 to 8.4e-3, as training amplifies rounding (more at a larger learning rate), as a
# different thread count does.
FIRST_50_EPOCHS_BOUND = 1e-6
LOSS_BOUND_500_EPOCHS = 3e-2


def specs_of(seeds=(0, 1), epochs=60, every=20, **training):
    config = validate_config(
        tiny_config(
            primes=[7], seeds=list(seeds), training={"num_epochs": epochs, "checkpoint_every": every, **training}
        )
    )
    return grid(config)


def with_training(spec, **changes):
    return dataclasses.replace(spec, training=dataclasses.replace(spec.training, **changes))


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"n_layers": 2, "act_fn": "gelu"},
        {"attn_only": True},
    ],
)
def test_stacked_logits_and_losses_equal_each_models_own(model):
    raw = tiny_config(primes=[7], seeds=[0, 1, 2], model=model)
    if model.get("attn_only"):
        del raw["model"]["d_mlp"]
    config = validate_config(raw)
    specs = grid(config)
    models = [training_model(spec, "cpu") for spec in specs]
    split = make_split(7, 0.6, 598)
    names = [name for name, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    logits = stacked_logits(params, models[0].cfg, split.train_tokens)
    losses, correct = stacked_cross_entropy_and_correct(logits, split.train_labels)
    for r, m in enumerate(models):
        own = m(split.train_tokens)[:, -1]
        torch.testing.assert_close(logits[r], own, rtol=1e-5, atol=1e-6)
        loss, count = cross_entropy_and_correct(own, split.train_labels)
        assert losses[r].item() == pytest.approx(loss.item(), rel=1e-6) and correct[r] == count


@pytest.mark.parametrize("act_fn,prime", [("relu", 7), ("gelu", 7), ("relu", 31)])
def test_folded_stack_equals_each_models_own_loss_and_gradients(act_fn, prime):
    """The folded stacked forward (one-layer models) gives each model's own lean loss, correct
    count and gradients to float32 rounding, on train and test, with the tables an evaluation
    built reused by the next training step (p = 7 takes the value rows through W_O first, p = 31
    W_O @ [W_in | W_U] first)."""
    from types import SimpleNamespace

    from grokpipe.training.lean_forward import objective_fn
    from grokpipe.training.stacked import FoldedStack, stacked_objective

    specs = grid(validate_config(tiny_config(primes=[prime], seeds=[0, 1, 2], model={"act_fn": act_fn})))
    models = [training_model(spec, "cpu") for spec in specs]
    split = make_split(prime, 0.6, 598)
    token_sets = (split.train_tokens, split.test_tokens)
    trainable = {n for n, p in models[0].named_parameters() if p.requires_grad}
    params = {
        n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(n in trainable)
        for n, _ in models[0].named_parameters()
    }
    stack = SimpleNamespace(params=params, optimizer=SimpleNamespace(step=0))
    objective = stacked_objective(models[0].cfg, token_sets)
    assert isinstance(objective, FoldedStack)
    with torch.inference_mode():
        test_losses, test_correct = objective.loss(stack, split.test_tokens, split.test_labels)
    losses, correct = objective.loss(stack, split.train_tokens, split.train_labels)  # the kept tables
    losses.sum().backward()
    for r, model in enumerate(models):
        own = objective_fn(model, "lean", token_sets)
        loss, count = own(split.train_tokens, split.train_labels)
        loss.backward()
        assert losses[r].item() == pytest.approx(loss.item(), rel=1e-6) and correct[r] == count
        with torch.inference_mode():
            test_loss, test_count = own(split.test_tokens, split.test_labels)
        assert test_losses[r].item() == pytest.approx(test_loss.item(), rel=1e-6) and test_correct[r] == test_count
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(params[name].grad[r], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prime", [7, 31])
def test_a_member_trains_bit_for_bit_alike_whatever_the_stack_size(prime):
    """A member of a stack of 3 and of a stack of 2 gets the same losses and weights bit for bit:
    a job killed between its members' writes resumes them in cohorts of other sizes than the
    uninterrupted job, and must still end bit-identical to it."""
    from types import SimpleNamespace

    from grokpipe.training.stacked import stacked_objective

    specs = grid(validate_config(tiny_config(primes=[prime], seeds=[0, 1, 2])))
    split = make_split(prime, 0.6, 598)

    def train_stack(members):
        models = [training_model(spec, "cpu") for spec in members]
        trainable = {n for n, p in models[0].named_parameters() if p.requires_grad}
        params = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(n in trainable)
            for n, _ in models[0].named_parameters()
        }
        stack = SimpleNamespace(params=params, optimizer=StackedAdamW(params, members, 0))
        objective = stacked_objective(models[0].cfg, (split.train_tokens, split.test_tokens))
        losses = []
        for _ in range(15):
            train_losses, _ = objective.loss(stack, split.train_tokens, split.train_labels)
            train_losses.sum().backward()
            stack.optimizer.update()
            with torch.inference_mode():
                test_losses, _ = objective.loss(stack, split.test_tokens, split.test_labels)
            losses.append((train_losses[0].item(), test_losses[0].item()))
        return losses, {n: p[0].detach().clone() for n, p in params.items()}

    three, weights_three = train_stack(specs)
    two, weights_two = train_stack(specs[:2])
    assert three == two
    assert all(torch.equal(weights_three[n], weights_two[n]) for n in weights_three)


def test_stacked_adamw_is_torch_adamw_with_per_run_settings():
    specs = specs_of(seeds=(0, 1, 2))
    specs = [
        with_training(specs[0], lr=1e-3),
        with_training(specs[1], lr=3e-3, weight_decay=0.1),
        with_training(specs[2], betas=(0.8, 0.9)),
    ]
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    stacked = {"w": start.clone().requires_grad_(True)}
    optimizer = StackedAdamW(stacked, specs, step=0)
    lone = [start[r].clone().requires_grad_(True) for r in range(3)]
    torch_optimizers = [
        torch.optim.AdamW([w], lr=s.training.lr, weight_decay=s.training.weight_decay, betas=s.training.betas)
        for w, s in zip(lone, specs)
    ]
    for _ in range(5):
        grads = torch.randn(3, 4, 5)
        stacked["w"].grad = grads.clone()
        optimizer.update()
        for r, (w, opt) in enumerate(zip(lone, torch_optimizers)):
            w.grad = grads[r].clone()
            opt.step()
    for r in range(3):
        torch.testing.assert_close(stacked["w"][r].detach(), lone[r].detach(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Three members (two seeds, and seed 0 at another learning rate) trained together for 500
    epochs, and each of them trained alone."""
    root = tmp_path_factory.mktemp("stacked")
    specs = specs_of(seeds=(0, 1), epochs=500, every=100)
    specs.append(dataclasses.replace(with_training(specs[0], lr=3e-3), model_name="tinylr"))
    group_dirs = [root / "group" / s.model_name / s.run_name for s in specs]
    lone_dirs = [root / "lone" / s.model_name / s.run_name for s in specs]
    train_group(specs, group_dirs, progress_bar=False)
    for spec, run_dir in zip(specs, lone_dirs):
        train(spec, run_dir, progress_bar=False)
    return {"root": root, "specs": specs, "group": group_dirs, "lone": lone_dirs}


def relative_deviation(a, b):
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def test_members_are_ordinary_runs_equal_to_the_lone_runs(job):
    assert len({group_key(s) for s in job["specs"]}) == 1
    for spec, grouped, lone in zip(job["specs"], job["group"], job["lone"]):
        report = verify_run(grouped)
        assert report.ok, report.problems
        meta, alone = grokpipe.load_metadata(grouped), grokpipe.load_metadata(lone)
        assert meta["checkpoint_epochs"] == alone["checkpoint_epochs"] == [99, 199, 299, 399, 499]
        for key in ("train_losses", "test_losses"):
            assert relative_deviation(meta[key][:50], alone[key][:50]) < FIRST_50_EPOCHS_BOUND, key
            assert relative_deviation(meta[key], alone[key]) < LOSS_BOUND_500_EPOCHS, key
        (segment,) = meta["environment"]["segments"]
        assert segment["implementation"] == "stacked" and segment["job_members"] == [d.name for d in job["group"]]
        header = read_metadata(grouped / "checkpoints" / "checkpoint_epoch_00499.safetensors")
        assert header["job_runs"] == "3" and json.loads(header["job_members"]) == segment["job_members"]
        config = grokpipe.load_config(grouped)
        assert config["training"]["lr"] == spec.training.lr and config["config_hash"] == spec.config_hash


def test_initial_weights_are_the_lone_runs_bit_for_bit(job, tmp_path):
    """The stack starts from each member's own seeded model, bit for bit; one epoch later the
    checkpoint is that start moved by one AdamW step."""
    from grokpipe.training.stacked import Stack
    from grokpipe.training.train import RunWriter

    writers = []
    for spec in job["specs"]:
        model = training_model(spec, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.training.lr)
        writer = RunWriter(spec, tmp_path / "w" / spec.model_name / spec.run_name, make_split(7, 0.6, 598), 0.01, None)
        writer.prepare(model, optimizer, "cpu", 1, "stacked")
        writers.append(writer)
    stack = Stack(writers)
    for r, spec in enumerate(job["specs"]):
        for name, param in training_model(spec, "cpu").named_parameters():
            assert torch.equal(stack.params[name][r], param.detach()), name
    specs = [
        dataclasses.replace(s, training=dataclasses.replace(s.training, num_epochs=1, checkpoint_every=1))
        for s in job["specs"][:2]
    ]
    dirs = [tmp_path / "g" / s.run_name for s in specs]
    train_group(specs, dirs, progress_bar=False)
    for spec, run_dir in zip(specs, dirs):
        alone = {name: p.detach() for name, p in training_model(spec, "cpu").named_parameters()}
        first = grokpipe.load_state_dict(run_dir, 0)
        # one AdamW step moves each weight by at most lr (plus decay): the start was the same model
        for name, tensor in alone.items():
            assert (first[name] - tensor).abs().max() <= 2 * spec.training.lr, name


def test_a_rerun_of_the_same_job_is_bit_identical(job, tmp_path):
    specs = job["specs"]
    dirs = [tmp_path / s.model_name / s.run_name for s in specs]
    train_group([with_training(s, num_epochs=200) for s in specs], dirs, progress_bar=False)
    for run_dir, original in zip(dirs, job["group"]):
        for epoch in (99, 199):
            a, b = grokpipe.load_state_dict(run_dir, epoch), grokpipe.load_state_dict(original, epoch)
            assert all(torch.equal(a[k], b[k]) for k in a), (run_dir, epoch)


def test_a_member_that_stops_early_leaves_and_the_others_go_on(job, tmp_path):
    specs = list(job["specs"])
    specs[1] = with_training(specs[1], early_stopping={"test_loss_below": 100.0, "after_epochs": 0})
    dirs = [tmp_path / s.model_name / s.run_name for s in specs]
    train_group(specs, dirs, progress_bar=False)
    stopped = grokpipe.load_metadata(dirs[1])
    assert stopped["stopped_at_epoch"] == 99 and stopped["final_epoch"] == 99 and verify_run(dirs[1]).ok
    for index in (0, 2):
        meta, full = grokpipe.load_metadata(dirs[index]), grokpipe.load_metadata(job["group"][index])
        assert meta["final_epoch"] == 499 and verify_run(dirs[index]).ok
        assert relative_deviation(meta["train_losses"], full["train_losses"]) < LOSS_BOUND_500_EPOCHS


def file_hashes(run_dir):
    """Checkpoints by content hash (a finished run's final model is rewritten on a rerun, as for a
    lone run: its header's key order may differ, its tensors do not)."""
    files = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    final = grokpipe.load_state_dict(run_dir)
    return {
        **{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
        "final": [final[k].tolist() for k in sorted(final) if final[k].is_floating_point()],
    }


def test_changing_one_member_retrains_only_that_member(job, tmp_path):
    import shutil

    dirs = [tmp_path / d.parent.name / d.name for d in job["group"]]
    for source, target in zip(job["group"], dirs):
        shutil.copytree(source, target)
    before = [file_hashes(d) for d in dirs]
    specs = list(job["specs"])
    specs[2] = with_training(specs[2], lr=5e-3)
    train_group(specs, dirs, progress_bar=False)
    assert file_hashes(dirs[0]) == before[0] and file_hashes(dirs[1]) == before[1]  # resumed at their end
    assert grokpipe.load_config(dirs[2])["training"]["lr"] == 5e-3 and file_hashes(dirs[2]) != before[2]
    assert verify_run(dirs[2]).ok


def test_a_job_killed_with_sigkill_resumes_bit_identical(tmp_path):
    config = tiny_config(primes=[7], seeds=[0])
    config["training"].update(num_epochs=3000, checkpoint_every=100)
    configfile = write_config(tmp_path / "config.yaml", {**config, "results_dir": str(tmp_path / "killed")})
    command = [
        sys.executable,
        "-m",
        "grokpipe",
        "train",
        "--config",
        str(configfile),
        "--prime",
        "7",
        "--seed",
        "0",
        "1",
        "2",
        "--no-progress",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = tmp_path / "killed" / "tiny" / "tiny_p7_seed2" / "checkpoints" / "checkpoint_epoch_00499.safetensors"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (tmp_path / "killed" / "tiny" / "tiny_p7_seed0" / "metadata.json").exists()
    assert subprocess.run(command, capture_output=True).returncode == 0
    reference = write_config(tmp_path / "reference.yaml", {**config, "results_dir": str(tmp_path / "uninterrupted")})
    assert subprocess.run([*command[:5], str(reference), *command[6:]], capture_output=True).returncode == 0
    for seed in (0, 1, 2):
        killed = tmp_path / "killed" / "tiny" / f"tiny_p7_seed{seed}"
        whole = tmp_path / "uninterrupted" / "tiny" / f"tiny_p7_seed{seed}"
        assert grokpipe.load_metadata(killed)["train_losses"] == grokpipe.load_metadata(whole)["train_losses"]
        for epoch in grokpipe.list_epochs(whole):
            a, b = grokpipe.load_state_dict(killed, epoch), grokpipe.load_state_dict(whole, epoch)
            assert all(torch.equal(a[k], b[k]) for k in a)
        log = json.loads((killed / "metadata.json").read_text())["environment"]["segments"]
        assert len(log) == 2 and log[1]["first_epoch"] > 0  # resumed, not retrained


def test_runs_of_different_shapes_are_refused(job):
    specs = specs_of(seeds=(0,)) + [with_training(specs_of(seeds=(1,))[0], frac_train=0.5)]
    with pytest.raises(grokpipe.GrokpipeError, match="must share prime, operation, model, data split and schedule"):
        train_group(specs, [job["root"] / "x" / s.run_name for s in specs])


def test_workflow_trains_runs_of_one_shape_as_one_job(tmp_path):
    """runs_per_job through Snakemake: two cells (lr) x two seeds share one job; every member is an
    ordinary, verified run; changing one cell's lr trains a new job in which the unchanged
    members resume at their end (their checkpoints untouched)."""
    from conftest import jobs_planned, snakemake

    config = tiny_config(primes=[7], seeds=[0, 1])
    config.update(runs_per_job=4, sweep={"training.lr": [0.001, 0.003]})
    configfile = write_config(tmp_path / "config.yaml", config)
    planned = jobs_planned(snakemake(tmp_path, "-n", "--cores", "2", configfile=configfile))
    assert planned.get("train_job") == 1 and "train" not in planned and planned["analyze"] == 4
    snakemake(tmp_path, "--cores", "2", configfile=configfile)
    (record,) = (tmp_path / "results" / "_jobs").glob("job-*.json")
    members = [m["run_dir"] for m in json.loads(record.read_text())["members"]]
    assert [m.split("/")[-1] for m in members] == [
        "tiny-lr0.001_p7_seed0",
        "tiny-lr0.001_p7_seed1",
        "tiny-lr0.003_p7_seed0",
        "tiny-lr0.003_p7_seed1",
    ]
    for member in members:
        run = tmp_path / member
        assert json.loads((run / "verify.json").read_text())["ok"]
        assert grokpipe.load_metadata(run)["environment"]["segments"][0]["implementation"] == "stacked"
    assert (tmp_path / "results" / "_sweeps" / "tiny" / "sweep.csv").exists()
    again = snakemake(tmp_path, "-n", "--cores", "2", configfile=configfile)
    assert "Nothing to be done" in again.stdout + again.stderr
    kept = tmp_path / "results" / "tiny-lr0.001" / "tiny-lr0.001_p7_seed0"
    before = file_hashes(kept)
    config["sweep"] = {"training.lr": [0.001, 0.005]}
    write_config(configfile, config)
    snakemake(tmp_path, "--cores", "2", configfile=configfile)
    assert file_hashes(kept) == before  # resumed at its end, not retrained
    changed = tmp_path / "results" / "tiny-lr0.005" / "tiny-lr0.005_p7_seed1"
    assert json.loads((changed / "verify.json").read_text())["ok"]


def test_jobs_group_runs_of_one_shape_evenly_and_deterministically():
    from grokpipe.jobs import train_jobs

    specs = specs_of(seeds=range(10))
    jobs = train_jobs(specs, 8)
    assert [len(members) for members in jobs.values()] == [5, 5]  # even jobs, not 8 + 2
    assert train_jobs(list(reversed(specs)), 8) == jobs  # names and members do not depend on order
    other_lr = [with_training(s, lr=3e-3) for s in specs[:2]]
    assert len(train_jobs(specs[:2] + [dataclasses.replace(s, model_name="tinylr") for s in other_lr], 4)) == 1
    other_split = [dataclasses.replace(with_training(s, frac_train=0.5), model_name="tinyfrac") for s in specs[:2]]
    assert [len(m) for m in train_jobs(specs[:2] + other_split, 4).values()] == [2, 2]  # shapes apart
    assert train_jobs(specs, 1) == {}
    assert [len(m) for m in train_jobs(specs, "auto").values()] == [3, 4, 3]  # p <= 31: up to 4 per job
    larger = grid(validate_config(tiny_config(primes=[37], seeds=[0, 1, 2])))
    assert train_jobs(larger, "auto") == {}  # above p = 31 each trains alone
