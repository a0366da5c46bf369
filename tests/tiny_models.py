"""Tiny random models of every supported architecture, built from a config (never downloaded)."""
from __future__ import annotations

import torch

VOCAB = 160

# transformers config class name → config values; small, but with every quirk switched on
TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=VOCAB, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=5,
        rms_norm_eps=1e-5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
        rms_norm_eps=1e-6)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, num_local_experts=4,
        num_experts_per_tok=2, rms_norm_eps=1e-5)),
}


def build_hf_model(arch: str, seed: int = 0):
    """A transformers model with random weights large enough that mistakes show in the logits."""
    import transformers

    config_cls, model_cls, values = TINY_CONFIGS[arch]
    config = getattr(transformers, config_cls)(**values)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_hf_model(model, directory) -> None:
    model.save_pretrained(directory, safe_serialization=True)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer_json() -> str:
    """A word-level tokenizer over VOCAB ids: special tokens, then words w5, w6, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer.to_str()


def write_tiny_model_dir(arch: str, directory, *, seed: int = 0):
    """A complete HF-style model dir (weights, config, tokenizer, chat template); returns the HF model."""
    import json
    from pathlib import Path

    directory = Path(directory)
    model = build_hf_model(arch, seed)
    save_hf_model(model, directory)
    (directory / "tokenizer.json").write_text(tiny_tokenizer_json())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "add_bos_token": False,
        "chat_template": CHATML}))
    return model
