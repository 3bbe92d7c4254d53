"""Tool calls in model output: LFM2's pythonic call lists and JSON calls, parsed whole or while streaming.

LFM2 writes `<|tool_call_start|>[get_weather(location="Paris"), f(x=1)]<|tool_call_end|>`; told to answer in
JSON it writes `[{"name": ..., "arguments": {...}}]` between the same markers. Both parse into `ToolCall`s.
The pythonic form is read with `ast` and only literals are accepted: nothing the model writes is evaluated.
"""

from __future__ import annotations

import ast
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

# Model output nests rarely more than a few levels; the cap keeps hostile output from exhausting the stack.
_MAX_DEPTH = 64
_NAMED_CONSTANTS = {"true": True, "false": False, "null": None, "none": None}


class ParseError(ValueError):
    """A tool-call block that is not a list of calls with literal keyword arguments."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_openai(self, id: str | None = None) -> dict[str, Any]:
        """The entry of an OpenAI `tool_calls` list (arguments as a JSON string, as that API sends them)."""
        return {
            "id": id or "call_" + secrets.token_hex(12),
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
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
    without it a positional argument is an error, because its name cannot be known."""
    text = _strip_fence(body)
    if not text:
        raise ParseError("empty tool-call block")
    if text.lstrip("[ \t\r\n").startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = None  # maybe Python-style dicts (single quotes, True): read below through ast
        if data is not None:
            return _calls_from_json(data)
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        try:
            tree = ast.parse(_escape_raw_newlines(text), mode="eval").body
        except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
            raise ParseError(f"not a call list: {e}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise ParseError(f"not a call list: {e}") from None
    order = _parameter_order(tools)
    items = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    if all(isinstance(i, ast.Dict) for i in items):
        return _calls_from_json([_value(i) for i in items] if isinstance(tree, (ast.List, ast.Tuple)) else _value(tree))
    return [_call_from_ast(item, order) for item in items]


def _escape_raw_newlines(text: str) -> str:
    """Models put real line breaks inside one-line string literals (file contents, code); escape them."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i:i + 2])
                i += 2
                continue
            if text.startswith(quote, i):
                out.append(quote)
                i += len(quote)
                quote = ""
                continue
            if ch == "\n" and len(quote) == 1:
                out.append("\\n")
                i += 1
                continue
            if ch == "\r" and len(quote) == 1:
                out.append("\\r")
                i += 1
                continue
        elif ch in "'\"":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            out.append(quote)
            i += len(quote)
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted_name(node.value) + "." + node.attr
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
        # `get-weather` parses as a subtraction; OpenAI function names may contain hyphens.
        return _dotted_name(node.left) + "-" + _dotted_name(node.right)
    raise ParseError(f"not a function name: {ast.unparse(node)}")


def _call_from_ast(node: ast.expr, order: dict[str, list[str]]) -> ToolCall:
    prefix = ""
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
        prefix += _dotted_name(node.left) + "-"
        node = node.right
    if not isinstance(node, ast.Call):
        raise ParseError(f"not a function call: {ast.unparse(node)[:80]}")
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
            raise ParseError(f"{name}(): **arguments are not literals")
        if kw.arg in arguments:
            raise ParseError(f"{name}(): argument {kw.arg!r} given twice")
        arguments[kw.arg] = _value(kw.value)
    return ToolCall(name, arguments)


def _value(node: ast.expr, depth: int = 0) -> Any:
    """A literal's value: what `ast.literal_eval` accepts, plus JSON's true/false/null; tuples become lists."""
    if depth > _MAX_DEPTH:
        raise ParseError("arguments nested too deeply")
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id.lower() in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id.lower()]
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
    raise ParseError(f"not a literal value: {ast.unparse(node)[:80]}")


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
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise ParseError(f"{name}: arguments are not JSON: {e}") from None
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ParseError(f"{name}: arguments must be an object, not {type(args).__name__}")
    return ToolCall(name, dict(args))


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
