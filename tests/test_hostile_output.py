"""Model output is untrusted input: what a model (or an `--endpoint` server) writes can be built to break the tool-call
parser, the reasoning split or the grammar, and one bad reply must cost one turn, never the session.

Each test builds the hostile output itself and runs the real code on it: the parser on text, a tiny model whose
sampler is replaced by a script of token ids (the model still runs every step), a sampler that only wants digits
under a grammar, `lfm2 chat` in this process, and `lfm2 chat --endpoint` in a subprocess against a small HTTP server
started here that streams the hostile replies."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lfm2cli.decoding.constraints import (
    MAX_EXP_DIGITS,
    MAX_FRAC_DIGITS,
    MAX_INT_DIGITS,
    Constraint,
    json_grammar,
    prepared_schema,
    read_schema,
    tool_call_grammar,
)
from lfm2cli.errors import UsageError
from lfm2cli.reply.thinking import Answer, Reasoning, ThinkingSplitter
from lfm2cli.reply.toolcalls import (
    MAX_BLOCK_CHARS,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ParseError,
    ToolCall,
    ToolCallStream,
    collect,
    parse_calls,
    parse_output,
)
from tests.helpers import functions_file, run_main, wait_measured

S, E = TOOL_CALL_START, TOOL_CALL_END
EOS = 7  # <|im_end|> in the test tokenizer
ARGS = ["--device", "cpu", "--dtype", "float32"]
D7 = "http://json-schema.org/draft-07/schema#"


def block(body: str) -> str:
    return S + body + E


def dotted(parts: int, sep: str = ".") -> str:
    return sep.join(["a"] * parts)


def with_headroom(fn: Callable[[], Any], frames: int = 250) -> Any:
    """Run `fn` with only `frames` stack frames left before the recursion limit, as deep inside a chat turn: a parser
    whose stack use grows with its input fails here."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + frames)
    try:
        return fn()
    finally:
        sys.setrecursionlimit(saved)


# ---------------------------------------------------------------- bounded parsing

HOSTILE_BLOCKS = {
    "dotted name, 1000 parts": f"[{dotted(1000)}(x=1)]",
    "dotted name, 2000 parts": f"[{dotted(2000)}(x=1)]",
    "dotted name, 2999 parts": f"[{dotted(2999)}(x=1)]",
    "dotted name, 100000 parts": f"[{dotted(100_000)}(x=1)]",
    "dotted name without brackets": f"{dotted(2500)}(x=1)",
    "hyphenated name, 1500 parts": f"[{dotted(1500, '-')}(x=1)]",
    "name made of subscripts": "[f" + "[0]" * 3000 + "(x=1)]",
    "calls of calls": "[f" + "()" * 3000 + "]",
    "minus signs": "[f(x=" + "-" * 5000 + "1)]",
    "a long sum": "[f(x=a" + "+a" * 3000 + ")]",
    "a sum nested 70 levels": "[f(x=" + "(a+" * 70 + "a" + ")" * 70 + ")]",
    "lists 150 deep": "[f(x=" + "[" * 150 + "]" * 150 + ")]",
    "lists 100000 deep": "[f(x=" + "[" * 100_000 + "]" * 100_000 + ")]",
    "dicts 90 deep": "[f(x=" + "{'a': " * 90 + "1" + "}" * 90 + ")]",
    "json arguments 900 deep": '[{"name": "f", "arguments": {"x": ' + "[" * 900 + "]" * 900 + "}}]",
    "json arguments 100000 deep": '[{"name": "f", "arguments": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}]",
    "openai shape, arguments 900 deep": json.dumps([{"function": {"name": "f", "arguments": json.dumps(
        {"x": [[[]]]}).replace("[[[]]]", "[" * 900 + "]" * 900)}}]),
    "a block over the size limit": "[f(x='" + "y" * (MAX_BLOCK_CHARS + 10) + "')]",
}


@pytest.mark.parametrize("body", HOSTILE_BLOCKS.values(), ids=HOSTILE_BLOCKS.keys())
def test_hostile_blocks_are_parse_errors_at_any_stack_depth(body: str) -> None:
    with pytest.raises(ParseError) as e:
        with_headroom(lambda: parse_calls(body))
    message = str(e.value)
    assert len(message) < 300 and "\n" not in message
    # streamed, the block is shown as the text it was, with the reason, and nothing is called
    stream = ToolCallStream([])
    events = with_headroom(lambda: stream.feed(block(body)) + stream.close())
    parsed = collect(events)
    assert parsed.calls == [] and len(parsed.errors) == 1 and parsed.content == block(body)


def test_deep_arguments_read_back_from_history_or_a_client_are_refused() -> None:
    deep = {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    with pytest.raises(ParseError, match="nested more than"):
        with_headroom(lambda: ToolCall.from_openai(deep))
    nested: Any = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(ParseError, match="nested more than"):
        ToolCall.from_openai({"name": "f", "arguments": {"x": nested}})


# ---------------------------------------------------------------- numbers

HUGE = "6504" + "1" * 300 + "e091266047529"
NOT_FINITE = {
    "many digits and a huge exponent": f"[calc(x={HUGE})]",
    "1e999": "[calc(x=1e999)]",
    "-1e999": "[calc(x=-1e999)]",
    "in a list": "[calc(xs=[1, 2, 1e999])]",
    "json 1e999": '[{"name": "calc", "arguments": {"x": 1e999}}]',
    "json -1e400 nested": '[{"name": "calc", "arguments": {"x": {"y": [-1e400]}}}]',
    "json Infinity": '[{"name": "calc", "arguments": {"x": Infinity}}]',
    "json NaN": '[{"name": "calc", "arguments": {"x": NaN}}]',
    "openai shape": json.dumps([{"function": {"name": "calc", "arguments": '{"x": 1e999}'}}]),
}


@pytest.mark.parametrize("body", NOT_FINITE.values(), ids=NOT_FINITE.keys())
def test_numbers_that_are_not_finite_never_become_calls(body: str) -> None:
    parsed = parse_output(block(body), [])
    assert parsed.calls == [] and len(parsed.errors) == 1
    assert "finite" in parsed.errors[0].error or "not a literal" in parsed.errors[0].error
    assert parsed.content == block(body)  # kept as the text it was


def test_calls_with_non_finite_numbers_have_no_json_or_pythonic_form() -> None:
    for value in (math.inf, -math.inf, math.nan):
        call = ToolCall("calc", {"x": [1, {"y": value}]})
        with pytest.raises(ValueError):
            call.to_openai()  # never {"x": Infinity}
        with pytest.raises(ValueError):
            call.to_pythonic()  # never calc(x=inf), which does not parse back
    with pytest.raises(ParseError, match="finite"):
        ToolCall.from_openai({"name": "calc", "arguments": '{"x": -1e999}'})
    big = parse_calls("[calc(x=1.7976931348623157e308, n=123456789012345678901234567890)]")[0]
    assert json.loads(big.to_openai()["function"]["arguments"]) == big.arguments
    assert parse_calls(f"[{big.to_pythonic()}]") == [big]


# ---------------------------------------------------------------- what Python reads differently from the model

def test_invalid_escapes_parse_as_meant_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (SyntaxWarning, DeprecationWarning) would fail the parse
        calls = parse_calls(r'[search(query="\d+\s*\w", path="C:\Users\new")]')
        json_calls = parse_calls(r"[{'name': 'search', 'arguments': {'query': '\d'}}]")
    assert calls == [ToolCall("search", {"query": "\\d+\\s*\\w", "path": "C:\\Users\new"})]
    assert json_calls == [ToolCall("search", {"query": "\\d"})]


@pytest.mark.parametrize("body, calls", [
    ("[set_date(month=07, day=05, year=2024)]", [("set_date", {"month": 7, "day": 5, "year": 2024})]),
    ("[f(a=-007, b=00, c=0, d=0.5, e=07.5, f=0x1F, g=1e07)]",
     [("f", {"a": -7, "b": 0, "c": 0, "d": 0.5, "e": 7.5, "f": 31, "g": 1e7})]),
    ('[f(code="007", n=007)]', [("f", {"code": "007", "n": 7})]),  # zeros inside strings are the model's text
    ("[f(cmd='printf a\x00b\nc')]", [("f", {"cmd": "printf a\x00b\nc"})]),
    ('[f(doc="""line\x00one\nline two""")]', [("f", {"doc": "line\x00one\nline two"})]),
    ("[search(query='M.md', from=1, import=True, lambda=None)]",
     [("search", {"query": "M.md", "from": 1, "import": True, "lambda": None})]),
    ("[search(from = 1, q='from=2', _lfm2_kw_from=3)]", [("search", {"from": 1, "q": "from=2", "_lfm2_kw_from": 3})]),
    ("[copy(from='a', to='b'), move(from=07)]", [("copy", {"from": "a", "to": "b"}), ("move", {"from": 7})]),
])
def test_what_peers_recover_we_recover(body: str, calls: list) -> None:
    parsed = parse_calls(body)
    assert [(c.name, c.arguments) for c in parsed] == calls
    for call in parsed:  # and what we write, we read back
        assert parse_calls(f"[{call.to_pythonic()}]") == [call]


@pytest.mark.parametrize("body", ["[f(x=1\x00)]", "[f(x=1 if True else 2)]", "[f(x=(y:=1))]", "[f(a=1, a=2)]",
                                  "[f(from=1, **{'from': 2})]", "[f(x=1)] == [g()]"])
def test_repairs_never_make_a_call_of_what_is_not_one(body: str) -> None:
    with pytest.raises(ParseError):
        parse_calls(body)


# ---------------------------------------------------------------- the reasoning split

def split(chunks: list[str], **kw: Any) -> tuple[str, str]:
    splitter = ThinkingSplitter(**kw)
    pieces = [p for c in chunks for p in splitter.feed(c)] + splitter.close()
    assert all(isinstance(p, (Reasoning, Answer)) for p in pieces)
    return splitter.reasoning_text, splitter.answer_text


def every_split(text: str) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("text", ["<think>Let me see.</think>\n\nHi.", "\n<think>\n<think>Let me see.</think>Hi.",
                                  "<think> <think>\n<think>Let me see.\n</think>Hi."])
def test_a_repeated_think_in_an_opened_block_is_not_reasoning(text: str) -> None:
    for chunks in every_split(text):
        assert split(chunks, opened=True) == ("Let me see.", "Hi.")


def test_a_think_inside_the_reasoning_stays() -> None:
    assert split(["I type <think> here.</think>Ok"], opened=True) == ("I type <think> here.", "Ok")


def test_a_call_begun_inside_an_unclosed_block_is_the_answer() -> None:
    text = f"<think>\nI will look it up. {S}[get_weather(city=\"Paris\")]{E}"
    for opened in (False, True):
        for chunks in every_split(text):
            reasoning, answer = split(chunks, opened=opened, call_start=S)
            assert (reasoning, answer) == ("I will look it up.", f'{S}[get_weather(city="Paris")]{E}')
            assert parse_output(answer).calls == [ToolCall("get_weather", {"city": "Paris"})]
    # without tools there is no call to find: the block stays reasoning
    assert split([text], opened=True)[1] == ""


# ---------------------------------------------------------------- scripted and biased samplers

class Script:
    """Stands in for the sampler: each reply takes the next script (text or ids, then EOS)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, ckpt: Path, *replies: str) -> None:
        from lfm2cli.text.tokenizer import load_tokenizer

        tok = load_tokenizer(ckpt)
        self.replies = [tok.encode(r, add_special_tokens=False) for r in replies]
        monkeypatch.setattr("lfm2cli.runs.local.Sampler", self._sampler)

    def _sampler(self, params: Any, prompt_len: int | None = None) -> Callable[[Any, Any], int]:
        ids = iter(self.replies.pop(0) if self.replies else [])
        return lambda logits, seen: next(ids, EOS)


def digit_lover(monkeypatch: pytest.MonkeyPatch, ckpt: Path) -> None:
    """A sampler that writes digits whenever it may (the longest run of them a token has), else the likeliest
    token: unbounded, it writes one number until max_tokens."""
    import torch

    from lfm2cli.text.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    # the longest run of digits, and a leading zero last (JSON allows no digit after it)
    digits = torch.tensor([len(t) - len(t.lstrip("0123456789")) - 0.5 * t.startswith("0") for t in texts],
                          dtype=torch.float32)

    def sampler(params: Any, prompt_len: int | None = None) -> Callable[[Any, Any], int]:
        def sample(logits: Any, seen: Any) -> int:
            allowed = torch.isfinite(logits[: len(digits)])
            wanted = torch.where(allowed & (digits > 0), digits, torch.tensor(-1.0))
            if wanted.max() > 0:
                return int(wanted.argmax())
            return int(logits.argmax())
        return sample

    monkeypatch.setattr("lfm2cli.runs.local.Sampler", sampler)


def constrained_run(lm: Any, grammar: Any, tools: Any = None, max_tokens: int = 200, prompt: str = "Compute.") -> Any:
    from lfm2cli.decoding.sampling import SamplingParams
    from lfm2cli.runs.local import TextRun
    from lfm2cli.runs.prompt import one_shot_prompt

    ids = one_shot_prompt(lm, prompt, tools=tools).ids
    run = TextRun(lm, ids, SamplingParams(temperature=0), max_tokens, grammar=grammar, tools=tools)
    run.run()
    return run


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def assert_bounded(value: Any, text: str) -> None:
    numbers = [value] if isinstance(value, (int, float)) else [v for v in value.values()]
    assert all(math.isfinite(v) for v in numbers)
    for literal in NUMBER.findall(text):
        whole, _, rest = literal.lstrip("-").partition(".")
        whole, _, exp = whole.lower().partition("e") if "." not in literal else (whole, "", "")
        frac, _, exp2 = rest.lower().partition("e")
        assert len(whole) <= MAX_INT_DIGITS and len(frac) <= MAX_FRAC_DIGITS
        assert len((exp or exp2).lstrip("+-")) <= MAX_EXP_DIGITS


@pytest.mark.slow
def test_numbers_under_a_grammar_end_and_stay_finite(lm: Any, chat_ckpt: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    digit_lover(monkeypatch, chat_ckpt)
    for schema in ({"type": "number"}, {"type": "integer"},
                   {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False}):
        run = constrained_run(lm, json_grammar(schema))
        assert not run.incomplete and run.stats.finish_reason == "stop", run.text[:200]
        value = json.loads(run.text)
        assert_bounded(value, run.text)
        assert len(run.tokens) < 100  # it ended on its own, long before max_tokens
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {
        "x": {"type": "number"}, "n": {"type": "integer"}}, "required": ["x", "n"]}}}]
    run = constrained_run(lm, tool_call_grammar(tools, parallel=False), tools=tools)
    assert run.stats.finish_reason == "tool_calls" and len(run.tool_calls) == 1, run.raw[:300]
    call = run.tool_calls[0]
    assert_bounded(call.arguments, run.raw)
    assert json.loads(call.to_openai()["function"]["arguments"]) == call.arguments


@pytest.mark.slow
def test_a_forced_call_begun_inside_the_reasoning_is_the_call(opening_ckpt: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt opened <think>; the model writes <think> again, reasons, and starts the call without closing the
    block. The grammar takes the marker as its own first token and the call comes out whole."""
    from lfm2cli.decoding.sampling import SamplingParams
    from lfm2cli.loading.loader import load
    from lfm2cli.runs.local import TextRun
    from lfm2cli.runs.prompt import one_shot_prompt

    lm = load(opening_ckpt, device="cpu", dtype="float32")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    Script(monkeypatch, opening_ckpt, f'<think>\nI will look it up.{S}[get_weather(city="Paris")]{E}')
    rendered = one_shot_prompt(lm, "Weather in Paris?", tools=tools)
    run = TextRun(lm, rendered.ids, SamplingParams(temperature=0), 100, think=True, opened=True,
                  tools=tools, grammar=tool_call_grammar(tools))
    run.run()
    assert run.reasoning == "I will look it up."
    assert run.tool_calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert run.stats.finish_reason == "tool_calls" and not run.incomplete


# ---------------------------------------------------------------- schemas refused up front, or read as meant

LOOPS = {
    "the root": {"$ref": "#"},
    "two steps": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "a required property": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "an optional property": {"type": "object", "properties": {"a": {"$ref": "#/definitions/x"}},
                             "definitions": {"x": {"$ref": "#/definitions/x"}}},
    "a non-empty array": {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    "every branch": {"anyOf": [{"$ref": "#"}, {"allOf": [{"$ref": "#"}, {"type": "string"}]}]},
}


@pytest.mark.parametrize("schema", LOOPS.values(), ids=LOOPS.keys())
def test_schemas_no_finite_value_satisfies_are_refused(schema: dict, chat_ckpt: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run_main(["generate", str(chat_ckpt), *ARGS, "-p", "Hi", "--schema", json.dumps(schema)],
                              monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: --schema: no finite JSON value satisfies the schema")


def test_a_tool_parameter_that_cannot_end_is_refused(chat_ckpt: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}]))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run_main(["generate", str(chat_ckpt), *ARGS, "-p", "Hi", "--tools", str(tools),
                               "--tool-choice", "required"], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "f(a=...): no finite JSON value satisfies" in err


def test_recursive_schemas_that_can_end_are_kept() -> None:
    tree = {"type": "object", "properties": {"name": {"type": "string"}, "children": {
        "type": "array", "items": {"$ref": "#"}}}, "required": ["name", "children"]}
    json_grammar(tree)
    json_grammar({"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                  "required": ["next"]})
    tool_call_grammar([{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#"}}}}, "required": ["a"]}}])


def accepts(tokenizer: Any, grammar: Any, text: str) -> bool:
    """Whether the real Constraint lets `text` through, token by token (and then ends it)."""
    c = Constraint(tokenizer, grammar, tokenizer.vocab_size, [EOS])
    for t in tokenizer.encode(text, add_special_tokens=False):
        if not bool(c.allowed()[t]):
            return False
        c.accept(t)
    return c.done


def test_counts_written_as_floats_and_draft_7_refs(chat_ckpt: Path) -> None:
    from lfm2cli.text.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_ckpt)
    counted = json_grammar({"type": "array", "items": {"type": "string", "maxLength": 3.0}, "maxItems": 2.0,
                            "minItems": 1.0})
    assert accepts(tok, counted, '["abc", "de"]')
    assert not accepts(tok, counted, '["abc", "de", "f"]') and not accepts(tok, counted, '["abcd"]')
    with pytest.raises(UsageError, match="maxItems"):
        json_grammar({"type": "array", "maxItems": 2.5})  # not an integer, however written: llguidance says so
    # draft 7 ignores the siblings of $ref; 2020-12 applies them
    schema = {"definitions": {"s": {"type": "string"}}, "type": "object",
              "properties": {"x": {"$ref": "#/definitions/s", "maxLength": 1}}, "required": ["x"]}
    assert accepts(tok, json_grammar({"$schema": D7, **schema}), '{"x": "abc"}')
    assert not accepts(tok, json_grammar(schema), '{"x": "abc"}')
    assert prepared_schema({"$schema": D7, **schema}, "s")["properties"]["x"] == {"$ref": "#/definitions/s"}
    # draft 7's array items and additionalItems, as llguidance already reads them
    tuple_schema = json_grammar({"$schema": D7, "type": "array", "items": [{"type": "string"}],
                                 "additionalItems": False})
    assert accepts(tok, tuple_schema, '["a"]') and not accepts(tok, tuple_schema, '["a", "b"]')
    with pytest.raises(UsageError, match="draft 3"):
        json_grammar({"$schema": "http://json-schema.org/draft-03/schema#", "type": "object"})


def test_schemas_nested_past_the_limit_are_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"items": ' * 100_000 + "{}" + "}" * 100_000)
    for value in (str(deep), '{"items": ' * 5000 + "{}" + "}" * 5000):
        with pytest.raises(UsageError, match="nests more than"):
            with_headroom(lambda v=value: read_schema(v))
    nested: dict = {}
    for _ in range(3000):
        nested = {"items": nested}
    with pytest.raises(UsageError, match="nests more than"):
        with_headroom(lambda: json_grammar(nested))


# ---------------------------------------------------------------- lfm2 chat, local model

FUNCTIONS = '''\
import json
from pathlib import Path

TRACE = Path({trace!r})


def get_weather(city: str) -> str:
    """The weather in a city."""
    TRACE.write_text(json.dumps({{"city": city}}))
    return "18 degrees"
'''


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    return functions_file(tmp_path, FUNCTIONS)


def chat(args: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    """`lfm2 chat` through the real entry point in this process, messages piped on stdin."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    return run_main(["chat", *args], monkeypatch, capsys)


def stored_messages() -> list:
    from lfm2cli.store.conversations import HistoryStore

    with HistoryStore() as store:
        convs = store.list()
        assert len(convs) == 1
        return store.get(convs[0].id).messages


@pytest.mark.slow
def test_chat_survives_a_call_with_a_name_nested_past_the_limit(chat_ckpt: Path, home: Path, tools_file: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    # 90 parts are past the parser's limit as surely as 2999 (the endpoint test below) and cost the tiny model
    # 180 tokens instead of 6000
    hostile = block(f"[{dotted(90)}(city=\"Paris\")]")
    Script(monkeypatch, chat_ckpt, hostile, "Fine, thanks.")
    code, out, err = chat([str(chat_ckpt), *ARGS, "-n", "400", "--functions", str(tools_file), "--yes-tools"],
                          "Weather?\nHow are you?\n", monkeypatch, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "did not parse" in line]
    assert len(notes) == 1 and "nested more than" in notes[0]
    assert "Fine, thanks." in out and not (tools_file.parent / "trace.json").exists()
    messages = stored_messages()
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].content == hostile and messages[3].content == "Fine, thanks."


@pytest.mark.slow
def test_an_unexpected_error_ends_the_turn_not_the_chat(chat_ckpt: Path, home: Path, tools_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """A failure nobody foresaw (here the parser raising as it once did on deep names) costs one message."""
    def broken(*args: Any, **kw: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("lfm2cli.reply.toolcalls.parse_calls", broken)
    Script(monkeypatch, chat_ckpt, block('[get_weather(city="Paris")]'), "Fine, thanks.")
    code, out, err = chat([str(chat_ckpt), *ARGS, "-n", "60", "--functions", str(tools_file), "--yes-tools"],
                          "Weather?\nHow are you?\n", monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    failed = [line for line in err.splitlines() if "this message failed" in line]
    assert failed == ["error: this message failed (RecursionError: maximum recursion depth exceeded); the "
                      "conversation is kept and the chat goes on (LFM2_DEBUG=1 shows the traceback)"]
    assert err.strip().endswith("error: 1 of 2 messages failed; see the errors above")
    assert "Fine, thanks." in out
    messages = stored_messages()
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].finish_reason == "error" and messages[3].content == "Fine, thanks."


@pytest.mark.slow
def test_chat_runs_a_call_begun_inside_the_reasoning(opening_ckpt: Path, home: Path, tools_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    Script(monkeypatch, opening_ckpt, f'<think>\nI should look it up.{S}[get_weather(city="Paris")]{E}',
           "The tool says 18.</think>\n\nIt is 18 degrees in Paris.")
    code, out, err = chat([str(opening_ckpt), *ARGS, "-n", "100", "--functions", str(tools_file), "--yes-tools"],
                          "Weather in Paris?\n", monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tools_file.parent / "trace.json").read_text()) == {"city": "Paris"}
    assert "It is 18 degrees in Paris." in out
    messages = stored_messages()
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1].reasoning == "I should look it up." and messages[1].tool_calls
    assert messages[3].reasoning == "The tool says 18."


# ---------------------------------------------------------------- lfm2 chat --endpoint, a hostile server

class HostileServer:
    """An OpenAI-compatible server that streams scripted replies, one per chat request, and records the requests."""

    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(json.dumps({"object": "list", "data": [
                    {"id": "hostile", "object": "model", "created": 0, "owned_by": "test"}]}).encode(),
                    "application/json")

            def do_POST(self) -> None:
                owner.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                reply = owner.replies.pop(0) if owner.replies else {"content": "(no more replies)"}
                self._send(b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in owner.chunks(reply))
                           + b"data: [DONE]\n\n", "text/event-stream")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def chunks(reply: dict[str, Any]) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "hostile",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        text = reply.get("content", "")
        for i in range(0, len(text), 997):
            yield chunk({"content": text[i:i + 997]})
        for n, call in enumerate(reply.get("tool_calls", ())):
            yield chunk({"tool_calls": [{"index": n, "id": f"call_{n}", "type": "function", "function": call}]})
        yield chunk({}, "tool_calls" if reply.get("tool_calls") else "stop")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_chat_with_a_hostile_endpoint_loses_one_turn_at_most(tmp_path: Path, tools_file: Path) -> None:
    server = HostileServer([
        {"content": block(f"[{dotted(2999)}(city=\"Paris\")]")},  # the name that used to end the session
        {"tool_calls": [{"name": "get_weather", "arguments": '{"city": 1e999}'}]},  # a number JSON cannot hold
        {"content": f"<think>\n<think>Call it.{S}[get_weather(city=\"Oslo\")]{E}"},  # a call inside the reasoning
        {"content": "It is 18 degrees."},
    ])
    try:
        env = {**os.environ, "LFM2_HOME": str(tmp_path / "home"), "LFM2_DEBUG": ""}
        (tmp_path / "stdin").write_text("Weather?\nAnd now?\nOslo?\n")
        with open(tmp_path / "stdin") as stdin, tempfile.TemporaryFile("w+") as out, \
                tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", "chat", "--endpoint", server.url, "-n",
                                     "20000", "--functions", str(tools_file), "--yes-tools"],
                                    stdin=stdin, stdout=out, stderr=err, text=True, env=env)
            code, peak_mb = wait_measured(proc.pid, time.monotonic() + 180)
            out.seek(0)
            err.seek(0)
            run = subprocess.CompletedProcess(proc.args, code, out.read(), err.read())
    finally:
        server.close()
    assert run.returncode == 1, run.stderr  # one message failed: the script learns it from the exit status
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len([line for line in lines if "did not parse" in line and "nested" in line]) == 1
    refused = [line for line in lines if line.startswith("error: ") and "1e999" in line]
    assert len(refused) == 1 and "not a finite number" in refused[0]
    assert json.loads((tools_file.parent / "trace.json").read_text()) == {"city": "Oslo"}
    assert "It is 18 degrees." in run.stdout
    assert lines[-1] == "error: 1 of 3 messages failed; see the errors above"
    # the last request carried the whole conversation, the failed turn's reply included
    assert len(server.requests) == 4
    roles = [m["role"] for m in server.requests[3]["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant", "tool"]
    assert peak_mb < 1024  # the child stayed small (it loads no model)
