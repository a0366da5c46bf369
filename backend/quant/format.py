"""The canonical quantized format of one linear layer (docs/FORMAT.md): packing, unpacking, the
reference dequantiser and exact bits-per-weight accounting.

A linear layer's weight W is [out, in] (y = x Wᵀ). Its input rows are split into groups along
`in` (sizes `group_sizes`, any positive sizes summing to `in`, usually 32-128 with a ragged last
group); group g stores every weight of its rows with one width `group_bits[g]` in {2,3,4,5,6,8}
as unsigned integers q in [0, 2^b - 1], and one scale and one minimum per (group, output column):

    W[o, start_g + r] = q[r, o] * scales[g, o] + mins[g, o]

With act-order, the rows were quantized in the order `perm` (int32 [in]): quantized row i is
original input row perm[i], so y = x[..., perm] Wqᵀ.

Stored tensors of a layer named P (safetensors; all little-endian):
    P.qweight      int32 [packed_rows, out]  each group's q values as a bit stream per output column:
                                             row r of the group occupies stream bits [r*b, r*b + b),
                                             stream bit k is bit (k % 32) of the group's word k // 32;
                                             a group takes ceil(size * b / 32) words (the rest is 0)
    P.scales       float16 [groups, out]
    P.mins         float16 [groups, out]
    P.group_bits   uint8 [groups]
    P.group_sizes  int32 [groups]
    P.perm         int32 [in]                 (only with act-order)
    P.bias         float [out]                (only if the layer has one; not quantized)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from trimtab.backend.errors import TrimtabError

WIDTHS = (2, 3, 4, 5, 6, 8)
PARTS = ("qweight", "scales", "mins", "group_bits", "group_sizes")
OPTIONAL_PARTS = ("perm",)
# bits of metadata per group (its width byte and its size int32), counted in bits per weight
GROUP_METADATA_BITS = 8 + 32


@dataclass(frozen=True)
class QuantizedLinear:
    """One layer in the canonical format (tensors as stored; see the module docstring)."""
    qweight: torch.Tensor       # int32 [packed_rows, out]
    scales: torch.Tensor        # float16 [groups, out]
    mins: torch.Tensor          # float16 [groups, out]
    group_bits: torch.Tensor    # uint8 [groups]
    group_sizes: torch.Tensor   # int32 [groups]
    perm: torch.Tensor | None = None  # int32 [in]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def in_features(self) -> int:
        return int(self.group_sizes.sum())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{name}": getattr(self, name) for name in PARTS}
        if self.perm is not None:
            out[f"{prefix}.perm"] = self.perm
        return out

    def bits(self) -> int:
        """Every stored bit of the layer: q values, scales and mins, group metadata, perm."""
        out = self.out_features
        total = sum(int(n) * int(b) for n, b in zip(self.group_sizes.tolist(), self.group_bits.tolist())) * out
        total += self.scales.numel() * 16 + self.mins.numel() * 16
        total += len(self.group_bits) * GROUP_METADATA_BITS
        if self.perm is not None:
            total += self.perm.numel() * 32
        return total

    def bits_per_weight(self) -> float:
        return self.bits() / (self.in_features * self.out_features)


def packed_words(size: int, bits: int) -> int:
    """int32 words one group of `size` rows at width `bits` takes per output column."""
    return (size * bits + 31) // 32


def pack_group(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: uint8/int [size, out] in [0, 2^bits) → int32 [packed_words(size, bits), out]."""
    size, out = q.shape
    q = q.to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64, device=q.device)
    stream = ((q[:, None, :] >> shifts[None, :, None]) & 1).reshape(size * bits, out)   # [size*b, out]
    words = packed_words(size, bits)
    stream = torch.cat([stream, stream.new_zeros(words * 32 - size * bits, out)])
    weights = (torch.ones(32, dtype=torch.int64, device=stream.device)
               << torch.arange(32, dtype=torch.int64, device=stream.device))[None, :, None]
    packed = (stream.reshape(words, 32, out) * weights).sum(dim=1)                       # [words, out] < 2^32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_group(words: torch.Tensor, size: int, bits: int) -> torch.Tensor:
    """int32 [packed_words(size, bits), out] → uint8 [size, out] (the inverse of pack_group)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = (w[:, None, :] >> torch.arange(32, dtype=torch.int64, device=w.device)[None, :, None]) & 1  # [words, 32, out]
    stream = stream.reshape(-1, w.shape[1])[: size * bits].reshape(size, bits, -1)
    values = (stream << torch.arange(bits, dtype=torch.int64, device=w.device)[None, :, None]).sum(dim=1)
    return values.to(torch.uint8)


def group_starts(group_sizes: torch.Tensor) -> list[int]:
    sizes = group_sizes.tolist()
    return [sum(sizes[:g]) for g in range(len(sizes))]


def unpack(layer: QuantizedLinear) -> torch.Tensor:
    """→ q values uint8 [in, out] in quantized row order."""
    rows, offset = [], 0
    for size, bits in zip(layer.group_sizes.tolist(), layer.group_bits.tolist()):
        words = packed_words(size, bits)
        rows.append(unpack_group(layer.qweight[offset:offset + words], size, bits))
        offset += words
    return torch.cat(rows)


def dequantize(layer: QuantizedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dequantiser → W [out, in] in the original input order."""
    q = unpack(layer).to(torch.float32)                                              # [in, out]
    sizes = layer.group_sizes.to(torch.int64)
    scales = layer.scales.float().repeat_interleave(sizes, dim=0)                   # [in, out]
    mins = layer.mins.float().repeat_interleave(sizes, dim=0)
    w = (q * scales + mins).t()                                                      # [out, in], quantized order
    if layer.perm is not None:
        w = torch.empty_like(w).index_copy_(1, layer.perm.to(torch.int64), w)
    return w.to(dtype).contiguous()


def pack(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_bits, group_sizes,
         perm: torch.Tensor | None = None) -> QuantizedLinear:
    """Canonical layer from q values [in, out] (quantized row order), scales/mins [groups, out]."""
    group_bits = torch.as_tensor(list(group_bits), dtype=torch.uint8)
    group_sizes = torch.as_tensor(list(group_sizes), dtype=torch.int32)
    words, start = [], 0
    for size, bits in zip(group_sizes.tolist(), group_bits.tolist()):
        words.append(pack_group(q[start:start + size], bits))
        start += size
    layer = QuantizedLinear(torch.cat(words), scales.to(torch.float16).contiguous(),
                            mins.to(torch.float16).contiguous(), group_bits, group_sizes,
                            None if perm is None else perm.to(torch.int32))
    validate(layer, "packed layer")
    return layer


def from_tensors(tensors: Mapping[str, torch.Tensor], prefix: str) -> QuantizedLinear:
    """Read layer `prefix` from a checkpoint's tensors, validated; TrimtabError naming what is wrong."""
    missing = [f"{prefix}.{p}" for p in PARTS if f"{prefix}.{p}" not in tensors]
    if missing:
        raise TrimtabError(f"quantized layer {prefix}: missing tensor {missing[0]}")
    layer = QuantizedLinear(*(tensors[f"{prefix}.{p}"] for p in PARTS), perm=tensors.get(f"{prefix}.perm"))
    validate(layer, prefix)
    return layer


def validate(layer: QuantizedLinear, name: str) -> None:
    """Dtypes, shapes and widths consistent with each other; TrimtabError naming the problem."""
    def fail(problem: str) -> TrimtabError:
        return TrimtabError(f"quantized layer {name}: {problem}")

    expected = {"qweight": torch.int32, "scales": torch.float16, "mins": torch.float16,
                "group_bits": torch.uint8, "group_sizes": torch.int32}
    for part, dtype in expected.items():
        t = getattr(layer, part)
        if t.dtype != dtype:
            raise fail(f"{part} must be {dtype}, got {t.dtype}")
    if layer.group_bits.dim() != 1 or layer.group_sizes.shape != layer.group_bits.shape or len(layer.group_bits) == 0:
        raise fail(f"group_bits {list(layer.group_bits.shape)} and group_sizes {list(layer.group_sizes.shape)} "
                   "must be two equal non-empty lists")
    widths = set(layer.group_bits.tolist())
    if not widths <= set(WIDTHS):
        raise fail(f"width {sorted(widths - set(WIDTHS))[0]} is not one of {', '.join(map(str, WIDTHS))}")
    if int(layer.group_sizes.min()) < 1:
        raise fail("group sizes must be positive")
    groups = len(layer.group_bits)
    if layer.scales.dim() != 2 or layer.scales.shape[0] != groups or layer.mins.shape != layer.scales.shape:
        raise fail(f"scales {list(layer.scales.shape)} and mins {list(layer.mins.shape)} must both be "
                   f"[{groups} groups, out]")
    words = sum(packed_words(n, b) for n, b in zip(layer.group_sizes.tolist(), layer.group_bits.tolist()))
    if list(layer.qweight.shape) != [words, layer.out_features]:
        raise fail(f"qweight is {list(layer.qweight.shape)}, but its groups need [{words}, {layer.out_features}]")
    if not (torch.isfinite(layer.scales).all() and torch.isfinite(layer.mins).all()):
        raise fail("scales or mins hold inf or NaN")
    if layer.perm is not None:
        n = layer.in_features
        if layer.perm.dtype != torch.int32 or list(layer.perm.shape) != [n]:
            raise fail(f"perm must be int32 [{n}], got {layer.perm.dtype} {list(layer.perm.shape)}")
        if not torch.equal(torch.sort(layer.perm.to(torch.int64)).values, torch.arange(n, device=layer.perm.device)):
            raise fail("perm is not a permutation of the input rows")


def split_groups(in_features: int, group_size: int) -> list[int]:
    """Group sizes for `in_features` rows: full groups of `group_size` and a ragged last one."""
    if group_size < 1:
        raise TrimtabError(f"group size must be positive, got {group_size}")
    full, rest = divmod(in_features, group_size)
    return [group_size] * full + ([rest] if rest else [])


def bits_per_weight(layers: Mapping[str, QuantizedLinear]) -> float:
    """Total stored bits over total weights of several layers (the model's linear layers)."""
    bits = sum(layer.bits() for layer in layers.values())
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    return bits / weights if weights else math.nan
