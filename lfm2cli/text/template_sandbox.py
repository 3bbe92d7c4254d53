"""The sandbox chat templates render in (`lfm2cli.text.chat_template`): jinja2's immutable sandbox with the filters and
globals the hub's templates are written against, under a budget. A checkpoint's template is code we did not
write, rendered again on every chat turn, so loops, calls, sizes, nesting and time are counted and a hostile or
broken template fails fast with one line (TemplateError) instead of hanging or eating memory.

The counts here see what the template asks for; work inside one filter or method (C code, or jinja's own Python)
runs between them. That is bounded from outside: rendering happens in a worker process (`template_worker`) that
is killed when it runs past its time and whose memory the kernel limits."""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
import types
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

# A checkpoint's template is code we did not write, rendered again on every chat turn: it runs under a budget
# so that a hostile or broken one fails fast with one line instead of hanging or eating memory. Real templates
# use a tiny fraction of each limit (one pass or two over the messages).
TIME_LIMIT_S = 3.0
MAX_STEPS = 5_000_000  # loop iterations and calls, all together
MAX_CHARS = 8_000_000  # any one string, bytes or list built, and the prompt; grows with the conversation's own size
MADE_FACTOR = 16  # all values built in one rendering together: this many times MAX_CHARS (each is counted ~twice)
MAX_RANGE = 100_000  # one range(), as jinja's sandbox allows
MAX_DEPTH = 100  # nested calls (a macro calling itself)
MAX_INT_BITS = 100_000  # integers built by * and ** (10**10**10 would take hours)
# The widths and precisions of a format: `%-08.3f`, `%(name)9s`; `{:>20}`, `{0:_^30.2}`.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}:]*:([^{}]*)\}")


class LimitExceeded(Exception):
    """A budget ran out; carries what happened, e.g. "built a string of 10,000,000,000 characters"."""


class Budget:
    """What one rendering may still spend."""

    def __init__(self, max_chars: int) -> None:
        self.deadline = time.monotonic() + TIME_LIMIT_S
        self.steps = 0
        self.depth = 0
        self.max_chars = max_chars
        self.produced = 0  # characters output anywhere, macro bodies and set blocks included
        self.made = 0  # characters and items of every value built, so a thousand values just under the limit fail

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise LimitExceeded(f"ran more than {MAX_STEPS:,} loop iterations and calls")
        if self.steps & 127 == 0 and time.monotonic() > self.deadline:
            raise LimitExceeded(f"ran longer than {TIME_LIMIT_S:g} s")

    def check(self, n: int, what: str = "a string or list", unit: str = "characters or items") -> None:
        """One value of `n` characters, bytes or items may be built."""
        if n > self.max_chars:
            raise LimitExceeded(f"tried to build {what} of {n:,} {unit} (limit {self.max_chars:,})")

    def size(self, n: int, what: str = "a string or list", unit: str = "characters or items") -> None:
        """A value of `n` characters, bytes or items is about to be built (or just was): it and everything built
        so far must fit."""
        self.check(n, what, unit)
        self.made += max(n, 0)
        if self.made > MADE_FACTOR * self.max_chars:
            raise LimitExceeded(f"built more than {MADE_FACTOR * self.max_chars:,} characters and items in all")

    def output(self, n: int) -> None:
        self.produced += n
        if self.produced > 4 * self.max_chars:
            raise LimitExceeded(f"wrote more than {4 * self.max_chars:,} characters")


BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("lfm2_template_budget", default=None)


_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset, range)
_SEQ = (str, bytes, bytearray, list, tuple)  # what `*` repeats and `+` joins


def _length(value: Any) -> int:
    return len(value) if isinstance(value, _SIZED) else 0


def text_size(value: Any, cap: int, per_item: int = 2, per_level: int = 0) -> int:
    """About how many characters `value` prints as; stops counting once past `cap`. A list holding the same
    long string a million times is small in memory but not once printed or joined. Laid out one item a line,
    `per_item` is what each item adds (separators, a newline) and `per_level` its indentation per nesting level."""
    total, stack = 0, [(value, 1)]
    while stack and total <= cap:
        v, depth = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, range):  # numbers of up to ~8 digits, not walked one by one
            total += 2 + len(v) * (per_item + 8 + depth * per_level)
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            total += 2 + len(v) * (per_item + depth * per_level)
            if total <= cap:
                stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
                if isinstance(v, dict):
                    stack.extend((k, depth + 1) for k in v.keys())
        else:
            total += 8
    return total


def _check_ints(b: Budget, values: Iterable[Any], what: str) -> None:
    for v in values:
        if type(v) is int and v > b.max_chars:
            raise LimitExceeded(f"asked {what} for {v:,} characters (limit {b.max_chars:,})")


def _check_format(b: Budget, fmt: Any, args: Iterable[Any], braces: bool = False) -> None:
    """`'%09999999999d' % 1` and `'{:>9999999999}'.format(1)` are short formats that build huge strings."""
    args = list(args)
    if isinstance(fmt, (bytes, bytearray)):
        fmt = fmt.decode("latin-1")
    if isinstance(fmt, str):
        if braces:
            numbers = [n for spec in _BRACE_SPEC.findall(fmt) for n in re.findall(r"\d+", spec)]
        else:
            numbers = [n for spec in _PERCENT_SPEC.findall(fmt) for n in spec if n]
        _check_ints(b, [int(n) for n in numbers if len(n) > 6], "a format")
        # `%*d` and `{:{}}` take the width from the arguments; elsewhere a big number is just a number
        if re.search(r"\{[^{}]*:[^{}]*\{", fmt) if braces else "*" in fmt:
            _check_ints(b, args, "a format")
    b.size(_length(fmt) + text_size(args, b.max_chars), "a formatted string")


def _replace_size(s: Any, old: Any, new: Any) -> int:
    same = (str,) if isinstance(s, str) else (bytes, bytearray)
    if not (isinstance(s, same) and isinstance(old, same) and isinstance(new, same)) or len(new) <= len(old):
        return 0
    return len(s) + (s.count(old) if old else len(s) + 1) * (len(new) - len(old))


def _check_binop(b: Budget, op: str, left: Any, right: Any) -> None:
    b.step()
    if op == "*":
        if isinstance(left, _SEQ) and type(right) is int:
            b.size(len(left) * right)
        elif isinstance(right, _SEQ) and type(left) is int:
            b.size(len(right) * left)
        elif type(left) is int and type(right) is int and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise LimitExceeded(f"tried to build an integer of more than {MAX_INT_BITS:,} bits")
    elif op == "+" and isinstance(left, _SEQ) and isinstance(right, _SEQ):
        b.size(len(left) + len(right))
    elif op == "**" and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
        if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise LimitExceeded(f"tried to build an integer of more than {MAX_INT_BITS:,} bits")
    elif op == "%" and isinstance(left, (str, bytes, bytearray)):
        _check_format(b, left, right if isinstance(right, tuple) else [right])


def _translate_size(s: str | bytes | bytearray, table: Any) -> int:
    """`str.translate` maps each character to a string of its table: `('x' * n).translate({120: 'y' * m})`."""
    if not isinstance(s, str) or not isinstance(table, Mapping):
        return len(s)  # bytes map byte to byte
    longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(s) * max(longest, 1)


def _check_int_call(b: Budget, name: str, args: tuple, kwargs: dict) -> None:
    if name == "to_bytes":  # `(0).to_bytes(1500000000, 'big')`
        length = _arg(args, kwargs, 0, "length", 1)
        if type(length) is int:
            b.size(length, "to_bytes()", "bytes")


def _check_call(b: Budget, obj: Any, args: tuple, kwargs: dict) -> None:
    """Before a call: the str, bytes and int methods whose arguments can ask for far more than they are given."""
    wrapped = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format in a function of its own
    owner = getattr(wrapped, "__self__", None)
    name = getattr(wrapped, "__name__", "")
    if isinstance(owner, int):
        _check_int_call(b, name, args, kwargs)
        return
    if not isinstance(owner, (str, bytes, bytearray)):
        return
    if name in ("format", "format_map"):
        mapped = [v for a in args if isinstance(a, Mapping) for v in a.values()]  # format_map's values
        _check_format(b, owner, [*args, *kwargs.values(), *mapped], braces=True)
    elif name == "join" and args:
        b.size(text_size(args[0], b.max_chars) + len(owner) * _length(args[0]), "a joined string")
    elif name == "replace" and len(args) >= 2:
        b.size(_replace_size(owner, args[0], args[1]))
    elif name == "expandtabs":
        tabsize = _arg(args, kwargs, 0, "tabsize", 8)
        if type(tabsize) is int:
            b.size(len(owner) + max(tabsize, 0) * (owner.count("\t" if isinstance(owner, str) else b"\t") + 1),
                   "expandtabs()")
    elif name in ("center", "ljust", "rjust", "zfill"):  # a width
        width = _arg(args, kwargs, 0, "width")
        if type(width) is int:
            b.size(max(width, len(owner)), f"{name}()")
    elif name == "translate" and args:
        b.size(_translate_size(owner, args[0]), "translate()")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _width(value: Any) -> int:
    """An indentation as filters take it: a number of spaces or a string."""
    return len(value) if isinstance(value, str) else value if type(value) is int and value > 0 else 0


def _check_sum(b: Budget, value: Any, start: Any) -> None:
    """`sum(start=[])` concatenates: the result holds every item of every element."""
    if isinstance(start, _SEQ) and isinstance(value, (list, tuple)):
        b.size(len(start) + sum(_length(v) for v in value), "a sum")


def _check_json(b: Budget, value: Any, indent: Any, separators: Any) -> None:
    """`tojson(indent=...)` adds its indentation once per item and level; separators once per item."""
    per_item = 4
    if isinstance(separators, (tuple, list)):
        per_item += sum(len(x) for x in separators if isinstance(x, str))
    b.size(text_size(value, b.max_chars, per_item, _width(indent)), "the tojson of a value")


def _check_filter(b: Budget, name: str, args: tuple, kwargs: dict) -> None:
    """Before a filter: the ones whose arguments can ask for far more than they are given. Filters that only
    grow their input by a small constant factor (escape, upper, urlencode) are counted once they return."""
    value = args[0] if args else None
    if name == "center":
        width = _arg(args, kwargs, 1, "width", 80)
        if type(width) is int:
            b.size(max(width, _length(value)), "center()")
    elif name == "indent":
        width = _width(_arg(args, kwargs, 1, "width", 4))
        lines = value.count("\n") + 1 if isinstance(value, str) else 1
        b.size(_length(value) + width * lines)
    elif name == "wordwrap":
        width, wrap = _arg(args, kwargs, 1, "width", 79), _arg(args, kwargs, 3, "wrapstring") or "\n"
        if isinstance(value, str) and isinstance(wrap, str) and type(width) is int:
            b.size(len(value) + (len(value) // max(width, 1) + value.count("\n") + 1) * len(wrap))
    elif name == "replace":
        b.size(_replace_size(value, _arg(args, kwargs, 1, "old"), _arg(args, kwargs, 2, "new")))
    elif name == "join":
        sep = _arg(args, kwargs, 1, "d", "")
        b.size(text_size(value, b.max_chars) + _length(sep) * _length(value), "a joined string")
    elif name == "format":
        _check_format(b, value, [*args[1:], *kwargs.values()])
    elif name == "tojson":
        _check_json(b, value, _arg(args, kwargs, 2, "indent"), _arg(args, kwargs, 3, "separators"))
    elif name == "pprint":  # one item a line, indented by its depth
        b.size(text_size(value, b.max_chars, 4, 1), "the pprint of a value")
    elif name == "sum":
        _check_sum(b, value, _arg(args, kwargs, 2, "start", 0))
    elif name == "batch":  # the last row is filled up to `linecount` items
        count, fill = _arg(args, kwargs, 1, "linecount"), _arg(args, kwargs, 2, "fill_with")
        b.size(_length(value) + (count if type(count) is int and fill is not None else 0), "a batch")
    elif name == "slice":  # `slices` lists, however short the value
        count = _arg(args, kwargs, 1, "slices")
        b.size(_length(value) + (count if type(count) is int else 0), "a slice")
    elif name == "urlize":  # the target and rel attributes are written once per link
        extra = sum(_length(_arg(args, kwargs, i, key)) for i, key in ((3, "target"), (4, "rel")))
        words = value.count(" ") + value.count("\n") + 1 if isinstance(value, str) else 1
        b.size(_length(value) + words * extra, "urlize()")
    elif name in ("string", "list"):
        b.size(text_size(value, b.max_chars), f"the {name} of a value")
    elif name == "truncate":
        b.size(_length(value) + _length(_arg(args, kwargs, 3, "end")), "truncate()")


def _budgeted_filter(name: str, func: Any) -> Any:
    """`func`, checked against the budget of the rendering in progress. Jinja reads which context argument a
    filter takes from attributes of the function: functools.wraps carries them over."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        b = BUDGET.get()
        if b is None:
            return func(*args, **kwargs)
        b.step()
        _check_filter(b, name, args[skip:], kwargs)
        result = func(*args, **kwargs)
        b.size(_length(result))
        return result

    return checked


def _range(*args: Any) -> range:
    """range() as jinja's sandbox allows it, failing with the budget's message instead of OverflowError."""
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise LimitExceeded(f"asked for a range of {len(r):,} numbers (limit {MAX_RANGE:,})")
    return r


def _counted(iterable: Any) -> Iterator[Any]:
    """What every `{% for %}` of a template iterates: each item costs one step."""
    b = BUDGET.get()
    for item in iterable:
        if b is not None:
            b.step()
        yield item


def _output(value: Any) -> str:
    """What every `{{ ... }}` and text block of a template writes: counted, and as jinja writes it (`str`)."""
    b = BUDGET.get()
    if b is not None and not isinstance(value, str):
        b.size(text_size(value, b.max_chars), "an output")
    text = str(value)
    if b is not None:
        b.output(len(text))
    return text


def _concat(*values: Any) -> str:
    """The `~` operator, as jinja joins it, with the result's size checked before it is built."""
    b = BUDGET.get()
    if b is not None:
        b.step()
        b.size(sum(text_size(v, b.max_chars) for v in values), "a string")
    return "".join(map(str, values))


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (jinja's names)
    from jinja2.utils import generate_lorem_ipsum

    if type(n) is int and type(max) is int and n * max > 100_000:
        raise LimitExceeded(f"asked lipsum() for {n:,} paragraphs of up to {max:,} words")
    return generate_lorem_ipsum(n, html, min, max)


_HELPERS = {"lfm2_counted": _counted, "lfm2_output": _output, "lfm2_concat": _concat}
_HELPER_FUNCTIONS = frozenset(_HELPERS.values())


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes `<`, `>` and `&` and sorts keys; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    b = BUDGET.get()
    if b is not None and isinstance(fmt, str):
        b.size(12 * len(fmt), "strftime_now()")  # `%c` is two characters that print as 24
    return datetime.now().strftime(fmt)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=1)
def environment() -> Any:
    """The one sandboxed environment every template renders in (jinja2 is imported on first use)."""
    import jinja2.ext

    env = _environment_class()(trim_blocks=True, lstrip_blocks=True,
                               extensions=[_generation_block(), jinja2.ext.loopcontrols])
    for attr, helper in _HELPERS.items():
        setattr(env, attr, helper)
    env.filters.update({name: _budgeted_filter(name, f) for name, f in env.filters.items()})
    env.filters["tojson"] = _budgeted_filter("tojson", tojson)
    env.globals["range"] = _range
    env.globals["lipsum"] = _lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _make_dict
    env.globals["namespace"] = _safe_namespace()
    return env


# The classes below derive from jinja2's, which is imported only when a template is first rendered: each is made
# by a function that `environment` calls once.

def _generation_block() -> type:
    import jinja2.ext
    import jinja2.nodes

    class GenerationBlock(jinja2.ext.Extension):
        """Accept `{% generation %}...{% endgeneration %}` (used by training templates to mark assistant
        text); rendering just emits the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return GenerationBlock


def _safe_namespace() -> type:
    import jinja2.exceptions
    import jinja2.utils

    class SafeNamespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore attributes, which could reach Python internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # `self` travels in args, as in jinja's Namespace
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for key in attrs:
                SafeNamespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key: str, value: Any) -> None:
            SafeNamespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key: Any) -> None:
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {key!r} is not allowed")

    return SafeNamespace


def _budgeted_transformer() -> type:
    import jinja2.nodes
    import jinja2.visitor

    class Budgeted(jinja2.visitor.NodeTransformer):
        """Routes every loop, `~` and output of a parsed template through the budget's helpers. The helpers
        return what jinja itself would have, so the rendered text does not change."""

        @staticmethod
        def _helper(name: str, args: list) -> Any:
            return jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute(name), args, [], None, None)

        def visit_For(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.iter = self._helper("lfm2_counted", [node.iter])
            return node

        def visit_Concat(self, node: Any) -> Any:
            node = self.generic_visit(node)
            return self._helper("lfm2_concat", node.nodes).set_lineno(node.lineno)

        def visit_Output(self, node: Any) -> Any:
            node = self.generic_visit(node)
            node.nodes = [self._helper("lfm2_output", [child]).set_lineno(child.lineno) for child in node.nodes]
            return node

    return Budgeted


def _environment_class() -> type:
    import jinja2.runtime
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    budgeted = _budgeted_transformer()

    class Environment(ImmutableSandboxedEnvironment):
        """The sandbox of Hugging Face's templates, with every step of a rendering charged to its budget."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            return budgeted().visit(super()._parse(source, name, filename))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            b = BUDGET.get()
            if b is not None:
                _check_binop(b, operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            if type(obj) is types.FunctionType and obj in _HELPER_FUNCTIONS:
                return obj(*args)
            b = BUDGET.get()
            if b is None:
                return super().call(context, obj, *args, **kwargs)
            b.step()
            _check_call(b, obj, args, kwargs)
            if isinstance(obj, jinja2.runtime.LoopContext) and args:  # a recursive loop's next level
                args = (_counted(args[0]), *args[1:])
            b.depth += 1
            try:
                if b.depth > MAX_DEPTH:
                    raise LimitExceeded(f"made calls nested more than {MAX_DEPTH} deep (a macro that calls itself?)")
                result = super().call(context, obj, *args, **kwargs)
            finally:
                b.depth -= 1
            b.size(_length(result))
            return result

    return Environment
