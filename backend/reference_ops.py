"""Plain-PyTorch references of the compiled ops in trimtab.backend.ops.

Written the obvious way, as HF transformers' Llama does it, so that they can be read in one
sitting and trusted as the oracle the kernels are tested against. Same signatures as the ops.
"""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm. x: [..., D], weight: [D] -> [..., D] in x's dtype."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    # HF rounds to the input dtype *before* the weight multiply; the op keeps x's dtype even
    # when the weight's dtype is wider.
    return (weight * hidden.to(input_dtype)).to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX / HF layout: pairs (i, i + D/2); (a, b) -> (-b, a)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J / GGUF) layout: pairs (2i, 2i + 1); (a, b) -> (-b, a)."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_embedding_reference(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    interleaved: bool = False,
) -> torch.Tensor:
    """x: [B, S, H, D]; positions: [B, S]; inv_freq: [R/2], R <= D -> [B, S, H, D]."""
    rot_dims = 2 * inv_freq.shape[0]
    freqs = positions[..., None].float() * inv_freq.float()  # [B, S, R/2]
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)  # [B, S, R]: f0, f0, f1, f1, ...
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, R]: f0, f1, ..., f0, f1, ...
    cos = (emb.cos() * attention_scaling).to(x.dtype)[:, :, None, :]  # [B, S, 1, R]
    sin = (emb.sin() * attention_scaling).to(x.dtype)[:, :, None, :]
    x_rot, x_pass = x[..., :rot_dims], x[..., rot_dims:]  # partial rotary: the rest passes
    rotated = rotate_pairs(x_rot) if interleaved else rotate_half(x_rot)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)
