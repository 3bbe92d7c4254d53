"""The one model instance behind the server: requests become jobs, and a worker thread runs them one at a time.

- Jobs wait in a FIFO queue of bounded length; a full queue refuses at once (429) rather than letting waits
  grow without limit. A job cancelled while it waits leaves the queue at once; a running one stops at its next
  token (or prefill chunk), so a client that went away frees the model for the next request.
- The cache of the last conversation is kept (`PrefixCache`): a client resending its conversation plus one message
  has only the new part prefilled. Snapshots are taken where a later request is likely to diverge: after each
  prefill chunk, before and after the prompt's last token, and every `SNAPSHOT_EVERY` generated tokens.
- Building a prompt (template, tokenizer, grammar) is done by the caller's thread (`chat_job`/`completion_job`),
  so the worker only runs the model; errors there are 400s before anything is queued.

Events go to each job's `sink` from the worker thread: text pieces (`Reasoning`/`Answer`), then one `Finished` or
`Failed`. The sink must not block (the app hands them to its event loop).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.errors import Lfm2Error, UsageError
from lfm2cli.loading import LoadedModel
from lfm2cli.prefix_cache import PrefixCache
from lfm2cli.sampling import SamplingParams
from lfm2cli.serve.errors import APIError, bad_request
from lfm2cli.serve.protocol import ChatRequest, CompletionRequest, Generation
from lfm2cli.structured import Grammar, json_grammar, tool_call_grammar
from lfm2cli.textgen import TextRun, require_tokenizer
from lfm2cli.thinking import Answer, opened_by_prompt
from lfm2cli.toolcalls import ToolCall

SNAPSHOT_EVERY = 128  # generated tokens between snapshots of a reply
DEFAULT_MAX_TOKENS = 4096


class Cancelled(Exception):
    """The job was cancelled: its client went away, or the server is stopping."""


@dataclass
class Finished:
    result: Result


@dataclass
class Failed:
    error: BaseException


@dataclass
class Result:
    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the cache already held: not prefilled again
    completion_tokens: int
    reasoning_tokens: int
    seconds: float
    tokens: list[int] = field(default_factory=list)


@dataclass(eq=False)  # a job is itself: the queue finds it by identity
class Job:
    """One generation. `chat`: the reply is split into reasoning and answer (a thinking model's `<think>` block)."""

    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stops: Sequence[str] = ()
    chat: bool = False
    opened: bool = False
    tools: list[dict[str, Any]] | None = None
    grammar: Grammar | None = None
    think_budget: int | None = None
    marks: Sequence[int] = ()  # prompt positions worth a snapshot (see PrefixCache.extend)
    max_calls: int | None = None  # parallel_tool_calls false: a free (auto) reply's extra calls are dropped
    sink: Callable[[Any], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = "the client went away"  # why it was cancelled


@dataclass
class Engine:
    """One loaded model, a queue of at most `queue_size` waiting jobs, and the worker thread that runs them."""

    def __init__(self, lm: LoadedModel, queue_size: int = 16, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 think_budget: int | None = None) -> None:
        if queue_size < 0:
            raise UsageError(f"the queue length must be >= 0, got {queue_size}")
        self.lm = lm
        self.tokenizer = require_tokenizer(lm)
        self.prefix = PrefixCache(lm.model.new_cache())
        self.context = self.prefix.cache.max_len
        self.queue_size = queue_size
        self.default_max_tokens = default_max_tokens
        self.think_budget = think_budget
        self.last_prefilled = 0  # prompt ids the latest job ran through the model (the rest came from the cache)
        self.completed = 0
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lfm2-engine", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop: waiting jobs fail at once, the running one stops at its next token; then the worker ends."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in [*waiting, self._running]:
                if job is not None:
                    job.reason = "the server is shutting down"
                    job.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.sink(Failed(Cancelled(job.reason)))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"queued": len(self._waiting), "running": int(self._running is not None),
                    "queue_size": self.queue_size, "completed": self.completed}

    # ------------------------------------------------------------------ the queue

    def submit(self, job: Job) -> None:
        """Queue `job`; APIError 429 when the queue is full, 503 when the server is stopping."""
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.queue_size and (self._running is not None or self._waiting):
                raise APIError(429, f"the server is busy: {len(self._waiting)} requests are waiting already (the "
                                    "queue is full); retry later", type="rate_limit_error", code="queue_full")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a running one stops at its next token."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running or done: the worker reports it
        job.sink(Failed(Cancelled(job.reason)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
                if self._closed:  # queued as the server began to stop
                    job.reason = "the server is shutting down"
                    job.cancelled.set()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self.completed += 1

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                raise Cancelled(job.reason)
            result = self._generate(job)
        except BaseException as e:  # the worker must outlive every job; the caller decides what the client sees
            job.sink(Failed(e))
            return
        job.sink(Finished(result))

    # ------------------------------------------------------------------ generation

    def _generate(self, job: Job) -> Result:
        pc, model = self.prefix, self.lm.model
        t0 = time.perf_counter()
        ids = job.ids
        new = pc.sync(ids)
        self.last_prefilled = len(new)
        pc.extend(model, new[:-1], stop=job.cancelled.is_set, marks=job.marks)
        if job.cancelled.is_set():
            raise Cancelled(job.reason)

        def after_token(n: int) -> None:
            if n == 1 or n % SNAPSHOT_EVERY == 0:
                # n == 1: the whole prompt is in the cache, where a resent conversation diverges most often
                pc.commit(ids + run.tokens)
                pc.snapshot()
            if job.cancelled.is_set():
                raise Cancelled(job.reason)

        run = TextRun(self.lm, new[-1:], job.params, job.max_tokens, stops=job.stops, cache=pc.cache,
                      context_ids=ids, think=job.chat, opened=job.opened, tools=job.tools, grammar=job.grammar,
                      think_budget=job.think_budget if job.chat else None, after_token=after_token)
        reasoning_tokens = 0
        answering = False
        try:
            for piece in run.pieces():
                if isinstance(piece, Answer) and not answering and job.chat:
                    answering = True
                    reasoning_tokens = len(run.tokens) - 1 if run.reasoning else 0
                job.sink(piece)
        except Cancelled:
            pc.commit(ids + run.tokens)  # raised between tokens: the cache is consistent
            raise
        except BaseException:
            pc.recover()  # a forward pass may have stopped half-way
            raise
        pc.commit(ids + run.tokens)
        pc.snapshot()
        if run.reasoning and not answering:
            reasoning_tokens = len(run.tokens)
        calls = list(run.tool_calls)[:job.max_calls]
        return Result(run.text, run.reasoning, calls, run.stats.finish_reason or "stop", len(ids),
                      len(ids) - len(new), len(run.tokens), reasoning_tokens, time.perf_counter() - t0,
                      list(run.tokens))

    # ------------------------------------------------------------------ building jobs (caller's thread)

    def _length(self, prompt: int, gen: Generation) -> int:
        """The reply's cap for a prompt of `prompt` tokens; a 400 when it cannot fit the context."""
        if prompt >= self.context:
            raise bad_request(f"this model's context holds {self.context} tokens, but the prompt needs {prompt}; "
                              "shorten the conversation", "messages", code="context_length_exceeded")
        room = self.context - prompt
        if gen.max_tokens is None:
            return min(self.default_max_tokens, room)
        if gen.max_tokens > room:
            raise bad_request(f"this model's context holds {self.context} tokens; the prompt needs {prompt} and "
                              f"max_tokens asks for {gen.max_tokens} more: lower max_tokens to at most {room}",
                              "max_tokens", code="context_length_exceeded")
        return gen.max_tokens

    def chat_job(self, req: ChatRequest) -> Job:
        """The job for a chat request: the template rendered (with the tools unless tool_choice is none), the
        grammar for response_format or a forced tool call, and the length checked against the context."""
        tools = req.tools if req.tool_choice != "none" else None
        try:
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tools=tools)
        except Lfm2Error as e:
            raise bad_request(f"messages: {e}", "messages") from None
        ids = self.tokenizer.encode(text)
        grammar = None
        try:
            if req.tool_choice == "required":
                grammar = tool_call_grammar(tools or [], req.parallel_tool_calls)
            elif req.tool_choice not in ("auto", "none"):
                grammar = tool_call_grammar([t for t in tools or [] if t.get("function", t).get("name")
                                             == req.tool_choice], req.parallel_tool_calls)
            elif req.response_format != "text":
                grammar = json_grammar(req.schema, "response_format")
        except UsageError as e:
            param = "response_format" if req.response_format != "text" else "tool_choice"
            raise bad_request(str(e).replace("--tool-choice", "tool_choice"), param) from None
        budget = req.think_budget if req.think_budget is not None else self.think_budget
        return Job(ids, req.gen.params, self._length(len(ids), req.gen), req.gen.stops, chat=True,
                   opened=opened_by_prompt(text), tools=tools, grammar=grammar, think_budget=budget,
                   max_calls=None if req.parallel_tool_calls else 1,
                   marks=self._reply_start(req.messages, tools, text, ids))

    def _reply_start(self, messages: list[dict[str, Any]], tools: Any, text: str, ids: list[int]) -> list[int]:
        """Where the generation prompt begins: the next request of this conversation has the reply there, so it
        diverges there at the latest (at once when the template opens a `<think>` the client does not send back).
        A snapshot at that position keeps the re-prefill to the reply and the new message."""
        try:
            bare = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
        except Lfm2Error:
            return []
        if not text.startswith(bare) or len(text) == len(bare):
            return []
        tail = self.tokenizer.encode(text[len(bare):])
        return [len(ids) - len(tail)] if tail and ids[len(ids) - len(tail):] == tail else []

    def completion_job(self, req: CompletionRequest) -> Job:
        """The job for a completions request: the prompt as is (BOS first), or the token ids given."""
        if isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            vocab = self.lm.config.vocab_size
            bad = next((t for t in req.prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary (0 to {vocab - 1})", "prompt")
            ids = list(req.prompt)
        return Job(ids, req.gen.params, self._length(len(ids), req.gen), req.gen.stops)

