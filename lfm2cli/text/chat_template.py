"""Render a model's Jinja chat template exactly as Hugging Face's `apply_chat_template` does.

The environment (sandbox, whitespace control, extensions, filters and globals) reproduces what the
hub's templates are written against, so the prompt the model sees is byte-identical to the one it was
trained with. Without a template we write the LFM2 format directly."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from lfm2cli.errors import CheckpointError, GenerationError, TemplateError, UsageError
from lfm2cli.text.template_sandbox import (
    BUDGET,
    MAX_CHARS,
    Budget,
    LimitExceeded,
    environment,
    text_size,
    tojson,
)

LFM2_BOS = "<|startoftext|>"
# Tools are listed in the prompt, so they have to fit a context (128k tokens is ~0.5 MB of text); OpenAI takes 128.
MAX_TOOLS = 512
MAX_TOOLS_CHARS = 1_000_000

# Older names for a message's reasoning; templates read `reasoning_content` (or `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _where(source: str | None) -> str:
    return f"the chat template in {source}" if source else "the model's chat template"


_ADVICE = "fix or remove it (`lfm2 generate --raw` sends a prompt without any template)"


@lru_cache(maxsize=16)
def compile_template(template: str, source: str | None = None) -> Any:
    """Compile once per distinct template text; a syntax error is the checkpoint's fault. `source` names the
    file the template came from, for messages."""
    import jinja2

    # Compiling evaluates filters on constants (`'x' | center(10**9)` written out): under a budget too.
    token = BUDGET.set(Budget(MAX_CHARS))
    try:
        return environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(
            f"{_where(source)} is invalid (line {e.lineno}: {_one_line(e.message or str(e))}); "
            f"fix or remove {source or 'chat_template in the checkpoint'}"
        ) from None
    finally:
        BUDGET.reset(token)


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


def tools_problem(tools: list) -> str | None:
    """What makes `tools` too many or too large to list in a prompt, or None. Checked before any template sees
    them, so the message blames the tools and not the template that would have choked on them."""
    if len(tools) > MAX_TOOLS:
        return f"{len(tools):,} tools are too many to offer the model (at most {MAX_TOOLS}); offer fewer"
    size = text_size(tools, MAX_TOOLS_CHARS)
    if size > MAX_TOOLS_CHARS:
        return (f"the tools are too large to list in a prompt (more than {MAX_TOOLS_CHARS:,} characters); offer "
                "fewer tools or shorter descriptions")
    return None


def _prepare_tools(tools: list | None) -> list | None:
    if tools is None:
        return None
    problem = tools_problem(list(tools))
    if problem is not None:
        raise UsageError(problem)
    for t in tools:
        if not isinstance(t, (Mapping, str)):
            raise UsageError("each tool must be a JSON-schema object (a dict) or a JSON string")
    return _plain(list(tools))


def _fallback(messages: list[dict], bos_token: str | None, add_generation_prompt: bool, tools: list | None) -> str:
    """The LFM2 chat format, for checkpoints that ship no template."""

    def text(content: Any) -> str:
        return content if isinstance(content, str) else tojson(content)

    parts = [bos_token if bos_token is not None else LFM2_BOS]
    system = ""
    if messages[0].get("role") == "system":
        system = text(messages[0].get("content", ""))
        messages = messages[1:]
    if tools:
        listed = ", ".join(t if isinstance(t, str) else tojson(t) for t in tools)
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
           add_generation_prompt: bool = True, tools: list | None = None, template_source: str | None = None,
           **kwargs: Any) -> str:
    """Render `messages` (dicts with role/content) into the prompt text the model continues.

    Extra keyword arguments become template variables (e.g. `keep_past_thinking=True` for LFM2.5).
    `template_source` names the file the template came from, for messages. The template runs in a worker
    process (`template_worker`) under a budget of time, steps, sizes and memory (see TIME_LIMIT_S and below);
    running out raises TemplateError."""
    from lfm2cli.text import template_worker

    msgs = _prepare_messages(messages)
    tool_list = _prepare_tools(tools)
    if template is None:
        return _fallback(msgs, bos_token, add_generation_prompt, tool_list)
    variables: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token}
    variables = {k: v for k, v in variables.items() if v is not None}
    variables.update(_plain(kwargs))
    variables.update(messages=msgs, tools=tool_list, add_generation_prompt=add_generation_prompt)
    variables.setdefault("documents", None)
    return template_worker.render(template, template_source, variables)


def render_here(template: str, template_source: str | None, variables: dict[str, Any]) -> str:
    """`template` rendered with `variables` in this process, under the sandbox's budget: what the worker runs."""
    import jinja2

    where, advice = _where(template_source), _ADVICE
    # A long conversation may rightly make a long prompt: the size limits grow with what the template is given.
    budget = Budget(MAX_CHARS + 2 * text_size(variables, 10 * MAX_CHARS))
    try:
        compiled = compile_template(template, template_source)
        token = BUDGET.set(budget)
        try:
            parts, size = [], 0
            for part in compiled.generate(**variables):
                size += len(part)
                budget.check(size, "a prompt")
                parts.append(part)
            text = "".join(parts)
        finally:
            BUDGET.reset(token)
    except LimitExceeded as e:
        raise TemplateError(f"{where} {e}; {advice}") from None
    except RecursionError:
        raise TemplateError(f"{where} made calls nested too deep (a macro that calls itself?); {advice}") from None
    except MemoryError:
        raise TemplateError(f"{where} needed more memory than a chat template may use; {advice}") from None
    except jinja2.exceptions.SecurityError as e:
        raise GenerationError(f"{where} tried something unsafe: {_one_line(str(e))}") from None
    except jinja2.exceptions.TemplateError as e:
        # raise_exception() in a template is how it rejects a conversation (e.g. roles out of order).
        raise GenerationError(f"{where} rejected the conversation: {_one_line(str(e))}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise GenerationError(f"{where} failed on this conversation: {_one_line(str(e))}") from None
    if not text:
        # Tokenized, an empty prompt would be blamed on the user's prompt: the template made it empty.
        raise TemplateError(f"{where} rendered nothing for this conversation; {advice}")
    return text
