"""Presets: the vetted ones, webui preset files (good and malformed), writing them, and the
`trimtab preset check` / `trimtab preset import` commands."""
from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import load_policy
from trimtab.backend.presets import DEFAULT_PRESET, VETTED_PRESETS, load_preset, write_preset
from trimtab.plugin import cli
from trimtab.plugin.preset_cli import add_preset_commands

DRY_ON = load_policy().loops.dry_multiplier   # the strength the guard turns DRY on at

WEBUI = Path(__file__).parent / "fixtures" / "webui_presets"
SHIPPED = Path(__file__).parents[1] / "presets"


def run_cli(argv: list[str]) -> int:
    """`trimtab ARGV` through cli.main once it wires the preset commands, else through a parser
    built the same way (subcommands with set_defaults(run=...), TrimtabError → one line, 1)."""
    if "add_preset_commands(" in inspect.getsource(cli.build_parser):
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="trimtab")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_preset_commands(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TrimtabError as e:
        print(f"trimtab: error: {e}", file=sys.stderr)
        return 1


@pytest.fixture
def webui(tmp_path) -> Path:
    """A copy of the webui fixtures, so tests can write next to them."""
    shutil.copytree(WEBUI, tmp_path / "webui")
    return tmp_path / "webui"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# -- load_preset -----------------------------------------------------------------------------

def test_vetted_presets():
    assert DEFAULT_PRESET == "balanced" and set(VETTED_PRESETS) == {"precise", "balanced", "creative"}
    expected = {"precise": (0.1, 0.7), "balanced": (0.2, 0.8), "creative": (0.3, 0.9)}
    for name, (temperature, top_p) in expected.items():
        values = load_preset(name)
        assert (values["temperature"], values["top_p"]) == (temperature, top_p)
        assert values["repetition_penalty"] == 1.0 and values["ban_eos_token"] is False
        text = (SHIPPED / f"{name}.yaml").read_text()
        assert text.startswith("# ") and yaml.safe_load(text) == values  # flat webui YAML, with a why


def test_webui_presets_load_as_written():
    assert load_preset(WEBUI / "Divine Intellect.yaml") == {
        "temperature": 1.31, "top_p": 0.14, "top_k": 49, "repetition_penalty": 1.17}
    assert load_preset(str(WEBUI / "seed-unsafe.yaml"))["ban_eos_token"] is True


def test_dict_presets_resolve_aliases_and_check_values():
    assert load_preset({"max_tokens": 10, "stopping_strings": "###", "custom_token_bans": "1, 2", "tfs": 0.9}) == {
        "max_new_tokens": 10, "stop": ("###",), "custom_token_bans": (1, 2), "tfs": 0.9}
    with pytest.raises(TrimtabError, match="max_new_tokens is given twice"):
        load_preset({"max_tokens": 10, "max_new_tokens": 20})
    with pytest.raises(TrimtabError, match="setting names must be text"):
        load_preset({1: 0.5})


def test_dry_sequence_breakers_take_webuis_text_form_or_a_list():
    assert load_preset({"dry_sequence_breakers": '"\\n", ":", "\\"", "*"'}) == {
        "dry_sequence_breakers": ("\n", ":", '"', "*")}
    assert load_preset({"dry_sequence_breakers": ["\n", "."]}) == {"dry_sequence_breakers": ("\n", ".")}
    for bad in ("\\n, :", 5, [1]):
        with pytest.raises(TrimtabError, match="dry_sequence_breakers: must be"):
            load_preset({"dry_sequence_breakers": bad})


def test_json_preset(tmp_path):
    path = write(tmp_path, "p.json", '{"temperature": 0.2, "logit_bias": {"2": -5}, "max_new_tokens": 1e3}')
    assert load_preset(path) == {"temperature": 0.2, "logit_bias": {2: -5.0}, "max_new_tokens": 1000}


def test_yaml_reads_exponents_as_numbers(tmp_path):
    path = write(tmp_path, "p.yml", "max_new_tokens: 1e3\nmin_p: 5e-2\n")
    assert load_preset(path) == {"max_new_tokens": 1000, "min_p": 0.05}


@pytest.mark.parametrize("asked, words", [
    ("balnced", "preset 'balnced' is neither a vetted preset (precise, balanced, creative) nor a file (did you mean balanced?)"),
    ("/no/such/preset.yaml", "/no/such/preset.yaml: no such preset file"),
    (42, "preset must be a vetted preset's name"),
])
def test_unknown_presets(asked, words):
    with pytest.raises(TrimtabError) as e:
        load_preset(asked)
    assert words in str(e.value)


# (file name, content, what the one-line error must say besides the file's path)
MALFORMED = [
    ("bad-yaml.yaml", "temperature: 0.2\ntop_p: [0.8\n", "line 3: invalid YAML"),
    ("list.yaml", "- temperature: 0.1\n- top_p: 0.8\n", "this file holds a list"),
    ("string-temperature.yaml", 'temperature: "0.7"\n', "setting temperature: must be a number, got '0.7'"),
    ("nan.yaml", "temperature: .nan\n", "setting temperature: must be finite"),
    ("inf.yaml", "top_p: .inf\n", "setting top_p: must be finite"),
    ("negative-top-k.yaml", "top_k: -5\n", "setting top_k: -5 is out of range"),
    ("huge.yaml", "max_new_tokens: 1e9\n", "setting max_new_tokens: 1000000000.0 is out of range"),
    ("fraction.yaml", "top_k: 2.5\n", "setting top_k: must be a whole number"),
    ("unknown.yaml", "temprature: 0.2\n", "unknown setting 'temprature' (did you mean temperature?)"),
    ("duplicate.yaml", "top_p: 0.8\ntop_p: 0.9\n", "line 2: invalid YAML: top_p is given twice"),
    ("empty.yaml", "", "the file is empty"),
    ("scalar.yaml", "just some text\n", "this file holds a string"),
    ("not-utf8.yaml", b"temperature: \xff\n", "not UTF-8 text"),
    ("bad.json", '{"temperature": 0.2,\n}', "line 2: invalid JSON"),
    ("nan.json", '{"temperature": NaN}', "setting temperature: must be finite"),
    ("list.json", "[0.2, 0.8]", "this file holds a list"),
    ("duplicate.json", '{"top_p": 0.8, "top_p": 0.9}', "top_p is given twice"),
    ("bias.json", '{"logit_bias": {"eos": -100}}', "setting logit_bias: keys must be token ids"),
    ("preset.txt", "temperature: 0.2\n", "not a preset file"),
]


@pytest.mark.parametrize("name, content, words", MALFORMED)
def test_malformed_preset_is_an_error_naming_file_and_problem(tmp_path, name, content, words):
    path = write(tmp_path, name, content)
    with pytest.raises(TrimtabError) as e:
        load_preset(path)
    message = str(e.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message


@pytest.mark.parametrize("name, content, words", MALFORMED)
def test_preset_check_on_a_malformed_file_gives_one_line_and_exit_2(tmp_path, capsys, name, content, words):
    path = write(tmp_path, name, content)
    assert run_cli(["preset", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"trimtab: error: {path}") and words in err and err.count("\n") == 1 and out == ""


# -- write_preset ----------------------------------------------------------------------------

def test_write_preset_round_trips_and_never_overwrites_unasked(tmp_path):
    values = {"temperature": 0.2, "custom_token_bans": [5, 6], "seed": -1, "stop": ["###"], "logit_bias": {7: 1.5}}
    path = write_preset(values, tmp_path / "mine.yaml", comment="made by hand\nsecond line")
    text = path.read_text()
    assert text.startswith("# made by hand\n# second line\n") and "custom_token_bans: 5, 6" in text
    assert load_preset(path) == load_preset(values)
    with pytest.raises(TrimtabError, match="already exists; not overwriting it"):
        write_preset({"temperature": 0.3}, path)
    assert path.read_text() == text
    write_preset({"temperature": 0.3}, path, overwrite=True)
    assert load_preset(path) == {"temperature": 0.3}
    json_path = write_preset(values, tmp_path / "mine.json")
    assert json.loads(json_path.read_text())["temperature"] == 0.2 and load_preset(json_path) == load_preset(values)
    with pytest.raises(TrimtabError, match="a preset file ends in"):
        write_preset(values, tmp_path / "mine.txt")
    with pytest.raises(TrimtabError, match="top_p: 2.0 is out of range"):
        write_preset({"top_p": 2.0}, tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


# -- trimtab preset check --------------------------------------------------------------------

def test_check_explains_divine_intellect_line_by_line(capsys):
    path = WEBUI / "Divine Intellect.yaml"
    assert run_cli(["preset", "check", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: checked as for an instruct model") and "--base-model" in lines[0]
    assert lines[1:5] == [
        "  temperature: 1.31: changed to 0.3 because temperature 1.31 flattens" + lines[1].split("flattens", 1)[1],
        "  top_p: 0.14: changed to 0.7 because top_p 0.14 keeps" + lines[2].split("keeps", 1)[1],
        "  top_k: 49: kept",
        "  repetition_penalty: 1.17: changed to 1.01 because repetition_penalty 1.17 penalises" + lines[4].split("penalises", 1)[1],
    ]
    assert lines[5:] == [
        f"  dry_multiplier (not in the preset): changed to {DRY_ON} because DRY turned on at {DRY_ON} in place of "
        "the lowered repetition_penalty" + lines[5].split("repetition_penalty", 1)[1],
        f"{path}: some settings would change"]


@pytest.mark.parametrize("name, changes", [
    ("LLaMA-Precise.yaml", {"temperature": "0.3", "top_p": "0.7", "repetition_penalty": "1.01", "dry_multiplier (not in the preset)": str(DRY_ON)}),
    ("simple-1.yaml", {"temperature": "0.3", "repetition_penalty": "1.01", "dry_multiplier (not in the preset)": str(DRY_ON)}),
    ("seed-unsafe.yaml", {"repetition_penalty": "1.01", "ban_eos_token": "false", "dry_multiplier (not in the preset)": str(DRY_ON)}),
])
def test_check_changes_exactly_the_unsafe_settings(capsys, name, changes):
    assert run_cli(["preset", "check", str(WEBUI / name)]) == 1
    lines = capsys.readouterr().out.splitlines()[1:-1]
    changed = {line.split(":")[0].strip(): line.split("changed to ")[1].split(" because")[0]
               for line in lines if "changed to" in line}
    assert changed == changes
    assert all(line.endswith(": kept") for line in lines if "changed to" not in line)


def test_check_passes_the_vetted_presets(capsys):
    paths = [str(SHIPPED / f"{name}.yaml") for name in VETTED_PRESETS]
    assert run_cli(["preset", "check", *paths]) == 0
    out = capsys.readouterr().out
    assert out.count("nothing would change") == 3 and "changed" not in out


def test_check_as_for_a_base_model_keeps_eos_bans_with_a_warning(tmp_path, capsys):
    path = write(tmp_path, "base.yaml", "temperature: 0.2\ntop_p: 0.8\nban_eos_token: true\n")
    assert run_cli(["preset", "check", "--base-model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "checked as for a base model" in out
    assert "  ban_eos_token: true: kept, with a warning: ban_eos_token keeps the model from ending" in out
    assert run_cli(["preset", "check", str(path)]) == 1
    assert "ban_eos_token: true: changed to false because" in capsys.readouterr().out


def test_check_finds_eos_in_token_bans_and_logit_bias_given_its_id(tmp_path, capsys):
    path = write(tmp_path, "bans.json", json.dumps(
        {"temperature": 0.2, "top_p": 0.8, "custom_token_bans": "2, 13", "logit_bias": {"2": -100}}))
    assert run_cli(["preset", "check", str(path)]) == 0
    assert "EOS token id unknown" in capsys.readouterr().out
    assert run_cli(["preset", "check", "--eos-id", "2", str(path)]) == 1
    out = capsys.readouterr().out
    assert "custom_token_bans: [2, 13]: changed to [13] because custom_token_bans includes the EOS token (2)" in out
    assert "logit_bias: {2: -100.0}: changed to {} because logit_bias -100.0 on the EOS token (2)" in out


def test_check_reports_unsupported_settings_and_defaults(tmp_path, capsys):
    path = write(tmp_path, "more.yaml", "temperature: 0.2\ntfs: 0.95\ntop_a: 0\nmirostat_mode: 2\n")
    assert run_cli(["preset", "check", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:-1] == [
        "  temperature: 0.2: kept",
        "  tfs: 0.95: not supported by trimtab; ignored",
        "  top_a: 0: kept (not supported by trimtab, but this value does nothing)",
        "  mirostat_mode: 2: not supported by trimtab; ignored",
        "  top_p (not in the preset): changed to 0.9 because not set, so the default 1.0 applies: "
        + lines[5].split("applies: ", 1)[1],
    ]


def test_check_of_several_files_exits_with_the_worst(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "- 1\n")
    good = SHIPPED / "balanced.yaml"
    assert run_cli(["preset", "check", str(good), str(bad), str(WEBUI / "simple-1.yaml")]) == 2
    out, err = capsys.readouterr()
    assert "nothing would change" in out and "some settings would change" in out and str(bad) in err


# -- trimtab preset import -------------------------------------------------------------------

def test_import_writes_a_vetted_copy_that_checks_clean(webui, capsys):
    source = webui / "Divine Intellect.yaml"
    original = source.read_text()
    assert run_cli(["preset", "import", str(source)]) == 0
    out = webui / "Divine Intellect.vetted.yaml"
    assert f"wrote {out}: 4 changed, 0 dropped" in capsys.readouterr().out
    assert load_preset(out) == {"temperature": 0.3, "top_p": 0.7, "top_k": 49, "repetition_penalty": 1.01,
                                "dry_multiplier": DRY_ON}
    assert out.read_text().startswith("# Vetted by trimtab from Divine Intellect.yaml")
    assert source.read_text() == original
    assert run_cli(["preset", "check", str(out)]) == 0


def test_import_drops_unsupported_settings_with_a_comment(tmp_path, capsys):
    source = write(tmp_path, "webui.yaml", "temperature: 0.7\ntop_p: 0.9\ntfs: 0.95\nmirostat_mode: 2\n"
                                           "ban_eos_token: true\n")
    assert run_cli(["preset", "import", str(source), "-o", str(tmp_path / "mine.yml")]) == 0
    text = (tmp_path / "mine.yml").read_text()
    assert "# Dropped, not supported by trimtab: tfs, mirostat_mode\n" in text
    assert yaml.safe_load(text) == {"temperature": 0.3, "top_p": 0.9, "ban_eos_token": False}
    capsys.readouterr()
    assert run_cli(["preset", "check", str(tmp_path / "mine.yml")]) == 0


def test_import_for_a_base_model_keeps_the_eos_ban(webui):
    assert run_cli(["preset", "import", "--base-model", str(webui / "seed-unsafe.yaml"), "-o",
                    str(webui / "seed.json")]) == 0
    assert json.loads((webui / "seed.json").read_text()) == {
        "temperature": 0.1, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.01, "ban_eos_token": True,
        "dry_multiplier": DRY_ON}


def test_import_refuses_to_overwrite_without_force(webui, capsys):
    source = webui / "simple-1.yaml"
    out = write(webui, "simple-1.vetted.yaml", "# mine\ntemperature: 0.25\n")
    assert run_cli(["preset", "import", str(source)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"trimtab: error: {out} already exists") and "--force" in err
    assert out.read_text() == "# mine\ntemperature: 0.25\n"
    assert run_cli(["preset", "import", str(source), "--force"]) == 0
    assert load_preset(out)["repetition_penalty"] == 1.01


def test_import_of_a_malformed_file_writes_nothing(tmp_path, capsys):
    source = write(tmp_path, "bad.yaml", "temperature: hot\n")
    assert run_cli(["preset", "import", str(source)]) == 1
    assert "setting temperature: must be a number" in capsys.readouterr().err
    assert not (tmp_path / "bad.vetted.yaml").exists()


def test_preset_without_an_action_shows_usage(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["preset"])
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err
