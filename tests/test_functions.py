"""The user's Python functions as tools: schemas from signatures and docstrings, calls that never raise."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lfm2cli.errors import UsageError
from lfm2cli.reply.functions import FunctionSet, ToolResult, describe, load_functions
from lfm2cli.reply.tool_specs import check_tools
from lfm2cli.reply.toolcalls import ToolCall, parse_calls

WEATHER = '''
from enum import Enum
from typing import Literal, Optional


class Unit(Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, unit: Unit = Unit.CELSIUS, days: int = 1) -> str:
    """Current weather for a city.

    Uses the offline table; no network.

    Args:
        city: The city's name,
            in English.
        unit: Temperature unit.
        days: How many days ahead.
    """
    if city == "Atlantis":
        raise ValueError("bad city")
    return f"{city}: 21 degrees {unit.value} for {days} day(s)"


def search(query: str, tags: list[str], limit: Optional[int] = None, mode: Literal["fast", "full"] = "fast"):
    """Search the notes.

    Parameters
    ----------
    query : str
        Words to look for.
    tags : list of str
        Only notes with these tags.
    limit : int, optional
        At most this many.
    """
    return {"query": query, "tags": tags, "limit": limit, "mode": mode, "hits": ["café"]}


def convert(amount: float, rates: dict[str, float], pair: tuple[str, str], flag: bool | None = None, note=None):
    """Convert money.

    :param amount: How much.
    :param rates: Rates by currency code.
    """
    print("converting", amount)
    return None


def _private(x: int) -> int:
    return x
'''


def write(tmp_path: Path, source: str, name: str = "tools.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


@pytest.fixture
def weather(tmp_path: Path) -> FunctionSet:
    return load_functions(write(tmp_path, WEATHER))


def test_schemas_from_signatures_and_docstrings(weather: FunctionSet) -> None:
    assert weather.names == ["get_weather", "search", "convert"]
    assert check_tools(weather.tools) == weather.tools
    get_weather, search, convert = weather.tools
    assert get_weather == {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather for a city.\n\nUses the offline table; no network.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city's name, in English."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit.",
                     "default": "celsius"},
            "days": {"type": "integer", "description": "How many days ahead.", "default": 1},
        }, "required": ["city"]},
    }}
    assert search == {"type": "function", "function": {  # NumPy style
        "name": "search",
        "description": "Search the notes.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "Words to look for."},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Only notes with these tags."},
            "limit": {"type": ["integer", "null"], "description": "At most this many.", "default": None},
            "mode": {"type": "string", "enum": ["fast", "full"], "default": "fast"},
        }, "required": ["query", "tags"]},
    }}
    assert convert == {"type": "function", "function": {  # reST style, an unannotated parameter
        "name": "convert",
        "description": "Convert money.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "description": "How much."},
            "rates": {"type": "object", "additionalProperties": {"type": "number"},
                      "description": "Rates by currency code."},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "string"}], "minItems": 2,
                     "maxItems": 2},
            "flag": {"type": ["boolean", "null"], "default": None},
            "note": {"default": None},
        }, "required": ["amount", "rates", "pair"]},
    }}


def test_more_type_hints(tmp_path: Path) -> None:
    fs = load_functions(write(tmp_path, '''
        from __future__ import annotations
        from enum import IntEnum
        from typing import Any, Literal, Union

        class Level(IntEnum):
            LOW = 1
            HIGH = 2

        def f(a: Level, b: list[int] | None, c: Union[int, str], d: tuple[float, ...], e: Any, g: list,
              h: Literal[1, "x"], *, k: dict = {"x": 1}, m: Level | None = Level.HIGH) -> None:
            pass
    '''))
    props = fs.tools[0]["function"]["parameters"]["properties"]
    assert props == {
        "a": {"type": "integer", "enum": [1, 2]},
        "b": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
        "c": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "d": {"type": "array", "items": {"type": "number"}},
        "e": {},
        "g": {"type": "array"},
        "h": {"enum": [1, "x"]},
        "k": {"type": "object", "default": {"x": 1}},
        "m": {"anyOf": [{"type": "integer", "enum": [1, 2]}, {"type": "null"}], "default": 2},
    }
    assert fs.tools[0]["function"]["description"] == ""  # no docstring
    # Enum values come back as members, under Optional too.
    source_call = ToolCall("f", {"a": 2, "b": None, "c": 1, "d": [1.5], "e": 0, "g": [], "h": "x", "m": 1})
    assert not fs.call(source_call).error


def test_calls_and_results(weather: FunctionSet, capfd: pytest.CaptureFixture) -> None:
    result = weather.call(ToolCall("get_weather", {"city": "Paris", "unit": "fahrenheit"}))
    assert (result.name, result.content, result.error) == ("get_weather", "Paris: 21 degrees fahrenheit for 1 day(s)",
                                                            False)
    result = weather.call(ToolCall("search", {"query": "x", "tags": ["a"]}))
    assert not result.error
    assert result.content == '{"query": "x", "tags": ["a"], "limit": null, "mode": "fast", "hits": ["café"]}'
    assert json.loads(result.content)["hits"] == ["café"]
    capfd.readouterr()
    result = weather.call(ToolCall("convert", {"amount": 2, "rates": {}, "pair": ["EUR", "USD"]}))
    assert (result.content, result.error) == ("null", False)
    out = capfd.readouterr()
    assert out.out == "" and out.err == "converting 2\n"  # what a tool prints is not part of the answer


def test_failures_are_results(weather: FunctionSet) -> None:
    cases = [
        (ToolCall("get_weather", {"city": "Atlantis"}), "error: ValueError: bad city"),
        (ToolCall("nope", {}), "error: unknown function 'nope'; the functions are get_weather, search, convert"),
        (ToolCall("get_weather", {}), "error: get_weather() is missing the required argument 'city'; its "
                                      "parameters are: city, unit, days"),
        (ToolCall("get_weather", {"city": "Paris", "town": "x"}), "error: get_weather() has no parameter 'town'; "
                                                                  "its parameters are: city, unit, days"),
        (ToolCall("get_weather", {"city": "Paris", "unit": "kelvin"}), "error: get_weather(): unit='kelvin' is not "
                                                                       "one of 'celsius', 'fahrenheit'"),
        (ToolCall("_private", {"x": 1}), "error: unknown function '_private'; the functions are get_weather, "
                                         "search, convert"),
    ]
    for call, content in cases:
        result = weather.call(call)
        assert (result.content, result.error) == (content, True), call


def test_odd_results_and_exits(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    fs = load_functions(write(tmp_path, '''
        import os, sys
        from dataclasses import dataclass

        @dataclass
        class Point:
            x: int
            y: int

        def point():
            return Point(1, 2)

        def keyed():
            return {(1, 2): "tuple key"}

        def quits():
            sys.exit(3)

        def silent_error():
            raise KeyError

        def shell():
            os.system("echo from-a-subprocess")
            return "done"

        def interrupted():
            raise KeyboardInterrupt

        async def later(n: int) -> int:
            return n + 1
    '''))
    assert fs.call(ToolCall("point")).content == '{"x": 1, "y": 2}'
    assert fs.call(ToolCall("keyed")).content == "{(1, 2): 'tuple key'}"
    assert fs.call(ToolCall("quits")) == ToolResult("quits", "error: SystemExit: 3", True)
    assert fs.call(ToolCall("silent_error")).content == "error: KeyError"
    assert fs.call(ToolCall("later", {"n": 1})).content == "2"
    capfd.readouterr()
    assert fs.call(ToolCall("shell")).content == "done"
    out = capfd.readouterr()
    assert out.out == "" and "from-a-subprocess" in out.err  # fd 1 itself points at stderr during the call
    with pytest.raises(KeyboardInterrupt):
        fs.call(ToolCall("interrupted"))


def test_long_results_are_cut(tmp_path: Path) -> None:
    path = write(tmp_path, '''
        def big(n: int) -> str:
            return "x" * n
    ''')
    fs = load_functions(path)
    assert fs.call(ToolCall("big", {"n": 16_000})).content == "x" * 16_000
    content = fs.call(ToolCall("big", {"n": 50_000})).content
    assert content == "x" * 16_000 + "\n[cut: the result has 50000 characters; the first 16000 are shown]"
    assert load_functions(path, max_chars=10).call(ToolCall("big", {"n": 11})).content.startswith("x" * 10 + "\n[cut")


def test_imported_functions_are_not_tools(tmp_path: Path) -> None:
    write(tmp_path, '''
        def helper(x: int) -> int:
            return x * 2
    ''', name="helpers_for_lfm2_test.py")
    fs = load_functions(write(tmp_path, '''
        from os.path import join
        from helpers_for_lfm2_test import helper

        def double(x: int) -> int:
            """Twice x."""
            return helper(x)

        triple = lambda x: x * 3  # noqa: E731 (a function defined here, under a public name)

        class NotATool:
            def method(self):
                pass

        VALUE = 3
    '''))
    assert fs.names == ["double", "triple"]
    assert fs.call(ToolCall("double", {"x": 4})).content == "8"


def test_dunder_all_decides(tmp_path: Path) -> None:
    fs = load_functions(write(tmp_path, '''
        from os.path import basename
        __all__ = ["basename", "second"]

        def first():
            pass

        def second():
            return 2
    '''))
    assert fs.names == ["basename", "second"]
    assert fs.call(ToolCall("basename", {"p": "/a/b.txt"})).content == "b.txt"
    assert fs.call(ToolCall("first")).error


@pytest.mark.parametrize(("source", "message"), [
    ("def f(:\n    pass\n", "{path}:1: syntax error: "),
    ("import os\n\nx = 1\nraise RuntimeError('no config here')\n",
     "{path}:4: importing the file raised RuntimeError: no config here; fix the file and try again"),
    ("def g():\n    return {}['k']\n\nY = g()\n", "{path}:2: importing the file raised KeyError: 'k'; fix the file"),
    ("import no_such_module_for_lfm2_tests\n",
     "{path}:1: importing the file raised ModuleNotFoundError: No module named 'no_such_module_for_lfm2_tests'"),
    ("import sys\nsys.exit(2)\n", "{path}:2: importing the file raised SystemExit: 2"),
    ("raise ValueError('first line\\nsecond line')\n",
     "{path}:1: importing the file raised ValueError: first line second line; fix the file"),
    ("X = 1\n", "{path}: no functions to offer as tools; define at least one top-level function"),
    ("def _hidden():\n    pass\n", "{path}: no functions to offer as tools"),
    ("def f(*args):\n    pass\n", "{path}: f(): a tool cannot take *args, since the model passes named arguments"),
    ("def f(a, **kw):\n    pass\n", "{path}: f(): a tool cannot take **kw"),
    ("def f(a, /, b):\n    pass\n", "{path}: f(): parameter 'a' is positional-only (before `/`)"),
    ("import datetime\ndef f(when: datetime.date):\n    pass\n",
     "{path}: f(): parameter 'when' has type date, which has no JSON form; use str, int"),
    ("def f(m: dict[int, str]):\n    pass\n", "{path}: f(): parameter 'm' has type dict[int, str] (JSON object keys"),
    ("def f(m: set[int]):\n    pass\n", "{path}: f(): parameter 'm' has type set[int], which has no JSON form"),
    ("def f(a: 'Missing'):\n    pass\n", "{path}: f(): cannot read its signature or type hints (NameError: "),
    ("__all__ = ['f', 'g']\ndef f():\n    pass\n", "{path}: __all__ names 'g', which the file does not define"),
    ("__all__ = ['X']\nX = 1\n", "{path}: __all__ names 'X', which is not a function"),
])
def test_bad_files_are_one_usage_error(tmp_path: Path, source: str, message: str) -> None:
    path = write(tmp_path, source)
    with pytest.raises(UsageError) as exc:
        load_functions(path)
    assert str(exc.value).startswith(message.format(path=path)), str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nope\.py: no such file; give the path of a Python file"):
        load_functions(tmp_path / "nope.py")
    with pytest.raises(UsageError, match=r": not a file; give the path of a Python file"):
        load_functions(tmp_path)


def test_the_file_runs_as_a_module_not_as_main(tmp_path: Path) -> None:
    # `if __name__ == "__main__":` stays off, and two files with the same name do not clash.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = load_functions(write(tmp_path / "a", '''
        if __name__ == "__main__":
            raise SystemExit("ran as a script")

        def which():
            return "a"
    '''))
    second = load_functions(write(tmp_path / "b", 'def which():\n    return "b"\n'))
    assert first.call(ToolCall("which")).content == "a"
    assert second.call(ToolCall("which")).content == "b"


def test_describe_reads_back_as_the_call(weather: FunctionSet) -> None:
    call = ToolCall("get_weather", {"city": "Paris \"16e\"", "days": 2})
    assert describe(call) == 'get_weather(city="Paris \\"16e\\"", days=2)'
    assert parse_calls(describe(call)) == [call]
    assert describe(ToolCall("f", {"when": {1, 2}})) == "f(when={1, 2})"  # no literal form: still shown


def test_tools_render_through_the_chat_template(weather: FunctionSet, tmp_path: Path) -> None:
    from lfm2cli.text.tokenizer import load_tokenizer
    from tests.tiny_tokenizer import make_tokenizer

    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=weather.tools)
    for name in weather.names:
        assert f'"name": "{name}"' in text
    assert "Temperature unit." in text
