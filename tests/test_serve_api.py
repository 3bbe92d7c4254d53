"""`lfm2 serve`'s OpenAI API surface beyond the basics (tests/test_serve.py): logit_bias and the presence and
frequency penalties applied, fields it cannot honour refused by name, a forced answer cut by max_tokens, Retry-After,
/tokenize and /detokenize, /metrics and CORS; driven with the official `openai` client against a real server."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.loading.loader import load
from tests.helpers import MODEL, Running, run_main, serving

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SITE = "https://app.example.com"


@pytest.fixture(scope="module")
def srv(chat_ckpt: Path) -> Iterator[Running]:
    from lfm2cli.serve.access import Access

    with serving(chat_ckpt, access=Access.build(origins=[SITE])) as running:
        yield running


def _library(lm: Any, max_tokens: int, **params: Any) -> list[int]:
    """The tokens the library itself generates for HELLO with these settings: what the server must give."""
    from lfm2cli.runs.local import TextRun

    ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))
    run = TextRun(lm, ids, SamplingParams(**{"repetition_penalty": 1.0, **params}), max_tokens, think=True)
    run.run()
    return run.tokens


def _served_tokens(srv: Running, client: openai.OpenAI, max_tokens: int, **fields: Any) -> tuple[str, list[int]]:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=max_tokens, temperature=0,
                                       extra_body={"repetition_penalty": 1.0}, **fields)
    return r.choices[0].message.content or "", srv.lm.tokenizer.encode(r.choices[0].message.content or "")


# ---- logit_bias, presence_penalty, frequency_penalty


def test_logit_bias_forces_and_bans_tokens(srv: Running, client: openai.OpenAI) -> None:
    plain = _library(srv.lm, 8)
    forced = plain[0] + 1 if plain[0] + 1 < srv.lm.config.vocab_size else plain[0] - 1
    text, _ = _served_tokens(srv, client, 8, logit_bias={str(forced): 100})
    assert _library(srv.lm, 8, temperature=0, logit_bias={forced: 100.0}) == [forced] * 8
    assert text == srv.lm.tokenizer.decode([forced] * 8)
    # a ban moves greedy decoding off its first choice
    banned = _library(srv.lm, 8, temperature=0, logit_bias={plain[0]: -100.0})
    assert banned[0] != plain[0]
    assert _served_tokens(srv, client, 8, logit_bias={str(plain[0]): -100})[0] == srv.lm.tokenizer.decode(banned)


def test_presence_and_frequency_penalties_are_applied_as_the_library_applies_them(
        srv: Running, client: openai.OpenAI) -> None:
    plain = _library(srv.lm, 40, temperature=0)
    for fields in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -1.5}):
        expected = _library(srv.lm, 40, temperature=0, **fields)
        text, _ = _served_tokens(srv, client, 40, **fields)
        assert text == srv.lm.tokenizer.decode(expected, skip_special_tokens=True), fields
        if fields.get("frequency_penalty", 0) > 0:
            # the tiny model repeats itself: a penalty on repeats changes its greedy reply
            assert expected != plain and len(set(expected)) >= len(set(plain))


@pytest.mark.parametrize("fields, param, message", [
    ({"logit_bias": {"999999": 5}}, "logit_bias", "outside the vocabulary"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "from -100 to 100"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
    ({"presence_penalty": 2.5}, "presence_penalty", "from -2 to 2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "from -2 to 2"),
    ({"functions": [WEATHER["function"]]}, "functions", "send tools"),
    ({"function_call": "auto"}, "function_call", "tool_choice"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "think_budget"),
    ({"modalities": ["text", "audio"]}, "modalities", "text model"),
    ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
    ({"extra_body": {"min_tokens": 5}}, "min_tokens", "not supported"),
    ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, "chat_template_kwargs", "not supported"),
])
def test_fields_it_cannot_honour_are_a_400_naming_them(client: openai.OpenAI, fields: dict, param: str,
                                                       message: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **fields)
    assert e.value.param == param and message in e.value.message


def test_fields_without_effect_on_the_reply_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, user="me", metadata={"a": "b"},
                                       store=False, modalities=["text"], presence_penalty=0, logit_bias={},
                                       extra_body={"min_tokens": 0, "ignore_eos": False})
    assert r.choices[0].finish_reason == "length"


def test_completions_take_the_sampling_fields_too(srv: Running, client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital", max_tokens=6, temperature=0,
                                  logit_bias={"42": 100})
    assert r.choices[0].text == srv.lm.tokenizer.decode([42] * 6)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, frequency_penalty=9)
    assert e.value.param == "frequency_penalty"


# ---- a forced answer cut by max_tokens


def test_a_forced_call_cut_by_max_tokens_has_no_marker_text(client: openai.OpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=4, **GREEDY)
        assert r.choices[0].finish_reason == "length"
        assert not r.choices[0].message.tool_calls and "<|" not in (r.choices[0].message.content or "")
        chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER],
                                                     tool_choice=choice, max_tokens=4, stream=True, **GREEDY))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "<|" not in streamed and chunks[-1].choices[0].finish_reason == "length"


def test_a_json_answer_cut_by_max_tokens_is_plain_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                       max_tokens=3, **GREEDY)
    content = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "length" and "<|" not in content and content.lstrip().startswith("{")


# ---- /tokenize, /detokenize


def test_tokenize_and_detokenize_in_llama_server_and_vllm_shapes(srv: Running) -> None:
    tok = srv.lm.tokenizer
    text = "Paris is the capital of France."
    r = httpx.post(srv.url + "/tokenize", json={"content": text}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(text)
    r = httpx.post(srv.url + "/tokenize", json={"prompt": text}, timeout=30)  # vLLM's: BOS first by default
    assert r.json()["tokens"] == tok.encode(text, add_special_tokens=True) and r.json()["count"] == len(
        r.json()["tokens"])
    assert httpx.post(srv.url + "/tokenize", json={"content": text, "add_special": True},
                      timeout=30).json()["tokens"] == tok.encode(text, add_special_tokens=True)
    r = httpx.post(srv.url + "/detokenize", json={"tokens": tok.encode(text)}, timeout=30)
    assert r.json() == {"content": text, "prompt": text}
    bad = httpx.post(srv.url + "/detokenize", json={"tokens": [10**7]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    bad = httpx.post(srv.url + "/tokenize", json={"content": 5}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "content"


# ---- /metrics


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in:\n{text}"
    return float(match[1])


def test_metrics_count_requests_and_tokens(srv: Running, client: openai.OpenAI) -> None:
    before = httpx.get(srv.url + "/metrics", timeout=30).text
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, **GREEDY)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, presence_penalty=7)
    r2 = httpx.get(srv.url + "/metrics", timeout=30)
    after = r2.text
    assert r2.headers["content-type"].startswith("text/plain; version=0.0.4")
    chat_ok = 'lfm2_requests_total{endpoint="/v1/chat/completions",status="200"}'
    chat_bad = 'lfm2_requests_total{endpoint="/v1/chat/completions",status="400"}'
    assert _sample(after, chat_ok) == _sample(before, chat_ok) + 1 if chat_ok in before else _sample(after,
                                                                                                    chat_ok) >= 1
    assert _sample(after, chat_bad) >= 1
    generated = "lfm2_generation_tokens_total"
    assert _sample(after, generated) - _sample(before, generated) == r.usage.completion_tokens
    assert _sample(after, "lfm2_prompt_tokens_total") - _sample(before, "lfm2_prompt_tokens_total") \
        == r.usage.prompt_tokens
    assert _sample(after, "lfm2_queue_length") == 0 and _sample(after, "lfm2_batch_size") == 0
    assert _sample(after, "lfm2_decode_tokens_per_second") > 0


# ---- CORS


def test_cors_answers_only_the_origins_allowed_by_name(srv: Running) -> None:
    preflight = httpx.options(srv.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": SITE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == SITE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
    site = srv.client(default_headers={"Origin": SITE})
    raw = site.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert raw.headers["access-control-allow-origin"] == SITE and raw.parse().choices
    # a page on this machine is answered (access.py) but gets no CORS headers unless named with --allow-origin
    local = srv.client(default_headers={"Origin": "http://localhost:3000"})
    raw = local.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert "access-control-allow-origin" not in raw.headers
    other = httpx.options(srv.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers


# ---- Retry-After


@pytest.fixture(scope="module")
def endless(endless_ckpt: Path) -> Iterator[Running]:
    with serving(endless_ckpt, queue=0, max_tokens=100_000) as running:
        yield running


def test_a_full_queue_says_when_to_retry_and_the_client_follows_it(endless: Running) -> None:
    client = endless.client()
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True, **GREEDY)
    next(iter(stream))
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        retry = e.value.response.headers["retry-after"]
        assert retry.isdigit() and 1 <= int(retry) <= 60 and f"retry in {retry} s" in e.value.message
        # a client that retries waits as told: its first try is refused, a later one runs once the slot is free
        patient = openai.OpenAI(base_url=endless.url + "/v1", api_key="unused", max_retries=3, timeout=60)
        replies: list[Any] = []
        worker = threading.Thread(target=lambda: replies.append(patient.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2)), daemon=True)
        refused = sum(" 429 " in line for line in endless.log)
        worker.start()
        deadline = time.monotonic() + 30
        while sum(" 429 " in line for line in endless.log) == refused:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        stream.close()
    worker.join(60)
    assert replies and replies[0].usage.completion_tokens == 2


# ---- the same settings on the command line


def test_generate_takes_the_new_sampling_options(chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, out, err = run_main(["generate", str(chat_ckpt), "-p", "Hi", "--raw", "-t", "0", "-n", "5", "--json",
                               "--logit-bias", "42=100", "--presence-penalty", "0.5", "--frequency-penalty", "1"],
                              monkeypatch, capsys)
    assert code == 0, err
    tok = load(chat_ckpt, device="cpu", dtype="float32").tokenizer
    assert json.loads(out)["text"] == tok.decode([42] * 5)
    for args, message in ((["--presence-penalty", "3"], "--presence-penalty must be a number from -2 to 2"),
                          (["--logit-bias", "5=abc"], "--logit-bias must be"),
                          (["--logit-bias", "999999=1"], "outside the vocabulary")):
        code, out, err = run_main(["generate", str(chat_ckpt), "-p", "Hi", "-n", "2", *args], monkeypatch, capsys)
        assert code == 2 and message in err, err
