"""The Jinja sandbox that chat templates run in: a hardened ``ImmutableSandboxedEnvironment``.

A chat template is code that comes with a model, so it is untrusted. On top of Jinja's immutable
sandbox (no private attributes such as ``__class__`` or ``__globals__``, no mutation of lists and
dicts, no unsafe callables), this module adds a ``SizeGuard`` to every render:

- Size cap, checked *before* an operation allocates. Every way a template can make a value much
  bigger than its operands -- ``*``, ``**``, ``+``, ``%``, ``~``, the filters and ``str`` methods
  that pad, repeat or join (``replace``, ``join``, ``indent``, ``format``, ``center``,
  ``tojson(indent=...)``, ...), and text collected by macros and blocks -- is estimated and refused
  past it. Integers are capped in bits, macro calls in depth.
- Allocation cap: whatever a render does allocate counts against it, so many medium values cannot
  add up to a huge one.
- Output cap on the rendered text.

The caps grow with the input: a long conversation legitimately renders to long text. The guard of
the render in progress lives in a thread-local, so renders in several threads do not share caps.

Templates also get Hugging Face's globals and filters (``raise_exception``, ``strftime_now``,
``tojson``, ``namespace``, ``dict``) and the ``{% generation %}`` tag; ``lipsum`` and ``pprint``
are removed.
"""
from __future__ import annotations

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
from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

_INPUT_ALLOWANCE = 4  # each character of input raises the size and output caps by this much
_ALLOCATION_FACTOR = 32  # allocation cap = this many times the size cap
_MAX_INT_BITS = 1 << 16
_MAX_MACRO_DEPTH = 64  # well below where Python's recursion limit would stop it, whatever that limit is
_SEQUENCES = (str, bytes, list, tuple)
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)
_SHORT_STRING = 64  # strings shorter than this are not remembered when counting allocations


class GuardRefused(Exception):
    """The sandbox refused an operation; the message says which cap and why."""


class TemplateRaised(Exception):
    """The template called raise_exception(message)."""


def compile_template(source: str, filename: str) -> tuple[Template, frozenset[str]]:
    """Compile source for the sandbox; also return the names of the variables it refers to."""
    ast = _ENVIRONMENT.parse(source, filename=filename)
    code = _ENVIRONMENT.compile(ast, filename=filename)
    template = _ENVIRONMENT.template_class.from_code(_ENVIRONMENT, code, _ENVIRONMENT.make_globals(None))
    return template, frozenset(name.name for name in ast.find_all(nodes.Name))


def render(template: Template, variables: dict, guard: SizeGuard) -> str:
    """Render template with variables under guard (``SizeGuard.for_input(variables, ...)``). The guard is
    found through a thread-local, so the whole render runs in the calling thread."""
    _local.guard = guard
    try:
        pieces = []
        for piece in template.generate(variables):
            guard.emit(piece)
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _local.guard = None


# ---------------------------------------------------------------------------------------------
# Size accounting

_local = threading.local()  # .guard: the SizeGuard of the render running in this thread, if any


def _current_guard() -> SizeGuard:
    guard = getattr(_local, "guard", None)
    if guard is None:  # at compile time, when Jinja tries to fold constants: leave it to the render
        raise GuardRefused("chat template code ran outside a guarded render")
    return guard


def _amount(n: int) -> str:
    return f"{n:,}" if n < 10**30 else "more than 10^30"


class SizeGuard:
    """The caps of one render. It lives in the thread that renders."""

    def __init__(self, cap: int):
        self.cap = cap  # size cap: the largest value, and the starting output allowance
        self.output_left = cap
        self.allocation_left = cap * _ALLOCATION_FACTOR
        self.macro_depth = 0
        self._weights: dict[tuple[int, int], tuple[object, int]] = {}
        self._counted: dict[int, object] = {}  # objects already charged (or given as input), by id

    @classmethod
    def for_input(cls, variables, max_output_chars: int) -> SizeGuard:
        """The guard for a render of these variables. Its size and output caps grow with their size,
        and they count as already allocated: charging a value that holds them does not count them again."""
        guard = cls(max_output_chars + _INPUT_ALLOWANCE * cls(sys.maxsize).weight(variables))
        guard._count_new(variables, sys.maxsize)
        return guard

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
            raise GuardRefused(f"{what} would make a value of about {_amount(size)} characters, past the size cap ({self.cap:,})")

    def check_int_bits(self, what: str, bits: int) -> None:
        if bits > _MAX_INT_BITS:
            raise GuardRefused(f"{what} would make an integer of about {_amount(bits)} bits, past the size cap ({_MAX_INT_BITS:,} bits)")

    def check_arguments(self, what: str, args, kwargs) -> None:
        """Filters and methods may turn any argument into a string; none may be past the size cap."""
        for value in itertools.chain(args, (v for k, v in kwargs.items() if not k.startswith("_"))):
            size = self.weight(value)
            if size > self.cap:
                raise GuardRefused(f"{what} got an argument of about {_amount(size)} characters, past the size cap ({self.cap:,})")

    def check_output(self, value) -> None:
        size = self.weight(value)
        if size > self.output_left:
            raise self._output_refused()

    def emit(self, text: str) -> None:
        self.output_left -= len(text)
        if self.output_left < 0:
            raise self._output_refused()

    def _output_refused(self) -> GuardRefused:
        return GuardRefused(f"the rendered text passed the output cap ({self.cap:,} characters)")

    def spend(self, chars: int) -> None:
        self.allocation_left -= chars
        if self.allocation_left < 0:
            raise GuardRefused(
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


def _printf_size(guard: SizeGuard, template, values) -> int:
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


def _format_size(guard: SizeGuard, template: str, args, kwargs) -> int:
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


def _join_size(guard: SizeGuard, separator, items: list) -> int:
    return sum(guard.weight(item) for item in items) + len(items) * guard.weight(separator)


def _indent_width(indent) -> int:
    if isinstance(indent, int):
        return max(indent, 0)
    return len(indent) if isinstance(indent, str) else 0


def _estimate_join_filter(guard: SizeGuard, arguments: dict) -> int:
    if not isinstance(arguments["value"], (list, tuple)):  # a generator: collect it so it can be measured
        arguments["value"] = list(arguments["value"])
    return _join_size(guard, arguments["d"], arguments["value"])


def _estimate_indent_filter(guard: SizeGuard, arguments: dict) -> int:
    text = _text(arguments["s"])
    return len(text) + (text.count("\n") + 1) * _indent_width(arguments["width"])


def _estimate_wordwrap_filter(guard: SizeGuard, arguments: dict) -> int:
    size = guard.weight(arguments["s"])  # at most one break per character
    return size + (size + 1) * len(_text(arguments["wrapstring"] or "\n"))


def _estimate_center_filter(guard: SizeGuard, arguments: dict) -> int:
    width = arguments["width"]
    return max(guard.weight(arguments["value"]), width if isinstance(width, int) else 0)


def _estimate_count_argument(name: str):
    def estimate(guard: SizeGuard, arguments: dict) -> int:
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


def _estimate_method(guard: SizeGuard, method, args: tuple, kwargs: dict) -> int:
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
    raise TemplateRaised(str(message))


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

    def __init__(self, /, *args, **kwargs):  # positional-only self, so namespace(self=...) works
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

    def __init__(self, guard: SizeGuard):
        super().__init__()
        self._guard = guard
        self._chars = 0

    def append(self, text) -> None:
        self._chars += len(text)
        self._guard.check_size("the text collected by a macro or block", self._chars)
        self._guard.spend(len(text))
        super().append(text)

    def extend(self, texts) -> None:
        for text in texts:  # one at a time: texts may be a generator that never ends
            self.append(text)


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
            raise GuardRefused(f"macros called each other more than {_MAX_MACRO_DEPTH} deep, past the recursion cap")
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


_ENVIRONMENT = _SandboxEnvironment()
