"""Quantized linear layers as the engine runs them: each device repacks the canonical format
(format.py) at load for its kernels.

    linear = PackedLinear.from_canonical(layer, bias, device)   # once, at load
    y = linear(x)                                                # x: [..., in] → [..., out], x's dtype
    rows = linear.dequantized_rows(ids)                          # ids: [n] → W[ids]: [n, in]

On the CPU the layer is repacked into the compiled kernels' tiles (csrc/qlinear*.cpp, layout in
docs/CSRC.md) and never dequantized as a whole; elsewhere it is dequantized once at load (the
reference path) until that device has kernels of its own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from trimtab.backend import ops
from trimtab.backend.quant.format import QuantizedLinear, dequantize


class PackedLinear(ABC):
    """y = x Wᵀ + b for a quantized W [out, in]; built by from_canonical for the target device."""

    in_features: int
    out_features: int

    @classmethod
    def from_canonical(cls, layer: QuantizedLinear, bias: torch.Tensor | None, device,
                       dtype: torch.dtype = torch.float32) -> "PackedLinear":
        if torch.device(device).type == "cpu":
            return CpuPackedLinear(layer, bias, dtype)
        if torch.device(device).type == "cuda":  # the CUDA kernels (imported here: that module builds on this one)
            from trimtab.backend.quant.cuda_linear import CudaPackedLinear
            return CudaPackedLinear(layer, bias, device, dtype)
        return DequantizedLinear(layer, bias, device, dtype)

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] → [..., out] in x's dtype."""

    @abstractmethod
    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W in the original input order, in the layer's dtype: ids [n] → [n, in]
        (so that a quantized head can serve as the embedding)."""


class CpuPackedLinear(PackedLinear):
    """The compiled CPU kernels on the packed layout. Computes in float32; x may be any float dtype."""

    def __init__(self, layer: QuantizedLinear, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        self.group_bits = layer.group_bits.contiguous()     # uint8 [groups]
        self.group_sizes = layer.group_sizes.contiguous()   # int32 [groups]
        self.perm = None if layer.perm is None else layer.perm.contiguous()  # int32 [in]
        self.bias = None if bias is None else bias.to(device="cpu", dtype=torch.float32).contiguous()  # [out]
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype = dtype
        self.kernel = "auto"  # or "int8", "fp32", "scalar", "dequant" (ops.qlinear)
        self.packed = ops.qlinear_pack(layer.qweight.cpu(), layer.scales.cpu(), layer.mins.cpu(),
                                       self.group_bits, self.group_sizes)  # uint8 [tiles, tile_bytes]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] → [..., out]
        return ops.qlinear(x, self.packed, self.group_bits, self.group_sizes, self.perm, self.bias,
                           self.out_features, self.kernel)

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ops.qlinear_dequantize_rows(self.packed, self.group_bits, self.group_sizes, self.perm,
                                           self.out_features, ids.to(torch.int64).reshape(-1))
        return rows.to(self.dtype)


class DequantizedLinear(PackedLinear):
    """The reference path for devices without quantized kernels: W dequantized once at load."""

    def __init__(self, layer: QuantizedLinear, bias: torch.Tensor | None, device, dtype: torch.dtype):
        self.weight = dequantize(layer, dtype).to(device)  # [out, in]
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)  # [out]
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids.to(device=self.weight.device, dtype=torch.int64).reshape(-1)]
