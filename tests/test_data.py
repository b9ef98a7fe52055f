"""The dataset and split are the TransformerLens grokking demo's, token for token."""

import pytest
import torch
from demo_reference import demo_dataset

from grokpipe.training.data import all_pairs, make_split, split_indices


@pytest.mark.parametrize("p,frac,seed", [(113, 0.3, 598), (31, 0.6, 598), (7, 0.5, 1)])
def test_split_equals_demo(p, frac, seed):
    dataset, labels, train_idx, test_idx = demo_dataset(p, frac, seed)
    tokens, ours_labels = all_pairs(p)
    assert torch.equal(tokens, dataset) and torch.equal(ours_labels, labels)
    ours_train, ours_test = split_indices(p, frac, seed)
    assert torch.equal(ours_train, train_idx) and torch.equal(ours_test, test_idx)
    split = make_split(p, frac, seed)
    assert torch.equal(split.train_tokens, dataset[train_idx])
    assert torch.equal(split.test_labels, labels[test_idx])


def test_split_partitions_all_pairs_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    train, test = split_indices(31, 0.6, 598)
    assert torch.equal(torch.rand(3), expected_next)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(31 * 31))
    assert len(train) == int(31 * 31 * 0.6)
