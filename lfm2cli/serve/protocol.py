"""The OpenAI API's shapes: request bodies checked field by field (a wrong type or value is a 400 naming the
field; unknown fields are ignored, as OpenAI does), and the responses and stream chunks built from a result.

Checks are written out here rather than left to a schema library so each message says what was wrong and what is
expected, and so the sampling values follow the one set of rules the command line and `/set` follow
(`lfm2cli.decoding.sampling.validate_setting`).
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lfm2cli.decoding.sampling import SamplingParams, validate_setting
from lfm2cli.errors import UsageError
from lfm2cli.reply.tool_specs import check_tools
from lfm2cli.reply.toolcalls import ParseError, ToolCall, format_calls
from lfm2cli.serve.errors import APIError, bad_request

if TYPE_CHECKING:  # the request checks run without torch, which runs.local brings
    from lfm2cli.runs.local import TokenScore

MAX_STOPS = 16
MAX_TOOLS = 128  # OpenAI's own limit; more only makes the template and the prompt huge
MAX_CHOICES = 8  # n: each choice is a sequence of its own, and eight fill the default --parallel
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, OpenAI's limit
MAX_LEGACY_LOGPROBS = 5  # completions' logprobs, OpenAI's limit
MAX_DEPTH = 64  # nesting of a body (and of tool-call arguments); OpenAI allows 5 levels in a schema
ROLES = ("system", "developer", "user", "assistant", "tool")
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "presence_penalty",
            "frequency_penalty", "logit_bias")
# Fields that would change the reply but are not implemented: a 400 naming the field unless the value is one that
# asks for nothing (an OpenAI field at its default, or an extension other servers take, left at "off").
# name -> (values that ask for nothing, what to do instead)
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "functions": ((), 'the legacy field is not supported; send tools: [{"type": "function", "function": {...}}]'),
    "function_call": ((), 'the legacy field is not supported; send tool_choice ("auto", "none", "required" or '
                          '{"type": "function", "function": {"name": ...}}) with tools'),
    "reasoning_effort": ((), "not supported; think_budget (a number of tokens) bounds a thinking model's reasoning"),
    "audio": ((), "not supported: this server runs a text model"),
    "modalities": ((["text"],), 'only ["text"] is supported: this server runs a text model'),
    "verbosity": ((), "not supported by this server"),
    "web_search_options": ((), "not supported: this server has no web search"),
    "min_tokens": ((0,), "not supported by this server"),
    "ignore_eos": ((False,), "not supported by this server"),
    "typical_p": ((1, 1.0), "not supported by this server"),
    "use_beam_search": ((False,), "not supported by this server"),
    "guided_json": ((), "not supported; send response_format: {\"type\": \"json_schema\", ...}"),
    "guided_regex": ((), "not supported by this server"),
    "guided_choice": ((), "not supported by this server"),
    "guided_grammar": ((), "not supported by this server"),
    "grammar": ((), "not supported by this server"),
    "json_schema": ((), "not supported; send response_format: {\"type\": \"json_schema\", ...}"),
    "chat_template_kwargs": (({},), "not supported by this server"),
}
# OpenAI fields that leave the reply as it is, so they are accepted without effect (see docs/serving.md):
# user, metadata, store, service_tier, safety_identifier, prompt_cache_key, prediction.


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", type(None): "null", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _path(chain: tuple[Any, ...] | None, root: str) -> str:
    """`messages[0].content` from the linked keys `(((None, "messages"), 0), "content")`; a path into deep
    nesting is cut short after its first keys (they and the depth say enough)."""
    keys: list[Any] = []
    while chain is not None:
        chain, key = chain
        keys.append(key)
    keys.reverse()
    out = root
    for key in keys[:10]:
        if isinstance(key, int):
            out += f"[{key}]"
        elif key.isidentifier() and key.isascii():
            out += f".{key}" if out else key
        else:
            shown = json.dumps(key)  # escapes whatever could not be shown or encoded
            out += f"[{shown if len(shown) <= 40 else shown[:36] + '...' + chr(34)}]"
    return out + (f"...({len(keys) - 10} levels more)" if len(keys) > 10 else "")


def _check_text(text: str, chain: tuple[Any, ...] | None, root: str) -> None:
    if not text.isascii() and (bad := _SURROGATE.search(text)):
        where = _path(chain, root)
        raise bad_request(f"{where or 'the request body'}: contains a lone surrogate ({json.dumps(bad[0])[1:-1]}) at "
                          f"character {bad.start()}; text must be valid Unicode", where or None)


def check_tree(value: Any, root: str = "", max_depth: int = MAX_DEPTH) -> None:
    """A 400 naming the first place in a parsed JSON value that no later step can take: nesting deeper than
    `max_depth` (templates, grammars and the call formatter recurse) or a string with a lone surrogate (a `\\ud800`
    escape: it cannot be encoded, so the tokenizer and every reply would fail on it). Iterative, with one iterator
    per level: any depth is safe and a list of a million items costs nothing extra; a path is only spelled out for
    the error."""
    if isinstance(value, str):
        _check_text(value, None, root)
    if not isinstance(value, (dict, list)):
        return
    stack: list[tuple[Any, Any]] = [(iter(value.items()) if isinstance(value, dict) else enumerate(value), None)]
    while stack:
        children, chain = stack[-1]
        for key, child in children:
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                where = _path(chain, root)
                raise bad_request(f"{where or 'the request body'}: a key contains a lone surrogate; text must be "
                                  "valid Unicode", where or None)
            if isinstance(child, str):
                _check_text(child, (chain, key), root)
            elif isinstance(child, (dict, list)):
                if len(stack) >= max_depth:
                    where = _path((chain, key), root)
                    raise bad_request(f"{where}: nested more than {max_depth} levels deep", where)
                if child:
                    stack.append((iter(child.items()) if isinstance(child, dict) else enumerate(child), (chain, key)))
                    break  # the child's items next; this level goes on where it stopped
        else:
            stack.pop()


def _wrong(param: str, expected: str, value: Any) -> APIError:
    return bad_request(f"{param}: expected {expected}, got {json_kind(value)}", param)


def _opt(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], expected: str) -> Any:
    """`body[name]` when present and not null; a 400 when it has another type (bool is never a number)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                   else (kind,))):
        raise _wrong(name, expected, value)
    return value


@dataclass
class Generation:
    """What every request asks of the sampler: settings, the length cap (None: the server's default) and stops."""

    params: SamplingParams
    max_tokens: int | None = None
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # the reply's logprobs with this many most likely tokens each; None: not asked
    n: int = 1  # choices: each generated as a sequence of its own


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]  # as the chat template takes them
    gen: Generation
    tools: list[dict[str, Any]] | None = None  # None: no tools offered
    tool_choice: str = "auto"  # auto, none, required, or a function's name
    response_format: str = "text"  # text, json_object or json_schema
    schema: dict[str, Any] | None = None
    think_budget: int | None = None
    parallel_tool_calls: bool = True  # false: at most one call a reply


@dataclass
class CompletionRequest:
    model: str | None
    prompt: str | list[int]
    gen: Generation


def _generation(body: Mapping[str, Any], default_params: SamplingParams) -> Generation:
    values = default_params.to_dict()
    for name in SAMPLING:
        if body.get(name) is not None:
            try:
                values[name] = validate_setting(name, body[name])
            except UsageError as e:
                raise bad_request(str(e), name) from None
    params = SamplingParams.from_dict(values)
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
        if body.get(name) is not None:
            try:
                max_tokens = validate_setting("max_tokens", body[name], label=name)
            except UsageError as e:
                raise bad_request(str(e), name) from None
    stop = body.get("stop")
    stops: list[str] = []
    if isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list):
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
            raise bad_request(f"stop: expected a string or a list of at most {MAX_STOPS} strings", "stop")
        stops = list(stop)
    elif stop is not None:
        raise _wrong("stop", "a string or a list of strings", stop)
    if any(not s for s in stops):
        raise bad_request("stop: a stop string cannot be empty", "stop")
    stream = bool(_opt(body, "stream", bool, "a boolean"))
    options = _opt(body, "stream_options", dict, "an object")
    include_usage = False
    if options is not None:
        include_usage = bool(_opt(options, "include_usage", bool, "a boolean"))
    n = _opt(body, "n", int, "an integer")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n: expected 1 to {MAX_CHOICES} choices per request", "n")
    return Generation(params, max_tokens, stops, stream, include_usage, n=n or 1)


def _refuse_unsupported(body: Mapping[str, Any], names: tuple[str, ...] | None = None) -> None:
    """A 400 naming the first field of `_UNSUPPORTED` (or of `names` among them) that asks for something."""
    for name in names or tuple(_UNSUPPORTED):
        value = body.get(name)
        off, instead = _UNSUPPORTED[name]
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in off):
            raise bad_request(f"{name}: {instead}", name)


def _model(body: Mapping[str, Any]) -> str | None:
    return _opt(body, "model", str, "a string (a model id from GET /v1/models)")


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for n, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else json_kind(part)
                raise bad_request(f"{where}[{n}]: only text parts are supported (got {kind!r}); this server runs "
                                  "a text model", where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise _wrong(where, "a string or a list of text parts", content)


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _wrong(where, "an object with role and content", m)
    role = m.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
    content = m.get("content")
    calls: list[ToolCall] = []
    if role == "assistant" and m.get("tool_calls") is not None:
        raw = m["tool_calls"]
        if not isinstance(raw, list):
            raise _wrong(f"{where}.tool_calls", "a list of tool calls", raw)
        for n, entry in enumerate(raw):
            try:
                call = ToolCall.from_openai(entry)
            except ParseError as e:
                raise bad_request(f"{where}.tool_calls[{n}]: {e}", f"{where}.tool_calls") from None
            except RecursionError:  # arguments as a JSON string nested beyond what the parser takes
                raise bad_request(f"{where}.tool_calls[{n}].function.arguments: nested too deeply",
                                  f"{where}.tool_calls") from None
            # the arguments came as a JSON string: what it holds is checked like the body (the template and
            # the call formatter recurse into it)
            check_tree(call.arguments, f"{where}.tool_calls[{n}].function.arguments")
            calls.append(call)
    if content is None and not calls:
        raise bad_request(f"{where}.content: required for a {role} message", f"{where}.content")
    text = "" if content is None else _text(content, f"{where}.content")
    if calls:
        # LFM2's templates take the reply as text: the call block as the model writes it, after any prose
        text += format_calls(calls)
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
    for key in ("name", "tool_call_id", "reasoning_content"):
        value = m.get(key)
        if value is not None and not isinstance(value, str):
            raise _wrong(f"{where}.{key}", "a string", value)
        if value is not None and (key != "reasoning_content" or role == "assistant"):
            out[key] = value
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str:
    if value is None:
        return "auto"
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise bad_request(f"tool_choice: expected auto, none, required or {{\"type\": \"function\", "
                              f"\"function\": {{\"name\": ...}}}}, got {value!r}", "tool_choice")
        choice = value
    elif isinstance(value, dict) and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str) and value.get("type", "function") == "function":
        choice = value["function"]["name"]
        names = [t.get("function", t).get("name") for t in tools or []]
        if choice not in names:
            raise bad_request(f"tool_choice: no tool named {choice!r} in tools", "tool_choice")
    else:
        raise _wrong("tool_choice", 'auto, none, required or {"type": "function", "function": {"name": ...}}',
                     value)
    if choice not in ("auto", "none") and not tools:
        raise bad_request(f"tool_choice {choice}: needs tools to call", "tool_choice")
    return choice


def _response_format(value: Any) -> tuple[str, dict[str, Any] | None]:
    if value is None:
        return "text", None
    if not isinstance(value, dict):
        raise _wrong("response_format", 'an object like {"type": "json_object"}', value)
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return kind, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request('response_format.json_schema: expected an object {"name": ..., "schema": {...}}',
                              "response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise _wrong("response_format.json_schema.schema", "a JSON schema object", schema)
        return kind, schema
    raise bad_request(f"response_format.type: expected text, json_object or json_schema, got {kind!r}",
                      "response_format")


def _count(body: Mapping[str, Any], name: str, most: int) -> int | None:
    value = _opt(body, name, int, f"a whole number from 0 to {most}")
    if value is not None and not 0 <= value <= most:
        raise bad_request(f"{name}: expected a whole number from 0 to {most}, got {value}", name)
    return value


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """logprobs (a boolean) and top_logprobs (0 to 20, only with logprobs) -> how many top tokens, or None."""
    top = _count(body, "top_logprobs", MAX_TOP_LOGPROBS)
    if not _opt(body, "logprobs", bool, "a boolean"):
        if top:
            raise bad_request("top_logprobs: needs logprobs: true", "top_logprobs")
        return None
    return top or 0


def parse_chat(body: Any, default_params: SamplingParams) -> ChatRequest:
    """A chat completions body -> ChatRequest; APIError (400) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {json_kind(body)}")
    check_tree(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        if messages is None:
            raise bad_request("messages: required (a list of {\"role\": ..., \"content\": ...})", "messages")
        raise _wrong("messages", "a non-empty list of messages", messages)
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    _refuse_unsupported(body)
    gen = _generation(body, default_params)
    gen.logprobs = _chat_logprobs(body)
    tools = body.get("tools")
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise bad_request(f"tools: {len(tools)} tools are too many; this server takes at most {MAX_TOOLS} a "
                          "request (send the ones this turn may need)", "tools", code="too_many_tools")
    if tools is not None:
        try:
            tools = check_tools(tools)
        except ValueError as e:
            raise bad_request(f"tools: {e}", "tools") from None
        tools = tools or None  # an empty list offers nothing
    choice = _tool_choice(body.get("tool_choice"), tools)
    fmt, schema = _response_format(body.get("response_format"))
    if choice not in ("auto", "none") and fmt != "text":
        raise bad_request(f"tool_choice {choice} makes the reply a tool call; it cannot also follow "
                          "response_format: drop one", "tool_choice")
    budget = _opt(body, "think_budget", int, "a number of tokens")
    if budget is not None and budget < 0:
        raise bad_request("think_budget: expected a number of tokens >= 0", "think_budget")
    parallel = _opt(body, "parallel_tool_calls", bool, "a boolean")
    return ChatRequest(model, msgs, gen, tools, choice, fmt, schema, budget, parallel is not False)


def parse_completion(body: Any, default_params: SamplingParams) -> CompletionRequest:
    """A (legacy) completions body -> CompletionRequest: the prompt is a string (or one in a list) or token ids."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {json_kind(body)}")
    check_tree(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass  # token ids; their range is checked against the vocabulary later
    elif isinstance(prompt, list):
        raise bad_request("prompt: expected a string, a list of one string, or a list of token ids (one prompt "
                          "per request)", "prompt")
    elif not isinstance(prompt, str):
        if prompt is None:
            raise bad_request("prompt: required", "prompt")
        raise _wrong("prompt", "a string or a list of token ids", prompt)
    if not prompt:
        raise bad_request("prompt: empty", "prompt")
    if _opt(body, "echo", bool, "a boolean"):
        raise bad_request("echo: not supported by this server", "echo")
    if body.get("suffix") is not None:
        raise bad_request("suffix: not supported by this server", "suffix")
    best_of = _opt(body, "best_of", int, "an integer")
    if best_of is not None and best_of != 1:
        raise bad_request("best_of: only 1 is supported", "best_of")
    _refuse_unsupported(body, ("min_tokens", "ignore_eos", "typical_p", "use_beam_search", "guided_json",
                               "guided_regex", "guided_choice", "guided_grammar", "grammar", "json_schema"))
    gen = _generation(body, default_params)
    gen.logprobs = _count(body, "logprobs", MAX_LEGACY_LOGPROBS)
    return CompletionRequest(model, prompt, gen)


# ---------------------------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt: int, cached: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens` are prompt tokens the server did not prefill again."""
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def tool_call_entries(calls: list[ToolCall], streamed: bool = False) -> list[dict[str, Any]]:
    """`tool_calls` as OpenAI sends them; a stream's entries also carry their index."""
    entries = [call.to_openai() for call in calls]
    if streamed:
        entries = [{"index": i, **e} for i, e in enumerate(entries)]
    return entries


def _scored(s: TokenScore) -> dict[str, Any]:
    return {"token": s.text, "logprob": s.logprob, "bytes": list(s.bytes)}


def chat_logprobs(scores: list[TokenScore] | None) -> dict[str, Any] | None:
    """A chat choice's `logprobs`: one entry per token of the content; None when they were not asked for."""
    if scores is None:
        return None
    return {"content": [{**_scored(s), "top_logprobs": [_scored(t) for t in s.top]} for s in scores],
            "refusal": None}


class TextOffsets:
    """Where each token's text starts in a completion, in characters: the tokens' bytes decoded as they come, so
    a character split over tokens counts once. One per completion (a stream's chunks go on where the last ended)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0

    def __call__(self, s: TokenScore) -> int:
        start = self.offset
        self.offset += len(self.decoder.decode(s.bytes))
        return start


def completion_logprobs(scores: list[TokenScore] | None, offsets: TextOffsets | None = None
                        ) -> dict[str, Any] | None:
    """A completion choice's legacy `logprobs`. `top_logprobs` also holds the chosen token, as OpenAI's did."""
    if scores is None:
        return None
    offsets = offsets or TextOffsets()
    return {"tokens": [s.text for s in scores], "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [{t.text: t.logprob for t in [*s.top, s]} for s in scores],
            "text_offset": [offsets(s) for s in scores]}


@dataclass
class Envelope:
    """What every response and chunk of one request shares."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def chat(self, message: dict[str, Any], finish_reason: str | None, use: dict[str, Any],
             logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
                "usage": use}

    def chat_chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
                   use: dict[str, Any] | None = None, with_usage: bool = False,
                   logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One chunk; `delta` None makes the usage-only chunk (no choices) that ends an include_usage stream."""
        chunk: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model}
        chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                      "finish_reason": finish_reason}]
        if with_usage:
            chunk["usage"] = use
        return chunk

    def completion(self, text: str | None, finish_reason: str | None, use: dict[str, Any] | None = None,
                   with_usage: bool = True, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model}
        out["choices"] = [] if text is None else [{"index": 0, "text": text, "logprobs": logprobs,
                                                   "finish_reason": finish_reason}]
        if with_usage:
            out["usage"] = use
        return out
