"""Tool schemas as a user or client hands them over (a `--tools` file, a request's `tools`): checked once, so the
template and the call grammar get only what they can read, and every problem is one message saying what is
expected."""

from __future__ import annotations

from typing import Any

from lfm2cli.errors import UsageError
from lfm2cli.model.config import parse_json

_TOOLS_SHAPE = ('a JSON list of function tools, [{"type": "function", "function": {"name": ..., "parameters": '
                '{...}}}] or [{"name": ..., "parameters": {...}}]')


def check_tools(data: Any) -> list[dict[str, Any]]:
    """`data` as a list of tool schemas (OpenAI `{"type": "function", "function": {...}}` or bare function
    objects), kept as given for the template. Raises ValueError saying what is wrong and what is expected."""
    if not isinstance(data, list):
        raise ValueError(f"expected {_TOOLS_SHAPE}, not a JSON {_json_kind(data)}")
    from lfm2cli.text.chat_template import tools_problem

    problem = tools_problem(data)  # too many or too large for any prompt: said before a template chokes on them
    if problem is not None:
        raise ValueError(problem)
    for n, tool in enumerate(data, 1):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(tool, dict) and "function" in tool and tool.get("type", "function") != "function":
            raise ValueError(f"tool {n} has type {tool.get('type')!r}; only \"function\" tools exist; expected "
                             f"{_TOOLS_SHAPE}")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tool {n} has no function name; expected {_TOOLS_SHAPE}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ValueError(f"tool {n} ({fn['name']}): parameters must be a JSON schema object; expected "
                             f"{_TOOLS_SHAPE}")
        problem = _parameters_problem(fn)
        if problem:
            raise ValueError(f"tool {n} ({fn['name']}): {problem}; expected {_TOOLS_SHAPE}")
    return data


def _parameters_problem(fn: dict[str, Any]) -> str | None:
    """What is wrong with the parts of a tool the prompt and the call grammar read (None: nothing)."""
    if not isinstance(fn.get("description", ""), str):
        return f"description must be a string, not a JSON {_json_kind(fn['description'])}"
    params = fn.get("parameters") or {}
    props = params.get("properties", {})
    if not isinstance(props, dict):
        return f"parameters.properties must be an object of argument schemas, not a JSON {_json_kind(props)}"
    for name, schema in props.items():
        if not isinstance(schema, dict):
            return f"parameters.properties.{name} must be a JSON schema object, not a JSON {_json_kind(schema)}"
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return "parameters.required must be a list of argument names"
    return None


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value),
                                                                                                "number")


def read_tools(path: str) -> list[dict[str, Any]]:
    """The tool schemas in the JSON file `path` (see `check_tools`); any problem is one UsageError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the tools file ({e.strerror or e}); expected {_TOOLS_SHAPE}") from None
    try:
        data = parse_json(raw.decode("utf-8"))  # deep nesting and 5,000-digit numbers are ValueErrors too
    except UnicodeDecodeError:
        raise UsageError(f"{path}: the tools file is not UTF-8 text; expected {_TOOLS_SHAPE}") from None
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e}); expected {_TOOLS_SHAPE}") from None
    try:
        return check_tools(data)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
