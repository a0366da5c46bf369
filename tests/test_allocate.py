"""Allocation of one layout per layer from measured errors (backend/quant/allocate.py): both methods
stay within the budget, dynamic programming finds the optimum a brute force finds, the Lagrangian comes
close, and a budget below the smallest layouts is a clear error."""
from __future__ import annotations

import itertools

import pytest
import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant.allocate import Choice, dynamic_programming, lagrangian


def random_options(layers=6, seed=0) -> dict[str, list[Choice]]:
    """Layers of different sizes and sensitivities; error falls about 4× per extra bit, as in measurements."""
    g = torch.Generator().manual_seed(seed)
    options = {}
    for i in range(layers):
        weights = int(torch.randint(1, 5, (1,), generator=g)) * 4096
        sensitivity = float(torch.rand(1, generator=g)) * 10 + 0.1
        choices = []
        for group_size, overhead in ((128, 0.25), (32, 1.0)):
            for bits in (2, 3, 4, 5, 6, 8):
                error = sensitivity * 4.0 ** -bits * (0.8 if group_size == 32 else 1.0)
                choices.append(Choice(group_size, bits, int(weights * (bits + overhead)), error))
        options[f"layer{i}"] = choices
    return options


def total(chosen, what):
    return sum(getattr(c, what) for c in chosen.values())


def brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        if sum(c.cost for c in combo) <= budget:
            error = sum(c.error for c in combo)
            best = error if best is None else min(best, error)
    return best


@pytest.mark.parametrize("seed, bpw", [(0, 3.0), (1, 4.1), (2, 5.5)])
def test_dynamic_programming_finds_the_optimum_and_lagrangian_comes_close(seed, bpw):
    options = random_options(layers=4, seed=seed)
    weights = sum(c.cost - c2.cost for c, c2 in ((o[1], o[0]) for o in options.values()))  # one bit each
    budget = int(bpw * weights)
    optimum = brute_force(options, budget)
    dp, lg = dynamic_programming(options, budget, resolution=1 << 16), lagrangian(options, budget)
    assert total(dp, "cost") <= budget and total(lg, "cost") <= budget
    assert total(dp, "error") == pytest.approx(optimum, rel=1e-9)
    assert optimum <= total(lg, "error") <= 1.5 * optimum


def test_more_bits_never_cost_error_and_the_budget_is_spent():
    options = random_options(layers=30, seed=3)
    weights = sum(o[1].cost - o[0].cost for o in options.values())
    errors = []
    for bpw in (2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
        chosen = dynamic_programming(options, int(bpw * weights))
        assert bpw * weights - 8 * 16384 < total(chosen, "cost") <= bpw * weights   # less than one upgrade left
        errors.append(total(chosen, "error"))
    assert errors == sorted(errors, reverse=True)


def test_a_budget_below_every_smallest_layout_is_a_clear_error():
    options = random_options()
    weights = sum(o[1].cost - o[0].cost for o in options.values())
    for allocate in (dynamic_programming, lagrangian):
        with pytest.raises(TrimtabError, match=r"2 bits per weight is below what these groups allow: every layer "
                                               r"at its smallest layout already takes 2\.250"):
            allocate(options, 2 * weights)
