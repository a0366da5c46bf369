"""What the chat app says in words: a preset's guard report, and a reply's status line.

The per-setting explanation is `trimtab preset check`'s (plugin/preset_cli.py: `explain`,
`describe`); this module only frames it for the app: which model kind it was checked for, and
what the chosen guard mode does with the changes. Plain text, shown in read-only textboxes.
"""
from __future__ import annotations

from typing import Any, Mapping

from trimtab.backend.guard import GUARD_OFF, NOT_SUPPORTED, ModelTraits, Override, guard, show_value
from trimtab.plugin.chat_engine import ReplyUpdate
from trimtab.plugin.preset_cli import describe, explain

# what a model with no loaded model's facts is checked as: an instruct model, EOS id unknown
ASSUMED_TRAITS = ModelTraits(has_chat_template=True, eos_token_ids=())

MODE_NOTES = {
    "enforce": "The guard is on (enforce): the changes above are made.",
    "warn": "The guard is in warn mode: the changes above are only reported; the preset runs as written.",
    "off": "The guard is off: none of the changes above are made; the preset runs as written.",
}


def preset_report(values: Mapping[str, Any], source: str, traits: ModelTraits | None, mode: str) -> str:
    """Line by line, what the guard keeps, changes (and why) or ignores in a preset's settings
    (canonical names → values, as `load_preset` gives them). TrimtabError if a value is bad."""
    _, overrides = guard(values, traits or ASSUMED_TRAITS, "enforce", source=source)
    lines, differs = explain(dict(values), overrides)
    return "\n".join([f"{source}: checked for {_model_kind(traits)}", *(f"  {line}" for line in lines),
                      "some settings would change" if differs else "nothing would change", MODE_NOTES[mode]])


def _model_kind(traits: ModelTraits | None) -> str:
    if traits is None:
        return "an instruct model (no model is loaded; its EOS token is unknown, so bans of it are not checked)"
    kind = "an instruct model (it has a chat template)" if traits.has_chat_template else \
        "a base model (no chat template: EOS bans are kept, with a warning)"
    eos = ", ".join(map(str, traits.eos_token_ids))
    return f"the loaded model, {kind}, EOS token id {eos or 'unknown'}"


def override_line(o: Override) -> str:
    """One thing the guard did to a reply's settings, as `preset check` words it."""
    if o.field == "guard" and o.reason == GUARD_OFF:
        return o.reason
    if o.reason == NOT_SUPPORTED:  # a note, not a change
        return f"{o.field}: {show_value(o.asked)}: {o.reason}"
    return f"{o.field}: {show_value(o.asked)}: {describe(o)[0]}"


def reply_status(update: ReplyUpdate | None) -> str:
    """A reply's status line (waiting, writing, finished or stopped) and what the guard did to it."""
    if update is None:
        return "waiting for the model…"
    if update.finish_reason is None:
        head = "writing…"
    elif update.completion is None:
        head = "stopped before it started"
    else:
        tokens = update.completion.usage.completion_tokens
        word = "stopped" if update.finish_reason == "cancelled" else "finished"
        head = f"{word}: {update.finish_reason}, {tokens} token{'s' if tokens != 1 else ''}"
    if not update.overrides:
        return head
    return "\n".join([head, "guard:", *(f"  {override_line(o)}" for o in update.overrides)])
