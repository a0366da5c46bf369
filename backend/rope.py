"""Rotary position embedding: the inverse frequencies of each supported rope variant.

The rotation itself is a compiled op (`ops.rotary_embedding`); this module only decides the
frequencies from config.json. Variants: "default", "linear" (position interpolation) and
"llama3" (Llama 3.1 frequency-dependent scaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trimtab.backend.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    inv_freq: torch.Tensor          # [rotary_dim / 2] float32
    attention_scaling: float = 1.0  # multiplies cos and sin


def base_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    # theta^(-2i/d) for i in [0, d/2): computed from int exponents as the checkpoints were trained
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    trained_context = float(scaling["original_max_position_embeddings"])

    wavelength = 2 * math.pi / inv_freq
    longest_kept = trained_context / high_freq_factor   # shorter wavelengths stay as they are
    shortest_scaled = trained_context / low_freq_factor  # longer wavelengths are divided by factor
    blend = (trained_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq

    scaled = torch.where(wavelength > shortest_scaled, inv_freq / factor, inv_freq)
    in_band = (wavelength >= longest_kept) & (wavelength <= shortest_scaled)
    return torch.where(in_band, blended, scaled)


def rope_spec(theta: float, rotary_dim: int, scaling: dict | None) -> RopeSpec:
    """Frequencies for `rotary_dim` rotated dims; `scaling` is config.json's rope_scaling block."""
    inv_freq = base_inv_freq(theta, rotary_dim)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return RopeSpec(inv_freq)
    if rope_type == "linear":
        return RopeSpec(inv_freq / float(scaling["factor"]))
    if rope_type == "llama3":
        return RopeSpec(llama3_inv_freq(inv_freq, scaling))
    raise UnsupportedModelError(
        f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )
