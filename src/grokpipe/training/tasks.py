"""The binary operations on Z_p a run can learn (``task.operation``): the grokking literature's tasks.

Every task uses the demo's tokens ``[a, b, =]`` (vocabulary p + 1, ``=`` is token p) and labels in
``0..p-1``. Pairs are identified by their id ``a * p + b`` in the p x p grid, whatever the task:
``train_indices``/``test_indices`` of metadata.json hold such ids, so a pair's operands are
``divmod(id, p)``. Division leaves out the pairs with b = 0 (they have no label); every other task
is defined on all p² pairs.

Add (the default) is Nanda et al. 2023's task; add, sub, mul, div and the polynomials are Power et
al. 2022's, whose two parity-mixed tasks take a and b as their representatives in 0..p-1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the workflow's parse reads only the names
    import torch


def inverses(p: int) -> torch.Tensor:
    """Multiplicative inverses mod p by residue (index 0 holds 0: zero has none)."""
    import torch

    return torch.tensor([0] + [pow(b, -1, p) for b in range(1, p)], dtype=torch.long)


def _div(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    return a * inverses(p)[b] % p


def _either(condition: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """Elementwise choice for a 0/1 integer ``condition``."""
    return condition * if_true + (1 - condition) * if_false


@dataclass(frozen=True)
class Operation:
    """One task: its config name, its formula as the papers write it, and its labels."""

    name: str
    formula: str
    labels_of: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    all_pairs: bool = True  # False: pairs with b = 0 are left out (division)


# Cubes are reduced mod p before their last factor, so no intermediate exceeds 3p²: nothing
# overflows int64 for any p whose p² pairs fit in memory.
OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("add", "a + b", lambda a, b, p: (a + b) % p),
        Operation("sub", "a - b", lambda a, b, p: (a - b) % p),
        Operation("mul", "a * b", lambda a, b, p: a * b % p),
        Operation("div", "a / b (b != 0)", _div, all_pairs=False),
        Operation("sq_sum", "a^2 + b^2", lambda a, b, p: (a * a + b * b) % p),
        Operation("sq_sum_ab", "a^2 + ab + b^2", lambda a, b, p: (a * a + a * b + b * b) % p),
        Operation("sq_sum_ab_a", "a^2 + ab + b^2 + a", lambda a, b, p: (a * a + a * b + b * b + a) % p),
        Operation("cube_ab", "a^3 + ab", lambda a, b, p: (a * a % p * a + a * b) % p),
        Operation("cube_ab2_b", "a^3 + ab^2 + b", lambda a, b, p: (a * a % p * a + a * (b * b % p) + b) % p),
        Operation(
            "div_odd_sub",
            "a / b if b is odd, else a - b",
            lambda a, b, p: _either(b % 2, _div(a, b, p), (a - b) % p),
        ),
        Operation(
            "add_even_mul",
            "a + b if a is even, else a * b",
            lambda a, b, p: _either(1 - a % 2, (a + b) % p, a * b % p),
        ),
    )
}
OPERATION_NAMES = tuple(OPERATIONS)


def operation(name: str) -> Operation:
    """The task called ``name``; a ValueError lists the known ones."""
    try:
        return OPERATIONS[name]
    except KeyError:
        raise ValueError(f"unknown operation {name!r} (known: {', '.join(OPERATION_NAMES)})") from None


def pair_ids(p: int, operation_name: str = "add") -> torch.Tensor:
    """Ids ``a * p + b`` of the pairs the task is defined on, ascending."""
    import torch

    ids = torch.arange(p * p)
    return ids if operation(operation_name).all_pairs else ids[ids % p != 0]


def tokens_of(ids: torch.Tensor, p: int) -> torch.Tensor:
    """Inputs ``[a, b, p]`` of the pairs with these ids, (n, 3)."""
    import torch

    return torch.stack([ids // p, ids % p, torch.full_like(ids, p)], dim=1)


def labels_of(ids: torch.Tensor, p: int, operation_name: str = "add") -> torch.Tensor:
    """The task's (clean) labels of the pairs with these ids."""
    op = operation(operation_name)
    a, b = ids // p, ids % p
    if not op.all_pairs and bool((b == 0).any()):
        raise ValueError(f"{operation_name} is not defined for pairs with b = 0")
    return op.labels_of(a, b, p)


def n_pairs(p: int, operation_name: str = "add") -> int:
    """How many pairs the task is defined on (p², or p(p - 1) for division)."""
    return p * p if operation(operation_name).all_pairs else p * (p - 1)
