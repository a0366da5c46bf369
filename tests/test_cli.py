"""The `trimtab` command line: one-shot answers, clear one-line errors, no overwriting."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tiny_models import write_tiny_model_dir
from trimtab.plugin.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_model_dir("llama", directory)
    return directory


def test_generate_prints_the_continuation(tiny_dir, capsys):
    assert main(["generate", "w5 w6", "-m", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_one_message_answers_and_exits(tiny_dir, capsys):
    assert main(["chat", "w7 w8", "-m", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_interactive_chat_reads_until_exit(tiny_dir, capsys, monkeypatch):
    lines = iter(["w5 w6", "/reset", "w9", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_bad_model_path_is_one_clear_line(capsys):
    assert main(["generate", "hi", "-m", "/no/such/model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trimtab: error: /no/such/model") and "Traceback" not in err


def test_bad_setting_is_one_clear_line(tiny_dir, capsys):
    assert main(["generate", "w5", "-m", str(tiny_dir), "--temperature", "-3"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_wrong_arguments_show_usage():
    result = subprocess.run([sys.executable, "-m", "trimtab", "generate"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "trimtab", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "chat", "import-gguf"):
        assert command in result.stdout
