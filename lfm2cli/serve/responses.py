"""The OpenAI Responses API (`POST /v1/responses`): a request becomes the chat request it amounts to (one
generation path: the engine's chat job), and the job's result and events become Responses output items and stream
events.

- `input` is a string or a list of items: messages (text content parts), `function_call` and
  `function_call_output` items (a tool loop sent back whole), `reasoning` items (dropped: LFM2's templates drop past
  reasoning too). `instructions` becomes the first system message.
- Nothing is stored: `previous_response_id` and `conversation` are refused (send the whole conversation as input);
  `store` is accepted and has no effect.
- A thinking model's reasoning is a `reasoning` item (its text as `reasoning_text` content) before the message.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.decoding.sampling import SamplingParams, validate_setting
from lfm2cli.errors import UsageError
from lfm2cli.reply.thinking import Reasoning
from lfm2cli.serve.errors import APIError, bad_request
from lfm2cli.serve.protocol import SAMPLING, ChatRequest, Generation, check_tree, json_kind, parse_chat

PART_TYPES = ("input_text", "output_text", "text")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
# Responses fields that would change the reply but are not implemented: name -> (values asking nothing, instead)
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "previous_response_id": ((), "not supported: this server stores no responses; send the whole conversation "
                                 "as input"),
    "conversation": ((), "not supported: this server stores no conversations; send the whole conversation as input"),
    "background": ((False,), "not supported by this server"),
    "include": (([],), "not supported by this server"),
    "reasoning": (({},), "not supported; think_budget (a number of tokens) bounds a thinking model's reasoning"),
    "truncation": (("disabled",), 'only "disabled" is supported: a conversation that does not fit is refused'),
    "top_logprobs": ((0,), "not supported on /v1/responses; /v1/chat/completions reports logprobs"),
    "max_tool_calls": ((), "not supported; parallel_tool_calls: false allows one call a reply"),
    "prompt": ((), "not supported: this server stores no prompt templates"),
}


def new_item_id(prefix: str) -> str:
    """An id in the Responses API's form: `resp_...`, `msg_...`, `fc_...`."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class ResponsesRequest:
    """A Responses body as the chat request it amounts to, plus what the response object echoes back."""

    chat: ChatRequest
    echo: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str | None:
        return self.chat.model

    @property
    def gen(self) -> Generation:
        return self.chat.gen


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, (off, instead) in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in off):
            raise bad_request(f"{name}: {instead}", name)


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text, output_text) joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: expected a string or a list of input_text parts, got {json_kind(content)}", where)
    texts = []
    for n, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else json_kind(part)
        if kind not in PART_TYPES or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{n}]: only text parts are supported (got {kind!r}); this server runs a text "
                              "model", where)
        texts.append(part["text"])
    return "\n".join(texts)


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key}: expected a string, got {json_kind(value)}", f"{where}.{key}")
    return value


def _item(item: Any, i: int, messages: list[dict[str, Any]], names: dict[str, str]) -> None:
    """One input item appended to `messages` in the chat shape; `names`: call id -> function name, for the
    outputs that answer them."""
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad_request(f"{where}: expected an object (a message or an item), got {json_kind(item)}", where)
    kind = item.get("type", "message")
    last = messages[-1] if messages else None
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise bad_request(f"{where}.role: expected user, system, developer or assistant, got {role!r}",
                              f"{where}.role")
        messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        name, call_id = _string(item, "name", where), _string(item, "call_id", where)
        names[call_id] = name
        call = {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": _string(item, "arguments", where)}}
        if last is not None and last["role"] == "assistant":  # one turn: its text, then its calls
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id = _string(item, "call_id", where)
        output = _text(item.get("output"), f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": call_id, "content": output,
                         **({"name": names[call_id]} if call_id in names else {})})
    elif kind != "reasoning":
        raise bad_request(f"{where}.type: expected one of {', '.join(ITEM_TYPES)}, got {kind!r}", f"{where}.type")


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request(f"instructions: expected a string, got {json_kind(instructions)}", "instructions")
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        names: dict[str, str] = {}
        for i, item in enumerate(given):
            _item(item, i, messages, names)
    elif given is None:
        raise bad_request("input: required (a string, or a list of messages and items)", "input")
    else:
        raise bad_request(f"input: expected a string or a non-empty list of items, got {json_kind(given)}", "input")
    if not any(m["role"] != "system" for m in messages):
        raise bad_request("input: holds no message to answer", "input")
    return messages


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """Responses' function tools ({type, name, description, parameters}) in chat's nesting."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request(f"tools: expected a list of function tools, got {json_kind(value)}", "tools")
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else json_kind(tool)
        if kind != "function":
            raise bad_request(f"tools[{i}].type: only function tools are supported (got {kind!r}); this server has "
                              "no built-in tools", f"tools[{i}].type")
        spec = tool["function"] if isinstance(tool.get("function"), dict) else {
            k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": spec})
    return out


def _tool_choice(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise bad_request('tool_choice: expected auto, none, required or {"type": "function", "name": ...}',
                      "tool_choice")


def _format(text: Any) -> dict[str, Any] | None:
    """text.format as chat's response_format."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request(f"text: expected an object like {{\"format\": {{...}}}}, got {json_kind(text)}", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = fmt.get("schema", {"type": "object"})
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), "schema": schema}}
    raise bad_request("text.format: expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": "
                      "\"json_schema\", \"name\": ..., \"schema\": {...}}", "text.format")


def parse_responses(body: Any, default_params: SamplingParams) -> ResponsesRequest:
    """A Responses body -> the chat request it amounts to; APIError (400) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {json_kind(body)}")
    check_tree(body)  # what is echoed back must be encodable too
    _refuse_unsupported(body)
    chat: dict[str, Any] = {"messages": _messages(body), "tools": _tools(body.get("tools")),
                            "tool_choice": _tool_choice(body.get("tool_choice")),
                            "response_format": _format(body.get("text"))}
    for name in (*SAMPLING, "model", "stream", "parallel_tool_calls", "think_budget"):
        chat[name] = body.get(name)
    if body.get("max_output_tokens") is not None:
        try:
            chat["max_tokens"] = validate_setting("max_tokens", body["max_output_tokens"], label="max_output_tokens")
        except UsageError as e:
            raise bad_request(str(e), "max_output_tokens") from None
    try:
        req = parse_chat(chat, default_params)
    except APIError as e:
        param = e.param or ""
        if param.startswith("response_format"):
            raise bad_request(e.message.replace("response_format", "text.format"), "text.format") from None
        if not param.startswith("messages"):
            raise
        raise bad_request(f"input: {e.message} (input as chat messages, instructions first)", "input") from None
    echo = {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "metadata": body.get("metadata") or {}}
    return ResponsesRequest(req, echo)


# ---------------------------------------------------------------------------------------------------------------
# Output


def _usage(result: Any) -> dict[str, Any]:
    return {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": result.cached_tokens},
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text)]}


def _reasoning(item_id: str, text: str | None) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}


def _calls(result: Any) -> list[dict[str, Any]]:
    items = []
    for call in result.tool_calls:
        entry = call.to_openai()
        items.append({"id": new_item_id("fc"), "type": "function_call", "status": "completed", "call_id": entry["id"],
                      "name": call.name, "arguments": entry["function"]["arguments"]})
    return items


@dataclass
class ResponseShape:
    """What one request's response object holds besides its output."""

    req: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: new_item_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], result: Any = None) -> dict[str, Any]:
        params = self.req.chat.gen.params
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": None, "model": self.model, "output": output,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "parallel_tool_calls": self.req.chat.parallel_tool_calls, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": params.temperature, "top_p": params.top_p, "truncation": "disabled",
                "usage": None if result is None else _usage(result), **self.req.echo}

    def finished(self, result: Any) -> dict[str, Any]:
        """The whole response of a finished job."""
        status = "incomplete" if result.finish_reason == "length" else "completed"
        output = [_reasoning(new_item_id("rs"), result.reasoning)] if result.reasoning else []
        if result.text or not result.tool_calls:
            output.append(_message(new_item_id("msg"), result.text, status))
        return self.response(status, output + _calls(result), result)


class ResponseEvents:
    """A stream's events, in the order OpenAI sends them: response.created and .in_progress, then each output
    item opened (output_item.added, content_part.added), its text deltas, and closed (.done events), the
    function calls whole at the end, and response.completed (or .incomplete, cut by max_output_tokens)."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item whose text is streaming
        self.text = ""

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def head(self) -> list[dict[str, Any]]:
        opening = self.shape.response("in_progress", [])
        return [self._event("response.created", response=opening),
                self._event("response.in_progress", response=opening)]

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output), "content_index": 0}

    def _start(self, item: dict[str, Any], part: dict[str, Any]) -> list[dict[str, Any]]:
        self.open, self.text = item, ""
        return [self._event("response.output_item.added", output_index=len(self.output), item=item),
                self._event("response.content_part.added", part=part, **self._where())]

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, where = self.open, self._where()
        assert item is not None
        if item["type"] == "reasoning":
            done, part = item | {"content": [{"type": "reasoning_text", "text": self.text}]}, "reasoning_text"
            events = [self._event("response.reasoning_text.done", text=self.text, **where)]
        else:
            done, part = _message(item["id"], self.text, status), "output_text"
            events = [self._event("response.output_text.done", text=self.text, logprobs=[], **where)]
        events += [self._event("response.content_part.done", part=done["content"][0], **where),
                   self._event("response.output_item.done", output_index=len(self.output), item=done)]
        assert done["content"][0]["type"] == part
        self.output.append(done)
        self.open = None
        return events

    def render(self, event: Any) -> list[dict[str, Any]]:
        """The events for one of the job's events: a text piece, or the end."""
        if isinstance(event, str):
            kind = "reasoning" if isinstance(event, Reasoning) else "message"
            out = []
            if self.open is not None and self.open["type"] != kind:
                out += self._close("completed")
            if self.open is None:
                out += (self._start(_reasoning(new_item_id("rs"), None), {"type": "reasoning_text", "text": ""})
                        if kind == "reasoning" else
                        self._start(_message(new_item_id("msg"), None, "in_progress"), _text_part("")))
            self.text += event
            delta = {"delta": str(event), **self._where()}
            out.append(self._event("response.reasoning_text.delta", **delta) if kind == "reasoning" else
                       self._event("response.output_text.delta", logprobs=[], **delta))
            return out
        return self._end(event.result)

    def _end(self, result: Any) -> list[dict[str, Any]]:
        status = "incomplete" if result.finish_reason == "length" else "completed"
        out = self._close(status) if self.open is not None else []
        if not result.tool_calls and not any(item["type"] == "message" for item in self.output):
            out += self._start(_message(new_item_id("msg"), None, "in_progress"), _text_part("")) + self._close(status)
        for item in _calls(result):
            index = len(self.output)
            out += [self._event("response.output_item.added", output_index=index, item=item | {"arguments": ""}),
                    self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=item["arguments"]),
                    self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
            self.output.append(item)
        final = self.shape.response(status, self.output, result)
        out.append(self._event(f"response.{status}", response=final))
        return out
