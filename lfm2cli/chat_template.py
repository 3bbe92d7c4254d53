"""Render a model's Jinja chat template exactly as Hugging Face's `apply_chat_template` does.

The environment (sandbox, whitespace control, extensions, filters and globals) reproduces what the
hub's templates are written against, so the prompt the model sees is byte-identical to the one it was
trained with. Without a template we write the LFM2 format directly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from lfm2cli.errors import CheckpointError, GenerationError, UsageError

LFM2_BOS = "<|startoftext|>"

# Older names for a message's reasoning; templates read `reasoning_content` (or `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes `<`, `>` and `&` and sorts keys; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

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

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _make_dict
    env.globals["namespace"] = SafeNamespace
    return env


@lru_cache(maxsize=16)
def compile_template(template: str) -> Any:
    """Compile once per distinct template text; a syntax error is the checkpoint's fault."""
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(
            f"the model's chat template is invalid (line {e.lineno}: {_one_line(e.message or str(e))}); "
            "fix or remove chat_template in the checkpoint"
        ) from None


def _plain(value: Any) -> Any:
    """Deep copy into plain JSON-like types, so the template never sees (or touches) caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    if not messages:
        raise GenerationError("there are no messages to send to the model")
    prepared = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise UsageError(f"a chat message must be a mapping with role and content, not {type(m).__name__}")
        # API-style `content: None` is treated as an absent key, as Hugging Face does.
        m = {k: v for k, v in _plain(m).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        prepared.append(m)
    return prepared


def _prepare_tools(tools: list | None) -> list | None:
    if tools is None:
        return None
    for t in tools:
        if not isinstance(t, (Mapping, str)):
            raise UsageError("each tool must be a JSON-schema object (a dict) or a JSON string")
    return _plain(list(tools))


def _fallback(messages: list[dict], bos_token: str | None, add_generation_prompt: bool, tools: list | None) -> str:
    """The LFM2 chat format, for checkpoints that ship no template."""

    def text(content: Any) -> str:
        return content if isinstance(content, str) else _tojson(content)

    parts = [bos_token if bos_token is not None else LFM2_BOS]
    system = ""
    if messages[0].get("role") == "system":
        system = text(messages[0].get("content", ""))
        messages = messages[1:]
    if tools:
        listed = ", ".join(t if isinstance(t, str) else _tojson(t) for t in tools)
        system += ("\n" if system else "") + f"List of tools: <|tool_list_start|>[{listed}]<|tool_list_end|>"
    if system:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        role, body = m.get("role", ""), text(m.get("content", ""))
        if role == "tool":
            body = f"<|tool_response_start|>{body}<|tool_response_end|>"
        parts.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def render(template: str | None, messages: list[dict], *, bos_token: str | None, eos_token: str | None,
           add_generation_prompt: bool = True, tools: list | None = None, **kwargs: Any) -> str:
    """Render `messages` (dicts with role/content) into the prompt text the model continues.

    Extra keyword arguments become template variables (e.g. `keep_past_thinking=True` for LFM2.5)."""
    import jinja2

    msgs = _prepare_messages(messages)
    tool_list = _prepare_tools(tools)
    if template is None:
        return _fallback(msgs, bos_token, add_generation_prompt, tool_list)
    compiled = compile_template(template)
    variables: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token}
    variables = {k: v for k, v in variables.items() if v is not None}
    variables.update(_plain(kwargs))
    variables.update(messages=msgs, tools=tool_list, add_generation_prompt=add_generation_prompt)
    variables.setdefault("documents", None)
    try:
        return compiled.render(**variables)
    except jinja2.exceptions.SecurityError as e:
        raise GenerationError(f"the chat template tried something unsafe: {_one_line(str(e))}") from None
    except jinja2.exceptions.TemplateError as e:
        # raise_exception() in a template is how it rejects a conversation (e.g. roles out of order).
        raise GenerationError(f"the chat template rejected the conversation: {_one_line(str(e))}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise GenerationError(f"the chat template failed on this conversation: {_one_line(str(e))}") from None
