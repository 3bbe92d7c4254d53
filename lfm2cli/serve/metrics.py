"""What `GET /metrics` reports, in Prometheus' text exposition format (version 0.0.4), written by hand: a handful of
counters and gauges need no client library.

The app counts requests by endpoint and status; the engine counts tokens and times each generation. Both update
one `ServeMetrics` under its lock; `render` reads it with the engine's queue state.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# endpoints counted by name; any other path (the client chose it) is counted as "other", so a scanner cannot
# grow the label set without bound
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize")


@dataclass
class ServeMetrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (endpoint, status) -> count
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    generations: int = 0
    prefill_tps: float = 0.0  # of the latest generation
    decode_tps: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[(path if path in ENDPOINTS else "other", status)] += 1

    def generation(self, prompt: int, cached: int, generated: int, prefill_tps: float, decode_tps: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.generated_tokens += generated
            self.generations += 1
            self.prefill_tps = prefill_tps
            if generated > 1:  # one token has no decode step to time
                self.decode_tps = decode_tps

    def render(self, queue: dict[str, Any]) -> str:
        """The exposition text; `queue` is the engine's `status()` (queued, running, queue_size, parallel, batch)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                         for labels, value in samples)

        with self.lock:
            requests = sorted(self.requests.items())
            metric("lfm2_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [(f'{{endpoint="{path}",status="{status}"}}', n) for (path, status), n in requests])
            metric("lfm2_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   [("", self.prompt_tokens)])
            metric("lfm2_prompt_tokens_cached_total", "counter",
                   "Prompt tokens the prefix cache already held (not prefilled again).", [("", self.cached_tokens)])
            metric("lfm2_generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("lfm2_generations_total", "counter", "Generations finished.", [("", self.generations)])
            metric("lfm2_prefill_tokens_per_second", "gauge", "Prefill speed of the latest generation.",
                   [("", float(self.prefill_tps))])
            metric("lfm2_decode_tokens_per_second", "gauge", "Decode speed of the latest generation.",
                   [("", float(self.decode_tps))])
        metric("lfm2_queue_length", "gauge", "Requests waiting for the model.", [("", queue["queued"])])
        metric("lfm2_queue_size", "gauge", "Most requests that may wait (--queue).", [("", queue["queue_size"])])
        metric("lfm2_requests_running", "gauge", "Requests generating now (one per choice of a request).",
               [("", queue["running"])])
        metric("lfm2_sequences_running", "gauge", "Sequences generating now, each on its own cache slot.",
               [("", queue["running"])])
        metric("lfm2_parallel", "gauge", "Most sequences that generate at once (--parallel).",
               [("", queue.get("parallel", 1))])
        metric("lfm2_batch_size", "gauge", "Sequences the latest model step decoded together (0: idle).",
               [("", queue.get("batch", queue["running"]))])
        return "\n".join(lines) + "\n"
