"""LoRA fine-tuning, adapter directories in PEFT's format, loading and merging (grokpipe finetune / merge).

The adapters are checked against the real ``peft`` package: it parses adapter_config.json, loads
adapter_model.safetensors onto the base HookedTransformer under the names and shapes PEFT itself
gives, and its merge (and its forward-time application on an equivalent model) gives grokpipe's
logits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import grokpipe_cli, tiny_config

import grokpipe
from grokpipe.config import grid, validate_config
from grokpipe.errors import GrokpipeError
from grokpipe.export import parse_export_name, verify_export
from grokpipe.io.safetensors_io import read_tensors
from grokpipe.lifecycle.adapter_dir import ADAPTER_CONFIG, ADAPTER_MODEL
from grokpipe.lifecycle.finetune import FinetuneSettings, finetune
from grokpipe.lifecycle.lora_format import DEFAULT_MATRICES, MATRICES, delta_weight, target_parameters
from grokpipe.lifecycle.merge import merge
from grokpipe.training.train import train

P = 19
# groks at epoch 207 in ~4 s on a 2-core CPU (90 % of the pairs for training)
BASE_CONFIG = tiny_config(
    primes=[P],
    seeds=[0],
    training={"frac_train": 0.9, "num_epochs": 300, "checkpoint_every": 50, "lr": 0.003},
    model={"n_heads": 4, "d_model": 64, "d_head": 16, "d_mlp": 256},
)
SETTINGS = FinetuneSettings("sub", rank=4, num_epochs=60, checkpoint_every=20)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """A grokked base run, its LoRA fine-tune to subtraction (from the run: exported first) and the merge."""
    root = tmp_path_factory.mktemp("lora")
    run = root / "results" / "tiny" / f"tiny_p{P}_seed0"
    metadata = train(grid(validate_config(BASE_CONFIG))[0], run, progress_bar=False)
    assert metadata["grokking_epoch"] is not None
    lora = finetune(run, SETTINGS, out=root / "models", progress_bar=False)
    merged = merge(lora)
    base = root / "models" / json.loads((lora / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return {"root": root, "run": run, "lora": lora, "merged": merged, "base": base}


def all_tokens(p: int = P) -> torch.Tensor:
    return torch.tensor([[a, b, p] for a in range(p) for b in range(p)])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(all_tokens())[:, -1]


def test_directory_layout_and_names(lifecycle):
    lora, merged = lifecycle["lora"], lifecycle["merged"]
    name = parse_export_name(lora.name)
    assert (name.training_type, name.operation, name.target_operation, name.prime) == ("lora", "add", "sub", P)
    assert lora.name.startswith(f"tl1l-{name.size}-modadd{P}-to-modsub{P}-lora-s0-e")
    assert parse_export_name(merged.name).training_type == "merged"
    assert merged.name == lora.name.replace("-lora-", "-merged-")
    for path in (ADAPTER_CONFIG, ADAPTER_MODEL, "config.json", "tokenizer.json", "export_meta.json", "README.md"):
        assert (lora / path).is_file(), path
    assert sorted(p.name for p in (lora / "checkpoints").iterdir()) == [
        f"checkpoint_epoch_{e:05d}.safetensors" for e in (19, 39, 59)
    ]
    assert not (lora / "resume").exists()
    meta = json.loads((lora / "export_meta.json").read_text())
    base_meta = json.loads((lifecycle["base"] / "export_meta.json").read_text())
    assert meta["base"]["sha256"] == base_meta["files"]["model.safetensors"]
    assert meta["target"]["operation"] == "sub"
    assert (meta["lora"]["rank"], meta["lora"]["alpha"]) == (4, 8.0)
    assert len(meta["train_losses"]) == 60 and len(meta["test_losses"]) == 60
    last_checkpoint = "checkpoints/checkpoint_epoch_00059.safetensors"
    assert set(meta["files"]) >= {ADAPTER_MODEL, ADAPTER_CONFIG, "config.json", last_checkpoint}
    assert verify_export(lora) == [] and verify_export(merged) == []
    assert (lora / "config.json").read_bytes() == (lifecycle["base"] / "config.json").read_bytes()
    rows = {row["name"]: row for row in json.loads(grokpipe_cli("list", str(lora.parent), "--json").stdout)}
    assert {lora.name, merged.name, lifecycle["base"].name} <= set(rows)


def test_training_starts_from_the_base_and_learns(lifecycle):
    meta = json.loads((lifecycle["lora"] / "export_meta.json").read_text())
    base = grokpipe.load_model(lifecycle["base"])
    data_labels = (all_tokens()[:, 0] - all_tokens()[:, 1]) % P
    train_ids = torch.tensor(meta["train_indices"])
    with torch.no_grad():
        log_probs = base(all_tokens()[train_ids])[:, -1].to(torch.float64).log_softmax(-1)
    base_loss = -log_probs.gather(-1, data_labels[train_ids][:, None]).mean().item()
    # B = 0 at the start: epoch 0's loss is the base's on the target task
    assert meta["train_losses"][0] == pytest.approx(base_loss, rel=1e-5)
    assert meta["train_losses"][-1] < 0.5 * meta["train_losses"][0]
    assert sorted(meta["train_indices"] + meta["test_indices"]) == list(range(P * P))


def test_peft_parses_the_config_and_its_merge_gives_our_logits(lifecycle):
    from peft import LoraConfig, PeftConfig, PeftModel

    adapters = lifecycle["lora"] / "adapters"
    config = PeftConfig.from_pretrained(str(adapters))
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha) == (4, 8.0)
    assert list(config.target_parameters) == target_parameters({"n_layers": 1}, DEFAULT_MATRICES)
    ours = grokpipe.load_model(lifecycle["lora"])
    base = grokpipe.load_model(lifecycle["base"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(base, str(adapters))
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == 2 * len(config.target_parameters)
    # what docs/lora.md says PEFT cannot do: apply it in TransformerLens' own forward
    with pytest.raises(TypeError, match="missing 1 required positional argument"), torch.no_grad():
        peft_model(all_tokens()[:2])
    theirs = peft_model.merge_and_unload()  # PEFT's own delta rule on the real TransformerLens modules
    torch.testing.assert_close(logits_of(theirs), logits_of(ours), rtol=1e-5, atol=1e-5)
    merged = grokpipe.load_model(lifecycle["merged"])
    torch.testing.assert_close(logits_of(merged), logits_of(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matrices", [DEFAULT_MATRICES, ("W_Q", "W_V"), ("W_O", "W_in"), MATRICES])
def test_tensor_names_and_shapes_are_peft_s(matrices):
    """PEFT's own state dict for these targets on a 2-layer HookedTransformer has our names and shapes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from grokpipe.lifecycle.finetune import LoraFactors
    from grokpipe.lifecycle.lora_format import peft_tensor_names
    from grokpipe.training.model import training_model

    spec = grid(validate_config(tiny_config(primes=[7], seeds=[0], model={"n_layers": 2})))[0]
    model = training_model(spec, "cpu")
    targets = target_parameters({"n_layers": 2}, matrices)
    shapes = {t: tuple(dict(model.named_parameters())[t].shape) for t in targets}
    ours = LoraFactors(shapes, 2, 1.5, seed=0).peft_state_dict(peft_tensor_names(targets, model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=targets, init_lora_weights=False)
        theirs = get_peft_model(model, config)
    expected = get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    # and their delta rule is ours, matrix by matrix
    from peft.tuners.lora.layer import ParamWrapper

    for name, module in theirs.named_modules():
        if isinstance(module, ParamWrapper):
            target = name.removeprefix("base_model.model.").replace(".base_layer", "") + "." + module.parameter_name
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            mine = delta_weight(a.detach(), b.detach(), shapes[target], module.scaling["default"])
            torch.testing.assert_close(module.get_delta_weight("default").detach(), mine)


class _Attention(torch.nn.Module):
    """HookedTransformer's attention (no LN, causal) with positional forward(x), which PEFT's
    ParamWrapper needs: TransformerLens calls its attention with keyword arguments only."""

    def __init__(self, weights: dict, prefix: str):
        super().__init__()
        for name in ("W_Q", "W_O", "W_K", "W_V"):  # TransformerLens 3.9's registration order
            setattr(self, name, torch.nn.Parameter(weights[prefix + name].clone()))
        for name in ("b_Q", "b_O", "b_K", "b_V"):
            self.register_buffer(name, weights[prefix + name].clone())

    def forward(self, x):
        q = torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q
        k = torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K
        v = torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / q.shape[-1] ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        return torch.einsum("bqhe,hed->bqd", z, self.W_O) + self.b_O


class _MLP(torch.nn.Module):
    def __init__(self, weights: dict, prefix: str):
        super().__init__()
        self.W_in = torch.nn.Parameter(weights[prefix + "W_in"].clone())
        self.W_out = torch.nn.Parameter(weights[prefix + "W_out"].clone())
        self.register_buffer("b_in", weights[prefix + "b_in"].clone())
        self.register_buffer("b_out", weights[prefix + "b_out"].clone())

    def forward(self, x):
        return torch.relu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out


class _Block(torch.nn.Module):
    def __init__(self, weights: dict):
        super().__init__()
        self.attn, self.mlp = _Attention(weights, "blocks.0.attn."), _MLP(weights, "blocks.0.mlp.")

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class _Equivalent(torch.nn.Module):
    """The one-layer model as plain modules, named as HookedTransformer's parameters."""

    def __init__(self, weights: dict):
        super().__init__()
        self.W_E = torch.nn.Parameter(weights["embed.W_E"].clone())
        self.W_pos = torch.nn.Parameter(weights["pos_embed.W_pos"].clone())
        self.blocks = torch.nn.ModuleList([_Block(weights)])
        self.W_U = torch.nn.Parameter(weights["unembed.W_U"].clone())
        self.register_buffer("b_U", weights["unembed.b_U"].clone())

    def forward(self, tokens):
        x = self.W_E[tokens] + self.W_pos[: tokens.shape[1]]
        return self.blocks[0](x) @ self.W_U + self.b_U


def test_peft_applied_at_forward_time_on_an_equivalent_model_gives_our_logits(lifecycle):
    """PEFT's ParamWrapper applies the adapter during the forward pass (no merge) on modules it can
    wrap; TransformerLens' attention is not one of them (keyword-only call), an equivalent one is."""
    from peft import PeftModel

    base_state = grokpipe.load_state_dict(lifecycle["base"] / "model.safetensors")
    equivalent = _Equivalent(base_state)
    torch.testing.assert_close(logits_of(equivalent), logits_of(grokpipe.load_model(lifecycle["base"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(equivalent, str(lifecycle["lora"] / "adapters"))
    assert not peft_model.peft_config["default"].target_modules
    torch.testing.assert_close(
        logits_of(peft_model), logits_of(grokpipe.load_model(lifecycle["lora"])), rtol=1e-5, atol=1e-5
    )


def test_load_adapter_and_merged_weights(lifecycle):
    adapter = grokpipe.load_adapter(lifecycle["lora"])
    merged = grokpipe.load_state_dict(lifecycle["merged"] / "model.safetensors")
    base = grokpipe.load_state_dict(lifecycle["base"] / "model.safetensors")
    assert adapter.scaling == 2.0
    for name, delta in adapter.deltas().items():
        assert delta.shape == base[name].shape
        torch.testing.assert_close(merged[name], base[name] + delta)
    untouched = set(base) - set(adapter.targets)
    assert untouched and all(torch.equal(merged[n], base[n]) for n in untouched)
    # TransformerLens hooks work on the adapted model
    _, cache = grokpipe.load_model(lifecycle["lora"]).run_with_cache(all_tokens()[:3])
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, 4, 3, 3)
    inspected = json.loads(grokpipe_cli("inspect", str(lifecycle["merged"]), "--json").stdout)
    assert inspected["state"] == "ok" and inspected["name_parts"]["training_type"] == "merged"


def test_rerun_is_a_no_op_and_merge_again_too(lifecycle):
    lora, merged = lifecycle["lora"], lifecycle["merged"]
    before = {p: p.stat().st_mtime_ns for p in [*lora.rglob("*"), *merged.rglob("*")] if p.is_file()}
    assert finetune(lifecycle["run"], SETTINGS, out=lifecycle["root"] / "models", progress_bar=False) == lora
    assert merge(lora) == merged
    assert {p: p.stat().st_mtime_ns for p in before} == before


def _finetune_command(base: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "grokpipe", "finetune", str(base), "--operation", "mul", "--rank", "2",
        "--num-epochs", "400", "--checkpoint-every", "40", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def test_killed_finetune_resumes_bit_identical(lifecycle, tmp_path):
    base = lifecycle["base"]
    reference = subprocess.run(_finetune_command(base, tmp_path / "a"), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen(_finetune_command(base, tmp_path / "b"), stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "b"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*/checkpoints/checkpoint_epoch_00119.safetensors")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (interrupted,) = (d for d in (tmp_path / "b").glob("*-lora-*") if d.is_dir())
    assert not (interrupted / "export_meta.json").exists()
    with pytest.raises(GrokpipeError, match="unfinished fine-tune"):
        grokpipe.load_model(interrupted)
    resumed = subprocess.run(_finetune_command(base, tmp_path / "b"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    (done,) = (d for d in (tmp_path / "a").glob("*-lora-*") if d.is_dir())
    assert done.name == interrupted.name
    for path in [ADAPTER_MODEL, *(f"checkpoints/checkpoint_epoch_{e:05d}.safetensors" for e in range(39, 400, 40))]:
        expected, got = read_tensors(done / path), read_tensors(interrupted / path)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), path
    meta_a, meta_b = (json.loads((d / "export_meta.json").read_text()) for d in (done, interrupted))
    assert meta_a["train_losses"] == meta_b["train_losses"] and meta_a["test_losses"] == meta_b["test_losses"]


def _refused(args, *, cwd: Path, match: str):
    before = sorted(p.relative_to(cwd) for p in cwd.rglob("*"))
    proc = grokpipe_cli(*args, cwd=cwd)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grokpipe: error:"), proc.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.relative_to(cwd) for p in cwd.rglob("*")) == before, "something was written"
    return lines[0]


def test_bad_requests_are_refused_in_one_line_and_write_nothing(lifecycle, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(lifecycle["run"], work / "run")
    run = str(work / "run")
    _refused(["finetune", run, "--epoch", "49", "--operation", "sub"], cwd=work, match="epoch 49 is not grokked")
    _refused(["finetune", run, "--epoch", "77", "--operation", "sub"], cwd=work, match="no checkpoint for epoch 77")
    _refused(["finetune", run, "--operation", "sub", "--rank", "17"], cwd=work, match="above the dimensions")
    _refused(["finetune", run, "--operation", "sub", "--prime", "23"], cwd=work, match="cannot express a task on")
    _refused(["finetune", run, "--operation", "pow"], cwd=work, match="--operation 'pow' is unknown")
    _refused(["finetune", run, "--operation", "sub", "--matrices", "W_X"], cwd=work, match="unknown matrices")
    base = str(lifecycle["base"])
    _refused(["finetune", base, "--operation", "sub", "--rank", "65"], cwd=work, match="above the dimensions")
    _refused(["finetune", base, "--operation", "sub", "--prime", "5"], cwd=work, match="p = 19")


def test_edited_adapter_files_and_another_base_are_refused(lifecycle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(lifecycle["lora"], models / lifecycle["lora"].name)
    shutil.copytree(lifecycle["base"], models / lifecycle["base"].name)
    lora = models / lifecycle["lora"].name
    assert grokpipe.load_adapter(lora).path == lora  # intact copies load

    tensors = read_tensors(lora / ADAPTER_MODEL)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(lora / ADAPTER_MODEL))
    with pytest.raises(GrokpipeError, match="adapter_model.safetensors: sha256 differs"):
        grokpipe.load_model(lora)
    _refused(["merge", str(lora)], cwd=tmp_path, match="adapter_model.safetensors: sha256 differs")

    shutil.copy(lifecycle["lora"] / ADAPTER_MODEL, lora / ADAPTER_MODEL)  # restored
    config = json.loads((lora / ADAPTER_CONFIG).read_text())
    (lora / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))
    _refused(["merge", str(lora)], cwd=tmp_path, match="adapter_config.json: sha256 differs")
    shutil.copy(lifecycle["lora"] / ADAPTER_CONFIG, lora / ADAPTER_CONFIG)

    # another export in the base's place, consistent with its own export_meta.json
    other = finetune(lifecycle["base"], SETTINGS, out=tmp_path / "other", progress_bar=False)
    other_merged = merge(other, out=tmp_path / "other")
    base_copy = models / lifecycle["base"].name
    shutil.rmtree(base_copy)
    shutil.copytree(other_merged, base_copy)
    with pytest.raises(GrokpipeError, match="differs from the .* the adapter was trained on"):
        grokpipe.load_model(lora)


def test_workflow_finetunes_merges_and_compares_with_training_from_scratch(tmp_path):
    from conftest import jobs_planned, snakemake, write_config

    config = {
        **BASE_CONFIG,
        "finetune": {"runs": [f"tiny_p{P}_seed0"], "operations": ["sub"], "ranks": [2], "num_epochs": 40},
    }
    configfile = write_config(tmp_path / "config.yaml", config)
    planned = jobs_planned(snakemake(tmp_path, "-n", configfile=configfile))
    assert (planned["train"], planned["finetune"], planned["merge"], planned["transfer_report"]) == (2, 1, 1, 1)
    snakemake(tmp_path, "--cores", "2", configfile=configfile)
    record = json.loads((tmp_path / f"results/tiny/tiny_p{P}_seed0/finetunes/sub-r2-f0.json").read_text())
    lora = tmp_path / record["adapter"]
    assert parse_export_name(lora.name).target_operation == "sub" and (lora / ADAPTER_MODEL).is_file()
    merged = json.loads((tmp_path / f"results/tiny/tiny_p{P}_seed0/finetunes/sub-r2-f0.merged.json").read_text())
    assert (tmp_path / merged["merged"] / "model.safetensors").is_file()
    scratch = tmp_path / f"results/tiny-scratch-sub/tiny-scratch-sub_p{P}_seed0"
    scratch_config = json.loads((scratch / "config.json").read_text())
    assert scratch_config["task"]["operation"] == "sub"
    assert scratch_config["training"]["frac_train"] == BASE_CONFIG["training"]["frac_train"]
    import csv

    (row,) = csv.DictReader((tmp_path / "results/_finetune/tiny/transfer.csv").open())
    meta = json.loads((lora / "export_meta.json").read_text())
    assert row["lora_epochs"] == "40" and row["adapter"] == lora.name
    assert row["lora_final_test_loss"] == str(meta["losses"]["test"])
    scratch_meta = json.loads((scratch / "metadata.json").read_text())
    assert row["scratch_epoch_below_threshold"] == str(scratch_meta["grokking_epoch"] or "")
    assert "| sub | 2 | 1 |" in (tmp_path / "results/_finetune/tiny/transfer.md").read_text()
    # nothing left to do; a second rank plans only its own fine-tune and merge (and the table)
    assert "Nothing to be done" in snakemake(tmp_path, "-n", configfile=configfile).stdout
    config["finetune"]["ranks"] = [2, 3]
    planned = jobs_planned(snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config)))
    assert planned == {"finetune": 1, "merge": 1, "transfer_report": 1, "all": 1, "total": 4}


def test_workflow_refuses_a_finetune_run_that_is_not_in_the_grid(tmp_path):
    from conftest import snakemake, write_config

    config = {**BASE_CONFIG, "finetune": {"runs": ["tiny_p23_seed0"]}}
    proc = snakemake(tmp_path, "-n", configfile=write_config(tmp_path / "config.yaml", config), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'finetune.runs[0]': 'tiny_p23_seed0' is not a run of the grid" in output
