"""Continuous batching for `lfm2 serve --parallel N`: one thread runs the model for every running sequence.

Each running job gets a `Seat`, a stand-in for the model (`seat(ids, cache)`, with `.device`) that the unchanged
generation code calls. A one-token call (`step_and_pick`) posts (token, cache, how to pick the next token) and
waits; the model thread gathers the one-token calls of all seats (until every open seat has posted, or none has
for `GATHER_S`), runs them as one batch (`decode_batch`) and picks each sequence's next token from its row of
logits, one sequence after another: picked in each job's own thread, the picks (a dozen small torch calls each,
every one releasing and retaking the interpreter lock) kept 8 threads handing the lock around for 5-6 ms a step.
A longer call (a prompt's prefill) is cut into `PREFILL_SLICE` tokens; the model thread runs at most one slice
between two decode batches, so running streams keep flowing while a new prompt is read, and the new stream's
first token is not held back behind every other stream's reply.

Seats join and leave between steps: the batch is whatever was posted. A failed batch fails every call in it (each
job puts its own cache right, see `CachedReply.generating`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lfm2cli.decoding.batch import decode_batch
from lfm2cli.kernels import native

# Tokens of a prompt run between two decode steps. A 64-token slice costs the 350M model on a laptop CPU about as
# much as a few decode steps, so running streams slow by that much while a prompt is read, and bigger slices gain
# little throughput on a CPU (the matrix products are already wide enough to run at full speed).
PREFILL_SLICE = 64
# How long the model thread waits for the next seat's token once one has posted: long enough for the other
# streams' per-token Python work (sampling, detokenizing; one at a time under the GIL), short against a step.
GATHER_S = 0.002


def worker_thread() -> None:
    """Call once in each thread that runs jobs on seats. A job's own torch work is one token's bookkeeping
    (sampling, checks) on 65k logits; split over the cores, each of 8 such threads started a team of OpenMP
    threads of its own, whose spinning took the cores from the model thread's kernels (a logits sum took 124 us
    instead of 19; 8 streams decoded 126-135 tok/s, 165-183 with one thread each, 350M bf16 on a 2-core Zen 4)."""
    native.one_thread_here()


class Stopped(Exception):
    """The batcher is closed: no more model calls."""


@dataclass(eq=False)
class _Call:
    seat: Seat
    ids: torch.Tensor  # [1, T]
    cache: Any
    pick: Callable[[torch.Tensor], int] | None = None  # chooses the token from the logits, on the model thread
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    token: int | None = None
    error: BaseException | None = None


class Seat:
    """One running sequence's view of the model: call it like the model (`ids` [1, T], a cache); it blocks until
    the model thread has run the call. `check()` is called before each prefill slice but the first: it raises
    to stop a job reading its prompt (the caller's cache code puts the cache back to its last snapshot)."""

    def __init__(self, batcher: Batcher, check: Callable[[], None] | None = None) -> None:
        self.batcher, self.check = batcher, check
        self.device = batcher.model.device

    def __call__(self, input_ids: torch.Tensor, cache: Any = None, all_logits: bool = False) -> torch.Tensor:
        if cache is None or all_logits:
            raise ValueError("a seat runs cached steps only")
        logits = None
        for start in range(0, input_ids.shape[1], PREFILL_SLICE):
            if start and self.check is not None:
                self.check()
            logits = self.batcher.run(_Call(self, input_ids[:, start:start + PREFILL_SLICE], cache)).logits
        assert logits is not None
        return logits

    def step_and_pick(self, input_ids: torch.Tensor, cache: Any, pick: Callable[[torch.Tensor], int]) -> int:
        """One token's step (`input_ids` [1, 1]) and the next token, `pick(logits)`, which the model thread runs
        right after the step (an exception it raises is raised here)."""
        token = self.batcher.run(_Call(self, input_ids, cache, pick)).token
        assert token is not None
        return token

    def close(self) -> None:
        self.batcher.leave(self)

    def __enter__(self) -> Seat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batcher:
    """The model thread. `seat()` opens a seat for a job (close it when the job ends); `close()` fails every call
    waiting and ends the thread. `last_batch`: sequences in the latest decode step (0 when none runs)."""

    def __init__(self, model: Any, gather_s: float = GATHER_S) -> None:
        self.model, self.gather_s = model, gather_s
        self.last_batch = 0
        self.steps = 0  # decode steps run, for tests and metrics
        self._step = decode_batch
        self._seats: set[Seat] = set()
        self._decodes: dict[Seat, _Call] = {}
        self._prefills: deque[_Call] = deque()
        self._posted_at = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lfm2-model", daemon=True)
        self._thread.start()

    def seat(self, check: Callable[[], None] | None = None) -> Seat:
        seat = Seat(self, check)
        with self._cond:
            self._seats.add(seat)
        return seat

    def leave(self, seat: Seat) -> None:
        with self._cond:
            self._seats.discard(seat)
            self._cond.notify_all()  # the others need not wait for it

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self, call: _Call) -> _Call:
        with self._cond:
            if self._closed:
                raise Stopped("the model is stopping")
            if call.ids.shape[1] == 1:
                self._decodes[call.seat] = call
            else:
                self._prefills.append(call)
            self._posted_at = time.perf_counter()
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call

    # ------------------------------------------------------------------ the model thread

    def _loop(self) -> None:
        while True:
            decodes, prefill = self._gather()
            if decodes is None:
                return
            if decodes:
                self._run(decodes)
            if prefill is not None:
                self._run([prefill])

    def _gather(self) -> tuple[list[_Call] | None, _Call | None]:
        """The next decode batch and at most one prefill slice; (None, None) once closed."""
        with self._cond:
            while True:
                if self._closed:
                    self._fail_waiting()
                    return None, None
                posted = len(self._decodes) + len(self._prefills)  # a seat waits for its call: one each
                if posted:
                    idle = time.perf_counter() - self._posted_at
                    if posted >= len(self._seats) or idle >= self.gather_s:
                        break
                    self._cond.wait(self.gather_s - idle)
                else:
                    self.last_batch = 0
                    self._cond.wait()
            decodes = list(self._decodes.values())
            self._decodes.clear()
            prefill = self._prefills.popleft() if self._prefills else None
            self.last_batch = len(decodes)
            if decodes:
                self.steps += 1
            return decodes, prefill

    def _run(self, calls: Sequence[_Call]) -> None:
        """One decode step of every call in `calls`, or the one prefill slice `calls` holds."""
        try:
            if calls[0].ids.shape[1] > 1:
                logits = self.model(calls[0].ids, calls[0].cache)
            else:
                logits = self._step(self.model, [int(c.ids[0, 0]) for c in calls], [c.cache for c in calls])
        except BaseException as e:  # the model thread outlives every failed step; each caller gets the error
            for call in calls:
                call.error = e
                call.done.set()
            return
        for i, call in enumerate(calls):
            call.logits = logits[i:i + 1]
            if call.pick is not None:
                try:
                    call.token = call.pick(call.logits)
                except BaseException as e:  # the job's own error (NaN logits, a grammar): raised in its thread
                    call.error = e
            call.done.set()

    def _fail_waiting(self) -> None:
        for call in [*self._decodes.values(), *self._prefills]:
            call.error = Stopped("the model is stopping")
            call.done.set()
        self._decodes.clear()
        self._prefills.clear()
