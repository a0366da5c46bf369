"""The guard: generation settings checked against trimtab's policy (presets/policy.yaml).

Quantized instruct models drift off topic under a few well-known settings (EOS banned, a
repetition penalty of 1.15, hot sampling). Every entry point sends the user's settings through
`guard` (via `resolve_settings`), which in "enforce" mode replaces each unsafe value and says
what it changed and why, in "warn" mode only says, and in "off" mode lets everything through
with one loud note. Webui settings trimtab does not implement are reported in every mode.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, Mapping

import yaml

from trimtab.backend.errors import TrimtabError
from trimtab.backend.presets import DEFAULT_PRESET, canonical_settings, load_preset
from trimtab.backend.settings import SETTINGS, UNSUPPORTED, GenerationSettings, check_value, is_neutral

log = logging.getLogger(__name__)

GUARD_MODES = ("enforce", "warn", "off")
POLICY_SOURCE = "trimtab.presets/policy.yaml"
NOT_SUPPORTED = "not supported by trimtab; ignored"
GUARD_OFF = ("the guard is off: settings are used exactly as given, unsafe ones included "
             "(EOS bans and strong repetition penalties make quantized models drift off topic)")


@dataclass(frozen=True)
class Override:
    """One thing the guard changed (or, for a warning, would change): `applied` is what runs."""
    field: str
    asked: Any
    applied: Any
    reason: str


@dataclass(frozen=True)
class ModelTraits:
    """What the guard needs to know about the model: instruct (has a chat template) or base,
    and which token ids end its answer."""
    has_chat_template: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ModelTraits:
        return cls(has_chat_template=tokenizer.chat_template is not None,
                   eos_token_ids=tuple(tokenizer.eos_token_ids))


# -- the policy ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bound:
    value: float   # values beyond this are unsafe
    to: Any        # what the guard uses instead
    reason: str


@dataclass(frozen=True)
class RangeRule:
    field: str
    sampling_only: bool      # skipped for greedy decoding, where the setting does nothing
    neutral: Any             # the value at which the setting does nothing (always allowed), or None
    low: Bound | None
    high: Bound | None

    def violated(self, value) -> Bound | None:
        if self.neutral is not None and value == self.neutral:
            return None
        if self.low is not None and value < self.low.value:
            return self.low
        if self.high is not None and value > self.high.value:
            return self.high
        return None


@dataclass(frozen=True)
class EosRule:
    instruct: str   # reason when the value is changed (models with a chat template)
    base: str       # reason when it is kept with a warning (base models)


@dataclass(frozen=True)
class LoopRule:
    dry_multiplier: float   # DRY's strength when the guard turns it on in place of a token penalty
    reason: str


@dataclass(frozen=True)
class Policy:
    ranges: tuple[RangeRule, ...]
    eos_bias_ban_at: float
    eos: Mapping[str, EosRule]   # ban_eos_token, custom_token_bans, logit_bias, min_new_tokens
    loops: LoopRule


# token penalties a user sets against repetition loops; when the guard lowers one, DRY takes over
LOOP_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram_size")


EOS_RULES = ("ban_eos_token", "custom_token_bans", "logit_bias", "min_new_tokens")
_PLACEHOLDERS = {"asked": "A", "applied": "B", "eos": "2", "ban_at": "-4", "fields": "F"}


@functools.cache
def load_policy() -> Policy:
    """The shipped policy, read and validated once."""
    try:
        text = resources.files("trimtab.presets").joinpath("policy.yaml").read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise TrimtabError(f"{POLICY_SOURCE}: cannot be read ({e}); reinstall trimtab") from None
    return parse_policy(data, source=POLICY_SOURCE)


def parse_policy(data: Any, *, source: str) -> Policy:
    """A policy from its YAML data; TrimtabError naming the entry at fault if it is malformed."""
    def fail(where: str, problem: str) -> TrimtabError:
        return TrimtabError(f"{source}: {where}: {problem}")

    def mapping(value, where: str, keys: set[str], required: set[str]) -> Mapping:
        if not isinstance(value, Mapping):
            raise fail(where, "must be a mapping")
        unknown, missing = set(value) - keys, required - set(value)
        if unknown:
            raise fail(where, f"unknown key {sorted(map(str, unknown))[0]}")
        if missing:
            raise fail(where, f"missing {sorted(missing)[0]}")
        return value

    def number(value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(where, f"must be a finite number, got {value!r}")
        return value

    def reason(value, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise fail(where, "must be a reason (text)")
        try:
            value.format(**_PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as e:
            raise fail(where, f"bad placeholder {e} (allowed: {', '.join('{' + p + '}' for p in _PLACEHOLDERS)})") from None
        return " ".join(value.split())

    def setting(name: str, value, where: str):
        try:
            return check_value(name, value, source=source)
        except TrimtabError as e:
            raise fail(where, str(e).removeprefix(f"{source}: ")) from None

    sections = {"version", "ranges", "eos", "loops"}
    top = mapping(data, "top level", sections, sections)
    if top["version"] != 1:
        raise fail("version", f"this trimtab reads policy version 1, not {top['version']!r}")

    ranges = []
    if not isinstance(top["ranges"], Mapping):
        raise fail("ranges", "must be a mapping of setting names to rules")
    for name, rule in top["ranges"].items():
        where = f"ranges.{name}"
        if name not in SETTINGS or SETTINGS[name].kind not in ("float", "int"):
            raise fail(where, "not a numeric trimtab setting")
        rule = mapping(rule, where, {"when", "neutral", "min", "max"}, {"when"})
        if rule["when"] not in ("sampling", "always"):
            raise fail(f"{where}.when", f"must be sampling or always, got {rule['when']!r}")
        neutral = setting(name, rule["neutral"], f"{where}.neutral") if "neutral" in rule else None
        bounds = {}
        for side in ("min", "max"):
            if side in rule:
                b = mapping(rule[side], f"{where}.{side}", {"value", "to", "reason"}, {"value", "to", "reason"})
                bounds[side] = Bound(number(b["value"], f"{where}.{side}.value"),
                                     setting(name, b["to"], f"{where}.{side}.to"),
                                     reason(b["reason"], f"{where}.{side}.reason"))
        if not bounds:
            raise fail(where, "needs a min or a max")
        parsed = RangeRule(name, rule["when"] == "sampling", neutral, bounds.get("min"), bounds.get("max"))
        if parsed.low and parsed.high and parsed.low.value > parsed.high.value:
            raise fail(where, "min.value is above max.value")
        for side, bound in bounds.items():
            if parsed.violated(bound.to) is not None:
                raise fail(f"{where}.{side}.to", f"{bound.to!r} is itself outside the rule")
        ranges.append(parsed)

    eos = mapping(top["eos"], "eos", {"bias_ban_at", *EOS_RULES}, {"bias_ban_at", *EOS_RULES})
    ban_at = number(eos["bias_ban_at"], "eos.bias_ban_at")
    if ban_at >= 0:
        raise fail("eos.bias_ban_at", f"must be negative, got {ban_at!r}")
    eos_rules = {}
    for name in EOS_RULES:
        rule = mapping(eos[name], f"eos.{name}", {"instruct", "base"}, {"instruct", "base"})
        eos_rules[name] = EosRule(reason(rule["instruct"], f"eos.{name}.instruct"),
                                  reason(rule["base"], f"eos.{name}.base"))
    loops = mapping(top["loops"], "loops", {"dry_multiplier", "reason"}, {"dry_multiplier", "reason"})
    dry = setting("dry_multiplier", loops["dry_multiplier"], "loops.dry_multiplier")
    if dry <= 0 or any(r.violated(dry) for r in ranges if r.field == "dry_multiplier"):
        raise fail("loops.dry_multiplier", f"{dry!r} must be above 0 and inside ranges.dry_multiplier")
    return Policy(tuple(ranges), ban_at, eos_rules, LoopRule(dry, reason(loops["reason"], "loops.reason")))


# -- the guard -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Finding:
    field: str
    asked: Any
    applied: Any    # equal to asked for a warning
    reason: str
    follows_user: bool = False   # a consequence of another change, not a judgement of this field


def guard(settings: Mapping[str, Any], traits: ModelTraits, mode: str = "enforce", *,
          source: str = "settings") -> tuple[GenerationSettings, list[Override]]:
    """Raw user settings (canonical or alias names) → the settings to generate with, and what
    the guard changed or warns about. Unknown names and bad values raise TrimtabError."""
    if mode not in GUARD_MODES:
        raise TrimtabError(f"guard mode must be one of {', '.join(GUARD_MODES)}, got {mode!r}")
    policy = load_policy()
    given = canonical_settings(settings, source=source)
    notes = [Override(name, value, None, NOT_SUPPORTED)
             for name, value in given.items() if name in UNSUPPORTED and not is_neutral(name, value)]
    asked = {name: value for name, value in given.items() if name in SETTINGS}
    if mode == "off":
        log.warning("%s", GUARD_OFF)
        return GenerationSettings(**asked), [Override("guard", "off", "off", GUARD_OFF), *notes]

    defaults = GenerationSettings()
    values = {f.name: asked.get(f.name, getattr(defaults, f.name)) for f in fields(GenerationSettings)}
    overrides = []
    for finding in _findings(values, traits, policy):
        if finding.field not in asked and not finding.follows_user:  # a default the user never chose: say so
            finding = _Finding(finding.field, finding.asked, finding.applied,
                               f"not set, so the default {show_value(finding.asked)} applies: {finding.reason}")
        if finding.applied == finding.asked:
            overrides.append(Override(finding.field, finding.asked, finding.asked, f"warning: {finding.reason}"))
        elif mode == "warn":
            overrides.append(Override(finding.field, finding.asked, finding.asked,
                                      f"warning: {finding.reason} (kept: the guard is in warn mode)"))
        else:
            values[finding.field] = finding.applied
            overrides.append(Override(finding.field, finding.asked, finding.applied, finding.reason))
    return GenerationSettings(**values), [*overrides, *notes]


def resolve_settings(preset: str | Mapping[str, Any] | None, user_settings: Mapping[str, Any],
                     traits: ModelTraits, mode: str = "enforce") -> tuple[GenerationSettings, list[Override]]:
    """A preset (default "balanced") overlaid with the user's settings, then guarded. A user
    setting given as None counts as not set (front ends pass None for options left alone)."""
    base = load_preset(DEFAULT_PRESET if preset is None else preset)
    user = canonical_settings({k: v for k, v in user_settings.items() if v is not None}, source="settings")
    return guard({**base, **user}, traits, mode)


def _findings(values: Mapping[str, Any], traits: ModelTraits, policy: Policy) -> list[_Finding]:
    greedy = values["temperature"] == 0 or not values["do_sample"]
    found = []
    for rule in policy.ranges:
        if rule.sampling_only and greedy:
            continue
        bound = rule.violated(values[rule.field])
        if bound is not None:
            asked = values[rule.field]
            found.append(_Finding(rule.field, asked, bound.to,
                                  bound.reason.format(asked=show_value(asked), applied=show_value(bound.to))))

    lowered = [f.field for f in found if f.field in LOOP_PENALTIES and f.applied < f.asked]
    if lowered and values["dry_multiplier"] == 0:
        dry = policy.loops.dry_multiplier
        found.append(_Finding("dry_multiplier", values["dry_multiplier"], dry, policy.loops.reason.format(
            applied=show_value(dry), fields=", ".join(lowered)), follows_user=True))

    instruct = traits.has_chat_template
    eos_ids = set(traits.eos_token_ids)

    def eos_finding(name: str, asked, applied, shown_asked, eos=""):
        rule = policy.eos[name]
        reason = (rule.instruct if instruct else rule.base).format(
            asked=shown_asked, applied=show_value(applied), eos=eos, ban_at=show_value(policy.eos_bias_ban_at))
        found.append(_Finding(name, asked, applied if instruct else asked, reason))

    if values["ban_eos_token"]:
        eos_finding("ban_eos_token", True, False, "true")
    banned_eos = [t for t in values["custom_token_bans"] if t in eos_ids]
    if banned_eos:
        bans = values["custom_token_bans"]
        eos_finding("custom_token_bans", bans, tuple(t for t in bans if t not in eos_ids), show_value(bans),
                    _ids(banned_eos))
    bias = values["logit_bias"]
    biased_eos = [t for t, b in bias.items() if t in eos_ids and b <= policy.eos_bias_ban_at]
    if biased_eos:
        eos_finding("logit_bias", dict(bias), {t: b for t, b in bias.items() if t not in biased_eos},
                    ", ".join(show_value(bias[t]) for t in biased_eos), _ids(biased_eos))
    if values["min_new_tokens"] > 0:
        eos_finding("min_new_tokens", values["min_new_tokens"], 0, show_value(values["min_new_tokens"]))
    return found


def _ids(token_ids) -> str:
    return ", ".join(map(str, token_ids))


def show_value(value) -> str:
    """A value as a user wrote it in a preset file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)
