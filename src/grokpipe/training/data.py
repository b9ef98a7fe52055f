"""A run's dataset and its train/test split: for addition exactly the TransformerLens grokking demo's.

Other operations (:mod:`grokpipe.training.tasks`) split the pairs they are defined on the same way,
and label noise replaces a seeded fraction of the training labels (the test set stays clean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tasks import labels_of, pair_ids, tokens_of


def all_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p² inputs ``[a, b, p]`` in lexicographic order (``=`` is token p) and labels ``(a + b) % p``."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    equals = torch.full((p * p,), p)
    tokens = torch.stack([a, b, equals], dim=1)
    labels = (a + b) % p
    return tokens, labels


def split_indices(
    p: int, frac_train: float, data_seed: int, operation: str = "add", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's split: ``torch.manual_seed(data_seed); torch.randperm(n)`` over the task's n pairs,
    the first ``int(n * frac_train)`` train. Returns pair ids (``a * p + b``); for addition (n = p²)
    they are the demo's indices.

    A private generator seeded the same way gives the same permutation without touching global RNG
    state; pass ``generator`` to keep drawing from it afterwards (label noise does).
    """
    generator = generator or torch.Generator().manual_seed(data_seed)
    ids = pair_ids(p, operation)
    perm = ids[torch.randperm(len(ids), generator=generator)]
    cutoff = int(len(ids) * frac_train)
    return perm[:cutoff], perm[cutoff:]


def noisy_labels(
    n_train: int, train_labels: torch.Tensor, p: int, label_noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which training examples get a wrong label, and which: ``round(label_noise * n_train)``
    positions drawn without replacement, each given a label drawn uniformly from the p - 1 wrong
    ones. Returns (positions in the training set, their noisy labels).

    Drawn from ``generator`` after the split's permutation, so the split does not depend on the noise.
    """
    n_noisy = round(label_noise * n_train)
    if n_noisy == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    chosen = torch.randperm(n_train, generator=generator)[:n_noisy]
    shift = torch.randint(1, p, (n_noisy,), generator=generator)  # never 0: the label always changes
    return chosen, (train_labels[chosen] + shift) % p


@dataclass
class Split:
    """Train and test tensors of one run, on the training device (train labels with their noise)."""

    train_indices: torch.Tensor
    test_indices: torch.Tensor
    train_tokens: torch.Tensor
    train_labels: torch.Tensor
    test_tokens: torch.Tensor
    test_labels: torch.Tensor
    # pair ids whose training label is noise (ascending) and the labels they were given
    noisy_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    noisy_labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def make_split(
    p: int,
    frac_train: float,
    data_seed: int,
    device: str | torch.device = "cpu",
    *,
    operation: str = "add",
    label_noise: float = 0.0,
) -> Split:
    """The run's split of the task's pairs, its tokens and labels (see the module docstring).

    Example:
        >>> split = make_split(13, 0.5, 598, operation="sub", label_noise=0.1)
        >>> len(split.train_indices), len(split.noisy_indices)
        (84, 8)
    """
    generator = torch.Generator().manual_seed(data_seed)
    train_ids, test_ids = split_indices(p, frac_train, data_seed, operation, generator)
    train_labels = labels_of(train_ids, p, operation)
    positions, noisy = noisy_labels(len(train_ids), train_labels, p, label_noise, generator)
    train_labels[positions] = noisy
    order = train_ids[positions].argsort()  # recorded by pair id
    return Split(
        train_indices=train_ids,
        test_indices=test_ids,
        train_tokens=tokens_of(train_ids, p).to(device),
        train_labels=train_labels.to(device),
        test_tokens=tokens_of(test_ids, p).to(device),
        test_labels=labels_of(test_ids, p, operation).to(device),
        noisy_indices=train_ids[positions][order],
        noisy_labels=noisy[order],
    )
