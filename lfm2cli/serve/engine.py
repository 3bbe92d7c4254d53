"""The one model instance behind the server: requests become jobs, and `parallel` worker threads run them, each
on its own cache slot; with more than one, the model calls of all running jobs are batched (serve/batcher.py).

- Jobs wait in a FIFO queue of bounded length; a full queue refuses at once (429) rather than letting waits
  grow without limit. A job cancelled while it waits leaves the queue at once; a running one stops at its next
  token (or prefill chunk), so a client that went away frees its slot for the next request.
- Each slot keeps the cache of its last conversation (`PrefixCache`), and a job takes the free slot whose cache
  shares the longest prefix with its prompt: a client resending its conversation plus one message has only the
  new part prefilled. Snapshots are taken where a later request is likely to diverge: after each prefill chunk,
  before and after the prompt's last token, and every `SNAPSHOT_EVERY` generated tokens.
- Building a prompt (template, tokenizer, grammar) is done by the caller's thread (`chat_job`/`completion_job`),
  so the worker only runs the model; errors there are 400s before anything is queued.

Events go to each job's `sink` from its worker thread: text pieces (`Reasoning`/`Answer`), then one `Finished` or
`Failed`. The sink must not block (the app hands them to its event loop).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.decoding.constraints import API, Grammar, choose_grammar
from lfm2cli.decoding.prefix_cache import CachedReply, PrefixCache, common_prefix
from lfm2cli.decoding.sampling import SEED_MAX, SamplingParams, check_bias_ids
from lfm2cli.errors import CheckpointError, Lfm2Error, PromptTooLongError, UsageError
from lfm2cli.loading.loader import LoadedModel
from lfm2cli.reply.thinking import Answer
from lfm2cli.reply.toolcalls import ToolCall
from lfm2cli.runs.local import TextRun, TokenScore
from lfm2cli.runs.prompt import Prompt, encode_prompt, require_tokenizer
from lfm2cli.serve.batcher import Batcher, Stopped, worker_thread
from lfm2cli.serve.errors import APIError, bad_request
from lfm2cli.serve.metrics import ServeMetrics
from lfm2cli.serve.protocol import ChatRequest, CompletionRequest, Generation
from lfm2cli.text.template_worker import RendererStopped

SNAPSHOT_EVERY = 128  # generated tokens between snapshots of a reply
DEFAULT_MAX_TOKENS = 4096
# --parallel's default: at most DEFAULT_PARALLEL slots, and only as many as half the memory left after loading
# holds at SLOT_TOKENS tokens of cache each (a slot grows as its conversation does; this is what is planned for)
DEFAULT_PARALLEL = 8
SLOT_TOKENS = 8192


def default_parallel(lm: LoadedModel, available: int) -> int:
    """--parallel's default for `lm` with `available` bytes left after loading it (see DEFAULT_PARALLEL)."""
    cfg = lm.config
    per_token = 2 * len(cfg.attention_layers) * cfg.num_key_value_heads * cfg.head_dim * lm.dtype.itemsize
    slot = max(1, per_token * min(SLOT_TOKENS, cfg.max_position_embeddings))
    return max(1, min(DEFAULT_PARALLEL, available // 2 // slot))


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
    logprobs: list[TokenScore] | None = None  # the answer tokens' logprobs, when the job asked for them


@dataclass(eq=False)  # a job is itself: the queue finds it by identity
class Job:
    """One generation. `chat`: the reply is split into reasoning and answer (a thinking model's `<think>` block)."""

    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stops: Sequence[str] = ()
    chat: bool = False
    opened: str = ""  # the `<think>` text the prompt ends with (see runs.prompt.Prompt)
    tools: list[dict[str, Any]] | None = None
    grammar: Grammar | None = None
    think_budget: int | None = None
    marks: Sequence[int] = ()  # prompt positions worth a snapshot (see PrefixCache.extend)
    max_calls: int | None = None  # parallel_tool_calls false: a free (auto) reply's extra calls are dropped
    logprobs: int | None = None  # score the answer's tokens, with this many most likely ones each (runs.local)
    sink: Callable[[Any], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = "the client went away"  # why it was cancelled


@dataclass
class Engine:
    """One loaded model, a queue of at most `queue_size` waiting jobs, and the `parallel` worker threads that run
    them (one at a time with `parallel` 1: the model is called directly, no batching)."""

    def __init__(self, lm: LoadedModel, queue_size: int = 16, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 think_budget: int | None = None, parallel: int = 1) -> None:
        if queue_size < 0:
            raise UsageError(f"the queue length must be >= 0, got {queue_size}")
        if parallel < 1:
            raise UsageError(f"--parallel must be >= 1, got {parallel}")
        self.lm = lm
        self.tokenizer = require_tokenizer(lm)
        self.parallel = parallel
        self.slots = [PrefixCache(lm.model.new_cache()) for _ in range(parallel)]
        self._free = list(self.slots)  # least recently used first
        self.prefix = self.slots[0]
        self.context = self.prefix.cache.max_len
        self.batcher: Batcher | None = None
        self.queue_size = queue_size
        self.default_max_tokens = default_max_tokens
        self.think_budget = think_budget
        self.last_prefilled = 0  # prompt ids the latest job ran through the model (the rest came from the cache)
        self.completed = 0
        self.metrics = ServeMetrics()
        self._job_seconds = 0.0  # a running average of how long a job takes, for the Retry-After of a 429
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            if self.parallel > 1:
                self.batcher = Batcher(self.lm.model)
            self._threads = [threading.Thread(target=self._loop, name=f"lfm2-engine-{i}", daemon=True)
                             for i in range(self.parallel)]
            for thread in self._threads:
                thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop: waiting jobs fail at once, running ones stop at their next token; then the workers end."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in [*waiting, *self._running]:
                job.reason = "the server is shutting down"
                job.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.sink(Failed(Cancelled(job.reason)))
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        if self.batcher is not None:
            self.batcher.close(None if end is None else max(0.0, end - time.monotonic()))

    def status(self) -> dict[str, Any]:
        """The queue's state; `running` counts sequences (a request asking for n choices runs n), `batch` is
        how many the latest model step decoded together."""
        with self._cond:
            batch = self.batcher.last_batch if self.batcher is not None else len(self._running)
            return {"queued": len(self._waiting), "running": len(self._running), "queue_size": self.queue_size,
                    "completed": self.completed, "parallel": self.parallel, "batch": batch}

    # ------------------------------------------------------------------ the queue

    def submit(self, job: Job) -> None:
        """Queue `job`; APIError 429 when the queue is full, 503 when the server is stopping."""
        self.submit_all([job])

    def submit_all(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` together (the choices of one request), or none of them: APIError 429 when they do not all
        fit beside what waits and runs, 503 when the server is stopping."""
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            idle = self.parallel - len(self._running)
            if len(self._waiting) + len(jobs) > self.queue_size + idle:
                # a slot opens when a running job ends: about one job's time over the slots, in whole seconds
                retry = min(60, max(1, math.ceil(self._job_seconds / self.parallel)))
                raise APIError(429, f"the server is busy: {len(self._waiting)} requests are waiting already (the "
                                    f"queue is full); retry in {retry} s", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(retry)})
            self._waiting.extend(jobs)
            self._cond.notify_all()

    @staticmethod
    def choices(job: Job, n: int) -> list[Job]:
        """`job` and n - 1 copies of it: a request's n choices, each a sequence of its own. With a seed, choice i
        draws with seed + i, so the choices differ and the request stays reproducible."""
        out = [job]
        for i in range(1, n):
            params = job.params
            if params.seed is not None:
                params = dataclasses.replace(params, seed=(params.seed + i) % (SEED_MAX + 1))
            out.append(dataclasses.replace(job, params=params, cancelled=threading.Event()))
        return out

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
        if self.batcher is not None:
            worker_thread()
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
                slot = self._take_slot(job.ids)
                if self._closed:  # queued as the server began to stop
                    job.reason = "the server is shutting down"
                    job.cancelled.set()
            t0 = time.perf_counter()
            try:
                self._run(job, slot)
            finally:
                with self._cond:
                    self._running.discard(job)
                    self._free.append(slot)
                    self.completed += 1
                    seconds = time.perf_counter() - t0
                    self._job_seconds = seconds if self.completed == 1 else 0.8 * self._job_seconds + 0.2 * seconds

    def _take_slot(self, ids: list[int]) -> PrefixCache:
        """The free slot whose cache shares the longest prefix with `ids` (of equals, the least recently used)."""
        best = max(range(len(self._free)), key=lambda i: (common_prefix(self._free[i].ids, ids), -i))
        return self._free.pop(best)

    def _run(self, job: Job, slot: PrefixCache) -> None:
        try:
            if job.cancelled.is_set():
                raise Cancelled(job.reason)
            if self.batcher is None:
                result = self._generate(job, slot, self.lm)
            else:
                def check() -> None:
                    if job.cancelled.is_set():
                        raise Cancelled(job.reason)

                with self.batcher.seat(check) as seat:
                    seated = copy.copy(self.lm)  # the generation code calls `lm.model`: here, the seat
                    seated.model = seat  # type: ignore[assignment]
                    result = self._generate(job, slot, seated)
        except Stopped:  # the model thread stopped under the job: the server is closing
            job.sink(Failed(Cancelled(job.reason if job.cancelled.is_set() else "the server is shutting down")))
            return
        except BaseException as e:  # the worker must outlive every job; the caller decides what the client sees
            job.sink(Failed(e))
            return
        job.sink(Finished(result))

    # ------------------------------------------------------------------ generation

    def _generate(self, job: Job, prefix: PrefixCache, lm: LoadedModel) -> Result:
        """Run `job` on the cache slot `prefix`; `lm.model` is the model or, when batching, the job's seat."""
        t0 = time.perf_counter()
        ids = job.ids
        reply = CachedReply(prefix, ids, snapshot_every=SNAPSHOT_EVERY)
        self.last_prefilled = len(reply.new)
        reply.prefill(lm.model, stop=job.cancelled.is_set, marks=job.marks)
        extended = time.perf_counter() - t0
        if job.cancelled.is_set():
            raise Cancelled(job.reason)

        def after_token(n: int) -> None:
            reply.after_token(run.tokens)
            if job.cancelled.is_set():
                raise Cancelled(job.reason)

        run = TextRun(lm, reply.last, job.params, job.max_tokens, stops=job.stops, cache=prefix.cache,
                      context_ids=ids, think=job.chat, opened=job.opened, tools=job.tools, grammar=job.grammar,
                      think_budget=job.think_budget if job.chat else None, after_token=after_token,
                      drop_cut_call=True, logprobs=job.logprobs)
        reasoning_tokens = 0
        answering = False
        with reply.generating(run.tokens, between_tokens=(Cancelled,)):
            for piece in run.pieces():
                if isinstance(piece, Answer) and not answering and job.chat:
                    answering = True
                    reasoning_tokens = len(run.tokens) - 1 if run.reasoning else 0
                job.sink(piece)
        if run.reasoning and not answering:
            reasoning_tokens = len(run.tokens)
        calls = list(run.tool_calls)[:job.max_calls]
        new = len(reply.new)
        prefill_s = extended + run.stats.ttft_s
        self.metrics.generation(len(ids), len(ids) - new, len(run.tokens), new / prefill_s if prefill_s > 0 else 0.0,
                                run.stats.decode_tps)
        return Result(run.text, run.reasoning, calls, run.stats.finish_reason or "stop", len(ids), len(ids) - new,
                      len(run.tokens), reasoning_tokens, time.perf_counter() - t0, list(run.tokens),
                      run.scores if job.logprobs is not None else None)

    # ------------------------------------------------------------------ building jobs (caller's thread)

    def _length(self, prompt: int, gen: Generation, param: str = "messages") -> int:
        """The reply's cap for a prompt of `prompt` tokens; a 400 when it cannot fit the context."""
        if prompt >= self.context:
            raise bad_request(f"this model's context holds {self.context} tokens, but the prompt needs {prompt}; "
                              "shorten the conversation", param, code="context_length_exceeded")
        room = self.context - prompt
        if gen.max_tokens is None:
            return min(self.default_max_tokens, room)
        if gen.max_tokens > room:
            raise bad_request(f"this model's context holds {self.context} tokens; the prompt needs {prompt} and "
                              f"max_tokens asks for {gen.max_tokens} more: lower max_tokens to at most {room}",
                              "max_tokens", code="context_length_exceeded")
        return gen.max_tokens

    def _too_long(self, param: str, what: str) -> APIError:
        return bad_request(f"this model's context holds {self.context} tokens; {what}", param,
                           code="context_length_exceeded")

    def _encode(self, text: str, param: str, add_special_tokens: bool = False) -> Prompt:
        """The prompt's ids, tokenising no more of a hopelessly long text than the context allows for."""
        try:
            return encode_prompt(self.tokenizer, text, add_special_tokens, within=self.context)
        except PromptTooLongError:
            raise self._too_long(param, f"the prompt needs far more tokens than the {self.context} the context "
                                        "holds; shorten it") from None
        except CheckpointError as e:  # the checkpoint's tokenizer failed on this text (its library panicked)
            raise APIError(500, str(e), type="server_error", code="tokenizer_failed") from None
        except Lfm2Error as e:  # text the tokenizer cannot take (a lone surrogate)
            raise bad_request(f"{param}: {e}", param) from None

    def encode_text(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        """POST /tokenize: the ids of `text` (400 when it could never fit the context)."""
        return self._encode(text, param, add_special_tokens).ids

    def decode_ids(self, ids: list[int]) -> str:
        """POST /detokenize: the text of `ids`, special tokens included; a 400 for an id the tokenizer lacks."""
        top = self.tokenizer.max_token_id
        bad = next((t for t in ids if not 0 <= t <= top), None)
        if bad is not None:
            raise bad_request(f"tokens: token id {bad} is outside the vocabulary (0 to {top})", "tokens")
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        except CheckpointError as e:
            raise APIError(500, str(e), type="server_error", code="tokenizer_failed") from None

    def _check_sizes(self, req: ChatRequest, tools: list[dict[str, Any]] | None) -> None:
        """Before the template runs: text that could never fit the context however it is tokenised (each token
        stands for at most `max_token_chars` characters; 4x leaves room for what normalisation folds)."""
        most = 4 * self.context * self.tokenizer.max_token_chars
        if tools and len(json.dumps(tools)) > most:
            raise self._too_long("tools", f"the tool schemas are {len(json.dumps(tools))} characters of JSON, "
                                          "too large to fit; send fewer or smaller tools")
        chars = sum(len(m["content"]) for m in req.messages)
        if chars > most:
            raise self._too_long("messages", f"the messages hold {chars} characters, far more than fit; shorten "
                                             "the conversation")

    def _check_bias(self, params: SamplingParams) -> None:
        try:
            check_bias_ids(params.logit_bias, self.lm.config.vocab_size, "logit_bias")
        except UsageError as e:
            raise bad_request(str(e), "logit_bias") from None

    def chat_job(self, req: ChatRequest) -> Job:
        """The job for a chat request: the template rendered (with the tools unless tool_choice is none), the
        grammar for response_format or a forced tool call, and the length checked against the context."""
        self._check_bias(req.gen.params)
        tools = req.tools if req.tool_choice != "none" else None
        self._check_sizes(req, tools)
        try:
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tools=tools)
        except RendererStopped as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except CheckpointError as e:  # the template is broken or ran out of its budget: the checkpoint's fault
            raise APIError(500, str(e), type="server_error", code="chat_template_failed") from None
        except Lfm2Error as e:
            raise bad_request(f"messages: {e}", "messages") from None
        prompt = self._encode(text, "messages")
        grammar = self._grammar(req, tools)
        budget = req.think_budget if req.think_budget is not None else self.think_budget
        return Job(prompt.ids, req.gen.params, self._length(len(prompt.ids), req.gen), req.gen.stops, chat=True,
                   opened=prompt.opened, tools=tools, grammar=grammar, think_budget=budget,
                   max_calls=None if req.parallel_tool_calls else 1,
                   marks=self._reply_start(req.messages, tools, text, prompt.ids))

    @staticmethod
    def _grammar(req: ChatRequest, tools: list[dict[str, Any]] | None) -> Grammar | None:
        """response_format or a forced tool call as a grammar (the request checks refused asking for both)."""
        fmt = "text" if req.response_format == "text" else "json"
        choice = "auto" if req.tool_choice == "none" else req.tool_choice
        try:
            return choose_grammar(req.schema, fmt, tools, choice, req.parallel_tool_calls, API)
        except UsageError as e:
            raise bad_request(str(e), "tool_choice" if fmt == "text" else "response_format") from None

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
        self._check_bias(req.gen.params)
        if isinstance(req.prompt, str):
            ids = self._encode(req.prompt, "prompt", add_special_tokens=True).ids
        else:
            vocab = self.lm.config.vocab_size
            bad = next((t for t in req.prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt: token id {bad} is outside the vocabulary (0 to {vocab - 1})", "prompt")
            ids = list(req.prompt)
        return Job(ids, req.gen.params, self._length(len(ids), req.gen, "prompt"), req.gen.stops)

