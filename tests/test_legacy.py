"""Legacy pickles: safe reading, faithful conversion, hostile and broken files refused."""

import builtins
import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import dry_jobs, grokpipe_cli, run_dir_of, snakemake, tiny_config, write_config
from legacy_fixtures import Payload, save_legacy, train_demo
from transformer_lens import HookedTransformer

import grokpipe
from grokpipe.convert import convert
from grokpipe.errors import GrokpipeError
from grokpipe.io.legacy import read_legacy, safe_load
from grokpipe.io.safetensors_io import read_metadata


@pytest.fixture(scope="module")
def demo_run():
    return train_demo()


@pytest.fixture(scope="module")
def legacy_files(demo_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("legacy")
    return {
        style: save_legacy(demo_run, folder / f"{style}.pth", style=style.split("-")[0], cuda="cuda" in style)
        for style in ("tl2", "tl3", "dict", "tl2-cuda")
    }


@pytest.mark.parametrize("style", ["tl2", "tl3", "dict", "tl2-cuda"])
def test_conversion_is_faithful(demo_run, legacy_files, tmp_path, style):
    legacy = legacy_files[style]
    before = (legacy.stat().st_mtime_ns, legacy.read_bytes())
    run = tmp_path / "grokking_p11_seed999"
    meta = convert(legacy, run)
    assert (legacy.stat().st_mtime_ns, legacy.read_bytes()) == before, "the legacy file must not change"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["artifacts", "checkpoints", "config.json", "metadata.json", "grokking_p11_seed999.safetensors"]
    )
    assert grokpipe.list_epochs(run) == demo_run["checkpoint_epochs"] == [3, 7, 11]
    for epoch, original in zip(demo_run["checkpoint_epochs"], demo_run["checkpoints"]):
        model = grokpipe.load_model(run, epoch=epoch)
        assert isinstance(model, HookedTransformer)
        converted = grokpipe.load_state_dict(run, epoch)
        for name, tensor in original.items():
            assert torch.equal(converted[name], tensor), name  # TL 3 mask placeholder round-trips too
        assert read_metadata(grokpipe.checkpoint_path(run, epoch))["source"] == "converted"
    final = grokpipe.load_state_dict(run)
    assert all(torch.equal(final[k], v) for k, v in demo_run["model"].items())
    assert meta["train_losses"] == demo_run["train_losses"] and meta["test_losses"] == demo_run["test_losses"]
    assert meta["train_indices"] == demo_run["train_indices"].tolist()
    assert meta["checkpoint_every"] == 4 and meta["source"] == "converted"
    assert meta["normalized_buffers"] == (["blocks.0.attn.mask"] if style.startswith("tl2") else [])
    config = grokpipe.load_config(run)
    assert config["hooked_transformer_config"]["device"] == "cpu"
    assert config["hooked_transformer_config"]["d_vocab_out"] == 11


def test_reader_needs_no_transformer_lens(legacy_files):
    code = (
        "import sys; sys.modules['transformer_lens'] = None\n"
        "from grokpipe.io.legacy import read_legacy\n"
        f"run = read_legacy({str(legacy_files['tl2-cuda'])!r})\n"
        "assert 'transformer_lens' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(run.prime, run.config['device'], run.model['embed.W_E'].device)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["11", "cuda", "cpu"]


def test_cuda_saved_file_needs_map_location(legacy_files):
    """The fixture really records cuda storages: a plain load on this CPU machine fails."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        with torch.serialization.safe_globals([]):
            torch.load(legacy_files["dict"].with_name("tl2-cuda.pth"), weights_only=False)


def test_load_model_accepts_legacy_file_with_a_warning(demo_run, legacy_files):
    with pytest.warns(UserWarning, match="grokpipe convert"):
        model = grokpipe.load_model(legacy_files["tl2"], epoch=7)
    assert torch.equal(model.state_dict()["embed.W_E"], demo_run["checkpoints"][1]["embed.W_E"])
    assert torch.equal(grokpipe.load_state_dict(legacy_files["dict"])["unembed.W_U"], demo_run["model"]["unembed.W_U"])


HOSTILE = {
    "os.system": lambda marker: Payload(os.system, f"touch {marker}"),
    "builtins.eval": lambda marker: Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
    "builtins.exec": lambda marker: Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
    "subprocess.call": lambda marker: Payload(subprocess.call, ["touch", str(marker)]),
    # an allowlisted outer call (OrderedDict) whose argument is itself a malicious reduce
    "nested-reduce": lambda marker: Payload(
        collections.OrderedDict, Payload(builtins.exec, f"open({str(marker)!r}, 'w')")
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("place", ["top", "in-config"])
def test_hostile_pickle_is_refused_and_nothing_runs(demo_run, tmp_path, kind, place):
    marker = tmp_path / "pwned"
    data = dict(demo_run)
    if place == "top":
        data["model"] = HOSTILE[kind](marker)
    else:
        fields = dict(demo_run["config"].to_dict())  # to_dict() returns the live __dict__
        fields["tokenizer_name"] = HOSTILE[kind](marker)
        data["config"] = fields
    path = tmp_path / "evil.pth"
    torch.save(data, path)
    with pytest.raises(GrokpipeError, match="refused") as info:
        read_legacy(path)
    assert not marker.exists(), "the payload ran"
    # The exact global the pickle names (as the unpickler reads it), not a loose substring.
    expected = {
        "os.system": "posix.system",
        "builtins.eval": "eval",
        "builtins.exec": "exec",
        "subprocess.call": "commands.call",  # pickled under its Python 2 name
        "nested-reduce": "exec",
    }[kind]
    assert f"names global {expected}, which is not on grokpipe's allowlist" in str(info.value)
    run = tmp_path / "grokking_p11_seed999"
    proc = grokpipe_cli("convert", str(path), str(run))
    assert proc.returncode == 1 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not run.exists()


def test_truncated_and_garbage_files(legacy_files, tmp_path):
    truncated = tmp_path / "truncated.pth"
    data = legacy_files["tl2"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("this is not a pickle\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(GrokpipeError, match="not a readable PyTorch pickle"):
            safe_load(bad)
        run = tmp_path / "out" / "grokking_p11_seed999"
        proc = grokpipe_cli("convert", str(bad), str(run))
        assert proc.returncode == 1, proc.stderr
        assert f"{bad}: not a readable PyTorch pickle" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists(), "nothing may be written for a bad file"


def test_wrong_content_is_refused(demo_run, legacy_files, tmp_path):
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in demo_run.items() if k != "test_losses"}, missing)
    with pytest.raises(GrokpipeError, match="missing key"):
        read_legacy(missing)
    with pytest.raises(GrokpipeError, match="holds a p = 11 model"):
        convert(legacy_files["tl2"], tmp_path / "grokking_p13_seed0")
    bad_mask = dict(demo_run)
    bad_mask["model"] = {**demo_run["model"], "blocks.0.attn.mask": torch.ones(3, 3, dtype=torch.bool)}
    path = tmp_path / "mask.pth"
    torch.save(bad_mask, path)
    with pytest.raises(GrokpipeError, match="not the causal mask"):
        convert(path, tmp_path / "grokking_p11_seed999")
    assert not (tmp_path / "grokking_p11_seed999").exists()


def test_convert_rule_end_to_end(legacy_files, tmp_path):
    (tmp_path / "legacy" / "tiny").mkdir(parents=True)
    os.link(legacy_files["tl2"], tmp_path / "legacy" / "tiny" / "tiny_p11_seed999.pth")
    configfile = write_config(
        tmp_path / "config.yaml",
        tiny_config(primes=[5, 11], seeds=[0], training={"num_epochs": 10, "checkpoint_every": 5}),
    )
    dry = snakemake(tmp_path, "-n", "--cores", "1", configfile=configfile)
    # all: the legacy run converts; the grid runs train, p = 11 seed 0 too (its prime is the legacy run's)
    made_by = {
        run: [rule for rule, outputs in dry_jobs(dry.stdout) if f"{run}/metadata.json" in outputs]
        for run in ("tiny_p11_seed999", "tiny_p11_seed0", "tiny_p5_seed0")
    }
    expected = {"tiny_p11_seed999": ["convert"], "tiny_p11_seed0": ["train"], "tiny_p5_seed0": ["train"]}
    assert made_by == expected, dry.stdout
    snakemake(
        tmp_path,
        "--cores",
        "2",
        "results/tiny/tiny_p11_seed999/verify.json",
        "results/tiny/tiny_p11_seed999/artifacts/progress_measures.csv",  # progress measures of a converted run
        configfile=configfile,
    )
    run = run_dir_of(tmp_path, 11, 999)
    assert grokpipe.load_metadata(run)["source"] == "converted"
    assert grokpipe.list_epochs(run) == [3, 7, 11]
    progress = (run / "artifacts" / "progress_measures.csv").read_text().splitlines()
    assert progress[0].startswith("epoch,train_loss,test_loss") and [r.split(",")[0] for r in progress[1:]] == [
        "3",
        "7",
        "11",
    ]
    assert json.loads((run / "verify.json").read_text())["ok"]
    assert (tmp_path / "logs" / "tiny" / "convert" / "tiny_p11_seed999.log").exists()
    assert not run_dir_of(tmp_path, 5, 0).exists()  # only what was asked for ran


def test_legacy_runs_keep_their_progress_measures_when_the_grid_model_has_none(legacy_files, tmp_path):
    (tmp_path / "legacy" / "tiny").mkdir(parents=True)
    os.link(legacy_files["tl2"], tmp_path / "legacy" / "tiny" / "tiny_p11_seed999.pth")
    config = tiny_config(primes=[5], seeds=[0], model={"act_fn": "gelu_new"})  # no progress measures
    configfile = write_config(tmp_path / "config.yaml", config)
    jobs = dry_jobs(snakemake(tmp_path, "-n", "--cores", "1", configfile=configfile).stdout)
    analyze = sorted(outputs for rule, outputs in jobs if rule == "analyze_without_progress")
    assert len(analyze) == 2 and not any("progress_measures" in outputs for outputs in analyze), jobs
    progress = [outputs for rule, outputs in jobs if rule == "progress"]
    assert len(progress) == 1 and "tiny_p11_seed999/artifacts/progress_measures.csv" in progress[0], jobs
    target = "results/tiny/tiny_p11_seed999/artifacts/progress_measures.csv"
    snakemake(tmp_path, "--cores", "1", target, configfile=configfile)  # the progress rule itself, run
    rows = (tmp_path / target).read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,test_loss") and len(rows) == 1 + 3
    assert (tmp_path / "logs" / "tiny" / "progress" / "tiny_p11_seed999.log").exists()


def with_entry(demo_run, key, value):
    data = dict(demo_run)
    data[key] = value
    return data


def bomb_variants(demo_run):
    """Small files whose content would take gigabytes to build."""
    import numpy as np

    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    level1 = [0.5] * 1000
    level2 = [level1] * 1000
    loop = [0.5]
    loop.append(loop)
    return {
        "self-containing-list": with_entry(demo_run, "train_losses", loop),
        "numpy-void-scalar": with_entry(demo_run, "train_losses", [Payload(scalar, np.dtype("V500000000"), b"x")]),
        "memo-shared-lists": with_entry(demo_run, "train_losses", [level2] * 1000),
        "stride-0-view": with_entry(demo_run, "test_indices", torch.zeros(1, dtype=torch.long).expand(10**6, 10**6)),
    }


@pytest.mark.parametrize("kind", ["numpy-void-scalar", "memo-shared-lists", "self-containing-list", "stride-0-view"])
def test_small_files_that_would_exhaust_memory_are_refused(demo_run, tmp_path, kind):
    import psutil

    path = tmp_path / "bomb.pth"
    torch.save(bomb_variants(demo_run)[kind], path)
    assert path.stat().st_size < 200_000
    before = psutil.Process().memory_info().rss
    expected = {
        "numpy-void-scalar": "numeric",
        "memo-shared-lists": "expand to more than",
        "self-containing-list": "holds itself",
        "stride-0-view": "claims",
    }[kind]
    with pytest.raises(GrokpipeError, match=expected) as info:
        read_legacy(path)
    assert str(path) in str(info.value)
    assert psutil.Process().memory_info().rss - before < 200 * 2**20
    for command in (["inspect", str(path)], ["convert", str(path), str(tmp_path / "grokking_p11_seed999")]):
        proc = grokpipe_cli(*command)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert not (tmp_path / "grokking_p11_seed999").exists()


def test_compressed_zip_members_are_refused(legacy_files, tmp_path):
    import zipfile

    bomb = tmp_path / "deflated.pth"
    with zipfile.ZipFile(legacy_files["tl3"]) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for member in source.infolist():
            out.writestr(member.filename, source.read(member))
    with pytest.raises(GrokpipeError, match="is compressed"):
        read_legacy(bomb)


MALFORMED = {
    "nan-epoch": ("checkpoint_epochs", lambda run: [float("nan")] + run["checkpoint_epochs"][1:], "not a whole number"),
    "negative-epoch": ("checkpoint_epochs", lambda run: [-1] + run["checkpoint_epochs"][1:], "not a whole number"),
    "fractional-epoch": ("checkpoint_epochs", lambda run: [3.5] + run["checkpoint_epochs"][1:], "not a whole number"),
    "float-indices": ("train_indices", lambda run: run["train_indices"].double(), "not integer indices"),
    "short-test-losses": ("test_losses", lambda run: run["test_losses"][:-1], "train losses but"),
    "indices-overlap": ("test_indices", lambda run: run["train_indices"], "do not partition"),
    "loss-is-text": ("train_losses", lambda run: ["low"] * len(run["train_losses"]), "not a number"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_but_allowed_content_is_refused_by_convert_and_inspect_alike(demo_run, tmp_path, kind):
    key, change, expected = MALFORMED[kind]
    path = tmp_path / "odd.pth"
    torch.save(with_entry(demo_run, key, change(demo_run)), path)
    run = tmp_path / "grokking_p11_seed999"
    for command in (["convert", str(path), str(run)], ["inspect", str(path)]):
        proc = grokpipe_cli(*command)
        assert proc.returncode == 1 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not run.exists() and not list(tmp_path.glob("**/checkpoint_epoch_-*"))


def test_losses_as_tensors_and_whole_float_epochs_convert_sanely(demo_run, tmp_path):
    data = with_entry(demo_run, "train_losses", torch.tensor(demo_run["train_losses"], dtype=torch.float64))
    data["test_losses"] = [torch.tensor(x) for x in demo_run["test_losses"]]
    data["checkpoint_epochs"] = [float(e) for e in demo_run["checkpoint_epochs"]]
    data["test_losses"][-1] = torch.tensor(float("nan"))  # a diverged last epoch
    path = tmp_path / "tensors.pth"
    torch.save(data, path)
    assert grokpipe_cli("inspect", str(path)).returncode == 0
    run = tmp_path / "grokking_p11_seed999"
    meta = convert(path, run)
    assert meta["checkpoint_epochs"] == demo_run["checkpoint_epochs"]
    assert meta["train_losses"] == pytest.approx(demo_run["train_losses"])
    last = len(demo_run["test_losses"]) - 1
    assert meta["test_losses"][-1] is None and meta["diverged_at_epoch"] == last
    json.loads((run / "metadata.json").read_text(), parse_constant=lambda token: pytest.fail(token))


def test_convert_onto_an_existing_run_needs_force_and_cleans_stale_staging(legacy_files, tmp_path):
    run = tmp_path / "grokking_p11_seed999"
    convert(legacy_files["tl3"], run)
    stale = tmp_path / ".grokking_p11_seed999.converting-killed"  # what a killed convert leaves
    stale.mkdir()
    (stale / "partial.safetensors").write_bytes(b"torn")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = grokpipe_cli("convert", str(legacy_files["tl2"]), str(run))
    assert proc.returncode == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before, "the existing run was touched"
    proc = grokpipe_cli("convert", str(legacy_files["tl2"]), str(run), "--force")
    assert proc.returncode == 0, proc.stderr
    assert grokpipe.load_metadata(run)["legacy_file"] == str(legacy_files["tl2"])
    assert not stale.exists() and not list(tmp_path.glob(".grokking_p11_seed999.replaced-*"))


def test_converted_run_follows_the_umask(legacy_files, tmp_path):
    import stat

    run = tmp_path / "grokking_p11_seed999"
    proc = subprocess.run(
        [sys.executable, "-m", "grokpipe", "convert", str(legacy_files["tl3"]), str(run)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert proc.returncode == 0, proc.stderr
    for path in [run, *run.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
