"""One rank's share of a quantized layer under tensor parallelism, cut without dequantizing.

    part = output_columns(layer, start, end)     # column-parallel: W[start:end, :]
    part = input_rows(layer, start, end)         # row-parallel: W[:, start:end]

Output columns are independent in the format (each has its own q stream, scales and mins), so a
column share is a slice. An input-row share keeps, in quantized order, the rows whose original
index lies in [start, end): each group keeps its scales and mins for the rows it still has (a group
may shrink, one with no rows left is dropped), the kept q values are packed again, and with
act-order the permutation is renumbered to the share's own input order. The shares' dequantized
weights are exactly the slices of the whole layer's (tests/test_tensor_parallel.py).
"""
from __future__ import annotations

import torch

from trimtab.backend.quant.format import QuantizedLinear, group_starts, pack, unpack


def output_columns(layer: QuantizedLinear, start: int, end: int) -> QuantizedLinear:
    """The layer's output columns [start, end)."""
    return QuantizedLinear(layer.qweight[:, start:end].contiguous(), layer.scales[:, start:end].contiguous(),
                           layer.mins[:, start:end].contiguous(), layer.group_bits, layer.group_sizes, layer.perm)


def input_rows(layer: QuantizedLinear, start: int, end: int) -> QuantizedLinear:
    """The layer restricted to original input rows [start, end) (renumbered from 0)."""
    original = (torch.arange(layer.in_features, device=layer.qweight.device) if layer.perm is None
                else layer.perm.to(torch.int64))                                  # [in], per quantized row
    keep = (original >= start) & (original < end)                                  # [in]
    sizes, bits, groups = [], [], []
    for g, (first, size) in enumerate(zip(group_starts(layer.group_sizes), layer.group_sizes.tolist())):
        kept = int(keep[first:first + size].sum())
        if kept:
            sizes.append(kept)
            bits.append(int(layer.group_bits[g]))
            groups.append(g)
    q = unpack(layer)[keep]                                                        # [end - start, out]
    perm = None if layer.perm is None else (original[keep] - start).to(torch.int32)  # without, rows stay in order
    return pack(q, layer.scales[groups], layer.mins[groups], bits, sizes, perm=perm)
