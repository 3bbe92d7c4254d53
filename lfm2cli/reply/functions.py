"""The user's own Python functions as tools (`lfm2 chat --functions FILE.py`).

`load_functions` imports the file, picks its public functions and writes an OpenAI function schema for each from
its signature and docstring; `FunctionSet.call` runs a parsed `ToolCall` and always returns a `ToolResult`, an
error result included, because a failing tool is something the model should read, not a crash.
No terminal code: the caller shows calls (`describe`), asks for confirmation and prints results.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import dataclasses
import enum
import importlib.machinery
import importlib.util
import inspect
import itertools
import json
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docstring_parser

from lfm2cli.errors import UsageError
from lfm2cli.reply.toolcalls import ToolCall

# A tool's result goes into the context whole; past this it is cut, so that one call cannot fill the context.
MAX_RESULT_CHARS = 16_000

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_SUPPORTED = "str, int, float, bool, list[...], tuple[...], dict[str, ...], Literal[...], an Enum or Optional[...]"
_module_numbers = itertools.count(1)


@dataclass(frozen=True)
class ToolResult:
    """What one call gave: `content` is the text the model reads back as the tool message."""

    name: str
    content: str
    error: bool = False


@dataclass(frozen=True)
class _Function:
    name: str
    fn: Callable[..., Any]
    signature: inspect.Signature
    enums: dict[str, type[enum.Enum]]  # parameters whose values arrive as an Enum's value and are turned into it
    schema: dict[str, Any]


class FunctionSet:
    """The tools of one file: `tools` for the chat template, `call` to run what the model asked for."""

    def __init__(self, path: Path, functions: list[_Function], max_chars: int = MAX_RESULT_CHARS) -> None:
        self.path = path
        self.max_chars = max_chars
        self._functions = {f.name: f for f in functions}

    @property
    def names(self) -> list[str]:
        return list(self._functions)

    @property
    def tools(self) -> list[dict[str, Any]]:
        """OpenAI function schemas, in the order the file defines the functions (fresh copies: callers may edit)."""
        return [json.loads(json.dumps(f.schema)) for f in self._functions.values()]

    def call(self, call: ToolCall) -> ToolResult:
        """Run `call`. Never raises for the tool's sake (unknown name, bad arguments, an exception inside it):
        those come back as `error=True` results; only KeyboardInterrupt goes through."""
        f = self._functions.get(call.name)
        if f is None:
            return self._error(call.name, f"unknown function {call.name!r}; the functions are {', '.join(self.names)}")
        problem = _check_arguments(f, call.arguments)
        if problem:
            return self._error(f.name, problem)
        kwargs = dict(call.arguments)
        for key, cls in f.enums.items():
            if kwargs.get(key) is not None:
                try:
                    kwargs[key] = cls(kwargs[key])
                except ValueError:
                    allowed = ", ".join(repr(m.value) for m in cls)
                    return self._error(f.name, f"{f.name}(): {key}={kwargs[key]!r} is not one of {allowed}")
        try:
            with _stdout_to_stderr():
                value = f.fn(**kwargs)
                if inspect.isawaitable(value):
                    value = asyncio.run(_await(value))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too: a tool calling exit() must not end the chat
            return self._error(f.name, _exception_text(e))
        try:
            content = _result_text(value)
        except Exception as e:
            return self._error(f.name, f"the result could not be turned into text: {_exception_text(e)}")
        return ToolResult(f.name, self._cut(content))

    def _error(self, name: str, text: str) -> ToolResult:
        return ToolResult(name, self._cut("error: " + text), error=True)

    def _cut(self, text: str) -> str:
        if len(text) <= self.max_chars:
            return text
        return text[:self.max_chars] + f"\n[cut: the result has {len(text)} characters; the first {self.max_chars} " \
                                       "are shown]"


def describe(call: ToolCall) -> str:
    """The call as the user is asked to confirm it, `get_weather(city="Paris")` (LFM2's own call syntax)."""
    try:
        return call.to_pythonic()
    except (TypeError, ValueError):  # a value with no literal form (only hand-built calls): still show something
        return f"{call.name}({', '.join(f'{k}={v!r}' for k, v in call.arguments.items())})"


async def _await(value: Any) -> Any:
    return await value


def _exception_text(e: BaseException) -> str:
    message = str(e).strip()
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _check_arguments(f: _Function, arguments: dict[str, Any]) -> str:
    params = f.signature.parameters
    listing = ", ".join(params) or "none"
    unexpected = [k for k in arguments if k not in params]
    if unexpected:
        return f"{f.name}() has no parameter {unexpected[0]!r}; its parameters are: {listing}"
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in arguments]
    if missing:
        return f"{f.name}() is missing the required argument {missing[0]!r}; its parameters are: {listing}"
    return ""


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"  # JSON, like every other non-string result
    try:
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError):  # keys that are not strings or numbers, reference cycles
        return repr(value)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """stdout is the answer stream: what a tool prints (print(), and subprocesses or C code writing to fd 1) goes
    to stderr while it runs."""
    saved = None
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError, AttributeError):  # no fd 1 or 2 to swap: the Python-level redirect still holds
        if saved is not None:
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_functions(path: str | Path, max_chars: int = MAX_RESULT_CHARS) -> FunctionSet:
    """Import the Python file `path` and offer its functions as tools: the names in its `__all__` if it has one,
    else every top-level function it defines whose name does not start with `_` (imported functions are not).
    Any problem is one UsageError naming the file (and the function) and saying what to do."""
    path = Path(path)
    module = _import(path)
    names = getattr(module, "__all__", None)
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"{path}: __all__ must be a list of function names")
        chosen = []
        for name in names:
            if not hasattr(module, name):
                raise UsageError(f"{path}: __all__ names {name!r}, which the file does not define")
            if not inspect.isfunction(getattr(module, name)):
                raise UsageError(f"{path}: __all__ names {name!r}, which is not a function; list only functions "
                                 "to offer as tools")
            chosen.append(name)
    else:
        chosen = [name for name, value in vars(module).items()
                  if not name.startswith("_") and inspect.isfunction(value) and value.__module__ == module.__name__]
    if not chosen:
        raise UsageError(f"{path}: no functions to offer as tools; define at least one top-level function whose "
                         "name does not start with _ (or list them in __all__)")
    return FunctionSet(path, [_function(path, name, getattr(module, name)) for name in chosen], max_chars)


def _import(path: Path) -> types.ModuleType:
    if not path.exists():
        raise UsageError(f"{path}: no such file; give the path of a Python file that defines the functions")
    if not path.is_file():
        raise UsageError(f"{path}: not a file; give the path of a Python file that defines the functions")
    # A private name: the file must not replace a real module, and its `if __name__ == "__main__":` block stays off.
    name = f"_lfm2_functions_{next(_module_numbers)}"
    loader = importlib.machinery.SourceFileLoader(name, str(path))  # any file name, not only *.py
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look the module up by name
    # The file imports its neighbours as it would when run with `python3 FILE.py`.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        loader.exec_module(module)
    except KeyboardInterrupt:
        sys.modules.pop(name, None)
        raise
    except SyntaxError as e:
        sys.modules.pop(name, None)
        where = f"{path}:{e.lineno}" if e.lineno and _same_file(e.filename, path) else str(path)
        raise UsageError(f"{where}: syntax error: {e.msg}; fix the file and try again") from None
    except OSError as e:
        sys.modules.pop(name, None)
        if _same_file(e.filename, path):
            raise UsageError(f"{path}: cannot read the file ({e.strerror or e})") from None
        raise _import_error(path, e) from e
    except BaseException as e:  # SystemExit included: exit() at import time is a problem in the file, not ours
        sys.modules.pop(name, None)
        raise _import_error(path, e) from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _same_file(filename: str | None, path: Path) -> bool:
    try:
        return filename is not None and Path(filename).resolve() == path.resolve()
    except OSError:
        return False


def _import_error(path: Path, e: BaseException) -> UsageError:
    # Point at the user's line nearest the failure (the traceback's frames in their file), not at ours.
    lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if _same_file(frame.filename, path)]
    where = f"{path}:{lines[-1]}" if lines else str(path)
    text = " ".join(_exception_text(e).split())  # one line, whatever the message holds
    text = text if len(text) <= 300 else text[:300] + "..."
    return UsageError(f"{where}: importing the file raised {text}; fix the file and try again")


def _function(path: Path, name: str, fn: Callable[..., Any]) -> _Function:
    where = f"{path}: {name}()"
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise UsageError(f"{where}: cannot read its signature or type hints ({_exception_text(e)})") from None
    doc = _parse_doc(inspect.getdoc(fn) or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    enums: dict[str, type[enum.Enum]] = {}
    for pname, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            star = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise UsageError(f"{where}: a tool cannot take {star}{pname}, since the model passes named arguments; "
                             "give it named parameters instead")
        if param.kind is param.POSITIONAL_ONLY:
            raise UsageError(f"{where}: parameter {pname!r} is positional-only (before `/`), but the model passes "
                             "arguments by name; remove the `/`")
        hint = hints.get(pname, inspect.Parameter.empty)
        try:
            prop = {} if hint is inspect.Parameter.empty else _schema(hint)
        except TypeError as e:
            raise UsageError(f"{where}: parameter {pname!r} has type {e}, which has no JSON form; use {_SUPPORTED} "
                             "(or no type hint)") from None
        cls = _enum_class(hint)
        if cls is not None:
            enums[pname] = cls
        if pname in doc.params:
            prop["description"] = doc.params[pname]
        if param.default is inspect.Parameter.empty:
            required.append(pname)
        else:
            default = _json_value(param.default)
            if default is not _NO_JSON:
                prop["default"] = default
        properties[pname] = prop
    schema = {"type": "function", "function": {
        "name": name,
        "description": doc.description,
        "parameters": {"type": "object", "properties": properties, "required": required},
    }}
    return _Function(name, fn, signature, enums, schema)


@dataclass(frozen=True)
class _Doc:
    description: str
    params: dict[str, str]


def _parse_doc(text: str) -> _Doc:
    try:
        parsed = docstring_parser.parse(text)
    except docstring_parser.ParseError:  # a docstring that looks like a style but breaks it: keep it whole
        return _Doc(text.strip(), {})
    params = {p.arg_name: " ".join(p.description.split()) for p in parsed.params if p.description}
    return _Doc((parsed.description or "").strip(), params)


_NO_JSON = object()


def _json_value(value: Any) -> Any:
    """`value` as JSON data for a schema's default, or _NO_JSON when it has none (an object, a function)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return _NO_JSON


def _enum_class(hint: Any) -> type[enum.Enum] | None:
    """The Enum a parameter takes, itself or under Optional: the call turns its value back into a member."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if _is_union(hint):
        found = [a for a in typing.get_args(hint) if isinstance(a, type) and issubclass(a, enum.Enum)]
        if len(found) == 1:
            return found[0]
    return None


def _is_union(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _enum_schema(values: list[Any], what: Any) -> dict[str, Any]:
    if not all(isinstance(v, (str, int, float, bool)) or v is None for v in values):
        raise TypeError(_type_name(what))
    kinds = {_SCALARS[type(v)] for v in values}
    return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}


def _schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of a type hint; TypeError (naming the type) for one that has no JSON form."""
    if hint is Any or hint is object:
        return {}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema([m.value for m in hint], hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return _enum_schema(list(args), hint)
    if _is_union(hint):
        options = [a for a in args if a is not type(None)]
        nullable = len(options) < len(args)
        inner = [_schema(a) for a in options]
        if nullable and len(inner) == 1 and set(inner[0]) == {"type"} and isinstance(inner[0]["type"], str):
            return {"type": [inner[0]["type"], "null"]}  # the compact form, for plain scalars
        return {"anyOf": inner + ([{"type": "null"}] if nullable else [])}
    if hint in (list, tuple, collections.abc.Sequence):
        return {"type": "array"}
    if origin in (list, collections.abc.Sequence):
        return _with({"type": "array"}, "items", _schema(args[0]) if args else {})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _with({"type": "array"}, "items", _schema(args[0]))
        if args == ((),):  # tuple[()]
            return {"type": "array", "maxItems": 0}
        return {"type": "array", "prefixItems": [_schema(a) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if hint in (dict, collections.abc.Mapping):
        return {"type": "object"}
    if origin in (dict, collections.abc.Mapping):
        if args and args[0] is not str:
            raise TypeError(_type_name(hint) + " (JSON object keys are strings)")
        return _with({"type": "object"}, "additionalProperties", _schema(args[1]) if args else {})
    raise TypeError(_type_name(hint))


def _with(schema: dict[str, Any], key: str, inner: dict[str, Any]) -> dict[str, Any]:
    # An unconstrained part (list[Any]) says nothing: leave it out rather than write {}.
    return {**schema, key: inner} if inner else schema
