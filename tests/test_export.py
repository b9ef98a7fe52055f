"""grokpipe export: named, self-describing model directories of one epoch of a run."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import grokpipe_cli, run_dir_of, snakemake, tiny_config, write_config
from tokenizers import Tokenizer

import grokpipe
from grokpipe.cli import main
from grokpipe.config import grid, validate_config
from grokpipe.errors import GrokpipeError
from grokpipe.export import ExportName, export, export_name, format_size, parse_export_name
from grokpipe.io.safetensors_io import read_metadata
from grokpipe.training.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: one that groks by its threshold, one that never does."""
    root = tmp_path_factory.mktemp("runs")
    config = validate_config(tiny_config(primes=[7], seeds=[3], training={"num_epochs": 40, "checkpoint_every": 10}))
    spec = grid(config)[0]
    grokked = root / "tiny_p7_seed3"
    train(spec, grokked, grokking_threshold=2.5, progress_bar=False)  # a threshold its test loss meets
    never = root / "never" / "tiny_p7_seed3"
    train(spec, never, grokking_threshold=1e-9, progress_bar=False)
    return {"grokked": grokked, "never": never}


@pytest.mark.parametrize(
    ("count", "text"), [(999, "999"), (1000, "1K"), (227_313, "227K"), (1_834_000, "1.83M"), (124_000_000, "124M")]
)
def test_size_rule(count, text):
    assert format_size(count) == text


def test_name_rule_and_parse_back():
    hooked = {"n_layers": 1, "attn_only": False}
    name = export_name(hooked, 113, 999, 24999, 227_313, None, config_hash="1a2b3c4d5e6f")
    assert str(name) == "tl1l-227K-modadd113-grok-s999-e24999-c1a2b3c4d"
    assert parse_export_name(str(name)) == name
    assert str(export_name(hooked, 113, 999, 24999, 227_313, None)) == "tl1l-227K-modadd113-grok-s999-e24999"
    named = parse_export_name("tl2lattn-1.83M-modadd53-grok-s0-e100-v1")
    assert named == ExportName("tl2lattn", "1.83M", "modadd53", "grok", "s0-e100-v1")
    assert (named.prime, named.seed, named.epoch) == (53, 0, 100)
    for bad in ("gpt-38M-tinystories-pretrain", "tl1l-227K-modadd113-grok", "tl1l-227K-modadd113-grok-s1-e2-a-b"):
        with pytest.raises(GrokpipeError, match="is not an export name"):
            parse_export_name(bad)
    with pytest.raises(GrokpipeError, match="--version"):
        export_name(hooked, 113, 999, 1, 10, "v-1")


def test_export_files_hashes_and_reload(runs, tmp_path):
    run = runs["grokked"]
    epoch = grokpipe.list_epochs(run)[1]
    proc = grokpipe_cli("export", str(run), "--epoch", str(epoch), "--out", str(tmp_path / "models"), "--version", "v1")
    assert proc.returncode == 0, proc.stderr
    config_hash = grokpipe.load_config(run)["config_hash"]
    target = tmp_path / "models" / f"tl1l-{format_size(_params(run))}-modadd7-grok-s3-e{epoch}-c{config_hash[:8]}-v1"
    assert proc.stdout.strip() == str(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["model.safetensors", "config.json", "tokenizer.json", "export_meta.json", "loss_curve.png", "README.md"]
    )
    meta = json.loads((target / "export_meta.json").read_text())
    for name, digest in meta["files"].items():
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == digest, name
    assert set(meta["files"]) == {"model.safetensors", "config.json", "tokenizer.json", "loss_curve.png", "README.md"}
    source = grokpipe.checkpoint_path(run, epoch)
    assert meta["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    metadata = grokpipe.load_metadata(run)
    assert meta["epoch"] == epoch and meta["losses"]["train"] == metadata["train_losses"][epoch]
    assert meta["grokking_epoch"] == metadata["grokking_epoch"] and meta["versions"]["torch"] == torch.__version__
    assert read_metadata(target / "model.safetensors")["source"] == "exported"
    exported, original = grokpipe.load_state_dict(target), grokpipe.load_state_dict(run, epoch)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], v) for k, v in original.items())
    tokens = torch.tensor([[a, b, 7] for a in range(7) for b in range(7)])
    with torch.no_grad():
        assert torch.equal(grokpipe.load_model(target)(tokens), grokpipe.load_model(run, epoch)(tokens))
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    assert tokenizer.encode("3 5 =").ids == [3, 5, 7]
    config = json.loads((target / "config.json").read_text())
    assert config["prime"] == 7 and config["input_format"] == ["a", "b", "="]
    card = (target / "README.md").read_text()
    assert f"epoch | {epoch}" in card and "`a + b mod 7`" in card
    assert "```python\nimport grokpipe\n" in card and "::" not in card  # Markdown, not reStructuredText
    inspected = grokpipe_cli("inspect", str(target))
    assert inspected.returncode == 0 and "grokpipe export" in inspected.stdout and "state: ok" in inspected.stdout
    listed = grokpipe_cli("list", str(tmp_path / "models"))
    assert listed.returncode == 0 and target.name in listed.stdout


def _params(run) -> int:
    state = grokpipe.load_state_dict(run)
    return sum(t.numel() for k, t in state.items() if not k.endswith((".mask", ".IGNORE")))


def test_grokked_final_and_no_overwrite(runs, tmp_path, capsys):
    run = runs["grokked"]
    metadata = grokpipe.load_metadata(run)
    grokked = export(run, tmp_path, "grokked")
    chosen = json.loads((grokked / "export_meta.json").read_text())["epoch"]
    assert chosen == min(e for e in grokpipe.list_epochs(run) if e >= metadata["grokking_epoch"])
    final = export(run, tmp_path, "final")
    assert parse_export_name(final.name).epoch == metadata["final_epoch"]
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    assert main(["export", str(run), "--out", str(tmp_path)]) == 0  # the same file again: nothing to do
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    meta_path = final / "export_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["source"]["sha256"] = "0" * 64  # as if the run had been retrained since
    meta_path.write_text(json.dumps(meta))
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    assert main(["export", str(run), "--out", str(tmp_path)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert main(["export", str(run), "--out", str(tmp_path), "--force"]) == 0


def test_export_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["export", str(runs["never"]), "--grokked", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("grokpipe: error: ") and "never grokked" in err and len(err.splitlines()) == 1
    assert main(["export", str(runs["grokked"]), "--epoch", "5", "--out", str(tmp_path)]) == 1
    assert "no checkpoint for epoch 5; nearest" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    # a damaged export is reported by inspect
    target = export(runs["grokked"], tmp_path / "models")
    (target / "config.json").write_text("{}")
    assert main(["inspect", str(target)]) == 0
    assert "sha256 differs" in capsys.readouterr().out


def test_snakemake_exports_every_run_when_configured(trained_grid, tmp_path):
    workdir = tmp_path / "grid"
    shutil.copytree(trained_grid["workdir"], workdir)
    configfile = write_config(workdir / "export.yaml", {**trained_grid["config"], "export": ["grokked", "final"]})
    proc = snakemake(workdir, "--cores", "2", configfile=configfile)
    assert "rule train" not in proc.stdout + proc.stderr, "exporting does not retrain"
    models = sorted(parse_export_name(p.name) for p in (workdir / "models").iterdir() if p.is_dir())
    assert [(m.prime, m.seed, m.epoch) for m in models] == [(5, 0, 29), (5, 1, 29), (7, 0, 29), (7, 1, 29)]
    for prime, seed in ((5, 0), (5, 1), (7, 0), (7, 1)):
        run = run_dir_of(workdir, prime, seed)
        final = json.loads((run / "exports" / "final.json").read_text())
        assert parse_export_name(final["name"]).epoch == grokpipe.load_metadata(run)["final_epoch"]
        assert (workdir / final["export"] / "export_meta.json").is_file()
        grokked = json.loads((run / "exports" / "grokked.json").read_text())
        assert grokked["export"] is None and "never grokked" in grokked["skipped"]  # 30 tiny epochs
