"""Round-to-nearest quantization of one linear layer, with an error-minimising range search per
(group, output column) — the `rtn` method of docs/FORMAT.md.

    layer = quantize_rtn(weight, group_sizes, group_bits)    # weight: [out, in] → QuantizedLinear

Each (group, output column) holds the n weights w of the group's rows in that column and gets
the grid q·s + m, q in [0, 2^b - 1], s and m stored as float16:
  1. for each factor in SHRINKS, the [min, max] range shrunk about its centre (clipping the
     outermost weights to make the steps finer), q rounded to nearest, and s, m refit by least
     squares for those q (which also moves the grid off-centre where the weights are skewed); the
     factor whose refit leaves the least squared error (cov(q, w)² / var(q) in closed form) wins;
  2. the winner's s and m rounded to float16, as stored, and q rounded again on that grid;
  3. plain min/max (m = min w, s = (max w - min w) / (2^b - 1), float16 too) replaces it wherever
     it does better, so the search is never worse than plain round-to-nearest.
"""
from __future__ import annotations

from typing import Sequence

import torch

from trimtab.backend.quant.format import QuantizedLinear, pack

# Range factors tried after plain min/max. 1.0 is there for its least-squares refit.
SHRINKS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.7)
# Elements of one [groups, columns, rows] block worked on at once; bounds the temporaries.
CHUNK_ELEMENTS = 1 << 18


def quantize_rtn(weight: torch.Tensor, group_sizes: Sequence[int], group_bits: Sequence[int]) -> QuantizedLinear:
    """weight: [out, in] float → the canonical layer with these groups (sizes along `in`, widths)."""
    out_features, in_features = weight.shape
    if sum(group_sizes) != in_features or len(group_sizes) != len(group_bits):
        raise ValueError(f"groups {list(group_sizes)} do not tile {in_features} input rows")
    starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    q = torch.empty(in_features, out_features, dtype=torch.uint8)                       # [in, out]
    scales = torch.empty(len(group_sizes), out_features, dtype=torch.float16)           # [groups, out]
    mins = torch.empty_like(scales)
    weight = weight.float()
    # groups of one size and width are quantized together: [k groups, out, size]
    for (size, bits), members in _batches(group_sizes, group_bits).items():
        rows = torch.tensor([starts[g] + r for g in members for r in range(size)])
        block = weight[:, rows].reshape(out_features, len(members), size).transpose(0, 1)
        bq, bs, bm = quantize_groups(block, bits)
        q[rows] = bq.permute(0, 2, 1).reshape(len(members) * size, out_features)
        scales[members], mins[members] = bs, bm
    return pack(q, scales, mins, group_bits, group_sizes)


# Layer kinds whose groups get the wider width first (tier 2, then 1, then the rest), measured on the
# default model (docs/FORMAT.md): v and k projections are small under grouped-query attention yet
# every query head of their group reads them, and down_proj's inputs, silu(gate)·up, carry the largest
# outliers (Mixtral calls it w2). Weight ranges alone, across layers, did worse than random choice.
TIERS = {"v_proj": 2, "k_proj": 2, "down_proj": 1, "w2": 1}


def width_priority(name: str, weight: torch.Tensor, group_sizes: Sequence[int]) -> list[float]:
    """Per group of rows of layer `name`'s weight [out, in]: its claim to the wider width, as
    tier + r / (1 + r) (tiers dominate). r compares the group with the rest of its layer: rounding
    noise on 2^b - 1 steps over a range s is s² / (12 (2^b - 1)²) per weight, so a wider width saves in
    proportion to the squared range, averaged over output columns, relative to the layer's mean."""
    spreads, start = [], 0
    for size in group_sizes:
        block = weight[:, start:start + size].float()                                # [out, size]
        spreads.append(float((block.amax(dim=1) - block.amin(dim=1)).square().mean()))
        start += size
    mean = sum(spreads) / len(spreads) or 1.0
    tier = TIERS.get(name.removesuffix(".weight").rsplit(".", 1)[-1], 0)
    return [tier + (s / mean) / (1 + s / mean) for s in spreads]


def _batches(group_sizes: Sequence[int], group_bits: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    batches: dict[tuple[int, int], list[int]] = {}
    for g, key in enumerate(zip(group_sizes, group_bits)):
        batches.setdefault(key, []).append(g)
    return batches


def quantize_groups(w: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [k, out, n] float32 (k groups of n rows, per output column) → q uint8 [k, out, n],
    scales and mins float16 [k, out], each column's best of the candidates above. `bits`: one width,
    or a width per (group, column) as an int tensor [k, out] (gptq.py searches several layouts at once)."""
    k, out, n = w.shape
    step = max(1, CHUNK_ELEMENTS // max(1, k * n))
    q = torch.empty(k, out, n, dtype=torch.uint8)
    scales = torch.empty(k, out, dtype=torch.float16)
    mins = torch.empty_like(scales)
    for c in range(0, out, step):
        part = bits if isinstance(bits, int) else bits[:, c:c + step]
        q[:, c:c + step], scales[:, c:c + step], mins[:, c:c + step] = _search(w[:, c:c + step], part)
    return q, scales, mins


def _search(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w: [k, c, n]; every tensor below without n is [k, c]
    top, n = _top(bits), w.shape[-1]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    w_sum = w.sum(dim=-1)
    w_spread = torch.linalg.vecdot(w, w) - w_sum * w_sum / n              # Σ (w - mean w)²
    # 1. pick each column's shrink factor by the error its least-squares refit would leave
    centre, half = (hi + lo) / 2, (hi - lo) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_factor = torch.ones_like(lo)
    for factor in SHRINKS:
        q = _nearest(w, 2 * half * factor / top, centre - half * factor, top)
        err = w_spread - _fit(w, q, w_sum)[2]
        better = err < best_err
        best_err, best_factor = torch.where(better, err, best_err), torch.where(better, factor, best_factor)
    # 2. that candidate as stored: refit, rounded to float16, q rounded again on the stored grid
    q = _nearest(w, 2 * half * best_factor / top, centre - half * best_factor, top)
    s, m, _ = _fit(w, q, w_sum)
    s, m = _stored(s, m)
    q = _nearest(w, s, m, top)
    err = _error(w, q, s, m)
    # 3. plain min/max where it does better
    s0, m0 = _stored((hi - lo) / top, lo)
    q0 = _nearest(w, s0, m0, top)
    plain = _error(w, q0, s0, m0) <= err
    q = torch.where(plain[..., None], q0, q)
    return q.to(torch.uint8), torch.where(plain, s0, s).half(), torch.where(plain, m0, m).half()


def _stored(scale, minimum):
    """Scale and minimum as float16 stores them (a negative scale cannot occur; clamp guards rounding)."""
    return scale.clamp(min=0).half().float(), minimum.half().float()


def _nearest(w, s, m, top):
    """The grid step nearest each weight: clamp(round((w - m) / s), 0, top); q = 0 where s = 0."""
    inv = torch.where(s > 0, 1 / s, 0.0)
    q = torch.addcmul((-m * inv)[..., None], w, inv[..., None]).round_()
    return q.clamp_(0, top) if isinstance(top, int) else torch.minimum(q.clamp_(min=0), top[..., None], out=q)


def _top(bits: int | torch.Tensor) -> int | torch.Tensor:
    """The largest q: 2^bits - 1 (a float tensor [k, c] for per-column widths)."""
    return 2 ** bits - 1 if isinstance(bits, int) else (2.0 ** bits.float()) - 1


def _fit(w, q, w_sum):
    """Least-squares s, m minimising Σ (w - q·s - m)² for fixed q (s = 0, m = mean w where q is
    constant), and how far they lower it below Σ (w - mean w)²: cov(q, w)² / var(q)."""
    n = w.shape[-1]
    q_sum = q.sum(dim=-1)
    var = torch.linalg.vecdot(q, q) - q_sum * q_sum / n
    cov = torch.linalg.vecdot(q, w) - q_sum * w_sum / n
    s = torch.where(var > 0, cov / var.clamp(min=1e-30), 0.0)
    return s, (w_sum - s * q_sum) / n, s * cov


def _error(w, q, s, m):
    """Σ (q·s + m - w)² per column."""
    return torch.addcmul(m[..., None] - w, q, s[..., None]).square_().sum(dim=-1)
