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


def test_dtype_option_is_applied_and_checked(tiny_dir, capsys):
    assert main(["generate", "w5 w6", "-m", str(tiny_dir), "--dtype", "bfloat16", "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "w5", "-m", str(tiny_dir), "--dtype", "float8"])
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_wrong_arguments_show_usage():
    result = subprocess.run([sys.executable, "-m", "trimtab", "generate"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "trimtab", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "chat", "import-gguf"):
        assert command in result.stdout


def test_guard_reports_what_it_changed_on_the_command_line(tiny_dir, capsys):
    assert main(["chat", "w7", "-m", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "2",
                 "--repetition-penalty", "1.15", "--set", "ban_eos_token=true"]) == 0
    err = capsys.readouterr().err
    assert "trimtab: guard: repetition_penalty: 1.15 → 1.01" in err
    assert "trimtab: guard: ban_eos_token: True → False" in err


def test_unknown_set_key_is_one_clear_line(tiny_dir, capsys):
    assert main(["generate", "w5", "-m", str(tiny_dir), "--set", "temprature=0.2"]) == 1
    err = capsys.readouterr().err
    assert "temprature" in err and "did you mean temperature" in err


def test_preset_file_on_the_command_line(tiny_dir, tmp_path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text("temperature: 1.31\ntop_p: 0.14\nrepetition_penalty: 1.17\ntop_k: 49\n")
    assert main(["chat", "w7", "-m", str(tiny_dir), "--preset", str(preset), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "temperature: 1.31 → 0.3" in err and "top_p: 0.14 → 0.7" in err
