"""End to end on the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trimtab
from trimtab.backend.default_model import default_model_path

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "wiki.utf8"
POSITIONS = 256


@pytest.fixture(scope="module")
def model():
    return trimtab.load()


def test_greedy_chat_knows_the_capital_of_france(model):
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}],
                       temperature=0, max_new_tokens=48)
    assert "Paris" in reply.text
    assert reply.finish_reason in ("eos", "length")
    assert reply.usage.completion_tokens == len(reply.token_ids) > 0


def test_stream_pieces_add_up_to_the_completion(model):
    stream = model.stream("The capital of Italy is", temperature=0, max_new_tokens=12)
    pieces = list(stream)
    assert "".join(pieces) == stream.completion.text
    assert stream.completion.finish_reason in ("eos", "length")
    same = model.generate("The capital of Italy is", temperature=0, max_new_tokens=12)
    assert same.text == stream.completion.text


def test_cancelled_stream_says_so(model):
    stream = model.stream("Count from one to one hundred:", temperature=0, max_new_tokens=64)
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.usage.completion_tokens <= 4


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("My favourite colour is", temperature=0.3, top_p=0.9, seed=7, max_new_tokens=16)
    b = model.generate("My favourite colour is", temperature=0.3, top_p=0.9, seed=7, max_new_tokens=16)
    assert a.token_ids == b.token_ids


def test_logits_match_transformers_loading_the_same_gguf(model):
    transformers = pytest.importorskip("transformers")
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} not present")
    path = default_model_path()
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    text = WIKI.read_text(encoding="utf-8")[:20000]
    ids = model.tokenizer.encode(text)[: POSITIONS]
    assert len(ids) == POSITIONS
    ours = model.logits(ids)                                          # [256, V]
    with torch.no_grad():
        reference = reference_model(torch.tensor([ids])).logits[0].float()
    top1_agreement = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), reference.log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1).mean().item()
    assert top1_agreement >= 0.99, top1_agreement
    assert kl < 1e-3, kl


def test_import_gguf_writes_a_dir_that_loads_as_the_same_model(model, tmp_path, capsys):
    from trimtab.plugin.cli import main

    out = tmp_path / "smollm2"
    assert main(["import-gguf", str(default_model_path()), str(out)]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    imported = trimtab.load(out)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert imported.tokenizer.encode("The quick brown fox jumps over the lazy dog.") == ids
    assert torch.equal(imported.logits(ids), model.logits(ids))

    before = (out / "config.json").read_bytes()
    assert main(["import-gguf", str(default_model_path()), str(out)]) == 1  # no tty: never overwrites
    assert "--force" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == before
