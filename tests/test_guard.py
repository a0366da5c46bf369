"""The guard: every policy rule in every mode, EOS for instruct and base models, unsupported and
unknown settings, the shipped policy and broken ones."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import yaml

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import (GUARD_MODES, ModelTraits, Override, guard, load_policy, parse_policy,
                                   resolve_settings)
from trimtab.backend.presets import VETTED_PRESETS, load_preset
from trimtab.backend.settings import GenerationSettings

EOS = 2
INSTRUCT = ModelTraits(has_chat_template=True, eos_token_ids=(EOS,))
BASE = ModelTraits(has_chat_template=False, eos_token_ids=(EOS,))
SAFE = {"temperature": 0.2, "top_p": 0.8}  # a sampling baseline the rules leave alone
WEBUI = Path(__file__).parent / "fixtures" / "webui_presets"

# (field, asked, what enforce applies, words the reason must contain)
RANGE_CASES = [
    ("temperature", 1.31, 0.3, "caps the temperature at 0.3"),
    ("temperature", 0.05, 0.1, "temperature 0"),
    ("top_p", 0.14, 0.7, "near-greedy"),
    ("top_p", 1.0, 0.9, "long tail"),
    ("top_k", 5, 20, "at least 20"),
    ("min_p", 0.5, 0.2, "near-greedy"),
    ("typical_p", 0.5, 0.9, "likeliest"),
    ("repetition_penalty", 1.15, 1.01, "punctuation and function words"),
    ("repetition_penalty", 0.9, 1.0, "rewards"),
    ("presence_penalty", 0.5, 0.1, "away from the subject"),
    ("presence_penalty", -0.5, 0.0, "rewards"),
    ("frequency_penalty", 0.5, 0.1, "the longer the answer"),
    ("frequency_penalty", -0.5, 0.0, "rewards"),
    ("no_repeat_ngram_size", 3, 0, "of the"),
    ("dry_multiplier", 5.0, 3.0, "names and terms"),
    ("dry_base", 10.0, 1.75, "explode"),
    ("dry_allowed_length", 1, 2, "not just verbatim loops"),
]
# lowering one of these turns DRY on in its place
LOOP_PENALTIES = {"repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram_size"}
DRY_ON = load_policy().loops.dry_multiplier   # the strength the guard turns DRY on at
# (field, value): inside the vetted range, or the value that turns the setting off
KEPT_CASES = [
    ("temperature", 0.1), ("temperature", 0.3), ("top_p", 0.7), ("top_p", 0.9), ("top_k", 0), ("top_k", 20),
    ("top_k", 50), ("min_p", 0.0), ("min_p", 0.2), ("typical_p", 1.0), ("typical_p", 0.9),
    ("repetition_penalty", 1.0), ("repetition_penalty", 1.01), ("presence_penalty", 0.1), ("presence_penalty", 0.0),
    ("frequency_penalty", 0.05), ("no_repeat_ngram_size", 0), ("no_repeat_ngram_size", 10),
    ("dry_multiplier", 0.0), ("dry_multiplier", 3.0), ("dry_base", 4.0), ("dry_allowed_length", 2),
    ("min_new_tokens", 0), ("ban_eos_token", False),
]
# (settings, field, what enforce applies for an instruct model, words the reason must contain)
EOS_CASES = [
    ({"ban_eos_token": True}, "ban_eos_token", False, "ever ending"),
    ({"custom_token_bans": [7, EOS, 9]}, "custom_token_bans", (7, 9), "EOS token (2)"),
    ({"custom_token_bans": f"{EOS}"}, "custom_token_bans", (), "EOS token (2)"),
    ({"logit_bias": {EOS: -100, 5: 2.0}}, "logit_bias", {5: 2.0}, "all but bans it"),
    ({"logit_bias": {str(EOS): -4}}, "logit_bias", {}, "all but bans it"),
    ({"min_new_tokens": 100}, "min_new_tokens", 0, "holds EOS off"),
]


def only(overrides: list[Override], field: str) -> Override:
    found = [o for o in overrides if o.field == field]
    assert len(found) == 1, overrides
    return found[0]


@pytest.mark.parametrize("field, asked, applied, words", RANGE_CASES)
def test_enforce_replaces_an_unsafe_value_and_says_why(field, asked, applied, words):
    settings, overrides = guard({**SAFE, field: asked}, INSTRUCT, "enforce")
    assert getattr(settings, field) == applied
    expected = [Override(field, asked, applied, only(overrides, field).reason)]
    if field in LOOP_PENALTIES and applied < asked:
        expected.append(Override("dry_multiplier", 0.0, DRY_ON, only(overrides, "dry_multiplier").reason))
        assert settings.dry_multiplier == DRY_ON and f"in place of the lowered {field}" in expected[1].reason
    assert overrides == expected
    reason = overrides[0].reason
    assert reason.startswith(f"{field} {asked!r}") and words in reason and "{" not in reason


@pytest.mark.parametrize("field, asked, applied, words", RANGE_CASES)
def test_warn_keeps_the_value_and_warns(field, asked, applied, words):
    settings, overrides = guard({**SAFE, field: asked}, INSTRUCT, "warn")
    assert getattr(settings, field) == asked
    o = only(overrides, field)
    assert o.asked == o.applied == asked and o.reason.startswith("warning: ") and words in o.reason


@pytest.mark.parametrize("unsafe", [{f: a} for f, a, _, _ in RANGE_CASES] + [s for s, *_ in EOS_CASES])
def test_off_applies_nothing_and_says_so_loudly(unsafe, caplog):
    with caplog.at_level(logging.WARNING, logger="trimtab.backend.guard"):
        guarded, overrides = guard({**SAFE, **unsafe}, INSTRUCT, "off")
    assert guarded == GenerationSettings(**load_preset({**SAFE, **unsafe}))
    assert [o.field for o in overrides] == ["guard"] and "guard is off" in overrides[0].reason
    assert "guard is off" in caplog.text


@pytest.mark.parametrize("mode", ["enforce", "warn"])
@pytest.mark.parametrize("field, value", KEPT_CASES)
def test_values_in_range_pass_untouched(field, value, mode):
    settings, overrides = guard({**SAFE, field: value}, INSTRUCT, mode)
    assert overrides == [] and getattr(settings, field) == value


@pytest.mark.parametrize("greedy", [{"temperature": 0}, {"temperature": 1.31, "do_sample": False}])
def test_greedy_decoding_skips_the_sampling_rules(greedy):
    settings, overrides = guard({**greedy, "top_p": 0.1, "top_k": 3, "min_p": 0.9, "typical_p": 0.1}, INSTRUCT)
    assert overrides == [] and settings.greedy
    # penalties and EOS still matter when decoding greedily
    _, overrides = guard({**greedy, "repetition_penalty": 1.15, "ban_eos_token": True}, INSTRUCT)
    assert [o.field for o in overrides] == ["repetition_penalty", "dry_multiplier", "ban_eos_token"]


@pytest.mark.parametrize("settings, field, applied, words", EOS_CASES)
def test_eos_is_never_banned_for_an_instruct_model(settings, field, applied, words):
    guarded, overrides = guard({**SAFE, **settings}, INSTRUCT, "enforce")
    o = only(overrides, field)
    assert getattr(guarded, field) == applied == o.applied and words in o.reason and "instruct" in o.reason
    _, warned = guard({**SAFE, **settings}, INSTRUCT, "warn")
    w = only(warned, field)
    assert w.applied == w.asked != applied and w.reason.startswith("warning: ")


@pytest.mark.parametrize("mode", ["enforce", "warn"])
@pytest.mark.parametrize("settings, field, applied, words", EOS_CASES)
def test_eos_bans_on_a_base_model_are_kept_with_a_warning(settings, field, applied, words, mode):
    guarded, overrides = guard({**SAFE, **settings}, BASE, mode)
    o = only(overrides, field)
    assert o.applied == o.asked == getattr(guarded, field) != applied
    assert o.reason.startswith("warning: ") and "base model" in o.reason


def test_eos_bias_above_the_ban_threshold_and_other_tokens_bans_are_kept():
    settings, overrides = guard({**SAFE, "logit_bias": {EOS: -3.9, 7: -100}, "custom_token_bans": [7, 8]}, INSTRUCT)
    assert overrides == [] and settings.logit_bias == {EOS: -3.9, 7: -100} and settings.custom_token_bans == (7, 8)


def test_every_eos_id_counts():
    traits = ModelTraits(has_chat_template=True, eos_token_ids=(2, 32000))
    settings, overrides = guard({**SAFE, "custom_token_bans": [32000, 5, 2]}, traits)
    assert settings.custom_token_bans == (5,) and "(32000, 2)" in overrides[0].reason


@pytest.mark.parametrize("mode", GUARD_MODES)
def test_unsupported_webui_settings_are_reported_in_every_mode(mode):
    settings, overrides = guard({**SAFE, "tfs": 0.95, "mirostat_mode": 2, "top_a": 0}, INSTRUCT, mode)
    notes = [o for o in overrides if o.field != "guard"]
    assert notes == [Override("tfs", 0.95, None, "not supported by trimtab; ignored"),
                     Override("mirostat_mode", 2, None, "not supported by trimtab; ignored")]
    assert settings.temperature == 0.2  # the supported settings still apply


def test_unknown_setting_is_an_error_with_a_suggestion():
    with pytest.raises(TrimtabError, match=r"unknown setting 'temprature' \(did you mean temperature\?\)"):
        guard({"temprature": 0.2}, INSTRUCT)


@pytest.mark.parametrize("settings, words", [
    ({"temperature": "hot"}, "temperature: must be a number"),
    ({"top_k": -1}, "top_k: -1 is out of range"),
    ({"top_p": float("nan")}, "top_p: must be finite"),
    ({"max_tokens": 5, "max_new_tokens": 6}, "max_new_tokens is given twice"),
])
def test_bad_values_are_errors_naming_the_setting(settings, words):
    with pytest.raises(TrimtabError, match=words):
        guard(settings, INSTRUCT, source="my settings")


def test_unknown_mode_is_an_error():
    with pytest.raises(TrimtabError, match="enforce, warn, off"):
        guard(SAFE, INSTRUCT, "strict")


@pytest.mark.parametrize("traits", [INSTRUCT, BASE])
@pytest.mark.parametrize("name", VETTED_PRESETS)
def test_vetted_presets_pass_the_guard_unchanged(name, traits):
    values = load_preset(name)
    settings, overrides = guard(values, traits)
    assert overrides == [] and all(getattr(settings, k) == v for k, v in values.items())


def test_unset_defaults_are_guarded_and_said_to_be_defaults():
    settings, overrides = guard({}, INSTRUCT)
    assert (settings.temperature, settings.top_p) == (0.3, 0.9)
    assert all(o.reason.startswith("not set, so the default 1.0 applies: ") for o in overrides)


def test_the_seed_settings_are_fixed_in_enforce_mode():
    settings, overrides = guard(load_preset(WEBUI / "seed-unsafe.yaml"), INSTRUCT)
    assert {o.field: (o.asked, o.applied) for o in overrides} == {
        "repetition_penalty": (1.15, 1.01), "dry_multiplier": (0.0, DRY_ON), "ban_eos_token": (True, False)}
    assert (settings.temperature, settings.top_p, settings.top_k) == (0.1, 0.8, 50)


def test_dry_replaces_lowered_penalties_only_when_it_is_off():
    lowered = {**SAFE, "repetition_penalty": 1.2, "frequency_penalty": 0.5}
    settings, overrides = guard(lowered, INSTRUCT)
    dry = only(overrides, "dry_multiplier")
    assert settings.dry_multiplier == DRY_ON and not dry.reason.startswith("not set")
    assert "in place of the lowered repetition_penalty, frequency_penalty" in dry.reason
    # the user's own DRY strength is kept
    settings, overrides = guard({**lowered, "dry_multiplier": 0.5}, INSTRUCT)
    assert settings.dry_multiplier == 0.5 and "dry_multiplier" not in {o.field for o in overrides}
    # warn mode turns nothing on, and says what enforce would do
    settings, overrides = guard(lowered, INSTRUCT, "warn")
    assert settings.dry_multiplier == 0 and only(overrides, "dry_multiplier").reason.startswith("warning: DRY")
    # a penalty raised to neutral (rewarding repetition) needs no replacement
    settings, overrides = guard({**SAFE, "repetition_penalty": 0.9}, INSTRUCT)
    assert settings.dry_multiplier == 0 and [o.field for o in overrides] == ["repetition_penalty"]


def test_resolve_settings_overlays_the_user_on_the_preset():
    settings, overrides = resolve_settings(None, {"top_p": 0.75, "max_tokens": 64, "seed": None}, INSTRUCT)
    assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.2, 0.75, 64) and overrides == []
    settings, overrides = resolve_settings("creative", {"repetition_penalty": 1.15}, INSTRUCT)
    assert settings.temperature == 0.3 and settings.repetition_penalty == 1.01
    assert [o.field for o in overrides] == ["repetition_penalty"]
    settings, _ = resolve_settings({"temperature": 0.15}, {}, INSTRUCT)
    assert settings.temperature == 0.15
    settings, overrides = resolve_settings(WEBUI / "simple-1.yaml", {}, INSTRUCT, "warn")
    assert settings.repetition_penalty == 1.15 and all(o.reason.startswith("warning:") for o in overrides)
    with pytest.raises(TrimtabError, match="did you mean top_p"):
        resolve_settings(None, {"top_pp": 0.8}, INSTRUCT)


def test_model_traits_from_a_tokenizer():
    class Tok:
        chat_template, eos_token_ids = None, [0, 1]
    assert ModelTraits.from_tokenizer(Tok()) == ModelTraits(False, (0, 1))


# -- the policy file -------------------------------------------------------------------------

def test_the_shipped_policy_loads_once():
    policy = load_policy()
    assert policy is load_policy()
    assert {r.field for r in policy.ranges} >= {"temperature", "top_p", "repetition_penalty"}


def shipped_policy() -> dict:
    path = Path(__file__).parents[1] / "presets" / "policy.yaml"
    return yaml.safe_load(path.read_text())


def broken(edit) -> dict:
    data = copy.deepcopy(shipped_policy())
    edit(data)
    return data


@pytest.mark.parametrize("data, words", [
    (["not", "a", "mapping"], "top level: must be a mapping"),
    (broken(lambda d: d.pop("eos")), "top level: missing eos"),
    (broken(lambda d: d.update(version=2)), "version"),
    (broken(lambda d: d["ranges"].update(tempreature=d["ranges"].pop("temperature"))), "ranges.tempreature: not a numeric"),
    (broken(lambda d: d["ranges"]["top_p"].update(when="sometimes")), "ranges.top_p.when"),
    (broken(lambda d: d["ranges"]["top_p"]["max"].pop("reason")), "ranges.top_p.max: missing reason"),
    (broken(lambda d: d["ranges"]["top_p"]["max"].update(to=1.5)), "ranges.top_p.max.to"),
    (broken(lambda d: d["ranges"]["top_p"]["max"].update(to=0.95)), "ranges.top_p.max.to: 0.95 is itself outside"),
    (broken(lambda d: d["ranges"]["top_p"]["max"].update(value="high")), "ranges.top_p.max.value: must be a finite number"),
    (broken(lambda d: d["ranges"]["top_p"]["max"].update(value=float("nan"))), "ranges.top_p.max.value: must be a finite"),
    (broken(lambda d: d["ranges"]["top_k"]["min"].update(to=2.5)), "ranges.top_k.min.to"),
    (broken(lambda d: d["ranges"]["top_p"]["max"].update(reason="top_p {aksed}")), "bad placeholder"),
    (broken(lambda d: d["ranges"]["top_p"].update(off=1)), "ranges.top_p: unknown key off"),
    (broken(lambda d: d["ranges"]["top_p"].pop("max") and d["ranges"]["top_p"].pop("min")), "needs a min or a max"),
    (broken(lambda d: d["eos"].update(bias_ban_at=5)), "eos.bias_ban_at: must be negative"),
    (broken(lambda d: d["eos"]["ban_eos_token"].pop("base")), "eos.ban_eos_token: missing base"),
    (broken(lambda d: d.pop("loops")), "top level: missing loops"),
    (broken(lambda d: d["loops"].update(dry_multiplier=0)), "loops.dry_multiplier: 0.0 must be above 0"),
    (broken(lambda d: d["loops"].update(dry_multiplier=9.0)), "inside ranges.dry_multiplier"),
    (broken(lambda d: d["loops"].update(reason="{nope}")), "loops.reason: bad placeholder"),
])
def test_a_broken_policy_fails_clearly(data, words):
    with pytest.raises(TrimtabError, match=r"^policy\.yaml: .*" + re.escape(words)):
        parse_policy(data, source="policy.yaml")
