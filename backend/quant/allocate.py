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
