"""Generation by a remote OpenAI-compatible server (`--endpoint`: vLLM, SGLang, another `lfm2 serve`), with the
same pieces a local `TextRun` yields: `Reasoning` and `Answer` text, tool calls and stats. The HTTP is the
`openai` package's; every failure of it becomes one `RemoteError` line naming the endpoint."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.decoding.loop import GenerationStats
from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.errors import Lfm2Error, UsageError
from lfm2cli.reply.thinking import Answer, Reasoning, ThinkingSplitter
from lfm2cli.reply.toolcalls import TOOL_CALL_START, Calls, ParseError, ToolCall, ToolCallStream, Unparsed, loads_json
from lfm2cli.text.stops import StopMatcher

TIMEOUT_S = 600.0  # a long reply from a busy cluster is normal; a dead connection still fails at connect
# A server that ignores max_tokens is cut off here: at most this many characters a token (LFM2's longest tokens
# are far shorter), and a few chunks beyond max_tokens for the role, finish and usage chunks.
TOKEN_CHARS, SPARE_CHUNKS = 128, 8


class RemoteError(Lfm2Error):
    """The endpoint could not be reached or refused the request."""


def _client(url: str, api_key: str | None) -> Any:
    try:
        import openai
    except ImportError:
        raise UsageError("--endpoint needs the openai package: pip install openai") from None
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--endpoint {url}: expected an http:// or https:// URL, such as http://127.0.0.1:8000/v1")
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"  # servers mount the API under /v1; users often give just host:port
    # servers that need no key still need the header to be well formed
    return openai.OpenAI(base_url=base, api_key=api_key or "none", timeout=TIMEOUT_S, max_retries=1)


def _explain(e: BaseException, url: str) -> RemoteError:
    """One line for anything the client raised."""
    import openai

    if isinstance(e, openai.APIStatusError):
        message = ""
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or "")
        message = " ".join((message or e.message or "").split())[:300]
        hint = {401: "; pass --api-key", 403: "; check --api-key", 404: "; check --endpoint and --remote-model",
                429: "; the server is busy, try again"}.get(e.status_code, "")
        return RemoteError(f"{url} answered {e.status_code}: {message}{hint}")
    if isinstance(e, openai.APITimeoutError):
        return RemoteError(f"{url} did not answer within {TIMEOUT_S:.0f} s")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return RemoteError(f"cannot reach {url} ({' '.join(str(cause).split())[:200] or type(cause).__name__}); is "
                           "the server running, and is the URL right?")
    return RemoteError(f"{url}: {' '.join(str(e).split())[:300]}")


class Endpoint:
    """One OpenAI-compatible server and the model it serves."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None) -> None:
        self.url = url
        self._client = _client(url, api_key)
        self._model = model

    @property
    def model(self) -> str:
        """`--remote-model`, else the first (usually only) model the server lists."""
        if self._model is None:
            try:
                models = list(self._client.models.list())
            except Exception as e:
                raise _explain(e, self.url) from None
            if not models:
                raise RemoteError(f"{self.url} serves no models; name one with --remote-model")
            self._model = models[0].id
        return self._model

    def stream(self, kind: str, **request: Any) -> Iterator[Any]:
        """The server's stream of chunks for a chat (`kind` "chat") or plain completion request."""
        api = self._client.chat.completions if kind == "chat" else self._client.completions
        try:
            stream = api.create(model=self.model, stream=True, stream_options={"include_usage": True}, **request)
            yield from stream
        except Lfm2Error:
            raise
        except Exception as e:
            raise _explain(e, self.url) from None


def _chunk_chars(choice: Any) -> int:
    """How much text one streamed choice carries: content, reasoning and tool-call pieces together."""
    if getattr(choice, "delta", None) is None:
        return len(getattr(choice, "text", None) or "")
    delta = choice.delta
    extra = getattr(delta, "model_extra", None) or {}
    size = len(delta.content or "") + sum(len(v) for v in extra.values() if isinstance(v, str))
    for tc in delta.tool_calls or ():
        if tc.function is not None:
            size += len(tc.function.name or "") + len(tc.function.arguments or "")
    return size


def request_fields(params: SamplingParams, max_tokens: int, stops: Sequence[str] = ()) -> dict[str, Any]:
    """Our sampling settings as request fields; those OpenAI lacks go in the body as vLLM and SGLang read them."""
    fields: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": max_tokens}
    if params.seed is not None:
        fields["seed"] = params.seed
    if stops:
        fields["stop"] = list(stops)
    for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's own fields: only sent when in use
        if getattr(params, name):
            fields[name] = getattr(params, name)
    if params.logit_bias:
        fields["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    extra: dict[str, Any] = {"min_p": params.min_p, "repetition_penalty": params.repetition_penalty}
    if params.top_k > 0:  # off is spelled 0 by some servers and -1 by others: leave it out instead
        extra["top_k"] = params.top_k
    fields["extra_body"] = extra
    return fields


def response_format(schema: Mapping[str, Any] | None, fmt: str) -> dict[str, Any] | None:
    """`--schema` / `--format json` as OpenAI's response_format."""
    if schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "schema", "schema": dict(schema), "strict": True}}
    return {"type": "json_object"} if fmt == "json" else None


@dataclass
class RemoteRun:
    """A TextRun's counterpart on a server (a `runs.base.Run`): iterate `pieces()`; `text`, `reasoning`,
    `tool_calls`, `stats` fill in.

    `messages` go to /v1/chat/completions; `prompt` (a str, for `--raw`) to /v1/completions. Reasoning comes from
    the server's `reasoning_content` where it separates it (vLLM and SGLang with a reasoning parser, lfm2 serve),
    else from a `<think>` block at the start of the content, split here as locally."""

    endpoint: Endpoint
    params: SamplingParams
    max_tokens: int
    messages: Sequence[Mapping[str, Any]] | None = None
    prompt: str | None = None
    stops: Sequence[str] = ()
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str = "auto"
    response_format: dict[str, Any] | None = None
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_errors: list[Unparsed] = field(default_factory=list)  # call blocks sent as content that did not parse
    stats: GenerationStats = field(default_factory=GenerationStats)
    # the server enforces response_format, but a reply cut at max_tokens still broke its promise
    incomplete: bool = field(default=False, init=False)
    generated: int = field(default=0, init=False)  # streamed choices: servers send about one token each
    _stream: ToolCallStream | None = field(default=None, init=False, repr=False)
    _server_reasoning: bool = field(default=False, init=False, repr=False)  # it sends reasoning apart

    def _request(self) -> tuple[str, dict[str, Any]]:
        fields = request_fields(self.params, self.max_tokens)  # stop strings are applied here, to the answer only
        if self.messages is None:
            return "text", {**fields, "prompt": self.prompt or ""}
        fields["messages"] = [dict(m) for m in self.messages]
        if self.tools is not None:
            fields["tools"] = list(self.tools)
            if self.tool_choice not in ("auto", "required", "none"):
                fields["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice}}
            else:
                fields["tool_choice"] = self.tool_choice
        if self.response_format is not None:
            fields["response_format"] = self.response_format
        return "chat", fields

    def pieces(self) -> Iterator[Reasoning | Answer]:
        kind, request = self._request()
        # a server without an LFM2 tool parser sends the calls as content: parse them here, as locally
        self._stream = ToolCallStream(self.tools, bare=True) if self.tools is not None else None
        # with tools, a call block begun inside an unclosed <think> ends the reasoning, as locally
        splitter = ThinkingSplitter(call_start=TOOL_CALL_START if self.tools is not None else None)
        matcher = StopMatcher(list(self.stops))
        calls: dict[int, dict[str, Any]] = {}
        t0 = time.perf_counter()
        first: float | None = None
        received = 0
        try:
            for chunk in self.endpoint.stream(kind, **request):
                if getattr(chunk, "usage", None):
                    self.stats.prompt_tokens = chunk.usage.prompt_tokens or 0
                    self.stats.generated_tokens = chunk.usage.completion_tokens or 0
                for choice in chunk.choices or ():
                    self.generated += 1
                    received += _chunk_chars(choice)
                    if self.generated > self.max_tokens + SPARE_CHUNKS or received > self.max_tokens * TOKEN_CHARS:
                        self.stats.finish_reason = "length"  # more than was asked for: stop reading, hang up
                        return
                    if first is None:
                        first = time.perf_counter()
                        self.stats.ttft_s = self.stats.prefill_s = first - t0
                    if choice.finish_reason:
                        self.stats.finish_reason = choice.finish_reason
                    for piece in self._choice_pieces(kind, choice, splitter, calls):
                        yield from self._sorted(piece, matcher)
                        if matcher.stopped:  # closing the stream ends the server's generation too
                            self.stats.finish_reason = "stop"
                            return
            yield from self._end(splitter, matcher)
        except KeyboardInterrupt:
            self.stats.finish_reason = "interrupted"
            raise
        finally:
            if first is not None:
                self.stats.decode_s = time.perf_counter() - first
        self._take_calls(calls)

    def _choice_pieces(self, kind: str, choice: Any, splitter: ThinkingSplitter,
                       calls: dict[int, dict[str, Any]]) -> list[Reasoning | Answer]:
        """One streamed choice as reasoning and answer pieces; the tool-call pieces it carries go to `calls`."""
        if kind == "text":
            return [Answer(choice.text or "")]
        delta = choice.delta
        pieces: list[Reasoning | Answer] = []
        extra = getattr(delta, "model_extra", None) or {}
        thought = getattr(delta, "reasoning_content", None) or extra.get("reasoning_content") \
            or extra.get("reasoning")
        if thought:
            self._server_reasoning = True
            pieces.append(Reasoning(thought))
        if delta.content:
            # a server that does not separate reasoning sends the <think> block as content
            pieces += [Answer(delta.content)] if self._server_reasoning else splitter.feed(delta.content)
        for tc in delta.tool_calls or ():
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function is not None:
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
        return pieces

    def _end(self, splitter: ThinkingSplitter, matcher: StopMatcher) -> Iterator[Reasoning | Answer]:
        """The stream ended: what the splitter, the call parser and the stop matcher held back."""
        for piece in splitter.close() if not self._server_reasoning else ():
            yield from self._sorted(piece, matcher)
        if self._stream is not None:
            yield from self._answer(self._stream.close(), matcher)
        self.incomplete = self.response_format is not None and self.stats.finish_reason == "length"
        out = matcher.flush()
        if out:
            self.text += out
            yield Answer(out)

    def _take_calls(self, calls: dict[int, dict[str, Any]]) -> None:
        """The server's streamed tool calls, their arguments read as JSON."""
        for entry in calls.values():
            try:
                args = loads_json(entry["arguments"] or "{}")  # bounded nesting, finite numbers
            except ParseError as e:
                raise RemoteError(f"{self.endpoint.url} sent a tool call whose arguments are {e}: "
                                  f"{entry['arguments'][:200]!r}") from None
            self.tool_calls.append(ToolCall(entry["name"], args if isinstance(args, dict) else {}))

    def _sorted(self, piece: Reasoning | Answer, matcher: StopMatcher) -> Iterator[Reasoning | Answer]:
        if isinstance(piece, Reasoning):
            self.reasoning += piece
            yield piece
            return
        if self._stream is not None:
            yield from self._answer(self._stream.feed(piece), matcher)
            return
        out, _hit = matcher.feed(piece)
        if out:
            self.text += out
            yield Answer(out)

    def _answer(self, events: list[Any], matcher: StopMatcher) -> Iterator[Answer]:
        for event in events:
            if isinstance(event, Calls):
                self.tool_calls += event.calls
                self.stats.finish_reason = "tool_calls"
                continue
            if isinstance(event, Unparsed):
                self.tool_errors.append(event)
            out, _hit = matcher.feed(event.text)
            if out:
                self.text += out
                yield Answer(out)

    @property
    def raw(self) -> str:
        """The reply as a history replays it to a server: the answer (OpenAI clients leave the reasoning out)."""
        return self.text

    def run(self) -> str:
        for _ in self.pieces():
            pass
        return self.text
