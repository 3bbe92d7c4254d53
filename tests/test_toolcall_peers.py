"""Our tool-call parser against the test cases of vLLM's and SGLang's `lfm2` and `pythonic` tool parsers.

Each row restates one of their cases as data: the model output, the calls the peer expects (name and arguments) and,
where the peer checks it, the text left over. Where lfm2 disagrees, the row says what we give instead and why.
Read from vLLM's tests/tool_parsers/test_lfm2_tool_parser.py and test_pythonic_tool_parser.py, and SGLang's
Lfm2Detector tests (test/registered/function_call/, two files) and the PythonicDetector cases of
test_function_call_parser.py. Their API-only cases (`has_tool_call`, `structure_info`, `adjust_request`, log
counts, mocked regex timeouts) have no parser behaviour to compare and are left out, except where the mocked input
itself is worth parsing.

The pythonic rows are parsed as `--endpoint` parses a server's content: with `bare=True` (a reply that is nothing
but a call list), since those parsers have no markers. Every row is parsed whole and streamed one character at a
time (and in the peer's own chunks where it gives them), and must give the same calls both ways. Leftover text is
compared without its outer whitespace: we keep the spaces and newlines the model wrote around a block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from lfm2cli.reply.toolcalls import TOOL_CALL_END, TOOL_CALL_START, ToolCallStream, collect, parse_output

S, E = TOOL_CALL_START, TOOL_CALL_END
Call = tuple[str, dict[str, Any]]


def block(body: str, after: str = "") -> str:
    return f"{S}[{body}]{E}" + (f"\n{after}" if after else "")


@dataclass(frozen=True)
class Case:
    id: str
    source: str  # "vllm lfm2", "vllm pythonic", "sglang lfm2", "sglang pythonic"
    output: str
    peer: list[Call]  # the calls the peer's test expects
    content: str | None = None  # the leftover text the peer expects (None: not checked)
    has: tuple[str, ...] = ()  # text the peer expects the leftover to contain
    chunks: tuple[str, ...] = ()  # the peer's own streaming chunks, where its test gives them
    ours: list[Call] | None = None  # where we disagree: our calls
    ours_content: str | None = None  # where we disagree on the leftover text
    why: str = ""  # the reason for a disagreement
    tools: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bare(self) -> bool:
        return self.source.endswith("pythonic")


def tool(name: str, *params: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {p: {"type": "string"} for p in params}, "required": list(params[:1])}}}


# SGLang's tests pass these tools; positional arguments map by their order
SGL_LFM2_TOOLS = [tool("get_weather", "city", "unit"), tool("search", "query"), tool("calculator", "expression")]
SGL_PY_TOOLS = [tool("get_weather", "location", "unit"), tool("search", "query")]

# vLLM's shared calls
SIMPLE = "get_candidate_status(candidate_id='12345')"
SIMPLE_CALL: Call = ("get_candidate_status", {"candidate_id": "12345"})
MORE = ("register_user(name='John Doe', age=37, address={'city': 'San Francisco', 'state': 'CA'}, role=None, "
        "passed_test=True, aliases=['John', 'Johnny'])")
MORE_CALL: Call = ("register_user", {"name": "John Doe", "age": 37, "address": {"city": "San Francisco", "state": "CA"},
                                     "role": None, "passed_test": True, "aliases": ["John", "Johnny"]})
NOARGS, NOARGS_CALL = "get_weather()", ("get_weather", {})
EMPTY_LIST, EMPTY_LIST_CALL = "do_something_cool(steps=[])", ("do_something_cool", {"steps": []})
ESCAPED = r"""get_weather(city='Martha\'s Vineyard', metric='\"cool units\"')"""
ESCAPED_CALL: Call = ("get_weather", {"city": "Martha's Vineyard", "metric": '"cool units"'})
DOTTED = ("grocery.orderIngredients(ingredientList=[{'name': 'Lasagna noodles', 'amount': 250, 'unit': 'g'}], "
          "deliveryAddress='845 Willow Lane, Springfield, IL 62704')")
DOTTED_CALL: Call = ("grocery.orderIngredients", {
    "ingredientList": [{"name": "Lasagna noodles", "amount": 250, "unit": "g"}],
    "deliveryAddress": "845 Willow Lane, Springfield, IL 62704"})
PY_SIMPLE = "get_weather(city='San Francisco', metric='celsius')"
PY_SIMPLE_CALL: Call = ("get_weather", {"city": "San Francisco", "metric": "celsius"})
ECHO = "[grocery.orderIngredients(ingredientList=[{'name': 'apple', 'quantity': '2'}], deliveryAddress='123 Main St')]"

# Why we differ, said once for the rows that share a reason
BLOCK_IS_ONE = ("a block is parsed whole: one call that is not a literal call makes all of it text (with a note), "
                "so a reply never runs half of what the model wrote")
NO_REQUOTING = ("a string closed early by a quote of its own kind is a syntax error we do not guess around: re-quoting "
                "picks one reading of ambiguous text, and a wrong pick runs a command the model did not write; the "
                "block stays text and the note says why")
PROSE = ("a bare list counts only as the whole reply: LFM2 marks its calls, a bare list is read only from servers "
         "that strip the markers, and a list inside prose is prose")

CASES: list[Case] = [
    # ---- vLLM, lfm2 parser
    Case("no tool call", "vllm lfm2", "How can I help you today?", [], content="How can I help you today?"),
    Case("simple", "vllm lfm2", block(SIMPLE), [SIMPLE_CALL]),
    Case("more types", "vllm lfm2", block(MORE), [MORE_CALL]),
    Case("parameterless", "vllm lfm2", block(NOARGS), [NOARGS_CALL]),
    Case("empty dict", "vllm lfm2", block("do_something_cool(additional_data={})"),
         [("do_something_cool", {"additional_data": {}})]),
    Case("empty list", "vllm lfm2", block(EMPTY_LIST), [EMPTY_LIST_CALL]),
    Case("set argument", "vllm lfm2", block("label(tags={'urgent', 'bug'})"), [("label", {"tags": ["urgent", "bug"]})]),
    Case("leading zeros", "vllm lfm2", block("set_date(month=07, day=05)"), [("set_date", {"month": 7, "day": 5})]),
    Case("nested quotes", "vllm lfm2", block("bash(command='sed -n '360,450p' /testbed/sympy/matrices/common.py')"),
         [("bash", {"command": "sed -n '360,450p' /testbed/sympy/matrices/common.py"})], ours=[], why=NO_REQUOTING),
    Case("nested python -c", "vllm lfm2",
         block("bash(command='cd /testbed && python3 -c \"from sympy import latex\nprint(latex(3*x, mul_symbol='\\,'))"
               "\"')"),
         [("bash", {"command": "cd /testbed && python3 -c \"from sympy import latex\nprint(latex(3*x, "
                               "mul_symbol='\\,'))\""})], ours=[], why=NO_REQUOTING),
    Case("escaped strings", "vllm lfm2", block(ESCAPED), [ESCAPED_CALL]),
    Case("parallel calls", "vllm lfm2", block(f"{SIMPLE}, {MORE}"), [SIMPLE_CALL, MORE_CALL]),
    Case("content after the block", "vllm lfm2", block(SIMPLE, "Checking the current status of candidate ID 12345."),
         [SIMPLE_CALL], content="Checking the current status of candidate ID 12345."),
    Case("dotted name", "vllm lfm2", block(DOTTED), [DOTTED_CALL]),
    Case("bracket in a string", "vllm lfm2", block("exec(command='grep -F \"]\" log.txt')"),
         [("exec", {"command": 'grep -F "]" log.txt'})]),
    Case("line breaks in a string", "vllm lfm2", block("exec(command='cat > f.py << EOF\nimport csv\nprint(1)\nEOF')"),
         [("exec", {"command": "cat > f.py << EOF\nimport csv\nprint(1)\nEOF"})]),
    Case("NUL byte in a string", "vllm lfm2", block("exec(command='printf a\x00b')"),
         [("exec", {"command": "printf a\x00b"})]),
    Case("empty block", "vllm lfm2", f"{S}[]{E}", []),
    Case("empty block with a space", "vllm lfm2", f"{S}[ ]{E}", []),
    Case("bad sibling (bytes)", "vllm lfm2", block(f"{SIMPLE}, bad(x=b'z')"), [SIMPLE_CALL], ours=[], why=BLOCK_IS_ONE),
    Case("whitespace after the start marker", "vllm lfm2", f"{S} [{SIMPLE}]{E}", [SIMPLE_CALL]),
    Case("three calls in one piece", "vllm lfm2", block(f"{SIMPLE}, {NOARGS}, {EMPTY_LIST}"),
         [SIMPLE_CALL, NOARGS_CALL, EMPTY_LIST_CALL]),
    Case("block and trailing text in one piece", "vllm lfm2", block(SIMPLE) + "\nDone.", [SIMPLE_CALL], has=("Done.",)),
    Case("leading text and block in one piece", "vllm lfm2", "Let me check. " + block(SIMPLE), [SIMPLE_CALL],
         has=("Let me check.",)),
    Case("text, block, text in one piece", "vllm lfm2", "Let me check. " + block(SIMPLE) + "\nDone.", [SIMPLE_CALL],
         has=("Let me check.", "Done.")),
    Case("echoed body after the block", "vllm lfm2", f"{S}{ECHO}{E}{ECHO}{E}",
         [("grocery.orderIngredients", {"ingredientList": [{"name": "apple", "quantity": "2"}],
                                        "deliveryAddress": "123 Main St"})], content="",
         ours_content=f"{ECHO}{E}",
         why="generation stops at the first block's end marker (TextRun), so a local model never writes the echo; in "
             "a finished text we keep what follows a block as text instead of guessing that it repeats the block"),
    Case("list of dicts, char by char", "vllm lfm2",
         block('grocery.orderIngredients(ingredientList=[{"name": "apple", "quantity": "2"}, '
               '{"name": "bread", "quantity": "1"}])'),
         [("grocery.orderIngredients", {"ingredientList": [{"name": "apple", "quantity": "2"},
                                                           {"name": "bread", "quantity": "1"}]})]),
    Case("the regex-timeout input", "vllm lfm2", f"{S}[A(A=" + "\t)A(A=,\t" * 2 + f"]{E}", [],
         content=f"{S}[A(A=" + "\t)A(A=,\t" * 2 + f"]{E}"),

    # ---- vLLM, pythonic parser
    Case("no tool call", "vllm pythonic", "How can I help you today?", [], content="How can I help you today?"),
    Case("simple", "vllm pythonic", f"[{PY_SIMPLE}]", [PY_SIMPLE_CALL], content=""),
    Case("more types", "vllm pythonic", f"[{MORE}]", [MORE_CALL], content=""),
    Case("parameterless", "vllm pythonic", f"[{NOARGS}]", [NOARGS_CALL], content=""),
    Case("empty dict", "vllm pythonic", "[do_something_cool(additional_data={})]",
         [("do_something_cool", {"additional_data": {}})], content=""),
    Case("empty list", "vllm pythonic", f"[{EMPTY_LIST}]", [EMPTY_LIST_CALL], content=""),
    Case("escaped strings", "vllm pythonic", f"[{ESCAPED}]", [ESCAPED_CALL], content=""),
    Case("parallel calls", "vllm pythonic", f"[{PY_SIMPLE}, {MORE}]", [PY_SIMPLE_CALL, MORE_CALL], content=""),
    Case("large steps", "vllm pythonic", f"[{PY_SIMPLE}, {NOARGS}, {EMPTY_LIST}]",
         [PY_SIMPLE_CALL, NOARGS_CALL, EMPTY_LIST_CALL], content="",
         chunks=("[get_weather(city='San", " Francisco', metric='celsius'), ", f"{NOARGS}, {EMPTY_LIST}]")),
    Case("the regex-timeout input", "vllm pythonic", "hello world[A(A=" + "\t)A(A=,\t" * 2, [],
         content="hello world[A(A=" + "\t)A(A=,\t" * 2),
    Case("bad sibling (bytes)", "vllm pythonic", f"[bad(x=b'z'), {PY_SIMPLE}]", [PY_SIMPLE_CALL], ours=[],
         why=BLOCK_IS_ONE),
    Case("a number that is not finite", "vllm pythonic", f"[calc(x=1e999), {PY_SIMPLE}]", [PY_SIMPLE_CALL], ours=[],
         why="we agree that 1e999 never reaches JSON as Infinity, but refuse the block it is in: " + BLOCK_IS_ONE),
    Case("a good call beside an unparsable one", "vllm pythonic", f"[{PY_SIMPLE}, f(a='x 'y', b='z')]",
         [PY_SIMPLE_CALL], ours=[], why=NO_REQUOTING),
    Case("no reading parses", "vllm pythonic", "[f(a='x 'y' 'z), g(b='p 'q' 'r)]", [],
         content="[f(a='x 'y' 'z), g(b='p 'q' 'r)]"),
    Case("mismatched brackets", "vllm pythonic", "[foo(x=1])]", []),

    # ---- SGLang, Lfm2Detector
    Case("pythonic simple", "sglang lfm2", block('get_weather(city="Paris")'), [("get_weather", {"city": "Paris"})],
         tools=SGL_LFM2_TOOLS),
    Case("invalid escape \\d", "sglang lfm2", block('search(query="\\d+")'), [("search", {"query": "\\d+"})],
         tools=SGL_LFM2_TOOLS),
    Case("two arguments", "sglang lfm2", block('get_weather(city="London", unit="celsius")'),
         [("get_weather", {"city": "London", "unit": "celsius"})], tools=SGL_LFM2_TOOLS),
    Case("no arguments", "sglang lfm2", f"{S}[get_time()]{E}", [("get_time", {})], tools=SGL_LFM2_TOOLS),
    Case("two calls", "sglang lfm2", block('get_weather(city="Paris"), search(query="restaurants")'),
         [("get_weather", {"city": "Paris"}), ("search", {"query": "restaurants"})], tools=SGL_LFM2_TOOLS),
    Case("text before", "sglang lfm2", 'Let me check the weather for you. ' + block('get_weather(city="Tokyo")'),
         [("get_weather", {"city": "Tokyo"})], content="Let me check the weather for you.", tools=SGL_LFM2_TOOLS),
    Case("quote in a value", "sglang lfm2", block('search(query="what\'s the weather?")'),
         [("search", {"query": "what's the weather?"})], tools=SGL_LFM2_TOOLS),
    Case("json", "sglang lfm2", f'{S}[{{"name": "get_weather", "arguments": {{"city": "Berlin"}}}}]{E}',
         [("get_weather", {"city": "Berlin"})], tools=SGL_LFM2_TOOLS),
    Case("json, two calls", "sglang lfm2",
         f'{S}[{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}, '
         f'{{"name": "search", "arguments": {{"query": "hotels"}}}}]{E}',
         [("get_weather", {"city": "Paris"}), ("search", {"query": "hotels"})], tools=SGL_LFM2_TOOLS),
    Case("json with parameters", "sglang lfm2",
         f'{S}[{{"name": "get_weather", "parameters": {{"city": "Madrid"}}}}]{E}',
         [("get_weather", {"city": "Madrid"})], tools=SGL_LFM2_TOOLS),
    Case("no tool call", "sglang lfm2", "This is just regular text without any tool calls.", [],
         content="This is just regular text without any tool calls.", tools=SGL_LFM2_TOOLS),
    Case("unknown function", "sglang lfm2", block('unknown_function(arg="value")'), [],
         ours=[("unknown_function", {"arg": "value"})], tools=SGL_LFM2_TOOLS,
         why="the parser reports what the model called; a name that is not offered is answered where calls run "
             "(chat --functions gives the model an 'unknown function' result it can read; serve returns the call "
             "to the client, as OpenAI's API does)"),
    Case("empty markers", "sglang lfm2", f"{S}{E}", [], tools=SGL_LFM2_TOOLS),
    Case("two blocks", "sglang lfm2",
         block('get_weather(city="Paris")') + " Some text " + block('search(query="food")'),
         [("get_weather", {"city": "Paris"}), ("search", {"query": "food"})], tools=SGL_LFM2_TOOLS),
    Case("json without a list, split", "sglang lfm2",
         f'{S}{{"name": "get_weather", "arguments": {{"city": "Vienna"}}}}{E}',
         [("get_weather", {"city": "Vienna"})], tools=SGL_LFM2_TOOLS,
         chunks=(f'{S}{{"name": "get_weather", "arguments": {{"city": ', f'"Vienna"}}}}{E}')),
    Case("text, then a json call", "sglang lfm2",
         f"I'll check the weather. {S}{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Amsterdam\"}}}}{E}",
         [("get_weather", {"city": "Amsterdam"})], has=("check the weather",), tools=SGL_LFM2_TOOLS),
    Case("the end marker is not left in the text", "sglang lfm2",
         f'{S}{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}{E}',
         [("get_weather", {"city": "Oslo"})], content="", tools=SGL_LFM2_TOOLS),
    Case("pythonic, split", "sglang lfm2", block('get_weather(city="Munich")'), [("get_weather", {"city": "Munich"})],
         chunks=(f'{S}[get_weather(city="', f'Munich")]{E}'), tools=SGL_LFM2_TOOLS),
    Case("markers in their own chunks", "sglang lfm2", block('get_weather(city="Oslo")'),
         [("get_weather", {"city": "Oslo"})], chunks=(S, '[get_weather(city="Oslo")]', E), tools=SGL_LFM2_TOOLS),
    Case("line break in a string", "sglang lfm2", block("search(query='line one\nline two')"),
         [("search", {"query": "line one\nline two"})], tools=SGL_LFM2_TOOLS),
    Case("NUL byte in a string", "sglang lfm2", block("search(query='printf a\x00b')"),
         [("search", {"query": "printf a\x00b"})], tools=SGL_LFM2_TOOLS),
    Case("nested quotes", "sglang lfm2", block("search(query='sed -n '360,450p' f.py')"),
         [("search", {"query": "sed -n '360,450p' f.py"})], ours=[], why=NO_REQUOTING, tools=SGL_LFM2_TOOLS),
    Case("ambiguous nested quotes", "sglang lfm2", block("get_weather(city='echo 'hi', unit='celsius')"), [],
         tools=SGL_LFM2_TOOLS),
    Case("a keyword as parameter name", "sglang lfm2", block("search(query='M.md', from=1)"),
         [("search", {"query": "M.md", "from": 1})], tools=SGL_LFM2_TOOLS),
    Case("leading zeros", "sglang lfm2", block("get_weather(city='NYC', day=07)"),
         [("get_weather", {"city": "NYC", "day": 7})], tools=SGL_LFM2_TOOLS),
    Case("explicit plus sign", "sglang lfm2", block("search(query='x', limit=+7)"),
         [("search", {"query": "x", "limit": 7})], tools=SGL_LFM2_TOOLS),
    Case("set argument", "sglang lfm2", block("search(query={'a', 'b'})"), [("search", {"query": ["a", "b"]})],
         tools=SGL_LFM2_TOOLS),
    Case("f-string without fields", "sglang lfm2", block("search(query=f'hello')"), [("search", {"query": "hello"})],
         tools=SGL_LFM2_TOOLS),
    Case("bytes argument beside a good call", "sglang lfm2", block("get_weather(city='SF'), search(query=b'z')"),
         [("get_weather", {"city": "SF"})], ours=[], why=BLOCK_IS_ONE, tools=SGL_LFM2_TOOLS),
    Case("a number that is not finite", "sglang lfm2", block("search(query='x', limit=1e999)"), [],
         tools=SGL_LFM2_TOOLS),
    Case("**dict keyword arguments", "sglang lfm2", block("search(**{'query': 'x'}, limit=2)"),
         [("search", {"query": "x", "limit": 2})], tools=SGL_LFM2_TOOLS),
    Case("** of a list", "sglang lfm2", block("search(**[1, 2])"), [], tools=SGL_LFM2_TOOLS),
    Case("a positional argument", "sglang lfm2", block("search(query='x'), get_weather('Paris', unit='celsius')"),
         [("search", {"query": "x"})], tools=SGL_LFM2_TOOLS,
         ours=[("search", {"query": "x"}), ("get_weather", {"city": "Paris", "unit": "celsius"})],
         why="with the tools known, a positional argument binds to the schema's parameter in order, as Python would "
             "bind it; without them it is refused, since its name cannot be known"),
    Case("a good call beside an unparsable one", "sglang lfm2",
         block("search(query='ok'), get_weather(city='x 'y', unit='c')"), [("search", {"query": "ok"})], ours=[],
         why=NO_REQUOTING, tools=SGL_LFM2_TOOLS),
    Case("the reading that keeps both calls", "sglang lfm2", block("search(query='x 'y'), get_weather(city='p 'q')"),
         [("search", {"query": "x 'y"}), ("get_weather", {"city": "p 'q"})], ours=[], why=NO_REQUOTING,
         tools=SGL_LFM2_TOOLS),
    Case("no reading parses", "sglang lfm2", block("search(query='x 'y' 'z), get_weather(city='p 'q' 'r)"), [],
         tools=SGL_LFM2_TOOLS),
    Case("line breaks, 7-character chunks", "sglang lfm2", block("search(query='line one\nline two')"),
         [("search", {"query": "line one\nline two"})], tools=SGL_LFM2_TOOLS,
         chunks=tuple(block("search(query='line one\nline two')")[i:i + 7]
                      for i in range(0, len(block("search(query='line one\nline two')")), 7))),
    Case("a parameter named like a placeholder", "sglang lfm2", block("search(query='x', in_pyreservedkw_=5)"),
         [("search", {"query": "x", "in_pyreservedkw_": 5})], tools=SGL_LFM2_TOOLS),
    Case("a keyword parameter with nested quotes", "sglang lfm2", block("search(from='sed -n '1,5p' f.py')"),
         [("search", {"from": "sed -n '1,5p' f.py"})], ours=[], why=NO_REQUOTING, tools=SGL_LFM2_TOOLS),
    Case("json call, as json.dumps writes it", "sglang lfm2",
         S + json.dumps([{"name": "search", "arguments": {"query": "sglang"}}]) + E,
         [("search", {"query": "sglang"})], tools=SGL_LFM2_TOOLS),
    Case("text before, short", "sglang lfm2", "Sure! " + block('get_weather(city="Paris")'),
         [("get_weather", {"city": "Paris"})], has=("Sure",), tools=SGL_LFM2_TOOLS),

    # ---- SGLang, PythonicDetector
    Case("no brackets", "sglang pythonic", "This is just normal text without any tool calls.", [],
         content="This is just normal text without any tool calls.", tools=SGL_PY_TOOLS),
    Case("text before a list", "sglang pythonic",
         "Here's a tool call: [get_weather(location='New York', unit='celsius')]",
         [("get_weather", {"location": "New York", "unit": "celsius"})], content="Here's a tool call:", ours=[],
         ours_content="Here's a tool call: [get_weather(location='New York', unit='celsius')]", why=PROSE,
         tools=SGL_PY_TOOLS),
    Case("a list at the start", "sglang pythonic", "[search(query='python programming')]",
         [("search", {"query": "python programming"})], content="", tools=SGL_PY_TOOLS),
    Case("text after a list", "sglang pythonic", "[get_weather(location='Tokyo')] Here's the forecast:",
         [("get_weather", {"location": "Tokyo"})], content="Here's the forecast:", ours=[],
         ours_content="[get_weather(location='Tokyo')] Here's the forecast:", why=PROSE, tools=SGL_PY_TOOLS),
    Case("two lists in prose", "sglang pythonic", "[get_weather(location='Berlin')] and [search(query='restaurants')]",
         [("get_weather", {"location": "Berlin"}), ("search", {"query": "restaurants"})], ours=[], why=PROSE,
         tools=SGL_PY_TOOLS),
    Case("an opening bracket only", "sglang pythonic", "Let's try this: [", [], tools=SGL_PY_TOOLS),
    Case("list argument", "sglang pythonic", "[get_weather(location='New York', unit='celsius', data=[1, 2, 3])]",
         [("get_weather", {"location": "New York", "unit": "celsius", "data": [1, 2, 3]})], content="",
         tools=SGL_PY_TOOLS),
    Case("nested dict argument", "sglang pythonic",
         "[search(query='test', config={'options': [1, 2], 'nested': {'key': 'value'}})]",
         [("search", {"query": "test", "config": {"options": [1, 2], "nested": {"key": "value"}}})], content="",
         tools=SGL_PY_TOOLS),
    Case("two calls with lists", "sglang pythonic",
         "[get_weather(location='Paris', data=[10, 20]), search(query='test', filters=['a', 'b'])]",
         [("get_weather", {"location": "Paris", "data": [10, 20]}),
          ("search", {"query": "test", "filters": ["a", "b"]})], content="", tools=SGL_PY_TOOLS),
    Case("text before, split", "sglang pythonic", "Let me check the weather: [get_weather(location='Paris')]",
         [("get_weather", {"location": "Paris"})], ours=[], why=PROSE, tools=SGL_PY_TOOLS,
         chunks=("Let me check the weather: [get_weather(location=", "'Paris')]")),
    Case("Llama 4 markers", "sglang pythonic",
         "Here's a call: <|python_start|>[get_weather(location='Tokyo', data=[1, 2, 3])]<|python_end|>",
         [("get_weather", {"location": "Tokyo", "data": [1, 2, 3]})], ours=[], tools=SGL_PY_TOOLS,
         why="<|python_start|> and <|python_end|> are Llama 4's markers, not LFM2's; " + PROSE),
]


def _calls(events: list) -> tuple[list[Call], str]:
    parsed = collect(events)
    return [(c.name, c.arguments) for c in parsed.calls], parsed.content


def _streamed(case: Case, chunks: list[str]) -> tuple[list[Call], str]:
    stream = ToolCallStream(case.tools or None, bare=case.bare)
    events: list = []
    for chunk in chunks:
        events += stream.feed(chunk)
    return _calls(events + stream.close())


def test_the_table_covers_both_peers_and_both_parsers() -> None:
    sources = {c.source for c in CASES}
    assert sources == {"vllm lfm2", "vllm pythonic", "sglang lfm2", "sglang pythonic"}
    assert len(CASES) >= 80
    assert all(c.why for c in CASES if c.ours is not None or c.ours_content is not None)
    assert len({(c.source, c.id) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.source}: {c.id}" for c in CASES])
def test_our_parser_on_the_peer_case(case: Case) -> None:
    parsed = parse_output(case.output, case.tools or None, bare=case.bare)
    calls = [(c.name, c.arguments) for c in parsed.calls]
    expected = case.peer if case.ours is None else case.ours
    assert calls == expected, case.why or "we agree with the peer here"
    content = parsed.content.strip()
    if case.ours_content is not None:
        assert content == case.ours_content.strip(), case.why
    elif case.content is not None:
        assert content == case.content.strip()
    for text in case.has:
        assert text in content
    # every call we return is JSON as OpenAI's API carries it: no Infinity, no NaN
    for call in parsed.calls:
        json.loads(call.to_openai()["function"]["arguments"],
                   parse_constant=lambda name: pytest.fail(f"{name} in the arguments"))
    # the same, streamed one character at a time and in the peer's own chunks
    assert _streamed(case, list(case.output)) == (calls, parsed.content)
    if case.chunks:
        assert "".join(case.chunks) == case.output
        assert _streamed(case, list(case.chunks)) == (calls, parsed.content)


def test_where_we_differ_the_text_is_kept_and_says_why() -> None:
    """A block we refuse is never lost: its text stays in the reply and the error names the cause."""
    for case in CASES:
        if case.ours == [] and case.peer and not case.bare:
            parsed = parse_output(case.output, case.tools or None)
            assert parsed.errors and S in parsed.content, case.id
