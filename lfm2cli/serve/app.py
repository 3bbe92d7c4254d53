"""The FastAPI app: OpenAI's endpoints over one `Engine`.

Every response that is not a success is OpenAI's error JSON with a fitting status; no traceback ever reaches a
client (an unexpected failure is a 500 with a generic message, its details go to `on_error`, the traceback only
with `debug`). One outermost layer (`_Boundary`) checks the API key, turns escaped exceptions into that 500 and
reports each request in one line to `on_request`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.errors import Lfm2Error
from lfm2cli.reply.thinking import Reasoning
from lfm2cli.serve.access import ANY, Access, normalize_origin
from lfm2cli.serve.engine import Cancelled, Engine, Failed, Finished, Job, Result
from lfm2cli.serve.errors import APIError, bad_request, server_error
from lfm2cli.serve.metrics import CONTENT_TYPE, ServeMetrics
from lfm2cli.serve.protocol import (
    Envelope,
    TextOffsets,
    chat_logprobs,
    check_tree,
    completion_logprobs,
    json_kind,
    new_id,
    parse_chat,
    parse_completion,
    tool_call_entries,
    usage,
)
from lfm2cli.serve.responses import ResponseEvents, ResponseShape, parse_responses
from lfm2cli.terminal.safetext import visible, visible_line

MAX_BODY_BYTES = 8 << 20  # a full 128k-token conversation is ~1 MB of JSON; this leaves room and stops abuse
BODY_BYTES_PER_TOKEN = 64  # --max-body's default: generous JSON (escapes, tool schemas) for a full context
# Bodies over BIG_BODY are decoded, checked and tokenised on one of BIG_BODY_WORKERS threads kept for them: many
# arriving at once then cost what that many do, and few threads' heaps keep what their work left behind.
BIG_BODY, BIG_BODY_WORKERS = 1 << 20, 2
CLIENT_GONE = 499  # nginx's status for "the client closed the request", for the log line only
OPEN_PATHS = ("/health",)  # answered without the API key, for load balancers and health checks


def default_max_body(context: int) -> int:
    """The body limit for a model whose context holds `context` tokens: room for a full conversation, 1 to 64 MiB."""
    return min(max(context * BODY_BYTES_PER_TOKEN, 1 << 20), 64 << 20)


def _error_response(error: APIError) -> JSONResponse:
    headers = {**error.headers, **({"WWW-Authenticate": "Bearer"} if error.status == 401 else {})}
    # a message may quote what the client sent; a lone surrogate in it could not be encoded as UTF-8
    fields = {k: v.encode("utf-8", "backslashreplace").decode() if isinstance(v, str) else v
              for k, v in error.body()["error"].items()}
    return JSONResponse({"error": fields}, status_code=error.status, headers=headers)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large for a double")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def _read_body(request: Request, limit: int) -> bytearray:
    """The body: 413 past `limit` bytes (checked as it arrives), 400 when empty."""
    too_large = APIError(413, f"the request body is larger than this server accepts ({limit} bytes; the server's "
                              "--max-body)", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    raw = bytearray()  # grown in place: the body is held once, not as chunks and their join
    async for chunk in request.stream():
        if len(raw) + len(chunk) > limit:
            raise too_large
        raw += chunk
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    return raw


def _decode(raw: bytearray) -> Any:
    """The body as parsed JSON; 400 when it is not JSON (NaN, Infinity and numbers beyond a double included:
    nothing later could write them back)."""
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(e).split()) if not isinstance(e, RecursionError) else "nested too deeply"
        raise bad_request(f"the request body is not valid JSON ({reason})") from None


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body has been read, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _named_sse(data: Any) -> bytes:
    """An event with its type named in an `event:` line, as the Responses API sends them."""
    kind = data.get("type", "error") if isinstance(data, dict) else "error"
    return f"event: {kind}\n".encode() + _sse(data)


class _EventStream(StreamingResponse):
    """Server-sent events from `events`, stopping the job (`on_gone`) as soon as the client disconnects, whether
    the stream has started or the job still waits in the queue."""

    def __init__(self, events: AsyncIterator[bytes], on_gone: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._on_gone = events, on_gone

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self._on_gone()

        listener = asyncio.create_task(listen())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self._events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # a write to a client that went away
            self._on_gone()
        finally:
            listener.cancel()
            await self._events.aclose()  # type: ignore[attr-defined]


class _Boundary:
    """The outermost layer: Host and Origin (see `access`), the API key, the last line of defence against
    tracebacks, and the request log line."""

    def __init__(self, app: Any, api_key: str | None, access: Access, on_request: Callable[[str], None] | None,
                 on_error: Callable[[str], None] | None, debug: bool, metrics: ServeMetrics | None = None) -> None:
        self.app, self.api_key, self.access = app, api_key, access
        self.on_request, self.on_error, self.debug = on_request, on_error, debug
        self.metrics = metrics

    def _cors_origin(self, scope: Any) -> bytes | None:
        """The request's Origin when CORS headers may answer it: only a page allowed by name with --allow-origin
        (or any, with `*`). A page allowed by default (this machine's, the server's own) gets none: CORS is
        opt-in."""
        origin = dict(scope.get("headers") or []).get(b"origin")
        if origin is None or not self.access.origins:
            return None
        if ANY not in self.access.origins:
            try:
                if normalize_origin(origin.decode("latin-1").lower()) not in self.access.origins:
                    return None
            except ValueError:
                return None
        return origin

    async def _preflight(self, scope: Any, send: Any, origin: bytes | None) -> None:
        """A browser's CORS preflight (OPTIONS with Access-Control-Request-Method): 204, with the CORS headers
        only for an origin `_cors_origin` allows (without them the browser sends nothing more)."""
        headers = [(b"vary", b"Origin"), (b"content-length", b"0")]
        if origin is not None:
            asked = dict(scope.get("headers") or []).get(b"access-control-request-headers")
            headers += [(b"access-control-allow-origin", origin),
                        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                        (b"access-control-max-age", b"600")]
            if asked:  # the SDKs send their own headers (x-stainless-*); the origin is trusted, so allow them
                headers.append((b"access-control-allow-headers", asked))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def _authorized(self, scope: Any) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # bytes against bytes: the key as UTF-8 is what a client that can send it sends
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())

    def _refused(self, scope: Any) -> APIError | None:
        """Why a browser's request may not be answered (see `access`), or None."""
        headers = dict(scope.get("headers") or [])
        host = headers[b"host"].decode("latin-1") if b"host" in headers else None
        if not self.access.host_allowed(host):
            return APIError(403, f"the Host {visible_line(repr(host)[:120])} is not a name of this server (a web "
                                 "page may be using DNS rebinding to reach it); start the server with --allow-host "
                                 "NAME to answer requests for that name", code="host_not_allowed")
        origin = headers[b"origin"].decode("latin-1") if b"origin" in headers else None
        if not self.access.origin_allowed(origin, host):
            return APIError(403, f"requests from web pages at {visible_line(repr(origin)[:120])} are not allowed; "
                                 "start the server with --allow-origin ORIGIN to allow that site",
                            code="origin_not_allowed")
        return None

    def _report(self, scope: Any, e: BaseException) -> None:
        if self.on_error is None:
            return
        where = visible_line(f"{scope.get('method')} {scope.get('path')}")
        if self.debug:
            self.on_error(f"error in {where}:\n" + visible("".join(traceback.format_exception(e)).rstrip()))
        else:
            self.on_error(f"error in {where}: {type(e).__name__}: {visible_line(str(e))} (LFM2_DEBUG=1 logs the "
                          "traceback)")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        info: dict[str, Any] = scope.setdefault("lfm2", {})
        status: int | None = None

        cors = self._cors_origin(scope)

        async def tracked(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cors is not None:
                    message = {**message, "headers": [*message.get("headers", []), (b"vary", b"Origin"),
                                                      (b"access-control-allow-origin", cors),
                                                      (b"access-control-expose-headers", b"Retry-After")]}
            try:
                await send(message)
            except OSError:
                info["gone"] = True  # the client went away: nothing more can reach it

        try:
            refused = self._refused(scope)
            if refused is not None:
                await _error_response(refused)(scope, receive, tracked)
            elif scope["method"] == "OPTIONS" and any(k == b"access-control-request-method"
                                                      for k, _ in scope.get("headers") or []):
                origin, cors = cors, None  # a preflight's CORS headers are its own
                await self._preflight(scope, tracked, origin)  # before the key: a preflight never carries it
            elif not self._authorized(scope):
                given = any(k == b"authorization" for k, _ in scope.get("headers") or [])
                error = APIError(401, "incorrect API key; send it as 'Authorization: Bearer KEY'" if given else
                                 "this server needs an API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await _error_response(error)(scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
            if "error" in info:  # a stream failed after it started: the client got an error event
                self._report(scope, info["error"])
        except Exception as e:
            self._report(scope, e)
            if status is None and not info.get("gone"):
                await _error_response(server_error())(scope, receive, tracked)
        finally:
            if self.metrics is not None:
                self.metrics.request(scope.get("path", ""), status or CLIENT_GONE)
            if self.on_request is not None:
                self.on_request(_log_line(scope, status, info, time.perf_counter() - t0))


def _log_line(scope: Any, status: int | None, info: dict[str, Any], seconds: float) -> str:
    client = scope.get("client")
    # the path is the client's: shown with its control characters escaped, so a log read on a terminal is safe
    path = visible_line(str(scope.get("path")))
    parts = [f"{client[0] if client else '-'} {scope.get('method')} {path} {status or CLIENT_GONE}"]
    if "prompt_tokens" in info:
        cached = f" ({info['cached_tokens']} cached)" if info.get("cached_tokens") else ""
        parts.append(f"{info['prompt_tokens']} prompt tokens{cached} + {info['completion_tokens']} generated")
    if info.get("cancelled"):
        parts.append("cancelled: the client went away")
    parts.append(f"{seconds:.2f} s")
    return " · ".join(parts)


def create_app(engine: Engine, model_id: str, *, aliases: Sequence[str] = (), listed: Sequence[str] = (),
               api_key: str | None = None, max_body: int = MAX_BODY_BYTES, default_params: SamplingParams | None = None,
               on_request: Callable[[str], None] | None = None, on_error: Callable[[str], None] | None = None,
               debug: bool = False, access: Access | None = None) -> FastAPI:
    """The app serving `engine`'s model as `model_id` (requests may also name it by one of `aliases`, or of
    `listed`: further ids /v1/models lists after `model_id`, from serve --name). The engine's worker starts and
    stops with the app. `on_request` gets one line per request, `on_error` the details of unexpected failures.
    `access`: which Host names and web pages are answered (default: this machine's)."""
    server = _Endpoints(engine, model_id, aliases=aliases, listed=listed, max_body=max_body,
                        defaults=default_params or SamplingParams())
    # no redirect_slashes: its Location would be built from the Host header, which the client chose
    app = FastAPI(title="lfm2", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.add_middleware(_Boundary, api_key=api_key, access=access or Access.build(), on_request=on_request,
                       on_error=on_error, debug=debug, metrics=engine.metrics)
    app.exception_handler(APIError)(_api_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.get("/health")(server.health)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{name:path}")(server.model)
    app.get("/metrics")(server.metrics)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/responses")(server.responses)
    return app


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404 and 405 as OpenAI's error JSON, a 404 for a trailing slash naming the route meant."""
    path = request.url.path
    bare = path.rstrip("/")
    hint = f" (did you mean {bare}?)" if bare != path and any(getattr(r, "path", None) == bare
                                                              for r in request.app.routes) else ""
    message = {404: f"no such endpoint: {request.method} {path}{hint}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return _error_response(APIError(exc.status_code, str(message)))


def _record(request: Request, result: Result) -> None:
    """A finished job's token counts, for the request's log line."""
    request.scope.setdefault("lfm2", {}).update(prompt_tokens=result.prompt_tokens,
                                                 cached_tokens=result.cached_tokens,
                                                 completion_tokens=result.completion_tokens)


def _failure(error: BaseException) -> BaseException:
    """What a failed job becomes for its client: a known error keeps its message; anything else is raised
    as it was, so the boundary logs it and answers with a generic 500."""
    if isinstance(error, Cancelled):
        return APIError(503, f"the request was not completed: {error}", type="server_error", code="cancelled")
    if isinstance(error, Lfm2Error):
        return APIError(500, str(error), type="server_error", code="generation_failed")
    if isinstance(error, MemoryError):
        return APIError(500, "the server ran out of memory for this request", type="server_error")
    return error


class _Endpoints:
    """The routes' handlers and what they share: one engine, its model's names, the body limit and the sampling
    defaults."""

    def __init__(self, engine: Engine, model_id: str, *, aliases: Sequence[str], listed: Sequence[str],
                 max_body: int, defaults: SamplingParams) -> None:
        self.engine, self.model_id, self.max_body, self.defaults = engine, model_id, max_body, defaults
        self.listed = [model_id, *(n for n in dict.fromkeys(listed) if n != model_id)]
        self.names = {*self.listed, *aliases}
        self.created = int(time.time())
        self.big_bodies = ThreadPoolExecutor(BIG_BODY_WORKERS, thread_name_prefix="lfm2-big-body")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            self.big_bodies.shutdown(wait=False, cancel_futures=True)
            await run_in_threadpool(self.engine.close)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist here; this server runs {self.model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lfm2"}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, **self.engine.status()}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_entry(name) for name in self.listed]}

    async def model(self, name: str) -> dict[str, Any]:
        self.check_model(name)
        return self.model_entry(name if name in self.listed else self.model_id)

    async def metrics(self) -> Response:
        return Response(self.engine.metrics.render(self.engine.status()), media_type=CONTENT_TYPE)

    async def small_body(self, request: Request) -> dict[str, Any]:
        """A small request's body: a JSON object, decoded off the event loop."""
        raw = await _read_body(request, self.max_body)
        body = await run_in_threadpool(_decode, raw)
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, not {json_kind(body)}")
        check_tree(body)
        return body

    async def tokenize(self, request: Request) -> dict[str, Any]:
        """llama-server's {"content": ...} (no BOS unless add_special) and vLLM's {"prompt": ...} (BOS unless
        add_special_tokens is false) -> {"tokens": [...]}."""
        body = await self.small_body(request)
        key = "content" if "content" in body else "prompt"
        text = body.get(key)
        if not isinstance(text, str):
            raise bad_request('content: required, the text to tokenize (or "prompt", as vLLM names it)'
                              if text is None else f"{key}: expected a string, got {json_kind(text)}", key)
        flag = "add_special" if key == "content" else "add_special_tokens"
        special = body.get(flag, key == "prompt")
        if not isinstance(special, bool):
            raise bad_request(f"{flag}: expected a boolean, got {json_kind(special)}", flag)
        if body.get("with_pieces"):
            raise bad_request("with_pieces: not supported by this server", "with_pieces")
        ids = await run_in_threadpool(self.engine.encode_text, text, key, special)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.context}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        """{"tokens": [...]} -> {"content": text} (llama-server's name) and {"prompt": text} (vLLM's)."""
        body = await self.small_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad_request("tokens: expected a list of token ids", "tokens")
        text = await run_in_threadpool(self.engine.decode_ids, ids)
        return {"content": text, "prompt": text}

    async def prepared(self, request: Request, parse: Callable[[Any, SamplingParams], Any],
                       build: Callable[[Any], Job]) -> tuple[Any, Job]:
        """The request read, parsed, checked and made a job, off the event loop (big bodies on their own threads).
        The body is dropped here: a reply that takes minutes does not hold it."""
        raw = await _read_body(request, self.max_body)

        def work() -> tuple[Any, Job]:
            req = parse(_decode(raw), self.defaults)
            self.check_model(req.model)
            job = build(req)
            job.logprobs = req.gen.logprobs
            return req, job

        if len(raw) > BIG_BODY:
            return await asyncio.get_running_loop().run_in_executor(self.big_bodies, work)
        return await run_in_threadpool(work)

    async def complete(self, request: Request, job: Job) -> Result | None:
        """Run `job` to its end; None when the client went away first (the job is then cancelled)."""
        results = await self.complete_all(request, [job])
        return None if results is None else results[0]

    async def complete_all(self, request: Request, jobs: list[Job]) -> list[Result] | None:
        """Run `jobs` (a request's choices) to their ends; None when the client went away first (they are then
        cancelled)."""
        loop = asyncio.get_running_loop()
        dones: list[asyncio.Future[Any]] = [loop.create_future() for _ in jobs]

        def finish(done: asyncio.Future[Any], event: Any) -> None:
            if not done.done():
                done.set_result(event)

        def sink_for(done: asyncio.Future[Any]) -> Callable[[Any], None]:
            def sink(event: Any) -> None:
                if isinstance(event, (Finished, Failed)):
                    try:
                        loop.call_soon_threadsafe(finish, done, event)
                    except RuntimeError:  # the loop is closed: the server stopped, nobody is waiting
                        pass
            return sink

        for job, done in zip(jobs, dones, strict=True):
            job.sink = sink_for(done)
        self.engine.submit_all(jobs)
        gone = asyncio.ensure_future(_disconnected(request))
        every = asyncio.gather(*dones)
        try:
            await asyncio.wait({every, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not every.done():
            every.cancel()
            for job in jobs:
                self.engine.cancel(job)
            request.scope["lfm2"]["cancelled"] = True
            return None
        events = every.result()
        failed = next((e for e in events if isinstance(e, Failed)), None)
        if failed is not None:
            raise _failure(failed.error)
        results = [e.result for e in events]
        _record(request, results[0] if len(results) == 1 else _merged(results))
        return results

    def stream(self, request: Request, job: Job, render: Callable[[Any], list[Any]], head: list[Any],
               sse: Callable[[Any], bytes] = _sse, done: bytes = b"data: [DONE]\n\n") -> Response:
        """Stream `job` as server-sent events: `head` first, then `render(event)` for each of its events, written
        by `sse`; `done` ends the stream (chat's and completions' `[DONE]`)."""
        return self.stream_all(request, [job], [render], head, sse, done)

    def stream_all(self, request: Request, jobs: list[Job], renders: list[Callable[[Any], list[Any]]],
                   head: list[Any], sse: Callable[[Any], bytes] = _sse, done: bytes = b"data: [DONE]\n\n"
                   ) -> Response:
        """`stream` for a request's choices: job i's chunks carry choice index i, and its usage-only chunk is held
        back for one with every choice's tokens, once all have finished."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        running = set(range(len(jobs)))

        def sink_for(i: int) -> Callable[[Any], None]:
            def sink(event: Any) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, event))
                except RuntimeError:
                    pass
            return sink

        def gone() -> None:
            if running:
                request.scope["lfm2"]["cancelled"] = True
                for job in jobs:
                    self.engine.cancel(job)

        async def events() -> AsyncIterator[bytes]:
            for data in head:
                yield sse(data)
            results: list[Result] = []
            usage_chunk = None
            while running:
                i, event = await queue.get()
                if isinstance(event, (Failed, Finished)):
                    running.discard(i)
                if isinstance(event, Failed):
                    running.clear()
                    for job in jobs:
                        self.engine.cancel(job)
                    for data in _failed_events(request, event, sse, done):
                        yield data
                    return
                if isinstance(event, Finished):
                    results.append(event.result)
                for data in renders[i](event):
                    if len(jobs) > 1 and data.get("choices") == [] and "usage" in data:
                        usage_chunk = data
                        continue
                    yield sse(_indexed(data, i) if len(jobs) > 1 else data)
            _record(request, results[0] if len(results) == 1 else _merged(results))
            if usage_chunk is not None:
                yield sse({**usage_chunk, "usage": _usage(_merged(results))})
            if done:
                yield done

        for i, job in enumerate(jobs):
            job.sink = sink_for(i)
        self.engine.submit_all(jobs)
        return _EventStream(events(), gone)

    async def chat_completions(self, request: Request) -> Response:
        req, job = await self.prepared(request, parse_chat, self.engine.chat_job)
        env = Envelope(new_id("chatcmpl"), self.model_id)
        with_usage = req.gen.include_usage
        jobs = self.engine.choices(job, req.gen.n)
        if req.gen.stream:
            head = [_indexed(env.chat_chunk({"role": "assistant", "content": ""}, with_usage=with_usage), i)
                    for i in range(len(jobs))]
            return self.stream_all(request, jobs, [_chat_chunks(env, with_usage) for _ in jobs], head)
        results = await self.complete_all(request, jobs)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(_choices([env.chat(_chat_message(r), r.finish_reason, _usage(r),
                                               chat_logprobs(r.logprobs)) for r in results], results))

    async def completions(self, request: Request) -> Response:
        req, job = await self.prepared(request, parse_completion, self.engine.completion_job)
        env = Envelope(new_id("cmpl"), self.model_id)
        jobs = self.engine.choices(job, req.gen.n)
        if req.gen.stream:
            return self.stream_all(request, jobs, [_completion_chunks(env, req.gen.include_usage) for _ in jobs], [])
        results = await self.complete_all(request, jobs)
        if results is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(_choices([env.completion(r.text, r.finish_reason, _usage(r),
                                                     logprobs=completion_logprobs(r.logprobs)) for r in results],
                                     results))

    async def responses(self, request: Request) -> Response:
        """The Responses API: the chat job its request amounts to, its result as output items."""
        req, job = await self.prepared(request, parse_responses, lambda r: self.engine.chat_job(r.chat))
        shape = ResponseShape(req, self.model_id)
        if req.gen.stream:
            events = ResponseEvents(shape)
            return self.stream(request, job, events.render, events.head(), sse=_named_sse, done=b"")
        result = await self.complete(request, job)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(shape.finished(result))


def _failed_events(request: Request, event: Failed, sse: Callable[[Any], bytes] = _sse,
                   done: bytes = b"data: [DONE]\n\n") -> list[bytes]:
    """The end of a stream whose job failed: an error event and `done`, or nothing when the client went away."""
    if request.scope["lfm2"].get("cancelled"):
        return []
    error = _failure(event.error)
    if not isinstance(error, APIError):
        # raised outside the boundary's reach once the stream has started: log it the same way
        request.scope["lfm2"]["error"] = error
        error = server_error()
    return [sse(error.body()), *([done] if done else [])]


def _chat_message(result: Result) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": result.text if result.text or not result.tool_calls else None}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = tool_call_entries(result.tool_calls)
    return message


def _chat_chunks(env: Envelope, with_usage: bool) -> Callable[[Any], list[Any]]:
    """What a chat stream sends for each of its job's events."""
    def render(event: Any) -> list[Any]:
        if isinstance(event, Reasoning):
            return [env.chat_chunk({"reasoning_content": str(event)}, with_usage=with_usage)]
        if isinstance(event, str):
            scores = getattr(event, "scores", None)  # a ScoredAnswer's, when logprobs were asked for
            return [env.chat_chunk({"content": str(event)}, with_usage=with_usage, logprobs=chat_logprobs(scores))]
        r = event.result
        out = []
        if r.tool_calls:
            out.append(env.chat_chunk({"tool_calls": tool_call_entries(r.tool_calls, streamed=True)},
                                      with_usage=with_usage))
        out.append(env.chat_chunk({}, r.finish_reason, with_usage=with_usage))
        if with_usage:
            out.append(env.chat_chunk(None, use=_usage(r), with_usage=True))
        return out

    return render


def _completion_chunks(env: Envelope, with_usage: bool) -> Callable[[Any], list[Any]]:
    """What a completion stream sends for each of its job's events."""
    offsets = TextOffsets()  # text_offset goes on from chunk to chunk

    def render(event: Any) -> list[Any]:
        if isinstance(event, str):
            logprobs = completion_logprobs(getattr(event, "scores", None), offsets)
            return [env.completion(str(event), None, with_usage=with_usage, logprobs=logprobs)]
        r = event.result
        out = [env.completion("", r.finish_reason, with_usage=with_usage)]
        if with_usage:
            out.append(env.completion(None, None, _usage(r)))
        return out

    return render


def _indexed(data: dict[str, Any], i: int) -> dict[str, Any]:
    """A chunk of choice `i` (the envelope writes index 0)."""
    return {**data, "choices": [{**c, "index": i} for c in data["choices"]]} if i else data


def _merged(results: list[Result]) -> Result:
    """The token counts of a request's choices together: the prompt once, every choice's completion."""
    first = results[0]
    return dataclasses.replace(first, completion_tokens=sum(r.completion_tokens for r in results),
                               reasoning_tokens=sum(r.reasoning_tokens for r in results))


def _choices(replies: list[dict[str, Any]], results: list[Result]) -> dict[str, Any]:
    """One response of a request's choices: each reply's choice, indexed, and the usage of them all."""
    if len(replies) == 1:
        return replies[0]
    return {**replies[0], "choices": [_indexed(r, i)["choices"][0] for i, r in enumerate(replies)],
            "usage": _usage(_merged(results))}


def _usage(result: Result) -> dict[str, Any]:
    return usage(result.prompt_tokens, result.cached_tokens, result.completion_tokens, result.reasoning_tokens)
