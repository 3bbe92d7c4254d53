"""Tool-call parsing: LFM2's pythonic call lists and JSON calls, whole and streamed in any chunking."""

from __future__ import annotations

import json
import random

import pytest

from lfm2cli.reply.toolcalls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    Calls,
    ParseError,
    Text,
    ToolCall,
    ToolCallStream,
    Unparsed,
    collect,
    format_calls,
    parse_calls,
    parse_output,
)

S, E = TOOL_CALL_START, TOOL_CALL_END


def block(body: str) -> str:
    return S + body + E


# (id, model output, expected content, expected calls as (name, arguments)).
CASES: list[tuple[str, str, str, list[tuple[str, dict]]]] = [
    ("basic", block('[get_weather(location="Paris")]'), "", [("get_weather", {"location": "Paris"})]),
    ("two calls", block('[get_weather(location="Paris"), f(x=1)]'), "",
     [("get_weather", {"location": "Paris"}), ("f", {"x": 1})]),
    ("python constants", block("[set_alarm(enabled=True, repeat=False, label=None)]"), "",
     [("set_alarm", {"enabled": True, "repeat": False, "label": None})]),
    ("json constants in pythonic", block("[set_alarm(enabled=true, repeat=false, label=null)]"), "",
     [("set_alarm", {"enabled": True, "repeat": False, "label": None})]),
    ("single quotes", block("[search(query='latest news', lang='en')]"), "",
     [("search", {"query": "latest news", "lang": "en"})]),
    ("escaped single quote", block(r"[send(text='it\'s done')]"), "", [("send", {"text": "it's done"})]),
    ("escaped double quote", block(r'[send(text="say \"hi\" now")]'), "", [("send", {"text": 'say "hi" now'})]),
    ("backslashes", block(r'[open_file(path="C:\\Users\\me\\a.txt")]'), "",
     [("open_file", {"path": "C:\\Users\\me\\a.txt"})]),
    ("dotted name", block('[Calendar.create_event(title="Standup", start="2025-01-06T09:00")]'), "",
     [("Calendar.create_event", {"title": "Standup", "start": "2025-01-06T09:00"})]),
    ("deep dotted name", block("[api.v2.users.get(id=7)]"), "", [("api.v2.users.get", {"id": 7})]),
    ("hyphenated name", block('[get-current-weather(city="Oslo")]'), "",
     [("get-current-weather", {"city": "Oslo"})]),
    ("nested dict", block('[create_user(profile={"name": "Ada", "address": {"city": "London", "zip": "N1"}})]'), "",
     [("create_user", {"profile": {"name": "Ada", "address": {"city": "London", "zip": "N1"}}})]),
    ("list argument", block('[add_tags(ids=[1, 2, 3], tags=["a", "b"])]'), "",
     [("add_tags", {"ids": [1, 2, 3], "tags": ["a", "b"]})]),
    ("list of dicts", block('[order(items=[{"sku": "A1", "qty": 2}, {"sku": "B7", "qty": 1}])]'), "",
     [("order", {"items": [{"sku": "A1", "qty": 2}, {"sku": "B7", "qty": 1}]})]),
    ("tuple becomes list", block("[move(to=(3, 4), path=((0, 0), (1, 1)))]"), "",
     [("move", {"to": [3, 4], "path": [[0, 0], [1, 1]]})]),
    ("numbers", block("[adjust(delta=-5, scale=0.25, big=12345678901234567890, exp=1e-3, plus=+2, neg=-0.5)]"), "",
     [("adjust", {"delta": -5, "scale": 0.25, "big": 12345678901234567890, "exp": 0.001, "plus": 2, "neg": -0.5})]),
    ("unicode", block('[translate(text="東京は日本の首都です 🗼", target="français")]'), "",
     [("translate", {"text": "東京は日本の首都です 🗼", "target": "français"})]),
    ("unicode escapes", block(r'[greet(name="caf\u00e9 \U0001F600")]'), "", [("greet", {"name": "café 😀"})]),
    ("escaped newline", block(r'[write_file(path="a.py", content="import os\nprint(1)\n")]'), "",
     [("write_file", {"path": "a.py", "content": "import os\nprint(1)\n"})]),
    ("raw newline in string", block('[write_file(path="a.py", content="def f():\n    return 1\n")]'), "",
     [("write_file", {"path": "a.py", "content": "def f():\n    return 1\n"})]),
    ("triple quotes", block('[run_python(code="""x = 1\nprint(\'a"b\')""")]'), "",
     [("run_python", {"code": "x = 1\nprint('a\"b')"})]),
    ("brackets inside strings", block('[note(text="a ] ) } [ ( {", sep="<|tool")]'), "",
     [("note", {"text": "a ] ) } [ ( {", "sep": "<|tool"})]),
    ("trailing commas", block('[f(x=1,), g(y=[1, 2,], z={"k": 1,},),]'), "",
     [("f", {"x": 1}), ("g", {"y": [1, 2], "z": {"k": 1}})]),
    ("no arguments", block("[get_time()]"), "", [("get_time", {})]),
    ("empty values", block('[f(s="", l=[], d={}, z=0)]'), "", [("f", {"s": "", "l": [], "d": {}, "z": 0})]),
    ("string concatenation", block('[f(s="ab" "cd")]'), "", [("f", {"s": "abcd"})]),
    ("spread over lines", block('[\n  search(\n    query="x",\n    limit=3\n  )\n]'), "",
     [("search", {"query": "x", "limit": 3})]),
    ("no list brackets", block('get_weather(location="Paris")'), "", [("get_weather", {"location": "Paris"})]),
    ("code fence in block", block('```python\n[f(x=1)]\n```'), "", [("f", {"x": 1})]),
    ("text before", "Let me check the weather for you. " + block('[get_weather(location="Paris")]'),
     "Let me check the weather for you. ", [("get_weather", {"location": "Paris"})]),
    ("text after", block("[f(x=1)]") + "\nI called f.", "\nI called f.", [("f", {"x": 1})]),
    ("text around", "Sure!\n" + block('[lookup(q="a")]') + " Then I will summarise.",
     "Sure!\n Then I will summarise.", [("lookup", {"q": "a"})]),
    ("two blocks", block("[a(x=1)]") + " and " + block("[b(y=2)]") + ".", " and .", [("a", {"x": 1}), ("b", {"y": 2})]),
    ("missing end marker at the end", "Checking. " + S + '[get_weather(location="Rome")]', "Checking. ",
     [("get_weather", {"location": "Rome"})]),
    ("missing end marker before next block", S + "[a(x=1)]" + block("[b(y=2)]"), "",
     [("a", {"x": 1}), ("b", {"y": 2})]),
    ("empty block", "x" + block("[]") + "y", "xy", []),
    ("json list", block('[{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}]'), "",
     [("get_weather", {"location": "Paris", "unit": "celsius"})]),
    ("json two calls", block('[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'), "",
     [("a", {"x": 1}), ("b", {})]),
    ("json single object", block('{"name": "get_time", "arguments": {"tz": "UTC"}}'), "",
     [("get_time", {"tz": "UTC"})]),
    ("json parameters key", block('{"name": "search", "parameters": {"query": "lfm2", "n": 5}}'), "",
     [("search", {"query": "lfm2", "n": 5})]),
    ("json openai shape",
     block('[{"type": "function", "function": {"name": "f", "arguments": "{\\"x\\": [1, true]}"}}]'), "",
     [("f", {"x": [1, True]})]),
    ("json null arguments", block('{"name": "ping", "arguments": null}'), "", [("ping", {})]),
    ("json surrogate pair", block(r'[{"name": "say", "arguments": {"text": "\ud83d\ude00 \u00e9"}}]'), "",
     [("say", {"text": "😀 é"})]),
    ("python-style dicts", block("[{'name': 'f', 'arguments': {'ok': True, 'v': None}}]"), "",
     [("f", {"ok": True, "v": None})]),
    ("json with text around", "Calling: " + block('{"name": "f", "arguments": {"a": "b"}}') + " ok", "Calling:  ok",
     [("f", {"a": "b"})]),
    ("marker prefix in plain text", "the token <|tool_ starts a call", "the token <|tool_ starts a call", []),
    ("marker prefix at the end", "ends with <|tool_call", "ends with <|tool_call", []),
    ("no calls", "Just an answer, with [brackets] and f(x=1).", "Just an answer, with [brackets] and f(x=1).", []),
]

# Blocks that do not parse: they stay in the content as raw text and are reported as errors.
BAD: list[tuple[str, str]] = [
    ("positional argument", block("[get_weather('Paris')]")),
    ("call as a value", block('[f(x=os.system("echo hi"))]')),
    ("name as a value", block("[f(x=some_variable)]")),
    ("keyword unpacking", block("[f(**opts)]")),
    ("argument given twice", block("[f(x=1, x=2)]")),
    ("prose in the block", block("I will now call the weather tool")),
    ("incomplete at the end", S + '[get_weather(location="Par'),
    ("json without a name", block('{"arguments": {"x": 1}}')),
    ("json arguments not an object", block('{"name": "f", "arguments": [1, 2]}')),
    ("arithmetic", block("[f(x=1+2)]")),
]


def expected_calls(calls: list[tuple[str, dict]]) -> list[ToolCall]:
    return [ToolCall(name, args) for name, args in calls]


def run_stream(chunks: list[str], **kw) -> tuple[list, list]:
    stream = ToolCallStream(**kw)
    during = [e for c in chunks for e in stream.feed(c)]
    return during, stream.close()


def test_the_table_is_big_enough() -> None:
    assert len(CASES) + len(BAD) >= 30
    assert len({c[0] for c in CASES} | {b[0] for b in BAD}) == len(CASES) + len(BAD)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parse_output(case) -> None:
    _, output, content, calls = case
    parsed = parse_output(output)
    assert parsed.calls == expected_calls(calls)
    assert parsed.content == content
    assert parsed.errors == []


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stream_every_split_and_random_chunks(case) -> None:
    _, output, content, calls = case
    want = expected_calls(calls)
    rng = random.Random(output)
    chunkings = [[output[:i], output[i:]] for i in range(len(output) + 1)]
    chunkings.append(list(output))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(output)), k=min(len(output) - 1, rng.randint(1, 8))))
        chunkings.append([output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)])
    for chunks in chunkings:
        during, final = run_stream(chunks)
        got = collect(during + final)
        assert (got.calls, got.content, got.errors) == (want, content, []), chunks
        shown = "".join(e.text for e in during if isinstance(e, Text))
        assert content.startswith(shown)


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_blocks_stay_text_in_any_chunking(case) -> None:
    _, output = case
    after = " after" if output.endswith(E) else ""  # an open block runs to the end of the output
    parsed = parse_output("before " + output + after)
    assert parsed.calls == []
    assert parsed.content == "before " + output + after
    assert [e.text for e in parsed.errors] == [output]
    assert parsed.errors[0].error
    for i in range(len(output) + 1):
        during, final = run_stream([output[:i], output[i:]])
        events = during + final
        assert [type(e) for e in events] == [Unparsed] and events[0].text == output


def test_text_is_released_at_once_and_only_a_marker_prefix_is_held() -> None:
    stream = ToolCallStream()
    assert stream.feed("Hello wor") == [Text("Hello wor")]
    assert stream.feed("ld <|tool") == [Text("ld ")]
    assert stream.feed("box|> x") == [Text("<|toolbox|> x")]
    assert stream.feed("<") == []
    assert stream.feed("|tool_call_start|>[f(x=1)") == []  # inside a block: nothing until it is whole
    assert stream.feed("]") == []
    assert stream.feed("<|tool_call_end|>ok") == [Calls([ToolCall("f", {"x": 1})]), Text("ok")]
    assert stream.close() == []


def test_no_call_before_its_end_marker_and_no_block_text_ever_shown() -> None:
    output = "A " + block('[f(x="<|tool_call_end")]') + " B"
    # The end marker's prefix inside a string does not close the block; the real marker does.
    for i in range(len(output) + 1):
        stream = ToolCallStream()
        first = stream.feed(output[:i])
        if i < output.index(E, output.index("<|tool_call_end\"") + 1) + len(E):
            assert not any(isinstance(e, Calls) for e in first)
        assert all("f(" not in e.text for e in first if isinstance(e, Text))
        got = collect(first + stream.feed(output[i:]) + stream.close())
        assert got.calls == [ToolCall("f", {"x": "<|tool_call_end"})]
        assert got.content == "A  B"


def test_positional_arguments_map_by_schema_order() -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}}}}},
        {"name": "bare_schema", "parameters": {"properties": {"a": {}, "b": {}}}},
    ]
    assert parse_calls("[get_weather('Paris', unit='c')]", tools) == [ToolCall("get_weather", {"location": "Paris",
                                                                                              "unit": "c"})]
    assert parse_calls("[bare_schema(1, 2)]", tools) == [ToolCall("bare_schema", {"a": 1, "b": 2})]
    with pytest.raises(ParseError, match="given twice"):
        parse_calls("[get_weather('Paris', location='Rome')]", tools)
    with pytest.raises(ParseError, match="takes 2 arguments"):
        parse_calls("[bare_schema(1, 2, 3)]", tools)
    with pytest.raises(ParseError, match="positional"):
        parse_calls("[unknown(1)]", tools)
    assert parse_output(block("[get_weather('Oslo')]"), tools=tools).calls == [ToolCall("get_weather",
                                                                                        {"location": "Oslo"})]


def test_nothing_is_evaluated(tmp_path) -> None:
    marker = tmp_path / "ran"
    code = f"[f(x=open({str(marker)!r}, 'w').write('x'))]"
    with pytest.raises(ParseError, match="not a literal"):
        parse_calls(code)
    with pytest.raises(ParseError):
        parse_calls(f"[__import__('pathlib').Path({str(marker)!r}).touch()]")
    assert not marker.exists()


def test_hostile_nesting_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        parse_calls("[f(x=" + "[" * 150 + "]" * 150 + ")]")
    with pytest.raises(ParseError):
        parse_calls("[f(x=" + "[" * 5000 + "]" * 5000 + ")]")
    parsed = parse_output(block('[{"name": "f", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}]"))
    assert parsed.calls == [] and len(parsed.errors) == 1


def test_bare_output_needs_the_flag() -> None:
    text = '[get_weather(location="Paris"), Calendar.create_event(title=\'x\', all_day=true)]'
    want = [ToolCall("get_weather", {"location": "Paris"}), ToolCall("Calendar.create_event",
                                                                     {"title": "x", "all_day": True})]
    assert parse_output(text) .calls == [] and parse_output(text).content == text
    assert parse_output("\n" + text + "\n", bare=True) == parse_output(text, bare=True)
    assert parse_output(text, bare=True).calls == want
    assert parse_output(text, bare=True).content == ""
    single = '{"name": "f", "parameters": {"a": 1}}'
    assert parse_output(single, bare=True).calls == [ToolCall("f", {"a": 1})]
    for prose in ["[1] Introduction", "[Note] calls look like f(x=1)", "{braces} in text", "[]", "[f(x=1)] and more",
                  "[I'm not a call]"]:
        assert parse_output(prose, bare=True) == parse_output(prose), prose
        assert parse_output(prose, bare=True).content == prose
    # Markers still work with the flag on.
    assert parse_output("hi " + block("[f(x=1)]"), bare=True).calls == [ToolCall("f", {"x": 1})]


def test_bare_streaming_holds_only_what_could_be_a_call() -> None:
    stream = ToolCallStream(bare=True)
    assert stream.feed("[1") == [Text("[1")]  # a list of numbers is no call list
    stream = ToolCallStream(bare=True)
    assert stream.feed("[Note") == []
    assert stream.feed("] more") == [Text("[Note] more")]
    stream = ToolCallStream(bare=True)
    assert stream.feed("Hello") == [Text("Hello")]
    text = '  [f(s="]\\"", t=\'\'\'x \' )] \'\'\'), g()]  '
    for i in range(len(text) + 1):
        during, final = run_stream([text[:i], text[i:]], bare=True)
        assert during == [] and final == [Calls([ToolCall("f", {"s": ']"', "t": "x ' )] "}), ToolCall("g", {})])]
    # Prose is released as soon as its brackets close and more text follows, wherever the chunks split.
    prose = "[f(s='''a]''')] and more"
    for i in range(len(prose) + 1):
        during, final = run_stream([prose[:i], prose[i:]], bare=True)
        assert "".join(e.text for e in during) == prose and final == []


def test_round_trips() -> None:
    calls = [
        ToolCall("Calendar.create_event", {"title": 'say "hi"\n', "when": None, "ok": True, "n": -3, "f": 2.5}),
        ToolCall("get-weather", {"nested": {"list": [1, {"a": "é😀"}], "empty": {}}, "s": "it's \\ fine"}),
        ToolCall("noargs", {}),
    ]
    text = format_calls(calls)
    assert text.startswith(S) and text.endswith(E) and "Calendar.create_event(title=" in text
    assert parse_output(text).calls == calls
    for i, call in enumerate(calls):
        entry = call.to_openai(f"call_{i}")
        assert entry["id"] == f"call_{i}" and entry["type"] == "function"
        assert entry["function"]["name"] == call.name
        assert json.loads(entry["function"]["arguments"]) == call.arguments
        assert ToolCall.from_openai(json.loads(json.dumps(entry))) == call
    ids = {ToolCall("f").to_openai()["id"] for _ in range(20)}
    assert len(ids) == 20 and all(i.startswith("call_") for i in ids)


def test_tool_call_is_frozen() -> None:
    call = ToolCall("f", {"x": 1})
    with pytest.raises(AttributeError):
        call.name = "g"  # type: ignore[misc]
