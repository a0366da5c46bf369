"""Calibration rows through a model one decoder layer at a time, for the converter's passes.

    runner = LayerRunner(arch, args, weights)
    x = runner.embed(rows, embedding)                 # float32 [rows, length, D]
    layer = runner.build(i)                           # decoder layer i from the float weights
    runner.map_linears(layer, "attention", fn)        # fn(name, linear) → replacement (a Tap, a quantized copy)
    x = runner.run(layer, x, "attention")             # x + attention(norm(x)), row batch by row batch
    x = runner.run(layer, x, "mlp")                   # x + mlp(norm(x))

Only one decoder layer's weights are read at a time (from the memory-mapped checkpoint), and the
activations of every calibration row are kept between layers: rows × length × hidden_size float32.
The layer is the model's own class (backend/models), so calibration runs exactly the model's maths.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from trimtab.backend.kv_cache import KVCache
from trimtab.backend.models.base import DecoderLayer, Linear, WeightReader
from trimtab.backend.quant.format import QuantizedLinear, dequantize
from trimtab.backend.rope import rope_spec

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERT = ("w1", "w3", "w2")                      # the order of SparseMoE.experts' tuples: gate, up, down
# layers that read the same input share one Hessian: name suffix → the suffix that stands for the group
SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "w3": "w1"}
# tokens per forward batch: bounds attention's [batch, heads, length, length] scores
BATCH_TOKENS = 4096


class _WholeRows(KVCache):
    """A cache for rows that arrive whole, from an empty cache: positions and masks, nothing stored."""

    def __init__(self, batch_size: int, length: int):
        super().__init__(num_layers=0, batch_size=batch_size, num_kv_heads=1, head_dim=1, max_len=length,
                         dtype=torch.float32)

    def store(self, layer, keys, values):
        return keys, values


class LayerRunner:
    def __init__(self, arch, args, weights: Mapping[str, torch.Tensor]):
        self.args = args
        self.weights = weights
        self.mlp_factory = arch.Model.mlp_factory
        self.rope = rope_spec(args.rope_theta, args.rotary_dim, args.rope_scaling)

    def embed(self, rows: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """rows int64 [R, L], embedding [V, D] (as the converted model will hold it) → float32 [R, L, D]."""
        return embedding.float()[rows]

    def build(self, index: int) -> DecoderLayer:
        return DecoderLayer(self.args, WeightReader(self.weights, torch.float32, torch.device("cpu")), index,
                            self.mlp_factory)

    @staticmethod
    def prefix(index: int) -> str:
        return f"model.layers.{index}"

    def map_linears(self, layer: DecoderLayer, part: str, fn: Callable[[str, object], object]) -> None:
        """Replace each linear of `part` ("attention" or "mlp") by fn(its weight's prefix, it)."""
        prefix = self.prefix(layer.index)
        if part == "attention":
            for name in ATTENTION:
                setattr(layer.self_attn, name, fn(f"{prefix}.self_attn.{name}", getattr(layer.self_attn, name)))
        elif hasattr(layer.mlp, "experts"):
            base = f"{prefix}.block_sparse_moe.experts"
            layer.mlp.experts = [tuple(fn(f"{base}.{e}.{n}", linear) for n, linear in zip(EXPERT, expert))
                                 for e, expert in enumerate(layer.mlp.experts)]
        else:
            for name in MLP:
                setattr(layer.mlp, name, fn(f"{prefix}.mlp.{name}", getattr(layer.mlp, name)))

    def linear_names(self, layer: DecoderLayer, part: str) -> list[str]:
        names: list[str] = []
        self.map_linears(layer, part, lambda name, linear: names.append(name) or linear)
        return names

    @torch.inference_mode()
    def run(self, layer: DecoderLayer, x: torch.Tensor, part: str) -> torch.Tensor:
        """x [R, L, D] → the residual stream after `part` of the layer (a new tensor)."""
        rows, length, _ = x.shape
        batch = max(1, BATCH_TOKENS // length)
        out = torch.empty_like(x)
        for start in range(0, rows, batch):
            chunk = x[start:start + batch]
            if part == "attention":
                cache = _WholeRows(len(chunk), length)
                positions = cache.positions(length)
                mask = cache.attention_mask(length, layer.sliding_window)
                h = layer.self_attn(layer.input_layernorm(chunk), positions, self.rope, cache, layer.index, mask)
            else:
                h = layer.mlp(layer.post_attention_layernorm(chunk))
            torch.add(chunk, h, out=out[start:start + batch])
        return out


def input_key(name: str) -> str:
    """The name that stands for every layer reading the same input as `name` (its Hessian's key)."""
    head, _, last = name.rpartition(".")
    return f"{head}.{SAME_INPUT.get(last, last)}"


def quantized_copy(layer: QuantizedLinear, like) -> Linear:
    """The float layer the converted model will compute with: the dequantized weight, the bias kept."""
    return Linear(dequantize(layer), getattr(like, "bias", None))
