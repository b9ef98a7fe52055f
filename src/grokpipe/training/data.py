"""The modular-addition dataset and its train/test split, exactly as in the TransformerLens grokking demo."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def all_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p² inputs ``[a, b, p]`` in lexicographic order (``=`` is token p) and labels ``(a + b) % p``."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    equals = torch.full((p * p,), p)
    tokens = torch.stack([a, b, equals], dim=1)
    labels = (a + b) % p
    return tokens, labels


def split_indices(p: int, frac_train: float, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's split: ``torch.manual_seed(data_seed); torch.randperm(p*p)``, first ``int(p*p*frac_train)`` train.

    A private generator seeded the same way gives the same permutation without touching global RNG state.
    """
    generator = torch.Generator().manual_seed(data_seed)
    perm = torch.randperm(p * p, generator=generator)
    cutoff = int(p * p * frac_train)
    return perm[:cutoff], perm[cutoff:]


@dataclass
class Split:
    """Train and test tensors of one run, on the training device."""

    train_indices: torch.Tensor
    test_indices: torch.Tensor
    train_tokens: torch.Tensor
    train_labels: torch.Tensor
    test_tokens: torch.Tensor
    test_labels: torch.Tensor


def make_split(p: int, frac_train: float, data_seed: int, device: str | torch.device = "cpu") -> Split:
    tokens, labels = all_pairs(p)
    train_idx, test_idx = split_indices(p, frac_train, data_seed)
    return Split(
        train_indices=train_idx,
        test_indices=test_idx,
        train_tokens=tokens[train_idx].to(device),
        train_labels=labels[train_idx].to(device),
        test_tokens=tokens[test_idx].to(device),
        test_labels=labels[test_idx].to(device),
    )
