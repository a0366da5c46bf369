"""The canonical quantized format (backend/quant/format.py): bit-stream packing, the reference
dequantiser against the formula by hand, exact bits accounting, and validation errors."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant import format as fmt


def random_q(size: int, out: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (size, out), generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", fmt.WIDTHS)
@pytest.mark.parametrize("size", [1, 5, 31, 32, 33, 64, 100, 128])
def test_pack_unpack_round_trip(bits, size):
    q = random_q(size, 7, bits, seed=size * 10 + bits)
    words = fmt.pack_group(q, bits)
    assert words.dtype == torch.int32 and words.shape == (fmt.packed_words(size, bits), 7)
    assert torch.equal(fmt.unpack_group(words, size, bits), q)


def test_bit_stream_layout_by_hand():
    # one column, width 3: rows 1, 2, 7 occupy stream bits 0-2, 3-5, 6-8 of word 0
    words = fmt.pack_group(torch.tensor([[1], [2], [7]], dtype=torch.uint8), 3)
    assert words.tolist() == [[1 | 2 << 3 | 7 << 6]]
    # width 5: row 6 straddles words 0 and 1 (bits 30-34); bit 31 set reads back as a negative int32
    q = torch.zeros(7, 1, dtype=torch.uint8)
    q[6] = 0b10111
    words = fmt.pack_group(q, 5)
    assert words.tolist() == [[-(2 ** 31) | 1 << 30], [0b101]]


def mixed_layer(out=6, sizes=(32, 32, 7), bits=(4, 8, 3), perm=None, seed=0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.cat([random_q(n, out, b, seed + i) for i, (n, b) in enumerate(zip(sizes, bits))])
    scales = torch.rand(len(sizes), out, generator=g) * 0.1
    mins = torch.randn(len(sizes), out, generator=g) * 0.1
    return q, scales, mins, fmt.pack(q, scales, mins, bits, sizes, perm)


def test_mixed_widths_round_trip():
    q, _, _, layer = mixed_layer()
    assert torch.equal(fmt.unpack(layer), q)
    assert layer.in_features == 71 and layer.out_features == 6


def test_dequantize_follows_the_formula():
    sizes, out = (32, 32, 7), 6
    q, scales, mins, layer = mixed_layer(out, sizes)
    w = fmt.dequantize(layer)
    assert w.shape == (out, sum(sizes))
    start = 0
    for g, n in enumerate(sizes):
        for r in range(n):
            for o in range(out):
                expected = q[start + r, o].item() * scales[g, o].half().item() + mins[g, o].half().item()
                assert w[o, start + r].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
        start += n


def test_act_order_puts_rows_back():
    perm = torch.randperm(71, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    _, _, _, plain = mixed_layer()
    q, scales, mins, _ = mixed_layer()
    permuted = fmt.pack(q, scales, mins, (4, 8, 3), (32, 32, 7), perm)
    # quantized row i is original input row perm[i]
    assert torch.equal(fmt.dequantize(permuted)[:, perm.long()], fmt.dequantize(plain))


def test_bits_accounting_for_576_wide_layer():
    # 576 rows in groups of 128 with a ragged last group of 64, widths mixed 4 and 5
    sizes, bits, out = [128, 128, 128, 128, 64], [4, 5, 4, 5, 4], 576
    assert fmt.split_groups(576, 128) == sizes
    q = torch.cat([random_q(n, out, b) for n, b in zip(sizes, bits)])
    layer = fmt.pack(q, torch.rand(5, out), torch.rand(5, out), bits, sizes)
    q_bits = out * (128 * 4 + 128 * 5 + 128 * 4 + 128 * 5 + 64 * 4)   # 576 × 2560
    scale_bits = 5 * out * (16 + 16)                                  # a float16 scale and min per (group, column)
    meta_bits = 5 * (8 + 32)                                          # each group's width and size
    assert layer.bits() == q_bits + scale_bits + meta_bits == 1_566_920
    assert layer.bits_per_weight() == pytest.approx(1_566_920 / (576 * 576))
    with_perm = fmt.pack(q, torch.rand(5, out), torch.rand(5, out), bits, sizes, torch.arange(576))
    assert with_perm.bits() == layer.bits() + 576 * 32
    assert fmt.bits_per_weight({"a": layer, "b": with_perm}) == (2 * layer.bits() + 576 * 32) / (2 * 576 * 576)


def test_split_groups_fit_any_dimension():
    assert fmt.split_groups(576, 64) == [64] * 9
    assert fmt.split_groups(100, 32) == [32, 32, 32, 4]
    assert fmt.split_groups(20, 32) == [20]


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("blk.q_proj.scales"), "missing tensor blk.q_proj.scales"),
    (lambda t: t["blk.q_proj.group_bits"].__setitem__(1, 7), "width 7 is not one of"),
    (lambda t: t.update({"blk.q_proj.qweight": t["blk.q_proj.qweight"][:-1]}),
     r"qweight is \[.*\], but its groups need"),
    (lambda t: t.update({"blk.q_proj.mins": t["blk.q_proj.mins"][:2]}), "must both be"),
    (lambda t: t.update({"blk.q_proj.scales": t["blk.q_proj.scales"].float()}), "scales must be torch.float16"),
    (lambda t: t["blk.q_proj.group_sizes"].__setitem__(2, 0), "positive"),
    (lambda t: t["blk.q_proj.scales"].__setitem__((0, 0), float("inf")), "inf or NaN"),
    (lambda t: t.update({"blk.q_proj.perm": torch.zeros(71, dtype=torch.int32)}), "not a permutation"),
])
def test_malformed_layers_are_named(change, message):
    tensors = {k: v.clone() for k, v in mixed_layer()[3].tensors("blk.q_proj").items()}
    change(tensors)
    with pytest.raises(TrimtabError, match=message) as error:
        fmt.from_tensors(tensors, "blk.q_proj")
    assert "blk.q_proj" in str(error.value)
