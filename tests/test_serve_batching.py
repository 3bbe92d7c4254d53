"""`lfm2 serve --parallel N`: requests generate at once on their own cache slots, decoded together a step at a time
(serve/batcher.py). Greedy replies must not depend on what else runs: the same texts concurrently, one at a time
and with --parallel 1. Driven with the official `openai` client against a real server on tiny checkpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import MODEL, Running, run_main, serving

pytestmark = pytest.mark.slow  # every test here runs a real server

GREEDY = dict(temperature=0)
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
# token-id prompts with distinct first ids, so no two share a cached prefix: each is prefilled from position 0
# whatever ran before it, and its numbers (so its greedy text) cannot depend on the order requests come in
PROMPTS = [[20 + i, *((7 * i + 3 * j) % 400 + 10 for j in range(5 + 7 * i))] for i in range(8)]
LONG = [90, *((11 * j) % 400 + 10 for j in range(150))]  # read in several prefill slices


@pytest.fixture(scope="module")
def batching(endless_ckpt: Path) -> Iterator[Running]:
    """Eight slots on a model whose greedy replies never end by themselves (every reply runs to max_tokens)."""
    with serving(endless_ckpt, queue=16, max_tokens=100_000, parallel=8) as running:
        yield running


@pytest.fixture(scope="module")
def single(endless_ckpt: Path) -> Iterator[Running]:
    with serving(endless_ckpt, queue=16, max_tokens=100_000, parallel=1) as running:
        yield running


def _wait(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _complete(srv: Running, prompt: list[int], max_tokens: int = 24) -> str:
    r = srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, **GREEDY)
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].text


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` on threads started together; their results in order (an exception is re-raised)."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_concurrent_greedy_replies_match_one_at_a_time_and_parallel_1(batching: Running, single: Running) -> None:
    alone = [_complete(batching, p) for p in PROMPTS]
    steps = batching.engine.batcher.steps
    together = _at_once([lambda p=p: _complete(batching, p) for p in PROMPTS])
    assert together == alone
    # batched for real: fewer model steps than the tokens generated (one step would be 8 x 24 = 192 alone)
    assert batching.engine.batcher.steps - steps < 8 * 24
    assert [_complete(single, p) for p in PROMPTS] == alone
    assert single.engine.batcher is None  # --parallel 1 calls the model directly, as a one-job server always did


def test_a_long_prompt_read_beside_running_streams_gives_its_own_reply(batching: Running) -> None:
    alone = _complete(batching, LONG, 16)
    texts = _at_once([lambda: _complete(batching, LONG, 16), *(lambda p=p: _complete(batching, p, 40)
                                                               for p in PROMPTS[:3])])
    assert texts[0] == alone


def test_requests_join_and_leave_while_others_run(batching: Running) -> None:
    client = batching.client()
    alone = {i: _complete(batching, PROMPTS[i], 60) for i in (0, 1)}
    short = [_complete(batching, p, 8) for p in PROMPTS[2:5]]
    streams = [client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=60, stream=True, **GREEDY)
               for i in (0, 1)]
    parts: list[list[str]] = [[], []]
    for part, stream in zip(parts, streams, strict=True):
        part.append(next(iter(stream)).choices[0].text)
    _wait(lambda: batching.engine.status()["running"] == 2)
    # three requests come and go while the two streams run
    assert _at_once([lambda p=p: _complete(batching, p, 8) for p in PROMPTS[2:5]]) == short
    for part, stream in zip(parts, streams, strict=True):
        part += [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert ["".join(p) for p in parts] == [alone[0], alone[1]]


def test_a_cancelled_stream_leaves_the_others_undisturbed(batching: Running) -> None:
    client = batching.client()
    alone = [_complete(batching, p, 50) for p in PROMPTS[:3]]
    streams = [client.completions.create(model=MODEL, prompt=p, max_tokens=50, stream=True, **GREEDY)
               for p in PROMPTS[:3]]
    iters = [iter(s) for s in streams]
    texts = [next(it).choices[0].text for it in iters]
    streams[1].close()  # its client goes away after one chunk
    batching.logged(r"POST /v1/completions 200 · cancelled: the client went away")
    for i in (0, 2):
        texts[i] += "".join(chunk.choices[0].text for chunk in iters[i] if chunk.choices)
    assert [texts[0], texts[2]] == [alone[0], alone[2]]
    _wait(lambda: batching.engine.status()["running"] == 0)
    assert _complete(batching, PROMPTS[1], 50) == alone[1]  # its slot is whole again


def test_n_choices_run_as_sequences_of_their_own(batching: Running) -> None:
    client = batching.client()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, n=3, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1  # greedy: the same reply three times
    assert r.usage.completion_tokens == 3 * 12
    one = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, **GREEDY)
    assert r.choices[0].message.content == one.choices[0].message.content
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    texts = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, n=3, stream=True,
                                                **GREEDY):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == [one.choices[0].message.content] * 3 and finished == {0, 1, 2}
    c = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, n=2, **GREEDY)
    assert [x.index for x in c.choices] == [0, 1] and c.choices[0].text == c.choices[1].text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, n=9)
    assert e.value.body["param"] == "n"


def test_metrics_show_the_batch(batching: Running) -> None:
    client = batching.client()
    streams = [client.completions.create(model=MODEL, prompt=p, stream=True, **GREEDY)
               for p in PROMPTS[:3]]
    try:
        for s in streams:
            next(iter(s))

        def sample(name: str) -> float:
            text = httpx.get(batching.url + "/metrics", timeout=30).text
            return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

        _wait(lambda: sample("lfm2_batch_size") == 3)
        assert sample("lfm2_sequences_running") == 3 and sample("lfm2_parallel") == 8
    finally:
        for s in streams:
            s.close()
    _wait(lambda: batching.engine.status()["running"] == 0)
    _wait(lambda: batching.engine.status()["batch"] == 0)


@pytest.fixture(scope="module")
def crowded(endless_ckpt: Path) -> Iterator[Running]:
    with serving(endless_ckpt, queue=1, max_tokens=100_000, parallel=2) as running:
        yield running


def test_past_the_slots_and_the_queue_requests_are_refused_with_retry_after(crowded: Running) -> None:
    client = crowded.client()
    status = crowded.engine.status
    streams = [client.completions.create(model=MODEL, prompt=p, stream=True, **GREEDY) for p in PROMPTS[:2]]
    try:
        for s in streams:
            next(iter(s))
        _wait(lambda: status()["running"] == 2)
        replies: list[Any] = []
        waiting = threading.Thread(target=lambda: replies.append(_complete(crowded, PROMPTS[2], 5)), daemon=True)
        waiting.start()
        _wait(lambda: status()["queued"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=2)
        retry = e.value.response.headers["retry-after"]
        assert retry.isdigit() and 1 <= int(retry) <= 60
        with pytest.raises(openai.RateLimitError):  # n choices are queued together or not at all
            client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=2, n=2)
    finally:
        for s in streams:
            s.close()
    waiting.join(60)
    assert replies and status()["queued"] == 0


def test_the_default_parallel_is_what_fits(chat_ckpt: Path) -> None:
    from lfm2cli.loading.loader import load
    from lfm2cli.serve.engine import DEFAULT_PARALLEL, default_parallel

    lm = load(chat_ckpt, device="cpu", dtype="float32")
    cfg = lm.config
    slot = 2 * len(cfg.attention_layers) * cfg.num_key_value_heads * cfg.head_dim * 4 * min(
        8192, cfg.max_position_embeddings)
    assert default_parallel(lm, 1 << 40) == DEFAULT_PARALLEL
    assert default_parallel(lm, 2 * 3 * slot) == 3  # half the memory left holds three slots
    assert default_parallel(lm, 0) == 1


def test_parallel_must_be_at_least_one(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["serve", str(chat_ckpt), "--parallel", "0"], monkeypatch, capsys)
    assert code == 2 and "--parallel" in err


def test_seats_pick_on_the_model_thread_and_keep_their_own_errors(dense_ckpt: Path) -> None:
    """Three jobs decode through seats of one batcher (the model thread steps them together and runs each job's
    pick): each gets the tokens decode_tokens gives it alone, and a pick that fails fails only its own job, in the
    job's own thread."""
    from lfm2cli.decoding.loop import decode_tokens
    from lfm2cli.errors import GenerationError
    from lfm2cli.loading.loader import load
    from lfm2cli.serve.batcher import Batcher

    model = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
    prompts = [[5, 9, 2], [7], [3, 3, 8, 1, 4]]

    def greedy(logits: Any, _seen: Any) -> int:
        return int(logits.argmax())

    alone = [list(decode_tokens(model, p, sampler=greedy, max_tokens=12)) for p in prompts]
    picked_on: set[str] = set()

    def failing(logits: Any, seen: Any) -> int:
        picked_on.add(threading.current_thread().name)
        if len(seen) >= 3 + 4:  # the fifth generated token
            raise GenerationError("no more")
        return greedy(logits, seen)

    batcher = Batcher(model)
    results: dict[int, Any] = {}

    def job(i: int) -> None:
        with batcher.seat() as seat:
            out: list[int] = []
            try:
                for tok in decode_tokens(seat, prompts[i], sampler=failing if i == 0 else greedy, max_tokens=12,
                                         cache=model.new_cache()):
                    out.append(tok)
            except GenerationError as e:
                results[i] = (out, str(e))
                return
            results[i] = out

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batcher.close()
    assert results[0] == (alone[0][:4], "no more")
    assert results[1] == alone[1] and results[2] == alone[2]
    assert picked_on == {"lfm2-model"}
    assert batcher.steps < 3 * 12  # the sequences did share steps
