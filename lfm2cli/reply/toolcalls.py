"""Tool calls in model output: LFM2's pythonic call lists and JSON calls, parsed whole or while streaming.

LFM2 writes `<|tool_call_start|>[get_weather(location="Paris"), f(x=1)]<|tool_call_end|>`; told to answer in
JSON it writes `[{"name": ..., "arguments": {...}}]` between the same markers. Both parse into `ToolCall`s.
The pythonic form is read with `ast` and only literals are accepted: nothing the model writes is evaluated.
"""

from __future__ import annotations

import ast
import json
import keyword
import math
import secrets
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

# Model output nests rarely more than a few levels; the cap keeps hostile output from exhausting the stack. Every
# structure is measured without recursion before anything recursive (json, ast.unparse, our own walks) sees it.
_MAX_DEPTH = 64
# Syntax nodes above one value: the call, its keyword, a dotted name; a name of more parts than this is no name.
_MAX_AST_DEPTH = _MAX_DEPTH + 16
# A block is parsed whole; past this it is text (file contents in an argument fit many times over).
MAX_BLOCK_CHARS = 2_000_000
_NAMED_CONSTANTS = {"true": True, "false": False, "null": None, "none": None}


class ParseError(ValueError):
    """A tool-call block that is not a list of calls with literal keyword arguments."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_openai(self, id: str | None = None) -> dict[str, Any]:
        """The entry of an OpenAI `tool_calls` list (arguments as a JSON string, as that API sends them).
        A non-finite number has no JSON form: ValueError, never `Infinity` in the arguments."""
        return {
            "id": id or "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False,
                                                                    allow_nan=False)},
        }

    @classmethod
    def from_openai(cls, entry: Mapping[str, Any]) -> ToolCall:
        """The inverse of `to_openai` (the id is dropped): for calls read back from history or a client."""
        return _call_from_object(entry)

    def to_pythonic(self) -> str:
        """The call as LFM2 writes it, `name(key="value", n=1)`; `parse_calls` reads it back unchanged."""
        args = ", ".join(f"{k}={_literal(v)}" for k, v in self.arguments.items())
        return f"{self.name}({args})"


def format_calls(calls: Iterable[ToolCall]) -> str:
    """Calls as one LFM2 block, the text an assistant turn with tool calls is replayed as."""
    return TOOL_CALL_START + "[" + ", ".join(c.to_pythonic() for c in calls) + "]" + TOOL_CALL_END


def _literal(value: Any) -> str:
    # JSON's string escapes are all valid in Python literals, and keep double quotes as LFM2 writes them.
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number; a tool-call argument must be one")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_literal(str(k))}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} as a tool-call argument")


# ---------------------------------------------------------------------------------------------------------------
# Parsing one block's content


def _parameter_order(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, list[str]]:
    """Function name -> its parameter names in schema order (OpenAI tools, or bare function schemas)."""
    order: dict[str, list[str]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            props = (fn.get("parameters") or {}).get("properties") or {}
            order[fn["name"]] = list(props)
    return order


def _strip_fence(body: str) -> str:
    # Some fine-tunes wrap the list in a markdown code fence inside the markers.
    text = body.strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3]
        first, _, rest = text.partition("\n")
        if first.strip().isidentifier() or not first.strip():
            text = rest
    return text.strip()


def parse_calls(body: str, tools: Sequence[Mapping[str, Any]] | None = None) -> list[ToolCall]:
    """The calls in one block's content: a pythonic list (or one call), or JSON call objects.

    `tools` (OpenAI function schemas) lets positional arguments map to parameters in schema order;
    without it a positional argument is an error, because its name cannot be known.
    Any block, however hostile, either parses or raises ParseError: sizes and nesting are bounded first."""
    if len(body) > MAX_BLOCK_CHARS:
        raise ParseError(f"the block is {len(body)} characters long; at most {MAX_BLOCK_CHARS} are read as calls")
    text = _strip_fence(body)
    if not text:
        raise ParseError("empty tool-call block")
    if text.lstrip("[ \t\r\n").startswith("{"):
        try:
            data = loads_json(text)
        except ParseError:
            data = None  # maybe Python-style dicts (single quotes, True): read below through ast
        if data is not None:
            return _calls_from_json(data)
    tree, renamed = _parse_expression(text)
    order = _parameter_order(tools)
    items = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    if all(isinstance(i, ast.Dict) for i in items):
        return _calls_from_json([_value(i) for i in items] if isinstance(tree, (ast.List, ast.Tuple)) else _value(tree))
    return [_call_from_ast(item, order, renamed) for item in items]


def _parse_expression(text: str) -> tuple[ast.expr, dict[str, str]]:
    """The block as one Python expression, repaired where models write what Python does not read (see
    `_repaired`); also the keyword parameters renamed for that, placeholder -> name."""
    renamed: dict[str, str] = {}
    try:
        tree = _ast_parse(text)
    except (SyntaxError, ValueError):
        repaired, renamed = _repaired(text)
        try:
            tree = _ast_parse(repaired)
        except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
            raise ParseError(f"not a call list: {_reason(e)}") from None
    except (RecursionError, MemoryError) as e:
        raise ParseError(f"not a call list: {_reason(e)}") from None
    if _ast_depth(tree) > _MAX_AST_DEPTH:
        raise ParseError(f"nested more than {_MAX_AST_DEPTH} levels deep (names or arguments); not a call list")
    return tree, renamed


def _ast_parse(text: str) -> ast.expr:
    # "\d" in a string is an invalid escape that Python still reads as backslash-d, which is what the model meant;
    # its warning (SyntaxWarning from 3.12, DeprecationWarning before) must neither print nor, under an "error"
    # filter, turn into a SyntaxError.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(text, mode="eval").body


def _reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, MemoryError):
        return "too large"
    return " ".join(str(e).split())[:200]


def _ast_depth(tree: ast.AST, limit: int = _MAX_AST_DEPTH) -> int:
    """How deep the syntax tree goes (counting stops past `limit`), measured without recursion."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def json_depth(text: str) -> int:
    """How deeply JSON text nests its arrays and objects (strings skipped), in one pass and without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str) -> Any:
    """JSON from a model or a client: nesting bounded before it is parsed, numbers finite (`1e999`, `NaN` and
    `Infinity` are refused rather than read as floats json.dumps would write back as non-JSON). ParseError
    otherwise."""
    if json_depth(text) > _MAX_DEPTH:
        raise ParseError(f"nested more than {_MAX_DEPTH} levels deep")
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ParseError(f"not JSON: {_reason(e)}") from None


def _repaired(text: str) -> tuple[str, dict[str, str]]:
    """What models write and Python does not read, made readable without changing what was meant: line breaks and
    NUL bytes inside one-line strings (escaped), a backslash that begins no escape Python can read (`"C:\\Users"`,
    kept as a backslash), integers with leading zeros (`month=07` is 7) and a Python keyword as a parameter name
    (`from=1`, renamed to a placeholder that `_call_from_ast` maps back)."""
    out: list[str] = []
    renamed: dict[str, str] = {}
    quote = ""
    raw = False  # the string has an r prefix: its backslashes are text
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            piece, i, closed = _string_piece(text, i, quote, raw)
            out.append(piece)
            quote = "" if closed else quote
            continue
        prev = text[i - 1] if i else " "  # a space: "" would be "in" every string
        starts_token = not (prev.isalnum() or prev in "_.")
        if ch in "'\"":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            raw = "r" in _prefix(text, i).lower()
            out.append(quote)
            i += len(quote)
        elif ch.isdigit() and starts_token:
            digits, i = _number_at(text, i)
            out.append(digits)
        elif (ch.isalpha() or ch == "_") and starts_token:
            word, i = _name_at(text, i, renamed)
            out.append(word)
        else:
            out.append(ch)
            i += 1
    return "".join(out), renamed


def _string_piece(text: str, i: int, quote: str, raw: bool) -> tuple[str, int, bool]:
    """The repaired text of what begins at `i` inside a string opened by `quote`, where it ends, and whether it
    closed the string."""
    ch = text[i]
    if ch == "\\" and i + 1 < len(text):
        if text[i + 1] == "\0":
            return "\\\\\\x00", i + 2, False  # backslash, NUL
        if not raw and not _escape_ok(text, i):
            return "\\\\", i + 1, False  # `C:\Users` is a path, not a broken \U escape: keep the backslash
        return text[i:i + 2], i + 2, False
    if text.startswith(quote, i):
        return quote, i + len(quote), True
    if ch == "\0":
        return "\\x00", i + 1, False
    if ch in "\n\r" and len(quote) == 1:
        return ("\\n" if ch == "\n" else "\\r"), i + 1, False
    return ch, i + 1, False


def _number_at(text: str, i: int) -> tuple[str, int]:
    """The digits that begin at `i`, leading zeros dropped from an integer (`07` is 7), and where they end."""
    j = i
    while j < len(text) and text[j].isdigit():
        j += 1
    digits = text[i:j]
    if len(digits) > 1 and digits[0] == "0" and (j == len(text) or text[j] not in ".eEjJxXoObB_"):
        digits = digits.lstrip("0") or "0"
    return digits, j


def _name_at(text: str, i: int, renamed: dict[str, str]) -> tuple[str, int]:
    """The name that begins at `i` (a keyword used as a parameter name replaced by its placeholder, recorded in
    `renamed`), and where it ends."""
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] == "_"):
        j += 1
    word = text[i:j]
    rest = text[j:j + 64].lstrip(" \t")
    if keyword.iskeyword(word) and rest.startswith("=") and not rest.startswith("=="):
        placeholder = _placeholder(word, text, renamed)
        renamed[placeholder] = word
        word = placeholder
    return word, j


_ESCAPE_DIGITS = {"x": 2, "u": 4, "U": 8}


def _escape_ok(text: str, at: int) -> bool:
    """Whether the backslash at `at` begins an escape Python can read (x, u and U need their hex digits, N a name
    in braces); a backslash before any other letter is read as itself, with only a warning."""
    kind = text[at + 1]
    if kind == "N":
        return text.startswith("{", at + 2) and "}" in text[at + 3:at + 100]
    n = _ESCAPE_DIGITS.get(kind)
    if n is None:
        return True
    digits = text[at + 2:at + 2 + n]
    return len(digits) == n and all(c in "0123456789abcdefABCDEF" for c in digits)


def _prefix(text: str, quote_at: int) -> str:
    """The string prefix (r, b, f, rb, ...) written right before a quote."""
    start = quote_at
    while start > 0 and text[start - 1].isalpha() and quote_at - start < 2:
        start -= 1
    return text[start:quote_at] if start == 0 or not (text[start - 1].isalnum() or text[start - 1] == "_") else ""


def _placeholder(word: str, text: str, taken: Mapping[str, str]) -> str:
    name = f"_lfm2_kw_{word}"
    while name in text or (name in taken and taken[name] != word):
        name += "_"
    return name


def _shown(node: ast.expr) -> str:
    """A node as a message shows it: its source when it is small (ast.unparse recurses), else what it is."""
    if _ast_depth(node, 12) > 12:
        return f"a {type(node).__name__.lower()} expression nested too deeply to show"
    return ast.unparse(node)[:80]


def _dotted_name(node: ast.expr) -> str:
    """`a.b.c` or `get-weather` as the name it spells; the tree's depth was bounded by `_parse_expression`."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted_name(node.value) + "." + node.attr
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
        # `get-weather` parses as a subtraction; OpenAI function names may contain hyphens.
        return _dotted_name(node.left) + "-" + _dotted_name(node.right)
    raise ParseError(f"not a function name: {_shown(node)}")


def _call_from_ast(node: ast.expr, order: dict[str, list[str]], renamed: Mapping[str, str]) -> ToolCall:
    prefix = ""
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
        prefix += _dotted_name(node.left) + "-"
        node = node.right
    if not isinstance(node, ast.Call):
        raise ParseError(f"not a function call: {_shown(node)}")
    name = prefix + _dotted_name(node.func)
    arguments: dict[str, Any] = {}
    if node.args:
        params = order.get(name)
        if params is None:
            raise ParseError(f"{name}() has positional arguments; LFM2 calls name every argument (key=value)")
        if len(node.args) > len(params):
            raise ParseError(f"{name}() takes {len(params)} arguments, the call gives {len(node.args)}")
        for param, arg in zip(params[:len(node.args)], node.args, strict=True):
            if isinstance(arg, ast.Starred):
                raise ParseError(f"{name}(): *arguments are not literals")
            arguments[param] = _value(arg)
    for kw in node.keywords:
        if kw.arg is None:
            # `**{"a": 1}`: a dict literal spelled out is keyword arguments too
            unpacked = _value(kw.value) if isinstance(kw.value, ast.Dict) else None
            if not isinstance(unpacked, dict) or not all(isinstance(k, str) for k in unpacked):
                raise ParseError(f"{name}(): **arguments must be a dict literal with string keys")
            items = list(unpacked.items())
        else:
            items = [(renamed.get(kw.arg, kw.arg), _value(kw.value))]
        for key, value in items:
            if key in arguments:
                raise ParseError(f"{name}(): argument {key!r} given twice")
            arguments[key] = value
    return ToolCall(name, arguments)


def _value(node: ast.expr, depth: int = 0) -> Any:
    """A literal's value: what `ast.literal_eval` accepts, plus JSON's true/false/null and f-strings without
    fields; tuples and sets become lists. Numbers must be finite: `1e999` has no JSON form."""
    if depth > _MAX_DEPTH:
        raise ParseError("arguments nested too deeply")
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ParseError("a number too large to be finite (a double ends near 1.8e308)")
        return node.value
    if isinstance(node, ast.Name) and node.id.lower() in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id.lower()]
    if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
        return "".join(str(v.value) for v in node.values)  # f"hello": no field, so a plain string
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand, depth + 1)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_value(e, depth + 1) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[Any, Any] = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                raise ParseError("**unpacking in a dict is not a literal")
            key = _value(k, depth + 1)
            if isinstance(key, (list, dict)):
                raise ParseError("a dict key must be a string or a number")
            out[key] = _value(v, depth + 1)
        return out
    raise ParseError(f"not a literal value: {_shown(node)}")


def _calls_from_json(data: Any) -> list[ToolCall]:
    if isinstance(data, Mapping) and isinstance(data.get("tool_calls"), list):
        data = data["tool_calls"]
    items = data if isinstance(data, list) else [data]
    return [_call_from_object(item) for item in items]


def _call_from_object(obj: Any) -> ToolCall:
    """`{"name", "arguments"|"parameters"}`, or the OpenAI shape with the call under "function"."""
    if not isinstance(obj, Mapping):
        raise ParseError(f"not a call object: {str(obj)[:80]}")
    if isinstance(obj.get("function"), Mapping):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ParseError("a call object without a name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        # The OpenAI shape carries arguments as a JSON string.
        try:
            args = loads_json(args) if args.strip() else {}
        except ParseError as e:
            raise ParseError(f"{name}: arguments are {e}") from None
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ParseError(f"{name}: arguments must be an object, not {type(args).__name__}")
    _check_value(args)
    return ToolCall(name, dict(args))


def _check_value(value: Any) -> None:
    """Arguments that came as objects (not text): nesting bounded and numbers finite, checked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ParseError(f"arguments nested more than {_MAX_DEPTH} levels deep")
        if isinstance(item, float) and not math.isfinite(item):
            raise ParseError(f"{item!r} is not a finite number")
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


@dataclass(frozen=True)
class Text:
    """Answer text outside any tool-call block."""

    text: str


@dataclass(frozen=True)
class Calls:
    """One complete, parsed tool-call block."""

    calls: list[ToolCall]


@dataclass(frozen=True)
class Unparsed:
    """A block that did not parse: `text` is the raw output (markers included) to show as text."""

    text: str
    error: str


Event = Text | Calls | Unparsed


def _bare_start_ok(text: str) -> bool:
    """Whether stripped output so far could still be the start of a bare call list or JSON call."""
    head = "".join(text.lstrip()[:64].split())[:2]
    if not head:
        return True
    if head[0] not in "[{":
        return False
    if len(head) < 2:
        return True
    nxt = head[1]
    if head[0] == "{":
        return nxt in "\"'}"
    return nxt in "{]_" or nxt.isidentifier()


class _Brackets:
    """Finds where the first bracket of a growing text closes, strings respected, scanning each character once."""

    def __init__(self) -> None:
        self.pos = 0
        self.depth = 0
        self.quote = ""
        self.end = -1  # index just past the closing bracket, once seen

    def scan(self, text: str) -> int:
        i = self.pos
        while i < len(text) and self.end < 0:
            ch = text[i]
            if self.quote:
                if ch == "\\":
                    if i + 1 >= len(text):
                        break  # the escaped character has not arrived yet
                    i += 2
                    continue
                if ch == self.quote[0]:
                    if len(text) - i < len(self.quote) and self.quote.startswith(text[i:]):
                        break  # maybe the start of a closing triple quote
                    if text.startswith(self.quote, i):
                        i += len(self.quote)
                        self.quote = ""
                        continue
            elif ch in "'\"":
                if len(text) - i < 3 and text[i:] == ch * (len(text) - i):
                    break  # one quote or three: not known yet
                self.quote = ch * 3 if text.startswith(ch * 3, i) else ch
                i += len(self.quote)
                continue
            elif ch in "[{(":
                self.depth += 1
            elif ch in "]})":
                self.depth -= 1
                if self.depth <= 0:
                    self.end = i + 1
            i += 1
        self.pos = i
        return self.end


class ToolCallStream:
    """Splits streamed text into `Text`, `Calls` and `Unparsed` events.

    Text is released as soon as it cannot be the start of `<|tool_call_start|>`; a block is released only
    whole, once its end marker (or the end of output) arrives. With `bare=True`, an output that is nothing
    but a call list or JSON call, without markers, is parsed as calls too (held until it cannot be one)."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None, bare: bool = False) -> None:
        self.tools = tools
        self._buf = ""
        self._in_block = False
        self._scanned = 0  # how far the current block has been searched for markers
        self._bare = bare  # still deciding whether the whole output is a bare call list
        self._brackets = _Brackets()

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        if self._bare:
            if _bare_start_ok(self._buf) and self._bare_may_continue():
                return []
            self._bare = False
        return self._drain(final=False)

    def close(self) -> list[Event]:
        """At the end of output: a block left open still parses if its content is complete."""
        if self._bare:
            self._bare = False
            if self._buf.strip():
                try:
                    calls = parse_calls(self._buf, self.tools)
                except ParseError:
                    calls = []
                if calls:  # an empty list is just text
                    self._buf = ""
                    return [Calls(calls)]
        events = self._drain(final=True)
        if self._in_block:
            event = self._block(self._buf, closed=False)
            if not isinstance(event, Calls) or event.calls:
                events.append(event)
            self._buf, self._in_block = "", False
        elif self._buf:
            events.append(Text(self._buf))
            self._buf = ""
        return events

    def _bare_may_continue(self) -> bool:
        # Once the outer bracket closes, anything but whitespace after it means this is prose, not a call.
        text = self._buf.lstrip()
        end = self._brackets.scan(text)
        return end < 0 or not text[end:].strip()

    def _block(self, body: str, closed: bool) -> Event:
        raw = TOOL_CALL_START + body + (TOOL_CALL_END if closed else "")
        try:
            calls = parse_calls(body, self.tools)
        except ParseError as e:
            return Unparsed(raw, str(e))
        return Calls(calls)

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._in_block:
                start = max(0, self._scanned - len(TOOL_CALL_START) + 1)
                end_at = self._buf.find(TOOL_CALL_END, start)
                # A new start marker before any end marker means the model dropped the end marker.
                restart_at = self._buf.find(TOOL_CALL_START, start)
                cut = min((i for i in (end_at, restart_at) if i >= 0), default=-1)
                if cut < 0:
                    self._scanned = len(self._buf)
                    return events
                closed = cut == end_at
                event = self._block(self._buf[:cut], closed)
                if not isinstance(event, Calls) or event.calls:
                    events.append(event)
                self._buf = self._buf[cut + (len(TOOL_CALL_END) if closed else 0):]
                self._in_block, self._scanned = False, 0
                continue
            at = self._buf.find(TOOL_CALL_START)
            if at >= 0:
                if at:
                    events.append(Text(self._buf[:at]))
                self._buf = self._buf[at + len(TOOL_CALL_START):]
                self._in_block, self._scanned = True, 0
                continue
            keep = 0 if final else _marker_prefix_len(self._buf)
            if len(self._buf) > keep:
                events.append(Text(self._buf[:len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep:]
            return events


def _marker_prefix_len(text: str) -> int:
    """Length of the longest tail of `text` that begins the start marker."""
    for n in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class ParsedOutput:
    """A whole output: its text with the call blocks taken out, the calls, and the blocks that did not parse."""

    content: str
    calls: list[ToolCall]
    errors: list[Unparsed]


def parse_output(text: str, tools: Sequence[Mapping[str, Any]] | None = None, bare: bool = False) -> ParsedOutput:
    """Parse a finished output the way `ToolCallStream` does; blocks that fail stay in `content` as text."""
    stream = ToolCallStream(tools, bare=bare)
    return collect(stream.feed(text) + stream.close())


def collect(events: Iterable[Event]) -> ParsedOutput:
    """Merge a stream's events into one `ParsedOutput`."""
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[Unparsed] = []
    for event in events:
        if isinstance(event, Calls):
            calls += event.calls
        else:
            content.append(event.text)
            if isinstance(event, Unparsed):
                errors.append(event)
    return ParsedOutput("".join(content), calls, errors)
