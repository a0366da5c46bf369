"""Round-to-nearest quantization (backend/quant/rtn.py) and width mixing (backend/quant/allocate.py)."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant import format as fmt
from trimtab.backend.quant.allocate import LayerGroups, mix_adjacent_widths, planned_bits
from trimtab.backend.quant.rtn import quantize_rtn, width_priority


def weights(out=48, inputs=100, seed=0) -> torch.Tensor:
    """Gaussian weights with a few outliers and a skewed group, like real layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inputs, generator=g) * 0.05
    w[torch.rand(out, inputs, generator=g) < 0.01] *= 8
    w[:, :20] += 0.03
    return w


def plain_rtn_error(w: torch.Tensor, sizes, bits) -> torch.Tensor:
    """Per (group, column) squared error of plain min/max round-to-nearest, scale and min as float16."""
    errors, start = [], 0
    for n, b in zip(sizes, bits):
        block = w[:, start:start + n]                                   # [out, n]
        lo, hi = block.amin(1, keepdim=True), block.amax(1, keepdim=True)
        s, m = ((hi - lo) / (2 ** b - 1)).half().float(), lo.half().float()
        q = ((block - m) / s).round().clamp(0, 2 ** b - 1)
        errors.append((q * s + m - block).square().sum(1))
        start += n
    return torch.stack(errors)                                          # [groups, out]


def rtn_error(w: torch.Tensor, sizes, bits) -> torch.Tensor:
    diff = (fmt.dequantize(quantize_rtn(w, sizes, bits)) - w).square()
    return torch.stack([part.sum(1) for part in diff.split(list(sizes), dim=1)])


@pytest.mark.parametrize("bits", fmt.WIDTHS)
def test_scale_search_never_worse_than_plain_min_max(bits):
    w = weights(seed=bits)
    sizes = fmt.split_groups(100, 32)                                   # ragged last group of 4
    ours, plain = rtn_error(w, sizes, [bits] * 4), plain_rtn_error(w, sizes, [bits] * 4)
    assert (ours <= plain * (1 + 1e-5) + 1e-12).all()
    assert ours.sum() < 0.95 * plain.sum()                              # and clearly better overall


def test_error_falls_with_width():
    w, sizes = weights(), fmt.split_groups(100, 64)
    errors = [rtn_error(w, sizes, [b] * len(sizes)).sum().item() for b in fmt.WIDTHS]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 1000


def test_constant_and_mixed_groups():
    w = weights()
    w[:, 32:64] = 0.25                                                  # a group with one value per column
    layer = quantize_rtn(w, [32, 32, 36], [2, 8, 5])
    assert layer.group_bits.tolist() == [2, 8, 5] and layer.in_features == 100
    assert torch.allclose(fmt.dequantize(layer)[:, 32:64], w[:, 32:64], atol=1e-3)


def tiny_layers(seed=0) -> list[LayerGroups]:
    shapes = {"l.0.self_attn.q_proj": (64, 64), "l.0.self_attn.v_proj": (32, 64),
              "l.0.mlp.up_proj": (96, 64), "l.0.mlp.down_proj": (64, 96)}
    layers = []
    for i, (name, (out, inputs)) in enumerate(shapes.items()):
        sizes = fmt.split_groups(inputs, 32)
        priority = width_priority(name, weights(out, inputs, seed + i), sizes)
        layers.append(LayerGroups(name, out, tuple(sizes), tuple(priority)))
    return layers


@pytest.mark.parametrize("target", [3.03, 3.5, 4.25, 4.5, 5.1, 6.0, 6.9, 7.5, 8.0])
def test_width_mixing_lands_at_or_just_under_the_target(target):
    layers = tiny_layers()
    widths = mix_adjacent_widths(layers, target)
    total = sum(layer.weights for layer in layers)
    bits = sum(planned_bits(layer.out_features, layer.group_sizes, widths[layer.name]) for layer in layers)
    used = sorted({b for ws in widths.values() for b in ws})
    assert len(used) <= 2 and (len(used) == 1 or fmt.WIDTHS.index(used[1]) == fmt.WIDTHS.index(used[0]) + 1)
    cheapest_upgrade = min(n * layer.out_features for layer in layers for n in layer.group_sizes) * 2
    assert target * total - cheapest_upgrade < bits <= target * total
    # the plan's accounting is the quantized layers' own
    quantized = {layer.name: quantize_rtn(weights(layer.out_features, sum(layer.group_sizes)),
                                          layer.group_sizes, widths[layer.name]) for layer in layers}
    assert sum(q.bits() for q in quantized.values()) == bits


def test_sensitive_layers_get_wider_widths_first():
    # groups of 32 at 3 bits take 4.0 bits per weight: 4.75 upgrades three quarters of the weights to 4 bits,
    # v_proj (tier 2) and down_proj (tier 1) first, then the groups with the widest ranges of q_proj and up_proj
    widths = mix_adjacent_widths(tiny_layers(), 4.75)
    assert set(widths["l.0.self_attn.v_proj"]) == set(widths["l.0.mlp.down_proj"]) == {4}
    assert 3 in widths["l.0.self_attn.q_proj"] + widths["l.0.mlp.up_proj"]


def test_target_below_the_smallest_width_is_a_clear_error():
    with pytest.raises(TrimtabError, match=r"below what these groups allow: every group at 2 bits already takes 3\.02"):
        mix_adjacent_widths(tiny_layers(), 2.5)
