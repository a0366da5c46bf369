"""trimtab.load on Hugging Face dirs: every architecture end to end, sharded checkpoints, errors."""
from __future__ import annotations

import json

import pytest
import torch

import trimtab
from tiny_models import TINY_CONFIGS, write_tiny_model_dir
from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError

pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_load_dir_logits_and_generation(tmp_path, arch):
    hf = write_tiny_model_dir(arch, tmp_path)
    model = trimtab.load(tmp_path)
    ids = [5, 17, 42, 99, 7, 150]
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    ours = model.logits(ids)
    assert ours.shape == (len(ids), hf.config.vocab_size) and ours.dtype == torch.float32
    assert ((ours - reference).abs().max() / reference.abs().max()) < 1e-4
    reply = model.chat([{"role": "user", "content": "w5 w6 w7"}], temperature=0, max_new_tokens=5)
    assert reply.finish_reason in ("eos", "length") and reply.usage.prompt_tokens > 0


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    hf = write_tiny_model_dir("llama", single)
    write_tiny_model_dir("llama", sharded)
    for f in sharded.glob("*.safetensors"):
        f.unlink()
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    ids = [9, 8, 7, 6]
    assert torch.equal(trimtab.load(single).logits(ids), trimtab.load(sharded).logits(ids))


def test_bf16_checkpoint_runs_in_float32(tmp_path):
    hf = write_tiny_model_dir("qwen2", tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    model = trimtab.load(tmp_path)
    assert model.transformer.embed_tokens.dtype == torch.float32
    assert torch.isfinite(model.logits([5, 6, 7])).all()


def test_unknown_architecture_names_the_file(tmp_path):
    write_tiny_model_dir("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"gpt_neox.*supports"):
        trimtab.load(tmp_path)


def test_missing_tokenizer_is_named(tmp_path):
    write_tiny_model_dir("llama", tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        trimtab.load(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_tiny_model_dir("llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="model.layers.1.mlp.up_proj.weight"):
        trimtab.load(tmp_path)


@pytest.mark.parametrize("path, message", [
    ("/nonexistent/model", "no such file"),
])
def test_bad_paths(path, message):
    with pytest.raises(TrimtabError, match=message):
        trimtab.load(path)


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFileError, match="not a model"):
        trimtab.load(tmp_path / "notes.txt")
    with pytest.raises(ModelFileError, match="config.json"):
        trimtab.load(tmp_path)


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"tempreature": 0.2}, "unknown setting"),
])
def test_bad_settings(tmp_path, settings, message):
    write_tiny_model_dir("llama", tmp_path)
    model = trimtab.load(tmp_path)
    with pytest.raises(TrimtabError, match=message):
        model.generate("w5 w6", **settings)


def test_wrong_device_is_an_error():
    with pytest.raises(TrimtabError, match="device"):
        trimtab.load(device="tpu")


def test_tools_and_documents_reach_the_template(tmp_path):
    write_tiny_model_dir("llama", tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for t in tools or [] %}{{ t['name'] }} {% endfor %}"
                               "{% for d in documents or [] %}{{ d['title'] }} {% endfor %}" + config["chat_template"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    model = trimtab.load(tmp_path)
    messages = [{"role": "user", "content": "w5"}]
    plain = model.chat(messages, temperature=0, max_new_tokens=1).usage.prompt_tokens
    with_both = model.chat(messages, tools=[{"name": "w40"}], documents=[{"title": "w41"}],
                           temperature=0, max_new_tokens=1).usage.prompt_tokens
    assert with_both == plain + 2
    with pytest.raises(TrimtabError, match="conversation"):
        model.generate("w5", tools=[{"name": "w40"}])


def test_load_dtype_is_checked_and_applied(tmp_path):
    write_tiny_model_dir("llama", tmp_path)
    with pytest.raises(TrimtabError, match="dtype must be one of float32, bfloat16, float16, got 'float8'"):
        trimtab.load(str(tmp_path), dtype="float8")
    assert trimtab.load(str(tmp_path), dtype="bfloat16").transformer.dtype == torch.bfloat16
    assert trimtab.load(str(tmp_path), dtype=torch.float32).transformer.dtype == torch.float32
