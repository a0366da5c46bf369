"""A text-generation-webui generation state → what trimtab runs: the settings for the guard,
the stop strings, the reply's token budget, and the webui keys trimtab ignores.

Which key is what is state_keys.py's table; this module applies it. Nothing is dropped in
silence: a key is a setting (the guard checks it and reports unsupported ones), a webui key
mapped here, an ignored key that is reported when it would change the reply, or webui's own
non-generation state.
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import Override
from trimtab.backend.settings import SETTINGS, UNSUPPORTED, GenerationSettings, canonical_name
from trimtab.plugin.webui.state_keys import HANDLED, NOT_HONOURED, WEBUI_PRESET_PARAMS, is_internal

NOT_KNOWN = "a text-generation-webui setting trimtab does not know; ignored"


@dataclass(frozen=True)
class WebuiRequest:
    preset: str | None                                 # a vetted preset chosen in the extension, or None
    settings: dict[str, Any]                           # setting names → values, for the guard
    adjusted: tuple[Override, ...] = ()                # what the webui mapping changed (the reply budget)
    ignored: tuple[Override, ...] = ()                 # webui keys that would change the reply, not followed


def webui_request(state: Mapping[str, Any], *, preset: str | None = None, stopping_strings=None,
                  prompt_tokens: int | None = None, context_length: int | None = None) -> WebuiRequest:
    """The request for one reply. `preset`: a vetted preset that replaces the values of webui's
    preset parameters (as choosing a preset in webui does); None uses the state's own.
    `prompt_tokens` and `context_length`, when known, set the reply budget."""
    replaced = WEBUI_PRESET_PARAMS if preset is not None else frozenset()
    settings: dict[str, Any] = {}
    ignored = []
    for key, value in state.items():
        if key in HANDLED or key in replaced or is_internal(key):
            continue
        if key in NOT_HONOURED:
            changes_nothing, reason = NOT_HONOURED[key]
            if not changes_nothing(value):
                ignored.append(Override(key, value, None, reason))
            continue
        try:
            name = canonical_name(key)
        except TrimtabError:
            ignored.append(Override(key, value, None, NOT_KNOWN))
            continue
        if name != "stop":  # the stop strings are gathered below, from every place webui keeps them
            settings[name] = value
    settings["stop"] = stop_strings(stopping_strings, state.get("custom_stopping_strings"),
                                    state.get("stopping_strings"), state.get("stop"))
    budget = reply_budget(state, settings.get("max_new_tokens"), prompt_tokens, context_length)
    if budget is not None:
        settings["max_new_tokens"] = budget.applied
    return WebuiRequest(preset, settings, (budget,) if budget is not None else (), tuple(ignored))


def stop_strings(*sources) -> list[str]:
    """Stop strings from lists, or from webui's text form `"\\n###", "User:"` (quoted strings
    separated by commas); in order, without repeats."""
    out: list[str] = []
    for source in sources:
        if isinstance(source, str):
            source = _parse_stop_text(source)
        for text in source or ():
            if not isinstance(text, str):
                raise TrimtabError(f"stop strings must be text, got {text!r}")
            if text and text not in out:
                out.append(text)
    return out


def _parse_stop_text(text: str) -> list:
    if not text.strip():
        return []
    try:
        value = ast.literal_eval(f"[{text}]")  # literals only: nothing in the text is run
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise TrimtabError(f'custom_stopping_strings: cannot read {text!r}; write quoted strings separated by '
                           f'commas, like "\\n###", "User:"') from None
    return value


def reply_budget(state: Mapping[str, Any], max_new_tokens, prompt_tokens: int | None,
                 context_length: int | None) -> Override | None:
    """max_new_tokens as webui means it: with auto_max_new_tokens the reply may fill the context;
    either way prompt + reply stay within truncation_length (trimtab shortens the reply, never
    the prompt). → the change as an Override, or None when max_new_tokens stands."""
    truncation = state.get("truncation_length")
    limits = [n for n in (context_length, truncation) if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    if prompt_tokens is None or not limits:
        return None
    limit = min(limits)
    room = limit - prompt_tokens
    if room < 1:
        return None  # the prompt alone fills it: the model's own context check speaks
    asked = max_new_tokens if max_new_tokens is not None else GenerationSettings().max_new_tokens
    where = (f"the context holds {limit} tokens" if limit == context_length else f"truncation_length is {limit}")
    if state.get("auto_max_new_tokens") is True:
        if asked == room:
            return None
        return Override("max_new_tokens", asked, room, f"auto_max_new_tokens is on: the reply may fill the rest "
                                                        f"of the context ({where}, the prompt has {prompt_tokens})")
    if isinstance(asked, (int, float)) and asked > room:
        return Override("max_new_tokens", asked, room, f"{where} and the prompt has {prompt_tokens} tokens")
    return None


def safe_state(state: Mapping[str, Any], settings: GenerationSettings, overrides: Sequence[Override],
               preset: str | None) -> dict[str, Any]:
    """A copy of the state with what trimtab will run written back in webui's forms: the values
    the guard changed and, when a vetted preset was chosen, its values for webui's preset
    parameters (those trimtab does not implement go to their neutral value)."""
    out = dict(state)
    names = {o.field for o in overrides if o.field in SETTINGS and o.applied != o.asked}
    if preset is not None:
        names |= WEBUI_PRESET_PARAMS & SETTINGS.keys()
        for name in WEBUI_PRESET_PARAMS & UNSUPPORTED.keys():
            if name in out and UNSUPPORTED[name] is not None:
                out[name] = UNSUPPORTED[name]
    for name in names:
        if name in out:
            out[name] = state_value(name, getattr(settings, name))
    return out


def state_value(name: str, value) -> Any:
    """A checked setting in the form webui's state holds it."""
    if name == "seed" and value is None:
        return -1                                         # webui's "random"
    if name == "custom_token_bans":
        return ", ".join(map(str, value))                 # webui: "1, 2, 3"
    if name == "dry_sequence_breakers":
        return ", ".join(json.dumps(s) for s in value)    # webui: "\n", ":", "\"", "*"
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
