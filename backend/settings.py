"""Generation settings, by text-generation-webui's names: the one table every entry point checks
against, and the typed `GenerationSettings` that the sampler and the generator read.

Three kinds of names:
- supported settings (`SETTINGS`): checked for type and range, then used;
- webui settings trimtab does not implement (`UNSUPPORTED`): accepted at their neutral value,
  reported (never silently dropped) when set to anything else;
- anything else: an error naming the key, with the closest known name.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from trimtab.backend.errors import TrimtabError

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class GenerationSettings:
    # sampling, applied in the order documented in backend/sampling.py
    temperature: float = 1.0           # 0 means greedy
    do_sample: bool = True             # False means greedy
    top_k: int = 0                     # 0 disables
    top_p: float = 1.0                 # 1 disables
    min_p: float = 0.0                 # 0 disables
    typical_p: float = 1.0             # 1 disables
    repetition_penalty: float = 1.0    # 1 disables; > 1 discourages tokens already in the context
    repetition_penalty_range: int = 0  # how many recent tokens count; 0 = the whole context
    repetition_penalty_decay: int = 0  # the oldest this-many tokens of the range fade linearly to no penalty
    presence_penalty: float = 0.0      # subtracted once from every token already present
    frequency_penalty: float = 0.0     # subtracted per occurrence
    no_repeat_ngram_size: int = 0      # 0 disables; n bans any token completing an n-gram already seen
    dry_multiplier: float = 0.0        # 0 disables DRY, the penalty on extending a verbatim repeat
    dry_base: float = 1.75             # DRY's penalty grows by this factor per token of the repeat
    dry_allowed_length: int = 2        # repeats up to this long go unpenalised
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")  # repeats never run across these
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id → added to its logit
    custom_token_bans: tuple[int, ...] = ()
    ban_eos_token: bool = False
    seed: int | None = None
    # stopping
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0            # EOS is held off until this many tokens
    stop: tuple[str, ...] = ()         # stop strings; never emitted
    stop_on_degenerate: bool = False   # end a reply the degeneration monitor flags as a loop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or not self.do_sample


@dataclass(frozen=True)
class Spec:
    kind: str                 # "float", "int", "bool", "int_or_none", "token_ids", "strings", "breakers", "bias"
    low: float = -math.inf
    high: float = math.inf


SETTINGS: dict[str, Spec] = {
    "temperature": Spec("float", 0, 100),
    "do_sample": Spec("bool"),
    "top_k": Spec("int", 0, 2**31 - 1),
    "top_p": Spec("float", 0, 1),
    "min_p": Spec("float", 0, 1),
    "typical_p": Spec("float", 0, 1),
    "repetition_penalty": Spec("float", 0.01, 100),
    "repetition_penalty_range": Spec("int", 0, 2**31 - 1),
    "repetition_penalty_decay": Spec("int", 0, 2**31 - 1),
    "presence_penalty": Spec("float", -100, 100),
    "frequency_penalty": Spec("float", -100, 100),
    "no_repeat_ngram_size": Spec("int", 0, 1024),
    "dry_multiplier": Spec("float", 0, 100),
    "dry_base": Spec("float", 1, 100),
    "dry_allowed_length": Spec("int", 1, 1024),
    "dry_sequence_breakers": Spec("breakers"),
    "logit_bias": Spec("bias", -1000, 1000),
    "custom_token_bans": Spec("token_ids"),
    "ban_eos_token": Spec("bool"),
    "seed": Spec("int_or_none", -1, 2**63 - 1),
    "max_new_tokens": Spec("int", 1, 2**20),
    "min_new_tokens": Spec("int", 0, 2**20),
    "stop": Spec("strings"),
    "stop_on_degenerate": Spec("bool"),
}

# webui settings trimtab does not implement, with the value at which each does nothing
UNSUPPORTED: dict[str, Any] = {
    "tfs": 1, "top_a": 0, "top_n_sigma": 0, "epsilon_cutoff": 0, "eta_cutoff": 0,
    "mirostat_mode": 0, "mirostat_tau": None, "mirostat_eta": None,
    "encoder_repetition_penalty": 1, "penalty_alpha": 0, "guidance_scale": 1, "negative_prompt": "",
    "xtc_threshold": None, "xtc_probability": 0, "smoothing_factor": 0, "smoothing_curve": None,
    "dynamic_temperature": False, "dynatemp_low": None, "dynatemp_high": None, "dynatemp_exponent": None,
    "temperature_last": False, "sampler_priority": None, "num_beams": 1, "length_penalty": None,
    "early_stopping": False, "grammar_string": "", "prompt_lookup_num_tokens": 0,
}
# aliases: other front ends' names for the same setting
ALIASES = {"max_tokens": "max_new_tokens", "custom_stopping_strings": "stop", "stopping_strings": "stop"}


def _fail(source: str, name: str, problem: str) -> TrimtabError:
    return TrimtabError(f"{source}: setting {name}: {problem}")


def _number(source: str, name: str, value, spec: Spec, *, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise _fail(source, name, f"must be finite, got {value!r}")
    if integer and int(value) != value:
        raise _fail(source, name, f"must be a whole number, got {value!r}")
    if not spec.low <= value <= spec.high:
        raise _fail(source, name, f"{value!r} is out of range [{spec.low:g}, {spec.high:g}]")
    return int(value) if integer else float(value)


def _token_ids(source: str, name: str, value) -> tuple[int, ...]:
    if isinstance(value, str):  # webui sends "1, 2, 3"
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.lstrip("-").isdigit() for p in parts):
            raise _fail(source, name, f"must be comma-separated token ids, got {value!r}")
        value = [int(p) for p in parts]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _fail(source, name, f"must be a list of token ids, got {value!r}")
    if any(v < 0 for v in value):
        raise _fail(source, name, "token ids cannot be negative")
    return tuple(value)


def _breakers(source: str, name: str, value) -> tuple[str, ...]:
    """DRY's sequence breakers: a list of strings, or webui's text form `"\\n", ":", "\\"", "*"`
    (JSON strings separated by commas, without the brackets)."""
    if isinstance(value, str):
        try:
            value = json.loads(f"[{value}]")
        except json.JSONDecodeError:
            raise _fail(source, name, f'must be quoted strings separated by commas, like "\\n", ":", '
                                      f"got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise _fail(source, name, f"must be a list of strings, got {value!r}")
    if len(value) > 256 or any(len(s) > 32 for s in value):
        raise _fail(source, name, "at most 256 breakers of at most 32 characters each")
    return tuple(s for s in value if s)


def check_value(name: str, value, *, source: str = "settings"):
    """One supported setting, checked and converted; TrimtabError naming it if it is wrong."""
    spec = SETTINGS[name]
    if spec.kind in ("float", "int"):
        return _number(source, name, value, spec, integer=spec.kind == "int")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise _fail(source, name, f"must be true or false, got {value!r}")
        return value
    if spec.kind == "int_or_none":
        if value is None or value == -1:
            return None
        return _number(source, name, value, spec, integer=True)
    if spec.kind == "token_ids":
        return _token_ids(source, name, value)
    if spec.kind == "strings":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise _fail(source, name, f"must be a list of strings, got {value!r}")
        return tuple(s for s in value if s)
    if spec.kind == "breakers":
        return _breakers(source, name, value)
    if spec.kind == "bias":
        if not isinstance(value, Mapping):
            raise _fail(source, name, f"must map token ids to numbers, got {value!r}")
        out = {}
        for token, bias in value.items():
            if isinstance(token, str) and token.strip().isdigit():  # JSON object keys are strings
                token = int(token)
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise _fail(source, name, f"keys must be token ids, got {token!r}")
            out[token] = _number(source, f"{name}[{token}]", bias, spec, integer=False)
        return out
    raise AssertionError(spec.kind)


def canonical_name(name: str, *, source: str = "settings") -> str:
    """The supported or recognised-unsupported name a key stands for; error for an unknown one."""
    name = ALIASES.get(name, name)
    if name in SETTINGS or name in UNSUPPORTED:
        return name
    close = difflib.get_close_matches(name, list(SETTINGS) + list(UNSUPPORTED), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise TrimtabError(f"{source}: unknown setting {name!r}{hint}")


def is_neutral(name: str, value) -> bool:
    """Whether an unsupported webui setting is at the value where it does nothing."""
    neutral = UNSUPPORTED[name]
    return neutral is None or value == neutral or value is None


def build_settings(values: Mapping[str, Any], *, source: str = "settings") -> GenerationSettings:
    """GenerationSettings from supported names only (already canonical), each checked."""
    known = {f.name for f in fields(GenerationSettings)}
    return GenerationSettings(**{name: check_value(name, value, source=source)
                                 for name, value in values.items() if name in known})
