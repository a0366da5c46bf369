"""Tool calls in a model's reply: which format a chat template uses, how to parse calls out of a
finished reply, and how to hold a call back from a stream until the reply ends.

Three common formats: Hermes/Qwen `<tool_call>{json}</tool_call>`, Mistral `[TOOL_CALLS][...]`
and Llama 3's bare `{"name": ..., "parameters": ...}` (after `<|python_tag|>` or alone).
No LangChain here: front ends build their own message types from the parsed calls.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trimtab.backend.api import Model


TOOL_CALL_OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def tool_support(model: Model) -> tuple[bool, str | None]:
    """(whether the model's chat template renders `tools`, its tool-call format if trimtab knows it)."""
    tokenizer = model.tokenizer
    template = tokenizer.chat_templates.get("tool_use") or tokenizer.chat_template
    if template is None or not template.supports_tools:
        return False, None
    source = template.source
    for marker, name in (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ('"parameters"', "llama3")):
        if marker in source:
            return True, name
    return True, None


def forced_call_prefix(call_format: str, name: str | None) -> str:
    """The start of a tool call in the template's format, written into the prompt so that the
    model has to go on with a call (to `name`, when given)."""
    args_key = "parameters" if call_format == "llama3" else "arguments"
    head = '{"name": ' + (f'{json.dumps(name, ensure_ascii=False)}, "{args_key}": ' if name else '"')
    return {"hermes": "<tool_call>\n", "mistral": "[TOOL_CALLS][", "llama3": ""}[call_format] + head


def _json_values(text: str) -> tuple[list, int]:
    """The JSON values at the start of text, separated by spaces, commas or semicolons; lists are
    flattened. → (values, where the parsing stopped)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,;":
            i += 1
        if i >= len(text) or text[i] not in "{[":
            return values, i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return values, i
        values.extend(value if isinstance(value, list) else [value])


def _call_args(obj: Any) -> dict | None:
    """{"name": ..., "arguments" | "parameters": {...} or a JSON string} → name and args text."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return {"name": obj["name"], "args": args}
    return {"name": obj["name"], "args": json.dumps(args, ensure_ascii=False)}


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Tool calls in a reply → (the reply's remaining text, [{"name", "args" (JSON text)}]). A call
    that does not parse keeps its raw text as args (LangChain files it under invalid_tool_calls)."""
    if "<tool_call>" in text:
        calls = []
        for body in _HERMES_CALL.findall(text):
            values, _ = _json_values(body.strip())
            parsed = _call_args(values[0]) if len(values) == 1 else None
            calls.append(parsed or {"name": None, "args": body.strip()})
        return _HERMES_CALL.sub("", text).strip(), calls
    stripped = text.strip()
    marker = next((m for m in TOOL_CALL_OPENERS if stripped.startswith(m)), None)
    body = stripped[len(marker):].lstrip() if marker else stripped
    values, end = _json_values(body)
    calls = [_call_args(v) for v in values]
    if marker is None:
        # bare JSON is a tool call only if every value has a name and arguments
        if not values or not all(c and ("arguments" in v or "parameters" in v) for c, v in zip(calls, values)):
            return text, []
    elif not values or None in calls:
        return "", [{"name": None, "args": body}]
    return body[end:].strip(), calls


class ToolCallSplitter:
    """Splits a streamed reply into text to show now and tool-call text to hold back until the
    reply ends (when it is parsed). Text that may be the start of a call is held back too."""

    def __init__(self):
        self._pending = ""            # text that may begin an opener
        self._held: str | None = None  # everything from a tool call's start on
        self._started = False          # whether text other than white space was shown

    def push(self, piece: str) -> str:
        if self._held is not None:
            self._held += piece
            return ""
        text, self._pending = self._pending + piece, ""
        if not self._started:
            stripped = text.lstrip()
            if not stripped:
                self._pending = text
                return ""
            if stripped[0] in "{[":   # a reply that opens with JSON may be a call (Llama 3, Mistral)
                self._held = text
                return ""
            self._started = True
        starts = [i for i in (text.find(o) for o in TOOL_CALL_OPENERS) if i >= 0]
        if starts:
            self._held = text[min(starts):]
            return text[:min(starts)]
        keep = max((k for o in TOOL_CALL_OPENERS for k in range(1, len(o)) if text.endswith(o[:k])), default=0)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        """The text held back, once the reply has ended."""
        return self._held if self._held is not None else self._pending
