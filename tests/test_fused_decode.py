"""The fused single-token decoder (csrc/decode.cpp) against the Python decode path.

Tiny random Llama-family models get every linear quantized (min-max rounding, mixed widths, some
act-order) and packed for the CPU kernels; then the same tokens are decoded twice from the same
prefilled cache: by `model.forward` (one op at a time) and by FusedDecoder.step.
- With the fp32 GEMV kernel on both sides they differ only in float32 summation order
  (attention, silu): logits agree to ~1e-6 relative, KV caches too, greedy tokens are identical.
- With the int8 kernel (the default) both round activations to int8; where their float32 inputs
  differ by an ulp a rounding can flip, so they agree to the int8 error level (observed <= 5e-3
  relative, allowed 2e-2).
"""
from __future__ import annotations

import copy

import pytest
import torch

from trimtab.backend import ops
from trimtab.backend.fused_decode import FusedDecoder, _kernel_weights, why_not
from trimtab.backend.models import base, qwen2
from trimtab.backend.quant import format as qformat
from trimtab.backend.quant.kernels import PackedLinear

VOCAB = 203
WIDTHS = (4, 6, 3, 5, 8, 2)


@pytest.fixture(scope="module", autouse=True)
def engine():
    ops.load_extension()


def quantize(weight: torch.Tensor, group_size: int, seed: int) -> qformat.QuantizedLinear:
    """Min-max rounding of W [out, in] per (group, column), widths cycling through WIDTHS; act-order
    (a random perm) on odd seeds."""
    gen = torch.Generator().manual_seed(seed)
    in_features = weight.shape[1]
    perm = torch.randperm(in_features, generator=gen) if seed % 2 else None
    w = (weight if perm is None else weight[:, perm]).t().float()                # [in, out], quantized order
    sizes = qformat.split_groups(in_features, group_size)
    widths = [WIDTHS[(g + seed) % len(WIDTHS)] for g in range(len(sizes))]
    qs, scales, mins, start = [], [], [], 0
    for size, bits in zip(sizes, widths):
        group = w[start:start + size]
        low, high = group.min(0).values, group.max(0).values
        scale = ((high - low) / (2 ** bits - 1)).clamp_min(1e-6)
        qs.append(((group - low) / scale).round().clamp(0, 2 ** bits - 1).to(torch.uint8))
        scales.append(scale)
        mins.append(low)
        start += size
    return qformat.pack(torch.cat(qs), torch.stack(scales), torch.stack(mins), widths, sizes, perm)


def tiny_model(args: base.ModelArgs, seed: int = 0) -> base.Transformer:
    """Random weights, then every linear (and the head) quantized and packed for the CPU kernels."""
    torch.manual_seed(seed)
    d, hd = args.hidden_size, args.head_dim
    qkv_bias = args.attention_bias or args.qkv_bias_only
    shapes = {"model.embed_tokens.weight": (VOCAB, d), "model.norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (VOCAB, d)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (args.num_attention_heads * hd, d),
                       p + "self_attn.k_proj.weight": (args.num_key_value_heads * hd, d),
                       p + "self_attn.v_proj.weight": (args.num_key_value_heads * hd, d),
                       p + "self_attn.o_proj.weight": (d, args.num_attention_heads * hd),
                       p + "mlp.gate_proj.weight": (args.intermediate_size, d),
                       p + "mlp.up_proj.weight": (args.intermediate_size, d),
                       p + "mlp.down_proj.weight": (d, args.intermediate_size)})
        if qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                shapes[p + f"self_attn.{name}.bias"] = (shapes[p + f"self_attn.{name}.weight"][0],)
    weights = {name: (1 + 0.2 * torch.randn(shape)) if name.endswith("norm.weight") else 0.15 * torch.randn(shape)
               for name, shape in shapes.items()}
    model = base.Transformer(args, weights)
    layer_seed = 0
    for layer in model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                dense = getattr(block, name)
                setattr(block, name, PackedLinear.from_canonical(quantize(dense.weight, 32, layer_seed), dense.bias,
                                                                 "cpu"))
                layer_seed += 1
    head = quantize(model.lm_head.weight, 48, layer_seed)
    model.lm_head = PackedLinear.from_canonical(head, None, "cpu")
    if args.tie_word_embeddings:  # the quantized head serves as the embedding too
        model.embed_tokens = model.lm_head.dequantized_rows(torch.arange(VOCAB))
    return model


ARGS = {
    # GQA, tied quantized head, head_dim not a multiple of 8, partial rotary
    "llama-tied": lambda: base.ModelArgs(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, head_dim=20,
                                         vocab_size=VOCAB, tie_word_embeddings=True, partial_rotary_factor=0.5,
                                         rms_norm_eps=1e-5),
    # untied head, llama3 rope scaling, odd widths
    "llama-untied": lambda: base.ModelArgs(hidden_size=100, intermediate_size=150, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                                           vocab_size=VOCAB,
                                           rope_theta=500000.0, rope_scaling={
                                               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Mistral-style sliding window shorter than the decoded sequence
    "sliding-window": lambda: base.ModelArgs(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB,
                                             sliding_window=5),
    # Qwen2-style bias on q/k/v
    "qkv-bias": lambda: qwen2.ModelArgs(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        tie_word_embeddings=True),
}


def use_kernel(model, kernel: str) -> None:
    """Every packed linear of the Python path runs `kernel` ("auto" is int8 for one row)."""
    for layer in model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                getattr(block, name).kernel = kernel
    model.lm_head.kernel = kernel


def python_and_fused_decode(model, prompt: list[int], steps: int, pad: int = 0, kernel: str = "fp32"):
    """Greedy-decode `steps` tokens from `prompt` both ways; → per-step (python logits, fused logits)."""
    use_kernel(model, kernel)
    cache = model.new_cache(1, len(prompt) + pad + steps + 1)
    cache.pad.fill_(pad)
    logits = model.forward(torch.tensor([[0] * pad + prompt]), cache, last_only=True)[0, -1]
    fused_cache = copy.deepcopy(cache)
    decoder = FusedDecoder.build(model, "fp32" if kernel == "fp32" else "int8")
    assert decoder is not None, why_not(model)
    results = []
    token = int(logits.argmax())
    for _ in range(steps):
        expected = model.forward(torch.tensor([[token]]), cache)[0, -1]
        actual = decoder.step(token, fused_cache)
        fused_cache.advance(1)
        results.append((expected, actual))
        token = int(expected.argmax())
    if kernel == "fp32":
        for layer in range(len(model.layers)):
            torch.testing.assert_close(fused_cache.keys[layer], cache.keys[layer], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fused_cache.values[layer], cache.values[layer], rtol=1e-4, atol=1e-4)
    return results


@pytest.mark.parametrize("name", sorted(ARGS))
def test_fused_decode_matches_the_python_path(name):
    model = tiny_model(ARGS[name]())
    for expected, actual in python_and_fused_decode(model, [5, 17, 3, 99, 42, 7, 150], steps=12):
        assert actual.shape == (VOCAB,) and actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        assert int(actual.argmax()) == int(expected.argmax())


@pytest.mark.parametrize("name", sorted(ARGS))
def test_fused_int8_decode_agrees_to_the_int8_error(name):
    model = tiny_model(ARGS[name]())
    for expected, actual in python_and_fused_decode(model, [5, 17, 3, 99, 42, 7, 150], steps=12, kernel="auto"):
        assert ((actual - expected).norm() / expected.norm()).item() < 2e-2


def test_fused_decode_with_left_padding():
    model = tiny_model(ARGS["llama-untied"](), seed=1)
    for expected, actual in python_and_fused_decode(model, [9, 8, 7, 6], steps=6, pad=3):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_tied_quantized_head_serves_as_embedding():
    model = tiny_model(ARGS["llama-tied"]())
    decoder = FusedDecoder.build(model)
    cache_a, cache_b = model.new_cache(1, 4), model.new_cache(1, 4)
    dense = decoder.step(11, cache_a)
    # the same decoder reading embedding rows straight from the packed head
    decoder.decoder.set_output(model.norm.weight, _kernel_weights(model.lm_head), None)
    assert torch.equal(decoder.step(11, cache_b), dense)


def test_ineligible_models_and_bad_steps_are_refused():
    model = tiny_model(ARGS["sliding-window"]())
    decoder = FusedDecoder.build(model)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        decoder.step(VOCAB, model.new_cache(1, 4))
    with pytest.raises(ValueError, match="batch 1"):
        decoder.step(1, model.new_cache(2, 4))
    full = model.new_cache(1, 2)
    full.advance(2)
    with pytest.raises(ValueError, match="KV cache full"):
        decoder.step(1, full)
    model.layers[1].mlp.up_proj = base.Linear(torch.randn(96, 64))
    assert "layer 1 mlp.up_proj" in why_not(model)
    assert FusedDecoder.build(model) is None
