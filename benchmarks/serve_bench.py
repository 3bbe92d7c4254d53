#!/usr/bin/env python3
"""Concurrent streaming clients against a running OpenAI-compatible server (`lfm2 serve`, llama.cpp's
`llama-server --parallel N`, or any other): aggregate and per-stream decode speed and time to first token.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8080 --streams 1,8
    python benchmarks/serve_bench.py --url http://127.0.0.1:8081 --streams 1,8 --api chat --max-tokens 128

For each stream count N, N clients send their requests at once (each its own prompt of the same length, so no
server can reuse another's prefix), greedy, with a fixed max_tokens; then, with N-1 streams decoding, one more
request arrives and its time to first token is taken (what a new user waits while the server is busy). Where the
server takes `ignore_eos` (llama-server does) it is sent so every reply runs to max_tokens; `lfm2 serve` has no
such field, so run it on random weights (`benchmarks/make_random_checkpoint.py`), where a greedy reply almost
never meets EOS: the table gives the tokens actually produced, which the speeds are computed from.

- completions (the default) sends the prompt as token ids drawn from --ids (both servers take them);
  chat sends random words as one user message, as many as make about --prompt-tokens by the server's count (two
  probes calibrate it); the table gives the count the server reported.
- aggregate tok/s: every generated token of the round over the round's wall time (first request sent to last
  token received), prefill included; stream tok/s: one stream's tokens after its first over the time from its
  first token to its last, median over streams; all decoding tok/s: the tokens of all streams while every one
  of them is past its first token and not yet done, over that time (none for a server that runs one at a time).
- Token counts come from the usage the server sends at the end of the stream (`stream_options.include_usage`);
  a server that sends none is counted one token per text chunk.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

WORDS = ("the model reads text as a sequence of tokens and predicts the next one small models run on a laptop "
         "a phone or a single graphics card liquid designed a hybrid of short convolutions and attention").split()


@dataclass
class Stream:
    """One request's timings (perf_counter seconds) and what the server reported."""

    sent: float
    first: float | None = None  # first chunk carrying generated text
    last: float | None = None  # last chunk carrying generated text
    chunks: int = 0  # chunks carrying generated text
    tokens: int | None = None  # completion_tokens from usage
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return self.tokens if self.tokens is not None else self.chunks

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def decode_rate(self) -> float | None:
        """Tokens after the first over the time from the first to the last: this stream's decode speed."""
        if self.first is None or self.last is None or self.last <= self.first or self.generated < 2:
            return None
        return (self.generated - 1) / (self.last - self.first)


@dataclass
class Options:
    url: str
    api: str = "completions"
    model: str | None = None
    prompt_tokens: int = 128
    max_tokens: int = 64
    ids: tuple[int, int] = (100, 400)
    ignore_eos: bool = False
    timeout: float = 600.0
    words: int | None = None  # chat: words in the message, set by calibrate_words


def request_body(opts: Options, seed: int, max_tokens: int) -> dict[str, Any]:
    """A greedy streaming request whose prompt (from `seed`) shares nothing with another seed's beyond chance."""
    rng = random.Random(seed)
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if opts.model:
        body["model"] = opts.model
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.api == "chat":
        # a number ahead of the words makes each prompt differ from its first token
        words = opts.words if opts.words is not None else opts.prompt_tokens - 1
        text = f"{seed} " + " ".join(rng.choice(WORDS) for _ in range(words))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = [rng.randrange(*opts.ids) for _ in range(opts.prompt_tokens)]
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text a stream chunk carries (completions: text; chat: content or reasoning)."""
    out = ""
    for choice in chunk.get("choices") or []:
        out += choice.get("text") or ""
        delta = choice.get("delta") or {}
        out += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return out


def read_events(stream: Stream, lines: Any) -> None:
    """Fill `stream` from a response's SSE lines (`data: {...}` ... `data: [DONE]`)."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        now = time.perf_counter()
        if "error" in chunk:
            stream.error = str(chunk["error"])
            break
        if chunk_text(chunk):
            stream.first = stream.first if stream.first is not None else now
            stream.last = now
            stream.chunks += 1
            stream.chunk_times.append(now)
        for choice in chunk.get("choices") or []:
            stream.finish_reason = choice.get("finish_reason") or stream.finish_reason
        if chunk.get("usage"):
            stream.tokens = chunk["usage"].get("completion_tokens")
            stream.prompt_tokens = chunk["usage"].get("prompt_tokens")


def run_stream(client: Any, opts: Options, seed: int, max_tokens: int, out: list[Stream],
               started: threading.Barrier | None = None) -> Stream:
    """Send one request (after `started`, so a round's requests leave together) and time its chunks."""
    if started is not None:
        started.wait()
    path = "/v1/chat/completions" if opts.api == "chat" else "/v1/completions"
    stream = Stream(sent=time.perf_counter())
    out.append(stream)
    try:
        with client.stream("POST", opts.url.rstrip("/") + path, json=request_body(opts, seed, max_tokens)) as r:
            if r.status_code != 200:
                stream.error = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}"
                return stream
            read_events(stream, r.iter_lines())
    except Exception as e:  # noqa: BLE001 - a failed stream is reported in the table, the others go on
        stream.error = f"{type(e).__name__}: {e}"
    return stream


def calibrate_words(client: Any, opts: Options) -> None:
    """Chat: the number of words whose message (chat template included) comes to about --prompt-tokens, from
    what the server counts for two probes (one token each): a straight line through them."""
    counts = []
    for words in (opts.prompt_tokens // 4, opts.prompt_tokens // 2):
        opts.words = max(words, 1)
        probe: list[Stream] = []
        run_stream(client, opts, -1 - words, 1, probe)
        if probe[0].prompt_tokens is None:
            raise SystemExit(f"{opts.url}: no usage in the stream ({probe[0].error or 'no error'}); use --api "
                             "completions")
        counts.append((opts.words, probe[0].prompt_tokens))
    (w1, t1), (w2, t2) = counts
    per_word = max((t2 - t1) / max(w2 - w1, 1), 0.1)
    opts.words = max(1, round(w2 + (opts.prompt_tokens - t2) / per_word))


def concurrent_round(client: Any, opts: Options, n: int, seed: int) -> list[Stream]:
    """N requests sent at once; every stream once all have ended."""
    out: list[Stream] = []
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=run_stream, args=(client, opts, seed + i, opts.max_tokens, out, barrier))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def late_arrival(client: Any, opts: Options, n: int, seed: int) -> tuple[Stream, bool]:
    """With N-1 streams past their first token (or the first of them ended), one more request: its stream, and
    whether all N-1 were still running when its first token came (else the time says less than it seems)."""
    busy: list[Stream] = []
    threads = [threading.Thread(target=run_stream, args=(client, opts, seed + i, opts.max_tokens, busy))
               for i in range(n - 1)]
    for t in threads:
        t.start()
    # all N-1 decoding; a server that runs one request at a time never gets there, so stop at the first end
    deadline = time.perf_counter() + opts.timeout
    while time.perf_counter() < deadline and not (len(busy) == n - 1 and all(s.chunks >= 2 for s in busy)) \
            and not any(s.error or s.finish_reason for s in busy):
        time.sleep(0.005)
    late: list[Stream] = []
    run_stream(client, opts, seed + n, min(opts.max_tokens, 8), late)
    for t in threads:
        t.join()
    first = late[0].first
    overlapped = first is not None and all(s.last is not None and s.last > first for s in busy)
    return late[0], overlapped


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def steady_rate(streams: list[Stream]) -> float | None:
    """Tokens a second while every stream of a round decodes (from the last first token to the first last one),
    each stream's chunks in that window scaled by its tokens per chunk; None when the streams never all ran at
    once (a server that serves one request at a time)."""
    done = [s for s in streams if s.first is not None and s.last is not None and s.chunks]
    if not done or len(done) < len(streams):
        return None
    start, end = max(s.first for s in done), min(s.last for s in done)
    if end - start <= 0:
        return None
    tokens = sum(sum(start < t <= end for t in s.chunk_times) * s.generated / s.chunks for s in done)
    return tokens / (end - start)


def summarise(n: int, rounds: list[list[Stream]], lates: list[tuple[Stream, bool]]) -> dict[str, Any]:
    """One table row: the rounds' streams pooled."""
    streams = [s for r in rounds for s in r]
    rates = []
    for r in rounds:
        ok = [s for s in r if s.last is not None]
        if ok:
            rates.append(sum(s.generated for s in ok) / (max(s.last for s in ok) - min(s.sent for s in r)))
    tokens = [s.generated for s in streams if not s.error]
    late_ttft = median([s.ttft for s, _ in lates])
    return {
        "streams": n, "errors": sum(1 for s in streams if s.error),
        "prompt_tokens": median([s.prompt_tokens for s in streams]),
        "tokens_per_stream": (min(tokens), max(tokens)) if tokens else None,
        "aggregate_tok_s": median(rates), "steady_tok_s": median([steady_rate(r) for r in rounds]),
        "stream_tok_s": median([s.decode_rate for s in streams]),
        "ttft_s": median([s.ttft for s in streams]),
        "ttft_max_s": max((s.ttft for s in streams if s.ttft is not None), default=None),
        "late_ttft_s": late_ttft, "late_overlapped": all(o for _, o in lates) if lates else None,
        "first_error": next((s.error for s in streams + [s for s, _ in lates] if s.error), None),
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(label: str, opts: Options, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{label}: {opts.api}, prompt {opts.prompt_tokens} tokens, max_tokens {opts.max_tokens}, greedy"
             f"{', ignore_eos' if opts.ignore_eos else ''}", "",
             "| streams | prompt tok | tokens/stream | aggregate tok/s | all decoding tok/s | stream tok/s (median) | "
             "TTFT median s | TTFT max s | TTFT, N-1 busy s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        span = r["tokens_per_stream"]
        tokens = "-" if span is None else str(span[0]) if span[0] == span[1] else f"{span[0]}-{span[1]}"
        late = "-" if r["streams"] < 2 else _num(r["late_ttft_s"], 3) + ("" if r["late_overlapped"] else " (*)")
        steady = _num(r["steady_tok_s"]) if r["streams"] > 1 else "-"
        cells = [str(r["streams"]), _num(r["prompt_tokens"], 0), tokens, _num(r["aggregate_tok_s"]), steady,
                 _num(r["stream_tok_s"]), _num(r["ttft_s"], 3), _num(r["ttft_max_s"], 3), late]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["streams"] > 1 and not r["late_overlapped"] for r in rows):
        lines += ["", "(*) some of the N-1 streams had ended before the late request's first token."]
    for r in rows:
        if r["errors"] or (r["first_error"] and r["streams"] > 1):
            lines += ["", f"{r['streams']} streams: {r['errors']} failed requests, e.g. {r['first_error']}"]
    return lines


def server_info(client: Any, url: str) -> tuple[str | None, bool, str]:
    """The first model id the server lists, whether it is llama.cpp's server (it answers /props and takes
    ignore_eos), and a label for the table."""
    base = url.rstrip("/")
    model = None
    try:
        data = client.get(base + "/v1/models").json().get("data") or []
        model = data[0]["id"] if data else None
    except Exception:  # noqa: BLE001 - a server without /v1/models still serves completions
        pass
    is_llama = False
    try:
        r = client.get(base + "/props")
        is_llama = r.status_code == 200 and "default_generation_settings" in r.json()
    except Exception:  # noqa: BLE001
        pass
    return model, is_llama, f"{'llama-server' if is_llama else 'server'} {base} ({model or 'no model id'})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api", choices=("completions", "chat"), default="completions")
    ap.add_argument("--ids", default="100:400", help="range LOW:HIGH of the prompt's token ids (completions)")
    ap.add_argument("--ignore-eos", choices=("auto", "on", "off"), default="auto",
                    help="send ignore_eos: auto sends it to llama-server only (lfm2 serve refuses it)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per stream count (pooled)")
    ap.add_argument("--model", help="model id to send (default: the first of GET /v1/models)")
    ap.add_argument("--label", help="name of the server in the table's heading")
    ap.add_argument("--json", help="also write every stream's timings to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    import httpx

    low, high = (int(x) for x in args.ids.split(":"))
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    client = httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0),
                          limits=httpx.Limits(max_connections=max(counts) + 4))
    model, is_llama, label = server_info(client, args.url)
    opts = Options(args.url, args.api, args.model or model, args.prompt_tokens, args.max_tokens, (low, high),
                   ignore_eos=args.ignore_eos == "on" or (args.ignore_eos == "auto" and is_llama))
    run_stream(client, opts, 10**6, 4, [])  # warm-up: first-request costs (kernels, buffers) out of the timings
    if opts.api == "chat":
        calibrate_words(client, opts)
    rows, record, seed = [], [], 0
    for n in counts:
        rounds, lates = [], []
        for _ in range(args.repeat):
            rounds.append(concurrent_round(client, opts, n, seed))
            seed += n
            if n > 1:
                lates.append(late_arrival(client, opts, n, seed))
                seed += n + 1
        rows.append(summarise(n, rounds, lates))
        record.append({"streams": n, "rounds": [[asdict(s) for s in r] for r in rounds],
                       "late": [asdict(s) for s, _ in lates]})
    print("\n".join(table(args.label or label, opts, rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"options": asdict(opts), "rows": rows, "streams": record}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
