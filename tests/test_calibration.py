"""Calibration text (backend/quant/calibration.py): formats, rows spread over the text, the default
text, and clear errors."""
from __future__ import annotations

import json

import pytest

from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant.calibration import DEFAULT_LABEL, read_text, token_rows


class WordTokenizer:
    """One token per whitespace-separated word: word wN → id N."""

    def encode(self, text, add_special_tokens=True):
        return [int(word[1:]) for word in text.split()]


def test_rows_are_spread_over_the_whole_text():
    text = " ".join(f"w{i}" for i in range(1000))
    rows = token_rows(WordTokenizer(), text, rows=4, length=10, flags="-r 4 × -l 10")
    assert rows.shape == (4, 10)
    assert rows[0].tolist() == list(range(10)) and rows[-1].tolist() == list(range(990, 1000))
    assert rows[1, 0] == 330 and rows[2, 0] == 660


def test_a_text_too_short_says_both_numbers():
    with pytest.raises(TrimtabError, match=r"the calibration text has 50 tokens, but -r 10 × -l 8 needs 80; "
                                           r"give a longer text \(-c\) or fewer or shorter rows"):
        token_rows(WordTokenizer(), " ".join(f"w{i}" for i in range(50)), rows=10, length=8, flags="-r 10 × -l 8")


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2 w3", encoding="utf-8")
    assert read_text(str(tmp_path / "a.txt")) == ("w1 w2 w3", "a.txt")
    lines = [json.dumps({"text": "w1 w2"}), "", json.dumps({"text": "w3", "meta": 1})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert read_text(str(tmp_path / "b.jsonl"))[0].split() == ["w1", "w2", "w3"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}), encoding="utf-8")
    with pytest.raises(TrimtabError, match="c.jsonl: line 1 has no string field 'text'"):
        read_text(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TrimtabError, match="d.txt: not UTF-8 text"):
        read_text(str(tmp_path / "d.txt"))
    with pytest.raises(TrimtabError, match="calibration text \\(-c\\) not found"):
        read_text(str(tmp_path / "missing.txt"))


def test_default_text_needs_no_network_and_is_always_the_same():
    text, label = read_text(None, tokens_wanted=20_000)
    assert label == DEFAULT_LABEL and len(text) >= 20_000 * 4
    assert read_text(None, tokens_wanted=20_000)[0] == text
    assert '"""' in text                        # prose in docstrings as well as code
