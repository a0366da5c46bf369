"""The decoder-only transformer that every supported architecture shares.

Each architecture file (llama.py, mistral.py, qwen2.py, mixtral.py) names its config quirks
(a `ModelArgs` subclass) and checkpoint quirks (`sanitize`). Weights arrive with Hugging Face
names; after `sanitize` they follow the Llama naming below (Mixtral adds its experts).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from trimtab.backend import ops
from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError
from trimtab.backend.fused_decode import FusedDecoder
from trimtab.backend.kv_cache import KVCache
from trimtab.backend.quant import format as quant_format
from trimtab.backend.quant import shard
from trimtab.backend.quant.kernels import PackedLinear
from trimtab.backend.rope import rope_spec
from trimtab.backend.tensor_parallel import SINGLE, TensorParallel

MAX_LAYERS = 1024


@dataclass
class ModelArgs:
    """Field names match config.json; unknown config keys are ignored."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    mlp_bias: bool = False
    sliding_window: int | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0

    # Per architecture: does q/k/v carry a bias while o does not (Qwen2)?
    qkv_bias_only = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields}
        # transformers 5 saves rope settings as `rope_parameters` (theta included)
        rope_parameters = config.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            values.setdefault("rope_theta", rope_parameters.get("rope_theta", cls.rope_theta))
            if rope_parameters.get("rope_type", "default") != "default":
                values["rope_scaling"] = rope_parameters
        return cls(**values)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0 < self.num_hidden_layers <= MAX_LAYERS:
            raise UnsupportedModelError(f"num_hidden_layers {self.num_hidden_layers} is out of range")
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedModelError(f"activation {self.hidden_act!r} is not supported (only silu)")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: full attention)."""
        return self.sliding_window


class Linear:
    """y = x Wᵀ + b. The quantized engine swaps in its own kind with the same call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight  # [out, in]
        self.bias = bias      # [out] or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class WeightReader:
    """Takes tensors by name, converted to the compute dtype, and reports the ones never used.

    `linear` is the one place a layer becomes float or quantized: a checkpoint that holds the layer
    in trimtab's quantized format (backend/quant/format.py) gets a PackedLinear, else a Linear.
    Under tensor parallelism it is also where a layer is cut to this rank's share (`columns`: output
    features [start, end), column-parallel; `rows`: input features [start, end), row-parallel)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], dtype: torch.dtype, device,
                 tp: TensorParallel = SINGLE):
        self.weights = weights
        self.dtype = dtype
        self.device = device
        self.tp = tp
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, *, convert: bool = True) -> torch.Tensor:
        """The tensor on the device, in the compute dtype (or as stored, convert=False); its shape checked."""
        if name not in self.weights:
            raise UnsupportedModelError(f"the checkpoint has no tensor {name!r}")
        self.used.add(name)
        tensor = self.weights[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise self._error(name, f"tensor {name!r} is {list(tensor.shape)}, but the config needs {list(shape)}")
        return tensor.to(device=self.device, dtype=self.dtype if convert else None)

    def optional(self, name: str) -> torch.Tensor | None:
        return self.tensor(name) if name in self.weights else None

    def has_linear(self, prefix: str) -> bool:
        return prefix + ".weight" in self.weights or self.is_quantized(prefix)

    def linear(self, prefix: str, bias: bool, shape: tuple[int, int], *, columns: tuple[int, int] | None = None,
               rows: tuple[int, int] | None = None) -> Linear | PackedLinear:
        """The linear layer `prefix` with weight [out, in] = shape (and bias [out]), or this rank's share
        of it: W[columns[0]:columns[1], :] or W[:, rows[0]:rows[1]] (the bias then on the first share only)."""
        columns = None if columns in (None, (0, shape[0])) else columns
        rows = None if rows in (None, (0, shape[1])) else rows
        b = self.tensor(prefix + ".bias", shape[:1]) if bias else None
        if b is not None and columns is not None:
            b = b[columns[0]:columns[1]].contiguous()
        if b is not None and rows is not None and rows[0] > 0:
            b = None  # a row-parallel layer's shares are summed: one of them adds the bias
        if self.is_quantized(prefix):
            layer = self._quantized(prefix, shape)
            if columns is not None:
                layer = shard.output_columns(layer, *columns)
            if rows is not None:
                layer = shard.input_rows(layer, *rows)
            return PackedLinear.from_canonical(layer, b, self.device, self.dtype)
        if prefix + ".weight" not in self.weights:
            raise UnsupportedModelError(
                f"the checkpoint has no tensor '{prefix}.weight' nor a quantized '{prefix}.qweight'")
        weight = self.tensor(prefix + ".weight", shape, convert=False)                     # [out, in]
        if columns is not None:
            weight = weight[columns[0]:columns[1]]
        if rows is not None:
            weight = weight[:, rows[0]:rows[1]]
        return Linear(weight.to(dtype=self.dtype).contiguous(), b)

    def is_quantized(self, prefix: str) -> bool:
        return any(f"{prefix}.{part}" in self.weights for part in quant_format.PARTS)

    def _quantized(self, prefix: str, shape: tuple[int, int]) -> quant_format.QuantizedLinear:
        # read as private copies, not views on the mapped file: the layer is repacked, and the
        # canonical tensors are dropped once it is (peak memory stays near the file size)
        read = getattr(self.weights, "read_copy", self.weights.__getitem__)
        names = [f"{prefix}.{part}" for part in quant_format.PARTS + quant_format.OPTIONAL_PARTS]
        tensors = {name: read(name) for name in names if name in self.weights}
        self.used.update(tensors)
        try:
            layer = quant_format.from_tensors(tensors, prefix)
        except TrimtabError as e:
            raise self._error(next(iter(tensors)), str(e)) from None
        if (layer.out_features, layer.in_features) != tuple(shape):
            raise self._error(next(iter(tensors)), f"quantized layer {prefix} is [{layer.out_features}, "
                              f"{layer.in_features}] (out, in), but the config needs {list(shape)}")
        return layer

    def _error(self, name: str, problem: str) -> TrimtabError:
        """A ModelFileError naming the file that holds `name` where the weights come from files."""
        file_of = getattr(self.weights, "file_of", None)
        return ModelFileError(file_of(name), problem) if file_of else UnsupportedModelError(problem)

    def unused(self) -> list[str]:
        return sorted(set(self.weights) - self.used)


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight = weight  # [D]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention:
    def __init__(self, args: ModelArgs, w: WeightReader, prefix: str):
        qkv_bias = args.attention_bias or args.qkv_bias_only
        D, hd = args.hidden_size, args.head_dim
        q_dim, kv_dim = args.num_attention_heads * hd, args.num_key_value_heads * hd
        # this rank's KV heads and the query heads that share them (all of them on one rank)
        w.tp.check_divides(args.num_key_value_heads, "num_key_value_heads")
        kv_start, kv_end = w.tp.share(args.num_key_value_heads)
        per_kv = args.num_attention_heads // args.num_key_value_heads
        q_share, kv_share = (kv_start * per_kv * hd, kv_end * per_kv * hd), (kv_start * hd, kv_end * hd)
        self.q_proj = w.linear(prefix + ".q_proj", qkv_bias, (q_dim, D), columns=q_share)
        self.k_proj = w.linear(prefix + ".k_proj", qkv_bias, (kv_dim, D), columns=kv_share)
        self.v_proj = w.linear(prefix + ".v_proj", qkv_bias, (kv_dim, D), columns=kv_share)
        self.o_proj = w.linear(prefix + ".o_proj", args.attention_bias, (D, q_dim), rows=q_share)
        self.num_kv_heads = kv_end - kv_start
        self.num_heads = self.num_kv_heads * per_kv
        self.head_dim = hd

    def __call__(self, x, positions, rope, cache: KVCache, layer: int, mask):
        # x: [B, S, D]; positions: [B, S]; mask: bool [B, 1, S, T]
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        q = ops.rotary_embedding(q, positions, rope.inv_freq, rope.attention_scaling)
        k = ops.rotary_embedding(k, positions, rope.inv_freq, rope.attention_scaling)
        keys, values = cache.store(layer, k.transpose(1, 2), v.transpose(1, 2))  # [B, H_kv, T, hd]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class GatedMLP:
    """down(silu(gate(x)) * up(x))"""

    def __init__(self, args: ModelArgs, w: WeightReader, prefix: str):
        D, I = args.hidden_size, args.intermediate_size
        share = w.tp.share(I)  # this rank's intermediate rows
        self.gate_proj = w.linear(prefix + ".gate_proj", args.mlp_bias, (I, D), columns=share)
        self.up_proj = w.linear(prefix + ".up_proj", args.mlp_bias, (I, D), columns=share)
        self.down_proj = w.linear(prefix + ".down_proj", args.mlp_bias, (D, I), rows=share)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer:
    def __init__(self, args: ModelArgs, w: WeightReader, index: int, mlp_factory):
        prefix = f"model.layers.{index}"
        self.index = index
        self.input_layernorm = RMSNorm(w.tensor(prefix + ".input_layernorm.weight"), args.rms_norm_eps)
        self.self_attn = Attention(args, w, prefix + ".self_attn")
        self.post_attention_layernorm = RMSNorm(
            w.tensor(prefix + ".post_attention_layernorm.weight"), args.rms_norm_eps)
        self.mlp = mlp_factory(args, w, prefix)
        self.sliding_window = args.layer_sliding_window(index)
        self.tp = w.tp

    def __call__(self, x, positions, rope, cache, masks):
        # under tensor parallelism each block's output is this rank's share: one all-reduce sums them
        h = x + self.tp.all_reduce(self.self_attn(self.input_layernorm(x), positions, rope, cache, self.index,
                                                  masks[self.sliding_window]))
        return h + self.tp.all_reduce(self.mlp(self.post_attention_layernorm(h)))


def gated_mlp(args: ModelArgs, w: WeightReader, layer_prefix: str):
    return GatedMLP(args, w, layer_prefix + ".mlp")


class Transformer:
    """Embedding → decoder layers → norm → head. One class for every supported architecture."""

    mlp_factory = staticmethod(gated_mlp)

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, device="cpu", tp: TensorParallel = SINGLE):
        self.args = args
        self.dtype = dtype
        self.device = torch.device(device)
        self.tp = tp
        w = WeightReader(weights, dtype, self.device, tp)
        self.embed_tokens, self.lm_head = self._embedding_and_head(args, w)
        self.layers = [DecoderLayer(args, w, i, self.mlp_factory) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(w.tensor("model.norm.weight"), args.rms_norm_eps)
        self.rope = rope_spec(args.rope_theta, args.rotary_dim, args.rope_scaling)
        self.rope = type(self.rope)(self.rope.inv_freq.to(self.device), self.rope.attention_scaling)
        self.unused_weights = w.unused()
        # batch-1 decode of one token: on the CPU one C++ call for a fully quantized model, on a CUDA
        # GPU one CUDA graph replay (each None where not eligible)
        self.fused_decoder = FusedDecoder.build(self)
        self.cuda_decoder = self._cuda_decoder()

    def _cuda_decoder(self):
        if self.device.type != "cuda":
            return None
        from trimtab.backend.cuda_decode import CudaGraphDecoder, unsupported  # CUDA kernels: GPU machines only
        return None if unsupported(self) else CudaGraphDecoder(self)

    @staticmethod
    def _embedding_and_head(args: ModelArgs, w: WeightReader):
        """→ (embedding [V, D] or None, head). Three layouts:
        - a quantized head and no stored embedding (`trimtab convert` of a tied model): the head's
          dequantized rows are the embedding, so the vocabulary is stored once, quantized;
        - tied, or no head in the checkpoint: the embedding, in the compute dtype, is the head;
        - otherwise both as stored (the embedding keeps its dtype: one row is read per token)."""
        V, D = args.vocab_size, args.hidden_size
        w.used.add("lm_head.weight")  # with tied embeddings, a checkpoint's copy of the embedding
        if w.is_quantized("lm_head") and "model.embed_tokens.weight" not in w.weights:
            return None, w.linear("lm_head", False, (V, D))
        head_is_embedding = args.tie_word_embeddings or not w.has_linear("lm_head")
        embedding = w.tensor("model.embed_tokens.weight", (V, D), convert=head_is_embedding)  # [V, D]
        return embedding, Linear(embedding) if head_is_embedding else w.linear("lm_head", False, (V, D))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] int64 → [B, S, D] in the compute dtype."""
        if self.embed_tokens is None:
            return self.lm_head.dequantized_rows(tokens.reshape(-1)).view(*tokens.shape, -1).to(self.dtype)
        return F.embedding(tokens, self.embed_tokens).to(self.dtype)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(num_layers=len(self.layers), batch_size=batch_size,
                       num_kv_heads=self.layers[0].self_attn.num_kv_heads, head_dim=self.args.head_dim,
                       max_len=max_len, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, *, last_only: bool = False) -> torch.Tensor:
        """tokens: [B, S] int64 → logits float32 [B, S, V] (or [B, 1, V] with last_only)."""
        if self.fused_decoder is not None and tokens.shape == (1, 1):
            logits = self.fused_decoder.step(int(tokens[0, 0]), cache)  # [V]
            cache.advance(1)
            return logits.view(1, 1, -1)
        if self.cuda_decoder is not None and tokens.shape == (1, 1) and cache.batch_size == 1:
            # the graph's logits (the model's dtype) are overwritten by its next replay: the caller gets its
            # own float32 copy
            logits = self.cuda_decoder.step(tokens[0, 0], cache)  # advances the cache
            return logits.to(torch.float32, copy=True).view(1, 1, -1)
        S = tokens.shape[1]
        positions = cache.positions(S)  # [B, S]
        windows = {layer.sliding_window for layer in self.layers}
        masks = {window: cache.attention_mask(S, window) for window in windows}
        x = self.embed(tokens)  # [B, S, D]
        for layer in self.layers:
            x = layer(x, positions, self.rope, cache, masks)
        cache.advance(S)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
