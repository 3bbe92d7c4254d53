"""`lfm2 serve`'s logprobs: chat's `logprobs`/`top_logprobs` and completions' legacy `logprobs`, streamed and not,
each token's logprob the log-softmax of the model's raw logits at its step (checked against a direct greedy run of
the same tiny checkpoint); driven with the official `openai` client against a real server."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import openai
import pytest

from lfm2cli.runs.local import token_text
from lfm2cli.runs.prompt import stop_ids
from tests.helpers import MODEL, Running, serving

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


def _direct(lm: Any, ids: list[int], steps: int) -> list[tuple[str, bytes, float, list[float]]]:
    """Greedy decoding on the model itself: each step's token text and bytes, its log-softmax and the sorted top
    ones."""
    import torch

    cache = lm.model.new_cache()
    logits = lm.model(torch.tensor([ids]), cache)
    out = []
    for _ in range(steps):
        logprobs = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), -1)
        tok = int(logprobs.argmax())
        if tok in stop_ids(lm):
            break
        out.append((*token_text(lm.tokenizer, tok), float(logprobs[tok]),
                    torch.sort(logprobs, descending=True).values[:5].tolist()))
        logits = lm.model(torch.tensor([[tok]]), cache)
    return out


def _chat_ids(lm: Any) -> list[int]:
    return lm.tokenizer.encode(lm.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))


def _check_chat_entries(content: list[Any], expected: list[tuple[str, bytes, float, list[float]]], top: int
                        ) -> None:
    assert content and len(content) <= len(expected)
    for entry, (text, raw, logprob, best) in zip(content, expected, strict=False):
        assert entry.token == text and entry.bytes == list(raw)
        assert math.isclose(entry.logprob, logprob, abs_tol=1e-3)
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == top and values == sorted(values, reverse=True)
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(values, best, strict=False))
        if top:  # greedy: the chosen token is the most likely one
            assert entry.top_logprobs[0].token == entry.token
            assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)


def test_chat_logprobs_are_the_models_log_softmax(srv: Running, client: openai.OpenAI) -> None:
    expected = _direct(srv.lm, _chat_ids(srv.lm), 12)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, logprobs=True, top_logprobs=5,
                                       **GREEDY)
    content = r.choices[0].logprobs.content
    _check_chat_entries(content, expected, 5)
    # every generated token is an answer token here: only ones whose text never showed may be missing at the end
    assert len(content) <= r.usage.completion_tokens


def test_chat_logprobs_streamed_are_the_same_entries(srv: Running, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, logprobs=True,
                                           top_logprobs=2, **GREEDY).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, logprobs=True,
                                                top_logprobs=2, stream=True, **GREEDY):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]


def test_chat_logprobs_without_top_ones_and_not_asked(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, logprobs=True, **GREEDY)
    assert r.choices[0].logprobs.content and all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, **GREEDY)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(srv: Running, client: openai.OpenAI) -> None:
    ids = srv.lm.tokenizer.encode("The capital of France", add_special_tokens=True)
    expected = _direct(srv.lm, ids, 10)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert lp.tokens and len(lp.tokens) <= len(expected)
    assert lp.tokens == [text for text, _, _, _ in expected[:len(lp.tokens)]]
    for got, (_, _, logprob, _) in zip(lp.token_logprobs, expected, strict=False):
        assert math.isclose(got, logprob, abs_tol=1e-3)
    for token, top, logprob in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
        assert token in top and top[token] == logprob == max(top.values())
        assert 1 <= len(top) <= 3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(r.choices[0].text)
    # streamed: the same tokens, offsets going on from chunk to chunk
    chunks = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=ids, max_tokens=10, logprobs=3, stream=True, **GREEDY) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


@pytest.mark.parametrize("endpoint, fields, param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
])
def test_logprob_counts_out_of_range_are_a_400(client: openai.OpenAI, endpoint: str, fields: dict,
                                               param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body=fields)
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body=fields)
    assert e.value.param == param


def test_reasoning_tokens_are_not_listed(opening_ckpt: Path) -> None:
    """The template opens the `<think>` block and random weights never close it: no token is the answer's."""
    with serving(opening_ckpt) as running:
        r = running.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, logprobs=True,
                                                     **GREEDY)
    assert r.choices[0].message.model_extra["reasoning_content"] and r.choices[0].message.content == ""
    assert r.choices[0].logprobs.content == []
