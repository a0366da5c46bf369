"""Chat templates: Hugging Face Jinja chat templates, rendered in a hardened sandbox.

A chat template is code that comes with a model, so it is untrusted. Four defences:

1. Jinja's ``ImmutableSandboxedEnvironment``: no private attributes (``__class__``,
   ``__globals__``, ``mro``, ...), no mutation of lists and dicts, no unsafe callables. The
   inputs are first copied into plain JSON-like data, so a template never holds an object whose
   methods the sandbox does not know about.
2. Size guards, checked *before* an operation allocates. Every way a template can make a value
   much bigger than its operands -- ``*``, ``**``, ``+``, ``%``, ``~``, the filters and ``str``
   methods that pad, repeat or join (``replace``, ``join``, ``indent``, ``format``, ``center``,
   ``tojson(indent=...)``, ...), and text collected by macros and blocks -- is estimated and
   refused past the *size cap*. Whatever a render does allocate counts against an *allocation
   cap*, so many medium values cannot add up to a huge one.
3. An *output cap* on the rendered text.
4. A *time cap* that also stops a loop which makes no calls and emits nothing: the render runs in
   a worker thread, and when the deadline passes the caller injects an exception into that
   thread (``PyThreadState_SetAsyncExc``), which CPython raises at the worker's next bytecode
   boundary -- every loop iteration has one.

The size, allocation and output caps grow with the input: a long conversation legitimately
renders to long text.
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import inspect
import itertools
import json
import re
import string
import sys
import threading
import types
from collections.abc import Mapping

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .errors import ChatTemplateError, TrimtabError

MAX_TEMPLATE_CHARS = 200_000
DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000

_COMPILE_TIME_LIMIT_S = 10.0  # compiling is linear in the source, which is capped; a 200k-char source takes ~3 s
_INPUT_ALLOWANCE = 4  # each character of input raises the size and output caps by this much
_ALLOCATION_FACTOR = 32  # allocation cap = this many times the size cap
_MAX_INT_BITS = 1 << 16
_MAX_MACRO_DEPTH = 64  # well below where Python's recursion limit would stop it, whatever that limit is
_STOP_GRACE_S = 1.0  # how long a timed-out worker may take to notice the injected exception
_SEQUENCES = (str, bytes, list, tuple)
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)
_SHORT_STRING = 64  # strings shorter than this are not remembered when counting allocations


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

        def compile_template():
            ast = _ENVIRONMENT.parse(source, filename=origin)
            code = _ENVIRONMENT.compile(ast, filename=origin)
            return ast, _ENVIRONMENT.template_class.from_code(_ENVIRONMENT, code, _ENVIRONMENT.make_globals(None))

        try:
            ast, self._template = _run_with_deadline(compile_template, _COMPILE_TIME_LIMIT_S)
        except (Exception, _Deadline) as error:
            raise self._explain(error, "compiling", _COMPILE_TIME_LIMIT_S) from error
        self.supports_tools: bool = any(name.name == "tools" for name in ast.find_all(nodes.Name))

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
        input_chars = _Guard(sys.maxsize).weight(variables)
        guard = _Guard(self.max_output_chars + _INPUT_ALLOWANCE * input_chars)
        guard.mark_as_input(variables)

        def render_template() -> str:
            _local.guard = guard
            try:
                pieces = []
                for piece in self._template.generate(variables):
                    guard.emit(piece)
                    pieces.append(piece)
                return "".join(pieces)
            finally:
                _local.guard = None

        try:
            return _run_with_deadline(render_template, self.time_limit)
        except (Exception, _Deadline) as error:
            raise self._explain(error, "rendering", self.time_limit) from error

    def _explain(self, error: BaseException, doing: str, time_limit: float) -> ChatTemplateError:
        """Turn whatever compiling or rendering raised into one ChatTemplateError naming the origin."""
        origin = self.origin
        if isinstance(error, _Deadline):
            return ChatTemplateError(
                f"{origin}: {doing} the chat template passed the time cap ({time_limit:g} s) and was stopped"
            )
        if isinstance(error, _TemplateRaised):  # the template's own raise_exception(): its message is the point
            return ChatTemplateError(f"{origin}: {error}")
        if isinstance(error, TemplateSyntaxError):
            return ChatTemplateError(f"{origin}: syntax error on line {error.lineno}: {error.message}")
        line = _template_line(error, origin)
        where = f" (line {line})" if line else ""
        if isinstance(error, _Refused):
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


# ---------------------------------------------------------------------------------------------
# Running with a deadline


class _Deadline(BaseException):
    """Injected into a worker whose time is up. A BaseException, so Jinja's `except Exception` lets it through."""


def _run_with_deadline(work, time_limit: float):
    """Run work() in a daemon thread and return its result or raise its exception. If it runs past
    time_limit, inject _Deadline into the thread and raise _Deadline here."""
    lock = threading.Lock()
    state = {}  # "started", "done", "cancelled", "result", "error"; written under lock

    def worker():
        try:
            with lock:
                if state.get("cancelled"):
                    return
                state["started"] = True
            try:
                state["result"] = work()
            except BaseException as error:  # noqa: BLE001 - handed over to the caller's thread
                state["error"] = error
            with lock:
                state["done"] = True
            _deliver_pending_exception()
        except _Deadline:
            pass  # it arrived after work() had ended; the caller has already reported the timeout

    thread = threading.Thread(target=worker, name="trimtab-chat-template", daemon=True)
    thread.start()
    try:
        thread.join(time_limit)
    finally:  # also when the caller is interrupted (KeyboardInterrupt): never leave the worker running
        with lock:
            timed_out = not state.get("done")
            if timed_out:
                state["cancelled"] = True
                if state.get("started"):
                    _inject(thread, _Deadline)
    if timed_out:
        thread.join(_STOP_GRACE_S)  # a worker inside one long C call stops when the call returns
        raise _Deadline()
    if "error" in state:
        raise state["error"]
    return state["result"]


def _deliver_pending_exception() -> None:
    """Entering a Python function is a point where CPython raises a pending asynchronous exception,
    so a deadline injected just as work() finished arrives here, inside the worker's try."""


def _inject(thread: threading.Thread, exception: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))


# ---------------------------------------------------------------------------------------------
# Size accounting


class _Refused(Exception):
    """A guard refused an operation; the message says which cap and why."""


class _TemplateRaised(Exception):
    """The template called raise_exception(message)."""


_local = threading.local()


def _current_guard() -> _Guard:
    guard = getattr(_local, "guard", None)
    if guard is None:  # at compile time, when Jinja tries to fold constants: leave it to the render
        raise _Refused("chat template code ran outside a guarded render")
    return guard


def _amount(n: int) -> str:
    return f"{n:,}" if n < 10**30 else "more than 10^30"


class _Guard:
    """The caps of one render. It lives in the thread that renders."""

    def __init__(self, cap: int):
        self.cap = cap  # size cap: the largest value, and the starting output allowance
        self.output_left = cap
        self.allocation_left = cap * _ALLOCATION_FACTOR
        self.macro_depth = 0
        self._weights: dict[tuple[int, int], tuple[object, int]] = {}
        self._counted: dict[int, object] = {}  # objects already charged (or given as input), by id

    def mark_as_input(self, value) -> None:
        """The inputs are already allocated: charging a value that holds them does not count them again."""
        self._count_new(value, sys.maxsize)

    def weight(self, value, indent: int = 0) -> int:
        """About len(str(value)) -- or of its JSON with this indent -- in characters; stops counting past the cap."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, int):
            return value.bit_length() // 3 + 1
        if not isinstance(value, _CONTAINERS):
            return 24
        key = (id(value), indent)
        known = self._weights.get(key)
        if known is not None and known[0] is value:
            return known[1]
        total, stack = 0, [(value, 0)]
        while stack and total <= self.cap:
            item, depth = stack.pop()
            if isinstance(item, (str, bytes)):
                total += len(item) + 2
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 1
            elif isinstance(item, Namespace):
                stack.append((item._Namespace__attrs, depth))
            elif isinstance(item, dict):
                total += 2 + len(item) * (4 + (depth + 1) * indent)
                if total <= self.cap:
                    stack.extend((part, depth + 1) for pair in item.items() for part in pair)
            elif isinstance(item, (list, tuple, set, frozenset)):
                total += 2 + len(item) * (2 + (depth + 1) * indent)
                if total <= self.cap:
                    stack.extend((part, depth + 1) for part in item)
            else:
                total += 24
        if not isinstance(value, Namespace):  # everything else a template holds is immutable
            self._weights[key] = (value, total)
        return total

    def check_size(self, what: str, size: int) -> None:
        if size > self.cap:
            raise _Refused(f"{what} would make a value of about {_amount(size)} characters, past the size cap ({self.cap:,})")

    def check_int_bits(self, what: str, bits: int) -> None:
        if bits > _MAX_INT_BITS:
            raise _Refused(f"{what} would make an integer of about {_amount(bits)} bits, past the size cap ({_MAX_INT_BITS:,} bits)")

    def check_arguments(self, what: str, args, kwargs) -> None:
        """Filters and methods may turn any argument into a string; none may be past the size cap."""
        for value in itertools.chain(args, (v for k, v in kwargs.items() if not k.startswith("_"))):
            size = self.weight(value)
            if size > self.cap:
                raise _Refused(f"{what} got an argument of about {_amount(size)} characters, past the size cap ({self.cap:,})")

    def check_output(self, value) -> None:
        size = self.weight(value)
        if size > self.output_left:
            raise self._output_refused()

    def emit(self, text: str) -> None:
        self.output_left -= len(text)
        if self.output_left < 0:
            raise self._output_refused()

    def _output_refused(self) -> _Refused:
        return _Refused(f"the rendered text passed the output cap ({self.cap:,} characters)")

    def spend(self, chars: int) -> None:
        self.allocation_left -= chars
        if self.allocation_left < 0:
            raise _Refused(
                f"the template allocated more than the allocation cap ({self.cap * _ALLOCATION_FACTOR:,} characters)"
            )

    def charge(self, value):
        """Count the new objects in value (a result the template just made) against the allocation cap."""
        if type(value) is str:  # the common case, a fresh string: no need to remember it
            self.spend(len(value))
        else:
            self.spend(self._count_new(value, self.allocation_left + 1))
        return value

    def _count_new(self, value, limit: int) -> int:
        new, stack = 0, [value]
        while stack and new < limit:
            item = stack.pop()
            if isinstance(item, (str, bytes)) and len(item) < _SHORT_STRING:
                new += len(item)  # cheaper to count a short string again than to remember it
                continue
            if isinstance(item, Namespace):
                stack.append(item._Namespace__attrs)  # a namespace changes; remember what it holds instead
                continue
            if not isinstance(item, (str, bytes, dict, list, tuple, set, frozenset)):
                new += item.bit_length() // 8 if isinstance(item, int) else 1
                continue
            if id(item) in self._counted:
                continue
            self._counted[id(item)] = item  # keeps it alive, so its id is not reused by a new object
            new += len(item)
            if isinstance(item, dict):
                stack.extend(itertools.chain.from_iterable(item.items()))
            elif not isinstance(item, (str, bytes)):
                stack.extend(item)
        return new


# ---------------------------------------------------------------------------------------------
# Size estimates for operations that can grow a value far beyond their operands

_PRINTF_SPEC = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)
_FORMATTER = string.Formatter()


def _text(value) -> str | bytes:
    return value if isinstance(value, (str, bytes)) else str(value)


def _printf_size(guard: _Guard, template, values) -> int:
    """Size of `template % values`: the template plus every field's width, precision and value."""
    if isinstance(template, bytes):
        template = template.decode("latin-1")
    positional = list(values) if isinstance(values, tuple) else [values]
    position = 0

    def take():
        nonlocal position
        position += 1
        return positional[position - 1] if position <= len(positional) else ""

    total = len(template)
    for key, width, precision, conversion in _PRINTF_SPEC.findall(template):
        if conversion == "%":
            continue
        for number in (width, precision):
            if number == "*":
                star = take()
                total += abs(star) if isinstance(star, int) else 0
            elif number:
                total += int(number)
        if key and isinstance(values, Mapping):
            total += guard.weight(values.get(key, ""))
        else:
            total += guard.weight(take())
    return total


def _format_size(guard: _Guard, template: str, args, kwargs) -> int:
    """Size of `template.format(*args, **kwargs)`: literal text plus every field's value, widths and precisions."""
    automatic = itertools.count()

    def lookup(field: str):
        head = re.match(r"[^.\[]*", field).group()
        key = next(automatic) if head == "" else int(head) if head.isdigit() else head
        try:
            return args[key] if isinstance(key, int) else kwargs[key]
        except (IndexError, KeyError, TypeError):
            return ""

    total = 0
    for literal, field, spec, _ in _FORMATTER.parse(template):
        total += len(literal)
        if field is None:
            continue
        total += guard.weight(lookup(field))
        for spec_literal, nested, _, _ in _FORMATTER.parse(spec or ""):
            total += sum(map(int, re.findall(r"\d+", spec_literal)))
            if nested is not None:
                value = lookup(nested)
                total += abs(value) if isinstance(value, int) else guard.weight(value)
    return total


def _replace_size(text, old, new, count) -> int:
    text, old, new = _text(text), _text(old), _text(new)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _join_size(guard: _Guard, separator, items: list) -> int:
    return sum(guard.weight(item) for item in items) + len(items) * guard.weight(separator)


def _indent_width(indent) -> int:
    if isinstance(indent, int):
        return max(indent, 0)
    return len(indent) if isinstance(indent, str) else 0


def _estimate_join_filter(guard: _Guard, arguments: dict) -> int:
    if not isinstance(arguments["value"], (list, tuple)):  # a generator: collect it so it can be measured
        arguments["value"] = list(arguments["value"])
    return _join_size(guard, arguments["d"], arguments["value"])


def _estimate_indent_filter(guard: _Guard, arguments: dict) -> int:
    text = _text(arguments["s"])
    return len(text) + (text.count("\n") + 1) * _indent_width(arguments["width"])


def _estimate_wordwrap_filter(guard: _Guard, arguments: dict) -> int:
    size = guard.weight(arguments["s"])  # at most one break per character
    return size + (size + 1) * len(_text(arguments["wrapstring"] or "\n"))


def _estimate_center_filter(guard: _Guard, arguments: dict) -> int:
    width = arguments["width"]
    return max(guard.weight(arguments["value"]), width if isinstance(width, int) else 0)


def _estimate_count_argument(name: str):
    def estimate(guard: _Guard, arguments: dict) -> int:
        count = arguments[name]
        return count if isinstance(count, int) else 0

    return estimate


_FILTER_ESTIMATES = {
    "replace": lambda guard, a: _replace_size(a["s"], a["old"], a["new"], a["count"]),
    "join": _estimate_join_filter,
    "indent": _estimate_indent_filter,
    "wordwrap": _estimate_wordwrap_filter,
    "center": _estimate_center_filter,
    "format": lambda guard, a: _printf_size(guard, _text(a["value"]), a["kwargs"] or a["args"]),
    "tojson": lambda guard, a: guard.weight(a["value"], _indent_width(a["indent"])),
    "batch": _estimate_count_argument("linecount"),
    "slice": _estimate_count_argument("slices"),
}


def _estimate_method(guard: _Guard, method, args: tuple, kwargs: dict) -> int:
    """Size of the result of a str or bytes method that can grow its text; 0 for the others."""
    owner, name = method.__self__, method.__name__
    if name == "replace" and len(args) >= 2:
        return _replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    if name == "join" and args:
        return _join_size(guard, owner, args[0])
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(len(owner), args[0])
    if name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        return len(owner) + owner.count(b"\t" if isinstance(owner, bytes) else "\t") * max(tabsize, 0)
    if name == "translate" and args and isinstance(args[0], Mapping):
        return len(owner) * max([1, *(guard.weight(value) for value in args[0].values())])
    return 0


# ---------------------------------------------------------------------------------------------
# The environment


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """Like Hugging Face's tojson: plain JSON (no HTML escaping), non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_dict(*args, **kwargs) -> dict:
    """`dict(...)` for templates: a function, so the template gets no handle on the dict type."""
    return dict(*args, **kwargs)


def _check_namespace_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace attribute may not start with an underscore: {name!r}")


class _TemplateNamespace(Namespace):
    """`namespace(...)` for templates: refuses underscore names, which could reach the object's internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - same trick as Jinja's, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _finalize(value):
    """Runs on every ``{{ ... }}`` value before it is turned into text."""
    _current_guard().check_output(value)
    return value


def _guarded_filter(name: str, function, estimate):
    leading = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context, eval context or environment
    signature = inspect.signature(function) if estimate is not None else None
    what = f"the {name!r} filter"

    @functools.wraps(function)  # copies jinja_pass_arg too
    def guarded(*args, **kwargs):
        guard = _current_guard()
        guard.check_arguments(what, args[leading:], kwargs)
        if estimate is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            guard.check_size(what, estimate(guard, bound.arguments))
            args, kwargs = bound.args, bound.kwargs
        return guard.charge(function(*args, **kwargs))

    return guarded


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for Hugging Face's training masks;
    here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _GuardedCodeGenerator(CodeGenerator):
    """Routes the text that macros and blocks collect, and `~` concatenation, through the guards."""

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    def visit_Template(self, node, frame=None) -> None:
        super().visit_Template(node, frame)
        # Module globals are looked up when the render functions run, so these replace the imported ones.
        self.writeline("str_join = environment.checked_str_join")
        self.writeline("markup_join = environment.checked_markup_join")


class _Buffer(list):
    """Text a macro, call block, filter block or `{% set %}` block collects before it is joined."""

    def __init__(self, guard: _Guard):
        super().__init__()
        self._guard = guard
        self._chars = 0

    def append(self, text) -> None:
        self._count(len(text))
        super().append(text)

    def extend(self, texts) -> None:
        for text in texts:  # one at a time: texts may be a generator that never ends
            self.append(text)

    def _count(self, chars: int) -> None:
        self._chars += chars
        self._guard.check_size("the text collected by a macro or block", self._chars)
        self._guard.spend(chars)


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self):
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[loopcontrols, _GenerationTag],
            finalize=_finalize,
        )
        filters = {name: function for name, function in self.filters.items() if name != "pprint"}
        filters["tojson"] = _tojson
        self.filters = {
            name: _guarded_filter(name, function, _FILTER_ESTIMATES.get(name)) for name, function in filters.items()
        }
        del self.globals["lipsum"]  # generates text in bulk; no chat template needs it
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_make_dict,
            namespace=_TemplateNamespace,
        )

    def call_binop(self, context, operator, left, right):
        guard = _current_guard()
        what = f"'{operator}'"
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept quick
            guard.check_size(what, len(left) + len(right))
            return guard.charge(left + right)
        if operator == "*":
            if isinstance(left, int) and isinstance(right, _SEQUENCES):
                left, right = right, left
            if isinstance(left, _SEQUENCES) and isinstance(right, int):
                guard.check_size(what, guard.weight(left) * max(right, 0))
            elif isinstance(left, int) and isinstance(right, int):
                guard.check_int_bits(what, left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                guard.check_int_bits(what, right * abs(left).bit_length())
        elif operator == "+":
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                guard.check_size(what, guard.weight(left) + guard.weight(right))
        elif operator == "%" and isinstance(left, (str, bytes)):
            guard.check_size("'%' formatting", _printf_size(guard, left, right))
        return guard.charge(super().call_binop(context, operator, left, right))

    def call(self, context, obj, /, *args, **kwargs):
        guard = _current_guard()
        what = _describe_callable(obj)
        owner = obj.__self__ if isinstance(obj, (types.BuiltinMethodType, types.MethodType)) else None  # text.upper()
        guard.check_arguments(what, (owner, *args) if isinstance(owner, _CONTAINERS + (str, bytes)) else args, kwargs)
        if isinstance(owner, (str, bytes)):
            if obj.__name__ == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(args[0]), *args[1:])  # collect a generator so it can be measured
            guard.check_size(what, _estimate_method(guard, obj, args, kwargs))
        elif isinstance(owner, int) and obj.__name__ == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            guard.check_size(what, length if isinstance(length, int) else 0)
        if not isinstance(obj, Macro):
            return guard.charge(super().call(context, obj, *args, **kwargs))
        if guard.macro_depth >= _MAX_MACRO_DEPTH:
            raise _Refused(f"macros called each other more than {_MAX_MACRO_DEPTH} deep, past the recursion cap")
        guard.macro_depth += 1
        try:
            return guard.charge(super().call(context, obj, *args, **kwargs))
        finally:
            guard.macro_depth -= 1

    def unsafe_undefined(self, obj, attribute):
        # Jinja's default hands back an Undefined that prints as "": refuse outright instead.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def getitem(self, obj, argument):
        value = super().getitem(obj, argument)
        guard = getattr(_local, "guard", None)  # None while constants are folded at compile time
        if guard is not None and isinstance(argument, slice):
            guard.charge(value)
        return value

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        template, is_format_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(wrapper)
        def checked(*args, **kwargs):
            guard = _current_guard()
            mapping = args[0] if is_format_map and args and isinstance(args[0], Mapping) else kwargs
            guard.check_size("str.format()", _format_size(guard, template, () if is_format_map else args, mapping))
            return wrapper(*args, **kwargs)

        return checked

    def new_buffer(self) -> _Buffer:
        return _Buffer(_current_guard())

    def concat(self, pieces) -> str:
        """Joins the text of a buffer, or of a block rendered by `self.name()`, which is a generator."""
        if isinstance(pieces, _Buffer):  # counted as it was collected
            return "".join(pieces)
        buffer = _Buffer(_current_guard())
        buffer.extend(pieces)
        return "".join(buffer)

    def checked_str_join(self, parts):
        return self._checked_join(str_join, parts)

    def checked_markup_join(self, parts):
        return self._checked_join(markup_join, parts)

    @staticmethod
    def _checked_join(join, parts):
        guard = _current_guard()
        parts = tuple(parts)
        guard.check_size("'~'", sum(guard.weight(part) for part in parts))
        return guard.charge(join(parts))


def _describe_callable(obj) -> str:
    if isinstance(obj, (types.BuiltinMethodType, types.MethodType)) and not isinstance(obj.__self__, (types.ModuleType, type(None))):
        return f"{type(obj.__self__).__name__}.{obj.__name__}()"
    if isinstance(obj, Macro):
        return f"macro {obj.name}()"
    if isinstance(obj, (types.FunctionType, type)):
        return f"{obj.__name__}()"
    return "a call"


def _template_line(error: BaseException, filename: str) -> int | None:
    """The template line an error came from: Jinja rewrites tracebacks so template frames carry it."""
    line, traceback = None, error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == filename:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


_ENVIRONMENT = _SandboxEnvironment()
