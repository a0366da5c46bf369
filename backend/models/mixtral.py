"""Mixtral: Mistral attention with a sparse mixture of experts in place of the MLP.

Each token's router picks `num_experts_per_tok` of `num_local_experts` experts; their outputs
are mixed with the softmax weights renormalised over the chosen few. Only the chosen experts run.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F

from trimtab.backend.errors import UnsupportedModelError
from trimtab.backend.models import base
from trimtab.backend.models.llama import sanitize as llama_sanitize

ModelArgs = base.ModelArgs

_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def sanitize(weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Accept both the classic per-expert layout and transformers 5's fused 3-D expert tensors."""
    weights = llama_sanitize(weights)
    if not any(_FUSED_EXPERTS.match(name) for name in weights):
        return weights
    out = {}
    for name, tensor in weights.items():
        fused = _FUSED_EXPERTS.match(name)
        if name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = tensor
        elif fused is None:
            out[name] = tensor
        else:
            prefix = f"model.layers.{fused.group(1)}.block_sparse_moe.experts"
            for expert, matrix in enumerate(tensor):
                if fused.group(2) == "down_proj":          # [E, D, I]
                    out[f"{prefix}.{expert}.w2.weight"] = matrix
                else:                                       # [E, 2I, D]: gate rows, then up rows
                    gate, up = matrix.chunk(2, dim=0)
                    out[f"{prefix}.{expert}.w1.weight"] = gate
                    out[f"{prefix}.{expert}.w3.weight"] = up
    return out


class SparseMoE:
    def __init__(self, args: ModelArgs, w: base.WeightReader, prefix: str):
        if not 0 < args.num_experts_per_tok <= args.num_local_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok ({args.num_experts_per_tok}) must be in 1..num_local_experts "
                f"({args.num_local_experts})")
        self.top_k = args.num_experts_per_tok
        D, I, E = args.hidden_size, args.intermediate_size, args.num_local_experts
        self.router = w.linear(prefix + ".gate", False, (E, D))
        share = w.tp.share(I)  # tensor parallel: this rank's intermediate rows of every expert
        self.experts = [
            (w.linear(f"{prefix}.experts.{e}.w1", False, (I, D), columns=share),   # gate
             w.linear(f"{prefix}.experts.{e}.w3", False, (I, D), columns=share),   # up
             w.linear(f"{prefix}.experts.{e}.w2", False, (D, I), rows=share))      # down
            for e in range(E)
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                       # [N, D]
        probs = F.softmax(self.router(x).float(), dim=-1)                   # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)                    # [N, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            token, slot = torch.where(chosen == expert)
            gate, up, down = self.experts[expert]
            h = x[token]
            y = down(F.silu(gate(h)) * up(h)) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.reshape(shape)


def sparse_moe(args: ModelArgs, w: base.WeightReader, layer_prefix: str) -> SparseMoE:
    return SparseMoE(args, w, layer_prefix + ".block_sparse_moe")


class Model(base.Transformer):
    mlp_factory = staticmethod(sparse_moe)
