"""One C++ call per decoded token (csrc/decode.cpp) for a Llama-family model whose linear layers
are all quantized and packed for the CPU kernels.

    decoder = FusedDecoder.build(model)          # None if the model is not eligible (why_not says why)
    logits = decoder.step(token, cache)          # batch-1 cache; writes slot cache.length; [V] float32
    cache.advance(1)

It computes what `model.forward(tokens [1, 1], cache)` computes (same float32 steps, same int8
GEMV kernel) without one Python/torch dispatch per op, which dominates a small model's decode.
Eligible: CPU, float32, every q/k/v/o/gate/up/down and the head a CpuPackedLinear, a gated SiLU
MLP (no mixture of experts), HF (non-interleaved) rotary.
"""
from __future__ import annotations

import torch

from trimtab.backend import ops
from trimtab.backend.kv_cache import KVCache
from trimtab.backend.quant.kernels import CpuPackedLinear

LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def why_not(model) -> str | None:
    """Why `model` cannot use the fused decoder, or None if it can."""
    if model.tp.active:
        return "tensor parallel: the blocks' all-reduces run between the ops"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"runs on {model.device} in {model.dtype}; the fused decoder is CPU float32"
    if not isinstance(model.lm_head, CpuPackedLinear):
        return "the output head is not a packed quantized layer"
    for index, layer in enumerate(model.layers):
        for block, name in LINEARS:
            linear = getattr(getattr(layer, block, None), name, None)
            if not isinstance(linear, CpuPackedLinear):
                return f"layer {index} {block}.{name} is not a packed quantized layer"
    return None


class FusedDecoder:
    def __init__(self, model, kernel: str = "int8"):
        # kernel: "int8" as PackedLinear runs one row; "fp32" to compare with the fp32 kernels exactly
        args = model.args
        self.num_layers = len(model.layers)
        self.decoder = torch.classes.trimtab.FusedDecoder(
            args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            float(args.rms_norm_eps), model.rope.inv_freq.float(), float(model.rope.attention_scaling), False,
            kernel)
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.decoder.add_layer(
                layer.input_layernorm.weight, _kernel_weights(attn.q_proj), _kernel_weights(attn.k_proj),
                _kernel_weights(attn.v_proj), _kernel_weights(attn.o_proj), layer.post_attention_layernorm.weight,
                _kernel_weights(mlp.gate_proj), _kernel_weights(mlp.up_proj), _kernel_weights(mlp.down_proj),
                layer.sliding_window or 0)
        embedding = model.embed_tokens if isinstance(model.embed_tokens, torch.Tensor) else None
        self.decoder.set_output(model.norm.weight, _kernel_weights(model.lm_head), embedding)

    @classmethod
    def build(cls, model, kernel: str = "int8") -> "FusedDecoder | None":
        if why_not(model) is not None:
            return None
        ops.load_extension()
        return cls(model, kernel)

    def step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Decode `token` (batch 1) into slot cache.length; → logits [V] float32. The caller advances."""
        if cache.batch_size != 1:
            raise ValueError(f"the fused decoder runs batch 1, got a cache of batch {cache.batch_size}")
        cache.slots(1)  # raises if the cache is full
        return self.decoder.step(int(token), cache.length, int(cache.pad[0]), cache.keys, cache.values)


def _kernel_weights(linear: CpuPackedLinear):
    """The decoder's handle on a packed layer: the same tensors, no copy."""
    return torch.classes.trimtab.QLinear(linear.packed, linear.group_bits, linear.group_sizes, linear.perm,
                                         linear.bias, linear.out_features)
