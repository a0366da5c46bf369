"""The CPU quantized-linear kernels (csrc/qlinear*.cpp) against the reference dequantiser.

Every kernel is compared with F.linear on format.dequantize's W, in float64, element by element:
- fp32, scalar and dequant kernels: float-rounding error only, |Δy| <= FP32_TOLERANCE * M where
  M = Σ_r (|q s| + |m|) |x_r| is the size of the terms summed (the min terms included);
- the int8 kernel also rounds x: each block of 32 rows of a group (quantized order) is scaled so
  its largest |x| maps to 127, so x is off by at most d/2 (d = max|x| / 127 over the block).
  The kernel's integer dot products are exact, the mins meet the exact sums of x, and the sum of
  the rounding errors over a group centres the weights on c = (2^bits - 1) / 2 (csrc/qlinear_kernels.cpp,
  int8_tile), so the only error left is s Σ (q - c)(x̂ - x):
      |Δy[o]| <= Σ_g |s[g,o]| Σ_blocks d/2 · Σ_(r in block) |q[r,o] - c_g|   (+ fp32 rounding)
  which int8_bound computes.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from trimtab.backend import ops
from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant import format as qformat
from trimtab.backend.quant.kernels import CpuPackedLinear, DequantizedLinear, PackedLinear

WIDTHS = qformat.WIDTHS
EXACT_KERNELS = ["fp32", "scalar", "dequant"]
FP32_TOLERANCE = 2e-6  # relative to M; observed <= 3e-7 (a few float32 ulps over sums of <= 1000 terms)
BLOCK_ROWS = 32        # activation blocks of the int8 kernel (csrc/qlinear.h kBlockRows)


@pytest.fixture(scope="module", autouse=True)
def engine():
    ops.load_extension()


def random_layer(widths, sizes, out_features, *, perm=False, seed=0, q_fill=None) -> qformat.QuantizedLinear:
    """A canonical layer with random q (or all q_fill(bits)), scales and mins like a real layer's."""
    gen = torch.Generator().manual_seed(seed)
    in_features = sum(sizes)
    q = torch.cat([torch.randint(0, 2 ** b, (n, out_features), generator=gen) if q_fill is None
                   else torch.full((n, out_features), q_fill(b)) for b, n in zip(widths, sizes)])
    groups = len(sizes)
    scales = torch.rand(groups, out_features, generator=gen) * 0.02 + 1e-3
    mins = -torch.rand(groups, out_features, generator=gen) * 0.1
    order = torch.randperm(in_features, generator=gen).to(torch.int32) if perm else None
    return qformat.pack(q, scales, mins, widths, sizes, order)


@functools.lru_cache(maxsize=None)
def layer_and_oracle(widths: tuple, sizes: tuple, out: int, perm: bool = False):
    """One random layer and its Oracle, shared by the batch sizes of a test (format.py is slow)."""
    layer = random_layer(list(widths), list(sizes), out, perm=perm)
    return layer, Oracle(layer)


def packed_args(layer: qformat.QuantizedLinear):
    packed = ops.qlinear_pack(layer.qweight, layer.scales, layer.mins, layer.group_bits, layer.group_sizes)
    return packed, layer.group_bits, layer.group_sizes, layer.perm


def run(layer, x, bias=None, kernel="auto"):
    packed, bits, sizes, perm = packed_args(layer)
    return ops.qlinear(x, packed, bits, sizes, perm, bias, layer.out_features, kernel)


class Oracle:
    """The reference for one layer, from format.dequantize and format.unpack (once per layer: slow)."""

    def __init__(self, layer: qformat.QuantizedLinear):
        self.layer = layer
        self.w = qformat.dequantize(layer).double()                                 # [out, in]
        q = qformat.unpack(layer).double()                                          # [in, out], quantized order
        sizes = layer.group_sizes.long()
        s = layer.scales.double().repeat_interleave(sizes, 0)                       # [in, out]
        m = layer.mins.double().repeat_interleave(sizes, 0)
        self.terms = (q * s).abs() + m.abs()                                        # [in, out]
        # The int8 kernel's activation blocks: 32 rows at a time from each group's start.
        blocks, weights, start = [], [], 0
        for g, (size, bits) in enumerate(zip(layer.group_sizes.tolist(), layer.group_bits.tolist())):
            centre = (2 ** bits - 1) / 2
            for first in range(0, size, BLOCK_ROWS):
                rows = slice(start + first, start + min(first + BLOCK_ROWS, size))
                blocks.append(rows)
                weights.append((q[rows] - centre).abs().sum(0) * layer.scales[g].double().abs())
            start += size
        self.blocks = blocks                                                        # row slices
        self.block_weights = torch.stack(weights)                                   # [blocks, out]

    def __call__(self, x, bias=None) -> torch.Tensor:
        return F.linear(x.double(), self.w, None if bias is None else bias.double())

    def quantized_order(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in] → [B, in] in quantized row order (x[..., perm])."""
        return x if self.layer.perm is None else x[..., self.layer.perm.long()]

    def term_magnitude(self, x) -> torch.Tensor:
        """M [B, out] = Σ_r (|q s| + |m|) |x_r|: the scale of the float rounding error."""
        return self.quantized_order(x).double().abs() @ self.terms

    def int8_bound(self, x) -> torch.Tensor:
        """The largest |Δy| [B, out] that rounding x to int8 per 32-row block can cause (module docstring)."""
        xq = self.quantized_order(x).double().abs()                                 # [B, in]
        half_steps = torch.stack([xq[:, rows].amax(dim=1) / 127 / 2 for rows in self.blocks], dim=1)  # [B, blocks]
        return half_steps @ self.block_weights

    def check(self, x, y, bias=None, *, int8: bool):
        """y within the float-rounding bound of the reference (plus the int8 bound for int8)."""
        layer = self.layer
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
        x2 = x.reshape(-1, layer.in_features).float()
        ref = self(x2, bias)
        allowed = FP32_TOLERANCE * self.term_magnitude(x2) + 1e-12
        if int8:
            allowed = allowed + self.int8_bound(x2) * (1 + 1e-5)
        error = (y.reshape(ref.shape).double() - ref).abs()
        worst = (error / allowed).max().item()
        assert worst <= 1.0, f"error {worst:.3g} x the allowed bound"


# ---- every width, odd shapes, batch sizes, perm and bias ------------------------------------------


SHAPES = [  # (group widths, group sizes, out): ragged last groups, in/out not multiples of 8 or 64
    ("single-ragged", lambda b: ([b], [37], 100)),
    ("groups-of-32", lambda b: ([b] * 4, qformat.split_groups(100, 32), 37)),
    ("576-in-128s", lambda b: ([b] * 5, qformat.split_groups(576, 128), 200)),
    ("577-in-128s", lambda b: ([b] * 5, qformat.split_groups(577, 128), 203)),
]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("shape", [s[1] for s in SHAPES], ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_every_width_matches_reference(bits, shape, batch):
    widths, sizes, out = shape(bits)
    layer, oracle = layer_and_oracle(tuple(widths), tuple(sizes), out)
    x = torch.randn(batch, sum(sizes))
    for kernel in EXACT_KERNELS:
        oracle.check(x, run(layer, x, kernel=kernel), int8=False)
    oracle.check(x, run(layer, x, kernel="int8"), int8=True)
    oracle.check(x, run(layer, x, kernel="auto"), int8=True)


MIXED = [  # every width inside one matrix, in several orders and group sizes
    ([2, 3, 4, 5, 6, 8], [128, 128, 64, 100, 92, 65], 577),
    ([8, 6, 5, 4, 3, 2, 4], [32, 32, 32, 32, 32, 32, 1], 37),
    ([4, 6, 4, 2, 8], [128, 128, 128, 128, 64], 1000),
    ([3, 5], [1000, 536], 100),
]


@pytest.mark.parametrize("widths,sizes,out", MIXED)
@pytest.mark.parametrize("perm", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_mixed_widths_with_perm_and_bias(widths, sizes, out, perm, batch):
    layer, oracle = layer_and_oracle(tuple(widths), tuple(sizes), out, perm)
    bias = torch.randn(out)
    x = torch.randn(batch, sum(sizes)) * 2
    for kernel in EXACT_KERNELS:
        oracle.check(x, run(layer, x, bias, kernel), bias, int8=False)
    oracle.check(x, run(layer, x, bias, "int8"), bias, int8=True)


def test_long_inputs_and_many_rows_cross_the_int8_row_chunks():
    # int8 activations go in chunks of at most 256 KiB of rows (28 rows of 8224 bytes here)
    layer, oracle = layer_and_oracle((4, 6, 3), (4096, 4000, 104), 40)
    x = torch.randn(61, 8200)
    oracle.check(x, run(layer, x, kernel="int8"), int8=True)


def test_outlier_activations_stay_within_the_int8_bound():
    layer = random_layer([4, 6, 8], [128, 128, 128], 96, seed=7)
    x = torch.randn(5, 384)
    x[:, [3, 200, 301]] = torch.tensor([60.0, -80.0, 45.0])  # LLM-style outlier channels
    Oracle(layer).check(x, run(layer, x, kernel="int8"), int8=True)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("q_fill", [lambda b: 2 ** b - 1, lambda b: 0], ids=["q-max", "q-zero"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_q_and_x_do_not_saturate(bits, q_fill, sign):
    # every x at the int8 extreme (±127) against q at its extremes: the largest int16 pair sums
    layer = random_layer([bits] * 2, [64, 64], 16, q_fill=q_fill)
    x = torch.full((2, 128), sign * 3.0)
    Oracle(layer).check(x, run(layer, x, kernel="int8"), int8=True)


def test_zero_input_gives_the_bias():
    layer = random_layer([4, 8], [64, 40], 20)
    bias = torch.randn(20)
    for kernel in ["int8", *EXACT_KERNELS]:
        torch.testing.assert_close(run(layer, torch.zeros(3, 104), bias, kernel), bias.expand(3, 20))


def test_leading_dimensions_and_half_inputs():
    layer = random_layer([4, 5, 6], [64, 64, 64], 72, perm=True)
    oracle = Oracle(layer)
    x = torch.randn(2, 5, 192)
    oracle.check(x, run(layer, x), int8=True)
    for dtype in (torch.float16, torch.bfloat16):
        y = run(layer, x.to(dtype), kernel="fp32")
        assert y.dtype == dtype and y.shape == (2, 5, 72)
        expected = oracle(x.to(dtype).float().reshape(10, 192)).reshape(2, 5, 72)
        torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2)
    assert run(layer, torch.randn(0, 192)).shape == (0, 72)


# ---- threads and batching do not change results ---------------------------------------------------


@pytest.mark.parametrize("kernel", ["int8", "fp32", "scalar"])
def test_threads_and_batch_do_not_change_results(kernel):
    layer = random_layer([4, 6, 2, 8], [128, 128, 128, 64], 1000, perm=True)
    x = torch.randn(7, 448)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = run(layer, x, kernel=kernel)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(run(layer, x, kernel=kernel), single_thread)
    one_by_one = torch.cat([run(layer, x[i:i + 1], kernel=kernel) for i in range(7)])
    assert torch.equal(one_by_one, single_thread)


# ---- dequantized rows and PackedLinear --------------------------------------------------------------


@pytest.mark.parametrize("perm", [False, True], ids=["in-order", "act-order"])
def test_dequantized_rows_are_rows_of_w(perm):
    layer = random_layer([2, 3, 4, 5, 6, 8], [32, 40, 64, 7, 100, 33], 53, perm=perm)
    packed, bits, sizes, order = packed_args(layer)
    ids = torch.tensor([0, 52, 8, 7, 9, 8, 31])
    rows = ops.qlinear_dequantize_rows(packed, bits, sizes, order, 53, ids)
    torch.testing.assert_close(rows, qformat.dequantize(layer)[ids], rtol=1e-6, atol=1e-7)


def test_packed_linear_on_cpu_uses_the_kernels():
    layer = random_layer([4, 6, 4, 8, 5], [128, 128, 128, 128, 64], 300, perm=True)
    bias = torch.randn(300)
    linear = PackedLinear.from_canonical(layer, bias, "cpu")
    assert isinstance(linear, CpuPackedLinear)
    assert (linear.in_features, linear.out_features) == (576, 300)
    oracle = Oracle(layer)
    for shape in [(1, 576), (1, 1, 576), (3, 576), (2, 40, 576)]:
        x = torch.randn(shape)
        oracle.check(x, linear(x), bias, int8=True)  # auto: int8 with AVX2 (scalar or dequant without)
    ids = torch.tensor([5, 299, 0])
    torch.testing.assert_close(linear.dequantized_rows(ids), qformat.dequantize(layer)[ids], rtol=1e-6, atol=1e-7)


def test_dequantized_linear_is_the_reference_path():
    layer = random_layer([4, 8], [64, 36], 30, perm=True)
    bias = torch.randn(30)
    linear = DequantizedLinear(layer, bias, "cpu", torch.float32)
    x = torch.randn(4, 100)
    torch.testing.assert_close(linear(x), F.linear(x, qformat.dequantize(layer), bias))
    ids = torch.tensor([3, 29])
    torch.testing.assert_close(linear.dequantized_rows(ids), qformat.dequantize(layer)[ids])
    assert (linear.in_features, linear.out_features) == (100, 30)


# ---- malformed inputs ------------------------------------------------------------------------------


def _bad_calls():
    layer = random_layer([4, 8], [64, 40], 20, perm=True)
    packed, bits, sizes, perm = packed_args(layer)
    x = torch.randn(2, 104)
    call = ops.qlinear
    return [
        ("x must be", lambda: call(torch.randint(0, 3, (2, 104)), packed, bits, sizes, perm, None, 20)),
        ("x must be \\[..., 104\\]", lambda: call(torch.randn(2, 100), packed, bits, sizes, perm, None, 20)),
        ("packed must be \\[3, ", lambda: call(x, packed[:2], bits, sizes, perm, None, 20)),
        ("packed must be \\[", lambda: call(x, packed, bits, sizes, perm, None, 30)),
        ("packed must be Byte", lambda: call(x, packed.to(torch.int32), bits, sizes, perm, None, 20)),
        ("group_bits must be Byte", lambda: call(x, packed, bits.int(), sizes, perm, None, 20)),
        ("group_bits has 2 groups but group_sizes has 1", lambda: call(x, packed, bits, sizes[:1], perm, None, 20)),
        ("width 7", lambda: call(x, packed, torch.tensor([7, 8], dtype=torch.uint8), sizes, perm, None, 20)),
        ("perm must have 104 entries", lambda: call(x, packed, bits, sizes, perm[:50], None, 20)),
        ("perm holds an entry outside", lambda: call(x, packed, bits, sizes, perm * 2, None, 20)),
        ("bias must be", lambda: call(x, packed, bits, sizes, perm, torch.randn(19), 20)),
        ("kernel must be", lambda: call(x, packed, bits, sizes, perm, None, 20, "fast")),
        ("qweight has", lambda: ops.qlinear_pack(layer.qweight[1:], layer.scales, layer.mins, bits, sizes)),
        ("scales and mins must both be", lambda: ops.qlinear_pack(layer.qweight, layer.scales[:1], layer.mins,
                                                                  bits, sizes)),
        ("qweight must be Int", lambda: ops.qlinear_pack(layer.qweight.float(), layer.scales, layer.mins, bits, sizes)),
        ("rows must lie in", lambda: ops.qlinear_dequantize_rows(packed, bits, sizes, perm, 20, torch.tensor([20]))),
    ]


@pytest.mark.parametrize("message,bad_call", _bad_calls(), ids=[m for m, _ in _bad_calls()])
def test_malformed_inputs_raise_a_clear_error(message, bad_call):
    with pytest.raises(TrimtabError, match=message):
        bad_call()
