"""Perplexity and KL divergence (backend/evaluate.py) and `trimtab eval`."""
from __future__ import annotations

import math

import pytest

import trimtab
from tiny_models import write_tiny_model_dir
from trimtab.backend import evaluate
from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant.convert import ConvertOptions, convert
from trimtab.plugin.cli import main

pytest.importorskip("transformers")

TEXT = " ".join(f"w{5 + (i * 7) % 150}" for i in range(100))   # 100 tokens of the tiny vocabulary


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    float_dir = tmp_path_factory.mktemp("float")
    write_tiny_model_dir("llama", float_dir)
    quantized = tmp_path_factory.mktemp("q") / "llama-4"
    convert(ConvertOptions(str(float_dir), str(quantized), bits=4.0, group_size=32, method="rtn"), progress=False)
    return float_dir, quantized


@pytest.fixture(scope="module")
def models(dirs):
    return trimtab.load(dirs[0]), trimtab.load(dirs[1])


def test_perplexity_by_hand(models):
    model = models[0]
    ids = evaluate.evaluation_tokens(model, TEXT)
    assert len(ids) == 100
    nll = []
    for window in (ids[:32], ids[32:64], ids[64:96]):              # the last 4 tokens make no full window
        logp = model.logits(window).double().log_softmax(-1)
        nll += [-logp[i, window[i + 1]].item() for i in range(31)]
    assert evaluate.perplexity(model, ids, ctx=32, progress=False) == pytest.approx(math.exp(sum(nll) / len(nll)))


def test_kl_divergence_of_a_model_against_itself_is_zero(models):
    model = models[0]
    ids = evaluate.evaluation_tokens(model, TEXT)
    same = evaluate.kl_divergence(model, model, ids, ctx=32, progress=False)
    assert abs(same.mean) < 1e-9 and same.top1_agreement == 1.0 and same.positions == 96


def test_kl_divergence_of_the_quantized_model_by_hand(models):
    reference, quantized = models
    ids = evaluate.evaluation_tokens(reference, TEXT)
    kld = evaluate.kl_divergence(quantized, reference, ids, ctx=32, progress=False)
    by_hand = []
    for window in (ids[:32], ids[32:64], ids[64:96]):
        p, q = reference.logits(window).double().log_softmax(-1), quantized.logits(window).double().log_softmax(-1)
        by_hand.append((p.exp() * (p - q)).sum(-1).mean().item())
    assert 0 < kld.mean < 1 and kld.mean == pytest.approx(sum(by_hand) / 3) and kld.top1_agreement < 1


def test_windows_need_enough_tokens():
    with pytest.raises(TrimtabError, match="fewer than one window of 512"):
        evaluate.windows(list(range(100)), 512)
    assert evaluate.windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_command_line(dirs, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    float_dir, quantized = map(str, dirs)
    assert main(["eval", "ppl", "-m", quantized, "--text", str(text), "--ctx", "32"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert main(["eval", "kld", "-m", quantized, "--ref", float_dir, "--text", str(text), "--ctx", "32",
                 "--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KL divergence ") and "over 64 positions" in out


@pytest.mark.parametrize("arguments, message", [
    (["kld", "--text", "TEXT"], "eval kld needs --ref"),
    (["ppl", "--text", "/no/such/text.txt"], "/no/such/text.txt: no such file"),
    (["ppl", "--text", "TEXT", "--ctx", "64"], "fewer than one window of 64"),
    (["ppl", "--text", "TEXT", "--ctx", "1"], "the context must be at least 2 tokens"),
    (["ppl", "--text", "TEXT", "--ctx", "1000"], "longer than"),
])
def test_command_line_mistakes_are_one_line(dirs, tmp_path, capsys, arguments, message):
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(["w5"] * 40))
    arguments = [str(text) if a == "TEXT" else a for a in arguments]
    assert main(["eval", *arguments, "-m", str(dirs[1])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trimtab: error: ") and message in err and "Traceback" not in err


def test_different_vocabularies_are_refused(models, tmp_path):
    other_dir = tmp_path / "other"
    write_tiny_model_dir("qwen2", other_dir)
    other = trimtab.load(other_dir)
    other.transformer.args.vocab_size += 1  # as if it had another vocabulary
    with pytest.raises(TrimtabError, match="different vocabularies"):
        evaluate.kl_divergence(models[0], other, list(range(5, 37)), ctx=32, progress=False)
