"""Chat templates: Hugging Face Jinja chat templates, rendered in a hardened sandbox.

A chat template is code that comes with a model, so it is untrusted. Four defences:

1. Jinja's ``ImmutableSandboxedEnvironment`` (see ``template_sandbox``). The inputs are first
   copied into plain JSON-like data, so a template never holds an object whose methods the
   sandbox does not know about.
2. A size cap and an allocation cap, checked as the template runs (``template_sandbox``).
3. An output cap on the rendered text.
4. A time cap that also stops a loop which makes no calls and emits nothing: compiling and
   rendering run under ``deadline.run_with_deadline``.

The size, allocation and output caps grow with the input: a long conversation legitimately
renders to long text.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

from .deadline import DeadlinePassed, run_with_deadline
from .errors import ChatTemplateError, TrimtabError
from .template_sandbox import GuardRefused, SizeGuard, TemplateRaised, compile_template, render

MAX_TEMPLATE_CHARS = 200_000
DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000

_COMPILE_TIME_LIMIT_S = 10.0  # compiling is linear in the source, which is capped; a 200k-char source takes ~3 s
_THREAD_NAME = "trimtab-chat-template"


class ChatTemplate:
    """A compiled chat template. ``render`` is safe to call from several threads at once."""

    def __init__(
        self,
        source: str,
        *,
        origin: str = "chat template",
        time_limit: float = DEFAULT_TIME_LIMIT_S,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ):
        if not isinstance(source, str):
            raise ChatTemplateError(f"{origin}: a chat template must be a string, not {type(source).__name__}")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"{origin}: the chat template is {len(source):,} characters long, over the"
                f" {MAX_TEMPLATE_CHARS:,}-character limit; refusing to compile it"
            )
        if not (0 < time_limit < float("inf") and max_output_chars > 0):
            raise TrimtabError(f"{origin}: time_limit must be a positive number of seconds and max_output_chars positive")
        self.source = source
        self.origin = origin
        self.time_limit = time_limit
        self.max_output_chars = max_output_chars

        try:
            self._template, names = run_with_deadline(
                functools.partial(compile_template, source, origin), _COMPILE_TIME_LIMIT_S, thread_name=_THREAD_NAME
            )
        except (Exception, DeadlinePassed) as error:
            raise self._explain(error, "compiling", _COMPILE_TIME_LIMIT_S) from error
        self.supports_tools: bool = "tools" in names

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        bos_token: str = "",
        eos_token: str = "",
        **extra,
    ) -> str:
        validate_messages(messages)
        _validate_dict_list("tools", tools)
        _validate_dict_list("documents", documents)
        try:
            variables = _plain(
                {
                    **extra,
                    "messages": messages,
                    "tools": tools,
                    "documents": documents,
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": bos_token,
                    "eos_token": eos_token,
                }
            )
        except RecursionError:
            raise TrimtabError("the messages, tools or documents are nested too deeply") from None
        guard = SizeGuard.for_input(variables, self.max_output_chars)
        try:
            return run_with_deadline(
                functools.partial(render, self._template, variables, guard), self.time_limit, thread_name=_THREAD_NAME
            )
        except (Exception, DeadlinePassed) as error:
            raise self._explain(error, "rendering", self.time_limit) from error

    def _explain(self, error: BaseException, doing: str, time_limit: float) -> ChatTemplateError:
        """Turn whatever compiling or rendering raised into one ChatTemplateError naming the origin."""
        origin = self.origin
        if isinstance(error, DeadlinePassed):
            return ChatTemplateError(
                f"{origin}: {doing} the chat template passed the time cap ({time_limit:g} s) and was stopped"
            )
        if isinstance(error, TemplateRaised):  # the template's own raise_exception(): its message is the point
            return ChatTemplateError(f"{origin}: {error}")
        if isinstance(error, TemplateSyntaxError):
            return ChatTemplateError(f"{origin}: syntax error on line {error.lineno}: {error.message}")
        line = _template_line(error, origin)
        where = f" (line {line})" if line else ""
        if isinstance(error, GuardRefused):
            return ChatTemplateError(f"{origin}{where}: {error}")
        if isinstance(error, SecurityError):
            return ChatTemplateError(f"{origin}{where}: unsafe operation blocked by the sandbox: {error}")
        if isinstance(error, RecursionError):
            return ChatTemplateError(f"{origin}{where}: {doing} the chat template recursed too deeply")
        if isinstance(error, MemoryError):
            return ChatTemplateError(f"{origin}{where}: out of memory while {doing} the chat template")
        if isinstance(error, TemplateError):
            return ChatTemplateError(f"{origin}{where}: {error}")
        return ChatTemplateError(f"{origin}{where}: error while {doing} the chat template: {type(error).__name__}: {error}")


def validate_messages(messages) -> None:
    """A chat is a list of dicts, each with a string ``role``; ``content`` is a string, a list of parts or None."""
    if not isinstance(messages, (list, tuple)):
        raise TrimtabError(f"messages must be a list of dicts, not {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TrimtabError(f"messages[{index}] must be a dict with 'role' and 'content', not {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise TrimtabError(f"messages[{index}] needs a string 'role', not {type(role).__name__}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TrimtabError(
                f"messages[{index}] (role {role!r}): 'content' must be a string, a list of parts or None,"
                f" not {type(content).__name__}"
            )


def _validate_dict_list(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)):
        raise TrimtabError(f"{name} must be a list of dicts, not {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise TrimtabError(f"{name}[{index}] must be a dict, not {type(item).__name__}")


def _plain(value):
    """A copy of value made only of JSON-like types, so the template sees no methods beyond those of
    str, int, float, list and dict. Anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) may carry extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _template_line(error: BaseException, filename: str) -> int | None:
    """The template line an error came from: Jinja rewrites tracebacks so template frames carry it."""
    line, traceback = None, error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == filename:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line
