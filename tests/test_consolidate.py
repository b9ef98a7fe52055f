"""grokpipe consolidate: other trainers' checkpoints into one verified safetensors file each."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import grokpipe_cli, snakemake, snakemake_command, tiny_config, write_config
from consolidate_fixtures import (
    DEEPSPEED_CASES,
    FIXTURES,
    flat_dcp_expected,
    save_dcp,
    save_hf_bin,
    save_hf_safetensors,
    tiny_gpt2,
)
from legacy_fixtures import Payload
from safetensors.torch import load_file, save_file

from grokpipe.cli import main
from grokpipe.consolidate import consolidate, consolidate_all
from grokpipe.io.safetensors_io import read_metadata

TRAINER_EXTRAS = ("optimizer.pt", "rng_state.pth", "training_args.bin", "scheduler.pt")


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_gpt2()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_sharded(gpt2, tmp_path_factory):
    return save_hf_safetensors(gpt2[0], tmp_path_factory.mktemp("hf") / "gpt2-tiny")


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory):
    return save_dcp(tmp_path_factory.mktemp("dcp") / "fsdp-step7")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def shard_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def plant_hostile(directory: Path, marker: Path, names=TRAINER_EXTRAS) -> None:
    """Files whose unpickling would create ``marker``: proof that they are never run."""
    for name in names:
        torch.save({"state": Payload(os.system, f"touch {marker}")}, directory / name)


def test_hf_sharded_safetensors(hf_sharded, gpt2, tmp_path):
    before = snapshot(hf_sharded)
    out = tmp_path / "out"
    record = consolidate(hf_sharded, out)
    tensors = load_file(out / "model.safetensors")
    shards = shard_tensors(hf_sharded)
    assert len(list(hf_sharded.glob("model-*-of-*.safetensors"))) == 5
    assert tensors.keys() == shards.keys()
    assert "lm_head.weight" not in tensors, "a tied name the source omits stays omitted"
    for name, tensor in shards.items():
        assert torch.equal(tensors[name], tensor) and tensors[name].dtype == tensor.dtype, name
        assert torch.equal(tensor, gpt2[1][name]), name
    meta = read_metadata(out / "model.safetensors")
    assert meta["format"] == "pt" and meta["source_format"] == "hf-sharded-safetensors"
    assert meta["source_path"] == str(hf_sharded.resolve()) and meta["grokpipe_version"]
    assert (out / "config.json").read_bytes() == (hf_sharded / "config.json").read_bytes()
    written = json.loads((out / "consolidation.json").read_text())
    assert written == record and record["tensor_count"] == len(shards)
    assert record["tensor_bytes"] == sum(t.numel() * t.element_size() for t in shards.values())
    for entry in record["source"]["files"]:
        assert entry["sha256"] == hashlib.sha256((hf_sharded / entry["path"]).read_bytes()).hexdigest()
    assert {e["path"] for e in record["source"]["files"]} == {
        "model.safetensors.index.json",
        *(p.name for p in hf_sharded.glob("model-*.safetensors")),
    }
    assert record["output"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "consolidation.json", "model.safetensors"]
    assert snapshot(hf_sharded) == before, "inputs are never modified"


@pytest.mark.parametrize("shards", [3, 1])
def test_hf_bin_shards_and_shared_storage(gpt2, tmp_path, shards):
    state = dict(gpt2[1])
    state["lm_head.weight"] = state["transformer.wte.weight"]  # stored twice, one storage
    source = save_hf_bin(state, tmp_path / "bin", shards)
    marker = tmp_path / "ran"
    plant_hostile(source, marker)
    record = consolidate(source, tmp_path / "out", dtype="bfloat16")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor.to(torch.bfloat16)), name
    assert tensors["lm_head.weight"].data_ptr() != tensors["transformer.wte.weight"].data_ptr()
    assert record["source"]["format"] == ("hf-sharded-bin" if shards > 1 else "pytorch-bin")
    assert record["dtype"] == "bfloat16" and record["tensors"]["lm_head.weight"]["source_dtype"] == "F32"
    assert not marker.exists(), "trainer extras are never unpickled"
    assert not {e["path"] for e in record["source"]["files"]} & set(TRAINER_EXTRAS)


def test_single_model_file_is_read_as_what_its_bytes_are(gpt2, tmp_path):
    source = tmp_path / "single"
    source.mkdir()
    save_file(gpt2[1], source / "pytorch_model.bin")  # a safetensors file under a pickle's name
    record = consolidate(source, tmp_path / "out")
    assert record["source"]["format"] == "safetensors"
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(tensors[k], v) for k, v in gpt2[1].items())
    lone = consolidate(source / "pytorch_model.bin", tmp_path / "from-file")  # a file as INPUT
    assert lone["source"]["files"] == record["source"]["files"]


def test_dcp_from_two_ranks(dcp_dir, tmp_path):
    before = snapshot(dcp_dir)
    record = consolidate(dcp_dir, tmp_path / "out", dtype="float16")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    expected = flat_dcp_expected()
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        cast = tensor.to(torch.float16) if tensor.is_floating_point() else tensor  # int64 kept
        assert torch.equal(tensors[name], cast) and tensors[name].dtype == cast.dtype, name
    assert record["non_tensor_entries"] == {"step": 7, "note": "tiny"}
    assert record["source"]["format"] == "torch-dcp" and record["source"]["ranks"] == ["__0_0.distcp", "__1_0.distcp"]
    assert snapshot(dcp_dir) == before


@pytest.mark.parametrize("case", DEEPSPEED_CASES)
def test_deepspeed_zero_matches_deepspeeds_own_reconstruction(case, tmp_path):
    source = tmp_path / case
    shutil.copytree(FIXTURES / "deepspeed" / case, source)
    marker = tmp_path / "ran"
    (source / "zero_to_fp32.py").write_text(f"open({str(marker)!r}, 'w')\n")  # what DeepSpeed copies there
    record = consolidate(source, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    expected = load_file(source / "expected.safetensors")  # DeepSpeed 0.19.8's zero_to_fp32 output
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor) and tensors[name].dtype == tensor.dtype, name
    stage = int(case[4])
    assert record["source"]["format"] == f"deepspeed-zero{stage}" and record["source"]["zero_stage"] == stage
    assert "unembed.weight" in tensors, "a tied parameter DeepSpeed records in shared_params is restored"
    assert not marker.exists() and "deepspeed" not in sys.modules


def test_all_checkpoints_of_a_trainer_run(gpt2, tmp_path):
    run = tmp_path / "gpt2-run"
    marker = tmp_path / "ran"
    for step in (10, 20, 30):
        checkpoint = save_hf_safetensors(tiny_gpt2(seed=step), run / f"checkpoint-{step}")
        plant_hostile(checkpoint, marker)
    shutil.copytree(FIXTURES / "deepspeed" / "zero2", run / "checkpoint-40")
    out = tmp_path / "all"
    proc = grokpipe_cli("consolidate", str(run), str(out), "--all-checkpoints", "--filter", "checkpoint-[23]*")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpt2-run_step_20", "gpt2-run_step_30"]
    for step in (20, 30):
        tensors = load_file(out / f"gpt2-run_step_{step}" / "model.safetensors")
        assert all(torch.equal(tensors[k], v) for k, v in shard_tensors(run / f"checkpoint-{step}").items())
    records = consolidate_all(run, tmp_path / "every", progress=False)
    assert [r["source"]["format"] for r in records] == ["hf-sharded-safetensors"] * 3 + ["deepspeed-zero2"]
    assert not marker.exists()


def test_dry_run_writes_nothing(hf_sharded, tmp_path):
    out = tmp_path / "out"
    proc = grokpipe_cli("consolidate", str(hf_sharded), str(out), "--dry-run", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert "hf-sharded-safetensors" in proc.stdout and "F32->BF16" in proc.stdout
    assert "model-00003-of-00005.safetensors" in proc.stdout and "nothing was written" in proc.stdout
    assert not out.exists()


def assert_refused(source: Path, out: Path, expected: str, capsys) -> None:
    """One ``grokpipe: error:`` line naming the input and the problem, exit 1, nothing written in or
    beside OUT_DIR, the input unchanged."""
    before = snapshot(source)
    assert main(["consolidate", str(source), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("grokpipe: error: ") and len(err.splitlines()) == 1, err
    assert expected in err and str(source) in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "nothing is left in or beside OUT_DIR"
    assert snapshot(source) == before


def _break_hf(kind: str, tmp_path: Path, hf_sharded: Path) -> Path:
    source = tmp_path / "checkpoint"
    shutil.copytree(hf_sharded, source)
    outside = tmp_path / "outside.safetensors"
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shard2 = "model-00002-of-00005.safetensors"
    if kind == "missing shard":
        (source / shard2).unlink()
    elif kind == "truncated shard":
        data = (source / shard2).read_bytes()
        (source / shard2).write_bytes(data[:-10])
    elif kind == "tensor in two shards":
        first = load_file(source / "model-00001-of-00005.safetensors")
        name = next(iter(first))
        save_file({**load_file(source / shard2), name: first[name]}, source / shard2)
    elif kind == "tensor in no shard":
        index["weight_map"]["ghost.weight"] = shard2
    elif kind == "tensor the index does not list":
        name = next(n for n, f in index["weight_map"].items() if f == shard2)
        del index["weight_map"][name]
    elif kind == "index path ../":
        shutil.copy(source / shard2, outside)
        escape = "../outside.safetensors"
        index["weight_map"] = {n: (escape if f == shard2 else f) for n, f in index["weight_map"].items()}
    elif kind == "absolute index path":
        shutil.copy(source / shard2, outside)
        index["weight_map"] = {n: (str(outside) if f == shard2 else f) for n, f in index["weight_map"].items()}
    elif kind == "symlink out":
        shutil.move(source / shard2, outside)
        (source / shard2).symlink_to(outside)
    elif kind == "hostile .bin shard":
        for path in source.glob("model*"):
            path.unlink()
        payload = Payload(os.system, f"touch {tmp_path}/ran")
        torch.save({"w": torch.zeros(2), "x": payload}, source / "pytorch_model.bin")
    if index is not None and index_path.exists():
        index_path.write_text(json.dumps(index))
    return source


BAD_HF = {
    "missing shard": "which is missing from",
    "truncated shard": "truncated",
    "tensor in two shards": "a tensor in two shards",
    "tensor in no shard": "the index puts 'ghost.weight' here, but the shard does not hold it",
    "tensor the index does not list": "which the index model.safetensors.index.json does not list there",
    "index path ../": "'../outside.safetensors', which leaves the checkpoint directory",
    "absolute index path": "which leaves the checkpoint directory",
    "symlink out": "a link that leaves the checkpoint directory",
    "hostile .bin shard": "names global posix.system, which is not on grokpipe's allowlist",
}


def _break_other(kind: str, tmp_path: Path, dcp_dir: Path) -> Path:
    if kind.startswith("dcp"):
        source = tmp_path / "dcp"
        shutil.copytree(dcp_dir, source)
        if kind == "dcp missing rank":
            (source / "__1_0.distcp").unlink()
        elif kind == "dcp truncated rank":
            data = (source / "__1_0.distcp").read_bytes()
            (source / "__1_0.distcp").write_bytes(data[: len(data) // 2])
        elif kind == "dcp hostile metadata":
            (source / ".metadata").write_bytes(__import__("pickle").dumps(Payload(os.system, f"touch {tmp_path}/ran")))
        return source
    source = tmp_path / "ds"
    shutil.copytree(FIXTURES / "deepspeed" / ("zero3" if "3" in kind else "zero2"), source)
    step = source / "global_step2"
    if kind == "deepspeed missing rank":
        (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif kind == "deepspeed ranks of two checkpoints (zero3)":
        other = FIXTURES / "deepspeed" / "zero3_3ranks_2groups" / "global_step2"
        shutil.copy(other / "zero_pp_rank_1_mp_rank_00_optim_states.pt", step)
    elif kind == "deepspeed latest leaves":
        (source / "latest").write_text("../../etc")
    return source


BAD_OTHER = {
    "dcp missing rank": "'__1_0.distcp', which is missing from",
    "dcp truncated rank": "past the end (truncated)",
    "dcp hostile metadata": "names global posix.system, which is not on grokpipe's allowlist",
    "deepspeed missing rank": "written by 2 ranks but holds 1 optimizer states files",
    "deepspeed ranks of two checkpoints (zero3)": "disagree",
    "deepspeed latest leaves": "does not hold a checkpoint directory name",
}


BAD_INPUT = {**BAD_HF, **BAD_OTHER}


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_nothing(hf_sharded, dcp_dir, tmp_path, capsys, kind):
    source = _break_hf(kind, tmp_path, hf_sharded) if kind in BAD_HF else _break_other(kind, tmp_path, dcp_dir)
    assert_refused(source, tmp_path / "out", BAD_INPUT[kind], capsys)
    assert not (tmp_path / "ran").exists(), "no pickled payload ran"


def test_output_inside_the_input_is_refused(hf_sharded, tmp_path, capsys):
    source = tmp_path / "checkpoint"
    shutil.copytree(hf_sharded, source)
    for out in (source, source / "out", tmp_path):
        assert main(["consolidate", str(source), str(out), "--force"]) == 1
        assert "inputs are never modified" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in hf_sharded.iterdir())


def test_inspect_describes_a_consolidated_directory(hf_sharded, tmp_path):
    consolidate(hf_sharded, tmp_path / "out")
    proc = grokpipe_cli("inspect", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "consolidated checkpoint" in proc.stdout and "hf-sharded-safetensors" in proc.stdout
    assert "transformer.wte.weight" in proc.stdout


def test_existing_output_needs_force(hf_sharded, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["consolidate", str(hf_sharded), str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["consolidate", str(hf_sharded), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "consolidation.json", "model.safetensors"]


# The child's own peak (VmHWM): ru_maxrss would carry the pytest parent's peak over fork + exec.
MEMORY_SCRIPT = """
import sys
from grokpipe.consolidate import consolidate
consolidate(sys.argv[1], sys.argv[2])
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _peak_rss(source: Path, out: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(source), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


def test_streaming_memory_stays_near_one_shard(tmp_path):
    """600 MB in 6 shards of 100 MB consolidates in well under 300 MB above a tiny model's peak."""
    big = tmp_path / "big"
    big.mkdir()
    weight_map = {}
    for k in range(6):
        name = f"model-{k + 1:05d}-of-00006.safetensors"
        tensors = {f"layer{k}.part{j}.weight": torch.full((1024, 1024 * 5), float(k + j)) for j in range(5)}
        save_file(tensors, big / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (big / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tiny = save_hf_bin({"w": torch.ones(4)}, tmp_path / "tiny", 1)
    baseline = _peak_rss(tiny, tmp_path / "tiny-out")
    peak = _peak_rss(big, tmp_path / "big-out")
    assert (tmp_path / "big-out" / "model.safetensors").stat().st_size > 600 * 2**20 * 0.99
    assert baseline < 400 * 2**20, "the baseline is the child's own peak"
    assert peak - baseline < 300 * 2**20, f"{(peak - baseline) / 2**20:.0f} MB above the baseline"


def test_snakemake_consolidates_imports(hf_sharded, tmp_path):
    imports = tmp_path / "imports"
    shutil.copytree(hf_sharded, imports / "gpt2-tiny")
    shutil.copytree(FIXTURES / "deepspeed" / "zero3", imports / "ds-run" / "checkpoint-2")
    configfile = write_config(tmp_path / "config.yaml", tiny_config(primes=[5], seeds=[0]))
    dry = snakemake(tmp_path, "-n", "--cores", "2", configfile=configfile)
    assert dry.stdout.count("rule consolidate:") == 2, "the imports are part of the default target"
    assert "output: consolidated/gpt2-tiny" in dry.stdout and "output: consolidated/ds-run" in dry.stdout
    snakemake(tmp_path, "--cores", "2", "consolidated/gpt2-tiny", "consolidated/ds-run", configfile=configfile)
    assert (tmp_path / "consolidated" / "gpt2-tiny" / "model.safetensors").is_file()
    step = tmp_path / "consolidated" / "ds-run" / "ds-run_step_2"
    expected = load_file(FIXTURES / "deepspeed" / "zero3" / "expected.safetensors")
    got = load_file(step / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in expected.items()) and got.keys() == expected.keys()
    assert (tmp_path / "logs" / "consolidate" / "gpt2-tiny.log").is_file()
    lint = subprocess.run(snakemake_command(tmp_path, "--lint", configfile=configfile), capture_output=True, text=True)
    assert "Lints for rule consolidate" not in lint.stdout + lint.stderr


# --- Hostile inputs, second round: links, special files, claimed sizes, bounded work ---------------


def one_line_refusal(args: list[str], expected: str, capsys) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("grokpipe: error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    return err


def test_config_json_linked_outside_the_input_is_refused_and_never_echoed(hf_sharded, tmp_path, capsys):
    source = tmp_path / "checkpoint"
    shutil.copytree(hf_sharded, source)
    secret = tmp_path / "environ"
    secret.write_text("HF_TOKEN=hf_secret_value\n")  # what /proc/self/environ would hand over
    (source / "config.json").unlink(missing_ok=True)
    (source / "config.json").symlink_to(secret)
    for extra in ([], ["--dry-run"]):
        err = one_line_refusal(
            ["consolidate", str(source), str(tmp_path / "out"), *extra], "a link that leaves", capsys
        )
        assert "hf_secret_value" not in err
    assert not (tmp_path / "out").exists()


def test_copied_config_json_is_recorded_with_its_sha256(hf_sharded, tmp_path):
    source = tmp_path / "checkpoint"
    shutil.copytree(hf_sharded, source)
    (source / "real_config.json").write_text('{"model_type": "gpt2"}')
    (source / "config.json").unlink(missing_ok=True)
    (source / "config.json").symlink_to("real_config.json")  # a link inside the input is fine
    record = consolidate(source, tmp_path / "out")
    digest = hashlib.sha256(b'{"model_type": "gpt2"}').hexdigest()
    assert record["config"] == {"file": "config.json", "source": "config.json", "bytes": 22, "sha256": digest}
    assert hashlib.sha256((tmp_path / "out" / "config.json").read_bytes()).hexdigest() == digest


def test_deepspeed_latest_never_puts_file_content_in_a_message(tmp_path, capsys):
    source = tmp_path / "ds"
    shutil.copytree(FIXTURES / "deepspeed" / "zero2", source)
    secret = tmp_path / "environ"
    secret.write_text("AWS_SECRET=very_secret\n")
    (source / "latest").unlink()
    (source / "latest").symlink_to(secret)
    err = one_line_refusal(["consolidate", str(source), str(tmp_path / "out")], "a link that leaves", capsys)
    assert "very_secret" not in err
    (source / "latest").unlink()
    (source / "latest").write_text("AWS_SECRET=very_secret\n")
    err = one_line_refusal(["consolidate", str(source), str(tmp_path / "out")], "does not hold a checkpoint", capsys)
    assert "very_secret" not in err


def test_checkpoint_directory_linked_outside_the_run_is_refused(hf_sharded, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(hf_sharded, run / "checkpoint-1")
    shutil.copytree(hf_sharded, tmp_path / "elsewhere")
    (run / "checkpoint-2").symlink_to(tmp_path / "elsewhere")
    one_line_refusal(
        ["consolidate", str(run), str(tmp_path / "out"), "--all-checkpoints"], "a link that leaves", capsys
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_a_fifo_is_refused_not_waited_on(tmp_path, name):
    source = tmp_path / "checkpoint"
    source.mkdir()
    os.mkfifo(source / name)
    for args in (
        ["consolidate", str(source), str(tmp_path / "out")],
        ["consolidate", str(source), str(tmp_path / "out"), "--dry-run"],
        ["inspect", str(source / name)],
    ):
        proc = grokpipe_cli(*args, timeout=120)  # a reader that opened the FIFO would hang here
        assert proc.returncode == 1 and "FIFO" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def claim_more_than_stored(path: Path) -> None:
    """Rewrite a torch.save file of {"w": 4 floats, ...} so that the pickle claims 64 floats for the
    storage whose record holds 4 (and a matching view): what mmap loading would not notice."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                numel = data.index(b"K\x04", data.index(b"cpu"))  # the storage's element count
                size = data.index(b"K\x04", numel + 2)  # the tensor's size
                data = data[:numel] + b"K\x40" + data[numel + 2 : size] + b"K\x40" + data[size + 2 :]
            archive.writestr(info, data)


def test_bin_storage_claiming_more_than_its_record_is_refused(tmp_path, capsys):
    source = tmp_path / "checkpoint"
    source.mkdir()
    torch.save({"w": torch.arange(4, dtype=torch.float32), "v": torch.ones(1000)}, source / "pytorch_model.bin")
    claim_more_than_stored(source / "pytorch_model.bin")
    one_line_refusal(
        ["consolidate", str(source), str(tmp_path / "out")], "claims 256 bytes but its record holds 16", capsys
    )
    assert not (tmp_path / "out").exists()


def test_one_storage_under_many_names_is_bounded_by_the_input(tmp_path, capsys):
    source = tmp_path / "checkpoint"
    source.mkdir()
    shared = torch.zeros(64 * 1024)  # 256 KiB, saved once, named 5,000 times: a 1.3 GB output
    torch.save({f"layer{i}.weight": shared for i in range(5000)}, source / "pytorch_model.bin")
    for extra in ([], ["--dry-run"]):
        one_line_refusal(
            ["consolidate", str(source), str(tmp_path / "out"), *extra], "more than 4 times as much", capsys
        )
    assert main(["consolidate", str(source), str(tmp_path / "out"), "--dry-run", "--max-output-ratio", "10000"]) == 0
    assert not (tmp_path / "out").exists()


def test_chunk_tiling_check_is_not_quadratic():
    from grokpipe.errors import GrokpipeError
    from grokpipe.io.dcp import PAIRWISE_CHUNK_LIMIT, _check_tiling

    where = Path(".metadata")
    _check_tiling("w", (200_000,), [((i,), (1,)) for i in range(200_000)], where)  # quadratic: hours
    grid = [((i, j), (1, 3)) for i in range(300) for j in range(0, 300, 3)]
    _check_tiling("w", (300, 300), grid[::-1], where)
    _check_tiling("w", (10, 10), [((0, 0), (10, 4)), ((0, 4), (5, 6)), ((5, 4), (5, 6))], where)  # no grid
    with pytest.raises(GrokpipeError, match="overlap"):
        _check_tiling("w", (4, 4), [((0, 0), (2, 4)), ((1, 0), (2, 4)), ((0, 0), (0, 4))], where)  # volumes add up
    bricks = [((i, 0), (1, 1 + i % 2)) for i in range(PAIRWISE_CHUNK_LIMIT + 1)]
    bricks += [((i, 1 + i % 2), (1, 2 - i % 2)) for i in range(PAIRWISE_CHUNK_LIMIT + 1)]
    with pytest.raises(GrokpipeError, match="form no grid"):
        _check_tiling("w", (PAIRWISE_CHUNK_LIMIT + 1, 3), bricks, where)


def rewrite_dcp_metadata(source: Path, change) -> None:
    """Load the fixture's .metadata (written by torch's DCP: trusted here) with torch's own classes,
    let ``change`` edit it, and pickle it back as DCP does."""
    import pickle

    with open(source / ".metadata", "rb") as fh:
        metadata = pickle.load(fh)
    change(metadata)
    with open(source / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)


def test_dcp_chunks_sharing_one_stored_item_are_refused(dcp_dir, tmp_path, capsys):
    source = tmp_path / "dcp"
    shutil.copytree(dcp_dir, source)

    def alias(metadata):
        keys = [key for key in metadata.storage_data if key.fqn == "model.embed.weight"]
        for key in keys[1:]:
            metadata.storage_data[key] = metadata.storage_data[keys[0]]

    rewrite_dcp_metadata(source, alias)
    one_line_refusal(["consolidate", str(source), str(tmp_path / "out"), "--dry-run"], "share bytes", capsys)


def test_dcp_huge_size_is_refused_by_name_before_any_allocation(dcp_dir, tmp_path, capsys):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    source = tmp_path / "dcp"
    shutil.copytree(dcp_dir, source)

    def huge(metadata):
        entry = metadata.state_dict_metadata["model.embed.weight"]
        first = entry.chunks[0]
        entry.size = torch.Size([2**40, 7])
        entry.chunks = [ChunkStorageMetadata(offsets=first.offsets, sizes=torch.Size([2**40, 7]))]

    rewrite_dcp_metadata(source, huge)
    for extra in (["--dry-run"], []):
        err = one_line_refusal(
            ["consolidate", str(source), str(tmp_path / "out"), *extra], "more than its stored item's", capsys
        )
        assert "'model.embed.weight'" in err
    assert not (tmp_path / "out").exists()


def rewrite_model_states(source: Path, change) -> None:
    path = source / "global_step2" / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=True)
    change(states)
    torch.save(states, path)


DEEPSPEED_INCONSISTENT = {
    "frozen shape vs fragment": (
        lambda s: s["frozen_param_shapes"].update({"frozen.weight": torch.Size([9, 9])}),
        "frozen parameter 'frozen.weight' has 35 elements in its fragments, but frozen_param_shapes gives it shape",
    ),
    "more param_shapes groups than flat groups": (
        lambda s: s["param_shapes"].append({"extra.weight": torch.Size([3])}),
        "param_shapes has 2 parameter groups, but the optimizer states hold 1 flat groups",
    ),
    "buffer named like a parameter": (
        lambda s: (s["module"].update({"hidden.bias": torch.zeros(5)}), s["buffer_names"].append("hidden.bias")),
        "'hidden.bias' is named twice among the buffers and parameters",
    ),
}


@pytest.mark.parametrize("kind", list(DEEPSPEED_INCONSISTENT))
def test_inconsistent_deepspeed_shapes_are_refused_by_name(tmp_path, capsys, kind):
    change, expected = DEEPSPEED_INCONSISTENT[kind]
    source = tmp_path / "ds"
    shutil.copytree(FIXTURES / "deepspeed" / "zero2", source)
    rewrite_model_states(source, change)
    for extra in (["--dry-run"], []):
        one_line_refusal(["consolidate", str(source), str(tmp_path / "out"), *extra], expected, capsys)
    assert not (tmp_path / "out").exists()


def test_lossy_casts_are_refused_on_overflow_and_recorded(tmp_path, capsys):
    source = tmp_path / "checkpoint"
    source.mkdir()
    save_file({"big": torch.tensor([1e5, 1.0]), "tiny": torch.tensor([1e-8, 0.5])}, source / "model.safetensors")
    out = tmp_path / "out"
    one_line_refusal(["consolidate", str(source), str(out), "--dtype", "float16"], "1 finite values overflow", capsys)
    assert not out.exists() and not [p for p in tmp_path.glob(".out.*") if p.suffix != ".lock"]
    assert main(["consolidate", str(source), str(out), "--dtype", "float16", "--allow-overflow"]) == 0
    record = json.loads((out / "consolidation.json").read_text())
    assert record["cast_changes"] == {"big": {"overflowed_to_inf": 1}, "tiny": {"underflowed_to_zero": 1}}
    assert "cast to float16" in record["output"]["verified"]


def test_output_that_is_the_working_directory_is_refused(hf_sharded, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    shutil.copytree(hf_sharded, tmp_path / "in")
    monkeypatch.chdir(work)
    for extra in ([], ["--force"]):
        one_line_refusal(["consolidate", "../in", ".", *extra], "is the working directory", capsys)
        assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "work"]


def test_two_directories_of_one_step_are_named_in_the_message(hf_sharded, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(hf_sharded, run / "checkpoint-7")
    shutil.copytree(hf_sharded, run / "checkpoint-007")
    one_line_refusal(
        ["consolidate", str(run), str(tmp_path / "out"), "--all-checkpoints"],
        "step 7 is in more than one directory (checkpoint-007, checkpoint-7)",
        capsys,
    )
