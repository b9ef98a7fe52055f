"""Checkpoints of other trainers, written by the real libraries: Hugging Face ``save_pretrained``
(sharded safetensors), ``torch.save`` shards with HF's index (the ``.bin`` layout, which
transformers 5 no longer writes), and ``torch.distributed.checkpoint`` from 2 gloo processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEEPSPEED_CASES = sorted(p.name for p in (FIXTURES / "deepspeed").iterdir() if p.is_dir())


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=16, eos_token_id=0, bos_token_id=0)
    return GPT2LMHeadModel(config)


def save_hf_safetensors(model, directory: Path, shard_size: str = "30KB") -> Path:
    model.save_pretrained(directory, max_shard_size=shard_size)
    return directory


def save_hf_bin(state: dict[str, torch.Tensor], directory: Path, shards: int) -> Path:
    """HF's ``.bin`` layout: ``pytorch_model-0000k-of-0000N.bin`` (``torch.save`` of a state dict)
    plus ``pytorch_model.bin.index.json``; one shard is a plain ``pytorch_model.bin``."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[k::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return directory


def dcp_state(seed: int = 0) -> dict:
    """What the ranks save: nested dicts, tensors of several dtypes, non-tensor entries."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed": {"weight": torch.randn(11, 7, generator=g)},  # sharded unevenly: 6 + 5 rows
            "out": {"weight": torch.randn(5, 9, generator=g)},  # sharded on dim 1: 5 + 4 columns
            "bias": torch.randn(5, generator=g),  # replicated
            "scale": torch.randn(3, 3, generator=g).to(torch.bfloat16),
            "positions": torch.arange(12, dtype=torch.int64),
        },
        "step": 7,
        "note": "tiny",
    }


def _dcp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = dcp_state()
    model = full["model"]
    state = {
        "model": {
            "embed": {"weight": distribute_tensor(model["embed"]["weight"], mesh, [Shard(0)])},
            "out": {"weight": distribute_tensor(model["out"]["weight"], mesh, [Shard(1)])},
            "bias": distribute_tensor(model["bias"], mesh, [Replicate()]),
            "scale": model["scale"],
            "positions": model["positions"],
        },
        "step": full["step"],
        "note": full["note"],
    }
    dcp.save(state, checkpoint_id=out)
    dist.destroy_process_group()


def save_dcp(directory: Path, world: int = 2) -> Path:
    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dcp_rank, args=(world, port, str(directory)), nprocs=world, join=True)
    return directory


def flat_dcp_expected() -> dict[str, torch.Tensor]:
    model = dcp_state()["model"]
    return {
        "model.embed.weight": model["embed"]["weight"],
        "model.out.weight": model["out"]["weight"],
        "model.bias": model["bias"],
        "model.scale": model["scale"],
        "model.positions": model["positions"],
    }
