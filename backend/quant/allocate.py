"""Which width each group of each layer gets, so that the layers' exact bits per weight (format.py's
accounting: q values, scales, mins, group metadata) lands at or just under a target.

    widths = mix_adjacent_widths(layers, target_bpw)     # {layer name: [width per group]}

Every group starts at the widest width w in WIDTHS that keeps the whole set within the target; the
bits left over then upgrade groups to the next width in WIDTHS, best `priority` first, as long as
each upgrade still fits. What is left over at the end is less than the cheapest group upgrade.
`priority` is what the quantizer expects a wider width to buy, per bit (the rtn method gives the
squared range of the group's weights; a measured allocation can pass measured error instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant.format import WIDTHS, QuantizedLinear


@dataclass(frozen=True)
class LayerGroups:
    name: str
    out_features: int
    group_sizes: tuple[int, ...]
    priority: tuple[float, ...]     # per group: gain per bit of the next width (higher upgrades first)

    @property
    def weights(self) -> int:
        return self.out_features * sum(self.group_sizes)


def planned_bits(out_features: int, group_sizes: Sequence[int], group_bits: Sequence[int]) -> int:
    """QuantizedLinear.bits() of a layer with these groups, before it is quantized: format.py's
    accounting run on a shell whose tensors have shapes but no data."""
    groups = len(group_sizes)
    shell = QuantizedLinear(
        qweight=torch.empty(0, out_features, dtype=torch.int32, device="meta"),
        scales=torch.empty(groups, out_features, dtype=torch.float16, device="meta"),
        mins=torch.empty(groups, out_features, dtype=torch.float16, device="meta"),
        group_bits=torch.tensor(list(group_bits), dtype=torch.uint8),
        group_sizes=torch.tensor(list(group_sizes), dtype=torch.int32))
    return shell.bits()


def uniform_bits(layers: Sequence[LayerGroups], width: int) -> int:
    return sum(planned_bits(layer.out_features, layer.group_sizes, [width] * len(layer.group_sizes))
               for layer in layers)


def mix_adjacent_widths(layers: Sequence[LayerGroups], target_bpw: float) -> dict[str, list[int]]:
    """Per layer, the width of each group: two adjacent widths, at or just under target_bpw overall."""
    total_weights = sum(layer.weights for layer in layers)
    budget = int(target_bpw * total_weights)
    fitting = [w for w in WIDTHS if uniform_bits(layers, w) <= budget]
    if not fitting:
        lowest = uniform_bits(layers, WIDTHS[0]) / total_weights
        raise TrimtabError(f"{target_bpw:g} bits per weight is below what these groups allow: every group at "
                           f"{WIDTHS[0]} bits already takes {lowest:.3f} (scales included); ask for more bits "
                           "or larger groups")
    base = fitting[-1]
    widths = {layer.name: [base] * len(layer.group_sizes) for layer in layers}
    if base == WIDTHS[-1]:
        return widths
    wider = WIDTHS[WIDTHS.index(base) + 1]
    left = budget - uniform_bits(layers, base)
    # an upgrade adds (wider - base) bits to each of the group's q values; nothing else changes
    upgrades = sorted(((priority, layer.name, g, size * layer.out_features * (wider - base))
                       for layer in layers
                       for g, (size, priority) in enumerate(zip(layer.group_sizes, layer.priority))),
                      key=lambda u: -u[0])
    for _, name, g, cost in upgrades:
        if cost <= left:
            widths[name][g] = wider
            left -= cost
    return widths


# -- allocation by measured error (the gptq method) -------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """One candidate layout of one layer: every group at `bits`, groups of `group_size` rows, rows in
    act-order (with a stored perm) or in their own order."""
    group_size: int
    bits: int
    cost: int            # stored bits, exactly as format.py counts them (perm included)
    error: float         # the layer's weighted output error at this layout (measure.py)
    act_order: bool = True


def lagrangian(options: dict[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """Minimise Σ error subject to Σ cost ≤ budget: bisect the price λ of a bit until every layer's own
    best trade (error + λ·cost) fits the budget, then spend what is left on the upgrades that buy the
    most error per bit. Fast, and optimal at the points the price reaches (the convex hull of each
    layer's choices); between them the greedy fill is close but not exact."""
    _check_budget(options, budget)

    def pick(price: float) -> dict[str, Choice]:
        return {name: min(choices, key=lambda c: (c.error + price * c.cost, c.cost)) for name, choices in options.items()}

    low, high = 0.0, 1.0
    while sum(c.cost for c in pick(high).values()) > budget:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        if sum(c.cost for c in pick(middle).values()) > budget:
            low = middle
        else:
            high = middle
    return _fill(options, pick(high), budget)


def dynamic_programming(options: dict[str, list[Choice]], budget: int, resolution: int = 8192) -> dict[str, Choice]:
    """Minimise Σ error subject to Σ cost ≤ budget exactly, on costs rounded up to units of budget /
    resolution (so the true total never exceeds the budget): the multiple-choice knapsack, layer by
    layer over every number of units, then the rounding's slack spent greedily."""
    import numpy as np

    _check_budget(options, budget)
    unit = -(-budget // resolution)
    capacity = budget // unit
    names = list(options)
    best = np.zeros(capacity + 1)                       # least error of the layers so far within u units
    picks = []
    for name in names:
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for i, choice in enumerate(options[name]):
            units = -(-choice.cost // unit)
            if units > capacity:
                continue
            trial = np.full(capacity + 1, np.inf)
            trial[units:] = best[:capacity + 1 - units] + choice.error
            better = trial < new
            new[better], pick[better] = trial[better], i
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):
        raise TrimtabError("the budget is too small for every layer's smallest layout once rounded; "
                           "ask for a few more bits per weight")
    chosen, u = {}, capacity
    for name, pick in zip(reversed(names), reversed(picks)):
        choice = options[name][int(pick[u])]
        chosen[name] = choice
        u -= -(-choice.cost // unit)
    return _fill(options, chosen, budget)


ALLOCATORS = {"dp": dynamic_programming, "lagrangian": lagrangian}


def _check_budget(options: dict[str, list[Choice]], budget: int) -> None:
    smallest = sum(min(c.cost for c in choices) for choices in options.values())
    if smallest > budget:
        weights = sum(_weights_of(choices) for choices in options.values())
        raise TrimtabError(f"{budget / weights:.4g} bits per weight is below what these groups allow: every layer at "
                           f"its smallest layout already takes {smallest / weights:.3f} (scales included); "
                           "ask for more bits")


def _weights_of(choices: list[Choice]) -> int:
    # cost = weights·bits + overhead for every choice, so two choices at different widths and one group size
    # give the count; the bits of q values are exact multiples of the weights
    a = choices[0]
    b = next(c for c in choices if (c.group_size, c.act_order) == (a.group_size, a.act_order) and c.bits != a.bits)
    return (b.cost - a.cost) // (b.bits - a.bits)


def _fill(options: dict[str, list[Choice]], chosen: dict[str, Choice], budget: int) -> dict[str, Choice]:
    """Spend the bits left on single-layer upgrades, most error saved per bit first, while they fit."""
    left = budget - sum(c.cost for c in chosen.values())
    while True:
        best, best_rate = None, 0.0
        for name, choices in options.items():
            now = chosen[name]
            for c in choices:
                extra = c.cost - now.cost
                if 0 < extra <= left and c.error < now.error and (now.error - c.error) / extra > best_rate:
                    best, best_rate = (name, c), (now.error - c.error) / extra
        if best is None:
            return chosen
        left -= best[1].cost - chosen[best[0]].cost
        chosen[best[0]] = best[1]
