"""`lfm2 serve`: the real server (uvicorn on 127.0.0.1, a free port) on tiny checkpoints, driven with the official
`openai` client. Replies are compared with the library's own TextRun on the same prompt, so a wrong prompt, wrong
sampling settings or a wrongly reused cache all show up as a different text."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from lfm2cli.decoding.sampling import SamplingParams
from tests.helpers import MODEL, Running, api_error, opening_template, run_main, serving, start_serve, thinking_copy

pytestmark = pytest.mark.slow  # every test here runs a real server

GREEDY = dict(temperature=0)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def _expected(lm, messages: list[dict] | None = None, prompt: str | None = None, max_tokens: int = 64,
              params: dict | None = None, **run_options: Any):
    """What the library generates cold for this request: the reference the server must match."""
    from lfm2cli.runs.local import TextRun
    from lfm2cli.runs.prompt import encode_prompt

    sampling = SamplingParams.from_dict({**SamplingParams().to_dict(), **(params or GREEDY)})
    if messages is not None:
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=run_options.get("tools"))
        rendered = encode_prompt(lm.tokenizer, text)
        ids = rendered.ids
        run = TextRun(lm, ids, sampling, max_tokens, think=True, opened=rendered.opened, **run_options)
    else:
        ids = lm.tokenizer.encode(prompt, add_special_tokens=True)
        run = TextRun(lm, ids, sampling, max_tokens, **run_options)
    run.run()
    return run, ids


HELLO = [{"role": "user", "content": "What is the capital of France?"}]


# ---- chat, completions, usage


def test_models_lists_the_one_model(client: openai.OpenAI, chat_ckpt: Path) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(str(chat_ckpt)).id == MODEL  # the checkpoint's path names it too


def test_chat_gives_what_the_library_gives(srv: Running, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, **GREEDY)
    run, ids = _expected(srv.lm, HELLO, max_tokens=20)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == run.text
    assert choice.finish_reason == run.stats.finish_reason
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(run.tokens))
    assert r.usage.total_tokens == len(ids) + len(run.tokens)
    srv.logged(rf"POST /v1/chat/completions 200 · {len(ids)} prompt tokens.* \+ {len(run.tokens)} generated")


def test_sampling_fields_reach_the_sampler(srv: Running, client: openai.OpenAI) -> None:
    params = dict(temperature=1.3, top_p=0.9, top_k=40, min_p=0.02, repetition_penalty=1.2, seed=7)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=16,
                                       temperature=1.3, top_p=0.9, seed=7,
                                       extra_body=dict(top_k=40, min_p=0.02, repetition_penalty=1.2))
    run, _ = _expected(srv.lm, HELLO, max_tokens=16, params=params)
    assert r.choices[0].message.content == run.text
    other = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=1.3, top_p=0.9,
                                           seed=8, extra_body=dict(top_k=40, min_p=0.02, repetition_penalty=1.2))
    assert other.choices[0].message.content != run.text  # the seed is not ignored either


def test_a_streamed_chat_is_the_plain_reply_in_pieces(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    quiet = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True))
    assert all(c.usage is None and c.choices for c in quiet)  # usage only when asked for


def test_stop_strings_end_the_reply(srv: Running, client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, **GREEDY)
    text = full.choices[0].message.content
    stop = text[5:8]
    assert stop and stop not in text[:7]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, stop=[stop, "zzzz"], **GREEDY)
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    single = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, stop=stop, **GREEDY)
    assert single.choices[0].message.content == text[:text.index(stop)]


def test_completions_plain_and_streamed(srv: Running, client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    run, ids = _expected(srv.lm, prompt=prompt, max_tokens=12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    assert r.object == "text_completion" and r.choices[0].text == run.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(run.tokens)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == run.text
    assert chunks[-1].usage.completion_tokens == len(run.tokens)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, **GREEDY)  # token ids work too
    assert by_ids.choices[0].text == run.text


def test_a_resent_conversation_prefills_only_its_new_tokens(srv: Running, client: openai.OpenAI) -> None:
    tok = srv.lm.tokenizer
    first = [{"role": "system", "content": "Answer in one word."}, *HELLO]
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=16, **GREEDY)
    ids1 = tok.encode(tok.apply_chat_template(first))
    assert r1.usage.prompt_tokens == len(ids1)
    # the client resends everything with the reply and one new message: only the part after ids1 is new
    second = [*first, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=second, max_tokens=16, **GREEDY)
    ids2 = tok.encode(tok.apply_chat_template(second))
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(ids2) and cached == len(ids1)
    assert srv.engine.last_prefilled == len(ids2) - len(ids1)
    assert r2.choices[0].message.content == _expected(srv.lm, second, max_tokens=16)[0].text
    # the reply as the model wrote it, sent back: at most the reply and the new message are prefilled
    third = [*first, {"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "Why?"}]
    client.chat.completions.create(model=MODEL, messages=first, max_tokens=16, **GREEDY)
    r3 = client.chat.completions.create(model=MODEL, messages=third, max_tokens=16, **GREEDY)
    ids3 = tok.encode(tok.apply_chat_template(third))
    assert 0 < r3.usage.prompt_tokens - r3.usage.prompt_tokens_details.cached_tokens <= len(ids3) - len(ids1)
    assert r3.choices[0].message.content == _expected(srv.lm, third, max_tokens=16)[0].text
    srv.logged(rf"{len(ids2)} prompt tokens \({len(ids1)} cached\)")


# ---- tools, structured output, reasoning


def test_tool_choice_required_returns_tool_calls(srv: Running, client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                           tools=[WEATHER, NOW], tool_choice="required", temperature=1, seed=seed,
                                           max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            schema = {"get_weather": WEATHER, "now": NOW}[call.function.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)


def test_parallel_tool_calls_false_gives_exactly_one_call(client: openai.OpenAI) -> None:
    """A sampled small model lists call after call; OpenAI's parallel_tool_calls: false makes it one."""
    counts = []
    for seed in range(6):
        for parallel in (True, False):
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, NOW],
                tool_choice="required", parallel_tool_calls=parallel, temperature=1, seed=seed, max_tokens=300)
            if parallel:
                counts.append(len(r.choices[0].message.tool_calls or []))
            else:
                assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    assert max(counts) > 1  # the control: without the flag, this model does make several


def test_a_named_tool_choice_calls_that_tool_also_when_streamed(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=[WEATHER, NOW], tool_choice=choice, temperature=1, seed=3,
                                                 max_tokens=200, stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [tc.function.name for tc in calls] == ["get_weather"] and calls[0].index == 0
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_history_reaches_the_template_as_the_model_writes_it(srv: Running, client: openai.OpenAI) -> None:
    from lfm2cli.reply.toolcalls import ToolCall, format_calls

    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, **GREEDY)
    rendered = [messages[0], {"role": "assistant", "content": format_calls([ToolCall("get_weather",
                                                                                     {"city": "Paris"})])},
                {"role": "tool", "content": "22 C, sunny"}]
    text = srv.lm.tokenizer.apply_chat_template(rendered)  # tool_choice none: the tools are not listed
    assert '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>' in text
    assert r.usage.prompt_tokens == len(srv.lm.tokenizer.encode(text))
    assert r.choices[0].message.content == _expected(srv.lm, rendered, max_tokens=8)[0].text


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe someone."}], temperature=1, seed=seed,
            max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    # any object: a random model may write keys for ever, so a seed whose object ends is used
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=1, seed=2, max_tokens=200,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.fixture(scope="module")
def thinking(chat_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A checkpoint with `<think>` tokens whose template opens the block, as thinking models' templates do."""
    path = thinking_copy(chat_ckpt, tmp_path_factory.mktemp("opening") / "ckpt", template=opening_template())
    with serving(path, think_budget=5) as running:
        yield running


def test_reasoning_comes_apart_from_the_answer(thinking: Running) -> None:
    """The tiny model never closes the block; the budget (5 here by default, 3 by the request) does."""
    client = thinking.client()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, extra_body={"think_budget": 3},
                                       **GREEDY)
    run, _ = _expected(thinking.lm, HELLO, max_tokens=30, think_budget=3)
    message = r.choices[0].message
    assert run.reasoning and message.reasoning_content == run.reasoning and message.content == run.text
    assert "<think>" not in message.content and "</think>" not in (message.content + message.reasoning_content)
    assert r.usage.completion_tokens_details.reasoning_tokens >= 3
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, stream=True,
                                                 extra_body={"think_budget": 3}, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == run.reasoning
    assert "".join(d.content or "" for d in deltas) == run.text
    default = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=30, **GREEDY)
    assert default.choices[0].message.reasoning_content == _expected(thinking.lm, HELLO, max_tokens=30,
                                                                     think_budget=5)[0].reasoning


def test_a_resent_conversation_reuses_the_cache_when_the_template_opened_the_block(thinking: Running) -> None:
    """The generation prompt ends in `<think>`, which the resent conversation does not have (the client sends the
    answer back): the cache goes back to where the generation prompt began, not to the start."""
    tok, client = thinking.lm.tokenizer, thinking.client()
    r1 = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, **GREEDY)
    resent = [*HELLO, {"role": "assistant", "content": r1.choices[0].message.content or "Paris."},
              {"role": "user", "content": "And of Japan?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=resent, max_tokens=12, **GREEDY)
    before_reply = len(tok.encode(tok.apply_chat_template(HELLO, add_generation_prompt=False)))
    assert r2.usage.prompt_tokens_details.cached_tokens == before_reply
    assert r2.choices[0].message.reasoning_content == _expected(thinking.lm, resent, max_tokens=12,
                                                                think_budget=5)[0].reasoning


# ---- errors


def _post(srv: Running, path: str, body: Any = None, raw: bytes | None = None, **kw: Any) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30,
                      **kw)


@pytest.mark.parametrize("body, param, message", [
    ({"messages": HELLO, "temperature": "hot"}, "temperature",
     "temperature must be 0 (greedy) or a number from 0.001 to 1000"),
    ({"messages": HELLO, "temperature": -1}, "temperature", "temperature must be"),
    ({"messages": HELLO, "top_p": 0}, "top_p", "top_p must be a number in (0, 1]"),
    ({"messages": HELLO, "seed": 1.5}, "seed", "seed must be"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "max_tokens must be a whole number >= 1"),
    ({"messages": HELLO, "stream": "yes"}, "stream", "stream: expected a boolean, got string"),
    ({"messages": HELLO, "stop": [1]}, "stop", "stop: expected a string or a list"),
    ({"messages": HELLO, "n": 9}, "n", "n: expected 1 to 8 choices"),
    ({"messages": "hi"}, "messages", "messages: expected a non-empty list"),
    ({"model": MODEL}, "messages", "messages: required"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "expected one of system"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "only text parts"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {}}]}, "tools", "tool 1 has no function name"),
    ({"messages": HELLO, "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "expected auto, none"),
    ({"messages": HELLO, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": HELLO, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "no tool named 'nope'"),
    ({"messages": HELLO, "response_format": {"type": "yaml"}}, "response_format", "expected text, json_object"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "string", "pattern": "(?=x)"}}}}, "response_format", "cannot be enforced"),
    ({"messages": HELLO, "model": 3}, "model", "model: expected a string"),
])
def test_a_bad_chat_request_is_a_400_naming_the_field(srv: Running, body: dict, param: str, message: str) -> None:
    error = api_error(_post(srv, "/v1/chat/completions", body), 400)
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


def test_a_bad_completion_request_is_a_400(srv: Running) -> None:
    assert api_error(_post(srv, "/v1/completions", {"prompt": ["a", "b"]}), 400)["param"] == "prompt"
    assert "outside the vocabulary" in api_error(_post(srv, "/v1/completions", {"prompt": [1, 10**6]}), 400)["message"]
    assert api_error(_post(srv, "/v1/completions", {"prompt": "x", "echo": True}), 400)["param"] == "echo"


def test_invalid_json_and_bodies_that_are_not_objects(srv: Running) -> None:
    assert "not valid JSON" in api_error(_post(srv, "/v1/chat/completions", raw=b'{"messages": ['), 400)["message"]
    assert "not valid JSON" in api_error(_post(srv, "/v1/chat/completions", raw=b"\xff\xfe{"), 400)["message"]
    assert "empty" in api_error(_post(srv, "/v1/chat/completions", raw=b""), 400)["message"]
    assert "must be a JSON object" in api_error(_post(srv, "/v1/chat/completions", [1]), 400)["message"]
    assert "not valid JSON" in api_error(_post(srv, "/v1/completions", raw=b"[" * 100_000), 400)["message"]


def test_unknown_fields_are_ignored(srv: Running) -> None:
    r = _post(srv, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 3, "frobnicate": {"x": 1},
                                            "presence_penalty": 0, "user": "me"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_the_context_limit_is_a_400(srv: Running, client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "Paris is the capital of France. " * 400}]  # far past 2048 tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "2048" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found" and "tiny" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_an_oversize_body_is_a_413(srv: Running) -> None:
    body = {"messages": [{"role": "user", "content": "x" * (300 << 10)}]}
    assert api_error(_post(srv, "/v1/chat/completions", body), 413)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies as the body arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}]}'

    r = httpx.post(srv.url + "/v1/chat/completions", content=chunked(), timeout=30)
    api_error(r, 413)


def test_unknown_paths_and_methods_answer_in_the_same_shape(srv: Running) -> None:
    api_error(httpx.get(srv.url + "/v1/nothing"), 404)
    api_error(httpx.get(srv.url + "/v1/chat/completions"), 405)
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_an_unexpected_failure_is_a_generic_500_and_its_details_stay_in_the_log(
        srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """No request can make the code fail on purpose, so a failure is injected where jobs are built."""

    def broken(*_: Any) -> None:
        raise RuntimeError("secret detail at /home/user/model")

    monkeypatch.setattr(srv.engine, "chat_job", broken)
    r = _post(srv, "/v1/chat/completions", {"messages": HELLO})
    error = api_error(r, 500)
    assert error["type"] == "server_error" and "secret" not in r.text
    assert any("secret detail" in line and "Traceback" not in line for line in srv.errors)


# ---- the queue, disconnects, the API key


@pytest.fixture(scope="module")
def endless(endless_ckpt: Path) -> Iterator[Running]:
    """Greedy decoding never ends here by itself: a reply runs until its max_tokens or its cancellation."""
    with serving(endless_ckpt, queue=1, max_tokens=100_000) as running:
        yield running


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_full_queue_is_a_429_and_a_client_that_leaves_frees_its_slot(endless: Running) -> None:
    client = endless.client()
    status = endless.engine.status
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True, **GREEDY)
    next(iter(stream))
    _wait(lambda: status()["running"] == 1)
    # a request that waits behind the endless one and gives up leaves the queue at once
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(endless.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=0.5)
    _wait(lambda: status()["queued"] == 0)
    endless.logged(r"POST /v1/chat/completions 499 · cancelled")
    replies: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: replies.append(
        _post(endless, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 50})), daemon=True)
    waiting.start()
    _wait(lambda: status()["queued"] == 1)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    assert status() == {**status(), "running": 1, "queued": 1}
    stream.close()  # the streaming client goes away: its generation stops and the waiting request runs
    waiting.join(30)
    assert not waiting.is_alive() and replies[0].status_code == 200
    assert replies[0].json()["usage"]["completion_tokens"] == 50
    endless.logged(r"POST /v1/chat/completions 200 · cancelled: the client went away")
    _wait(lambda: status()["running"] == 0)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, **GREEDY)
    assert r.usage.completion_tokens == 5  # the engine is free and well


def test_a_disconnected_plain_request_stops_its_generation(endless: Running) -> None:
    before = endless.engine.status()["completed"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(endless.url + "/v1/chat/completions", json={"messages": HELLO}, timeout=1.0)
    _wait(lambda: endless.engine.status()["completed"] == before + 1 and endless.engine.status()["running"] == 0)
    endless.logged(r"499 · cancelled: the client went away")


def test_the_api_key_is_required_except_for_health(chat_ckpt: Path) -> None:
    with serving(chat_ckpt, api_key="s3cret") as locked:
        with pytest.raises(openai.AuthenticationError) as e:
            locked.client().models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            locked.client(api_key="wrong").chat.completions.create(model=MODEL, messages=HELLO)
        assert api_error(httpx.get(locked.url + "/v1/models"), 401)["message"].startswith("this server needs")
        assert [m.id for m in locked.client(api_key="s3cret").models.list().data] == [MODEL]
        assert httpx.get(locked.url + "/health").status_code == 200


# ---- the command


def test_a_public_host_needs_an_api_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                        tmp_path: Path) -> None:
    code, out, err = run_main(["serve", str(tmp_path / "none"), "--host", "0.0.0.0"], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["error: --host 0.0.0.0 lets other machines in; set --api-key KEY too (or "
                                        "keep the default --host 127.0.0.1)"]


def test_a_port_in_use_fails_in_one_line_before_the_model_loads(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture,
                                                                tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run_main(["serve", str(tmp_path / "none"), "--port", str(port)], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another --port" in err


def _lfm2_serve(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    proc, url, lines, _ = start_serve(*args)
    return proc, url, lines


def test_lfm2_serve_starts_logs_each_request_and_stops_on_ctrl_c(chat_ckpt: Path) -> None:
    proc, url, lines = _lfm2_serve(str(chat_ckpt), "--dtype", "float32", "--api-key", "k1")
    try:
        assert len(lines) == 1 and lines[0].startswith(f"lfm2 serve · {chat_ckpt} · cpu float32 · context 2048")
        assert "(API key required)" in lines[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [str(chat_ckpt)]
        r = client.chat.completions.create(model=str(chat_ckpt), messages=HELLO, max_tokens=5, **GREEDY)
        assert r.usage.completion_tokens <= 5
        _wait(lambda: any("POST /v1/chat/completions 200" in line for line in lines))
        line = next(line for line in lines if "POST /v1/chat/completions" in line)
        assert re.fullmatch(rf"127\.0\.0\.1 POST /v1/chat/completions 200 · {r.usage.prompt_tokens} prompt tokens \+ "
                            rf"{r.usage.completion_tokens} generated · \d+\.\d\d s", line)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0 and lines[-1] == "lfm2 serve stopped"
    assert not any("Traceback" in line or "ERROR" in line for line in lines)


def test_serve_name_sets_the_ids_clients_may_send(chat_ckpt: Path) -> None:
    """--name, repeated: /v1/models lists the names in order, replies carry the first, requests may send any (or
    the names the server always took: the path, the folder); any other name is still refused."""
    proc, url, lines = _lfm2_serve(str(chat_ckpt), "--dtype", "float32", "--quiet", "--name", "lfm2-tiny",
                                   "--name", "gpt-4o-mini", "--name", "lfm2-tiny")
    try:
        assert lines[0].startswith("lfm2 serve · lfm2-tiny · cpu float32")
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["lfm2-tiny", "gpt-4o-mini"]
        assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
        replies = [client.chat.completions.create(model=name, messages=HELLO, max_tokens=4, **GREEDY)
                   for name in ("lfm2-tiny", "gpt-4o-mini", str(chat_ckpt), chat_ckpt.name)]
        assert {r.model for r in replies} == {"lfm2-tiny"}
        assert len({r.choices[0].message.content for r in replies}) == 1
        done = client.completions.create(model="gpt-4o-mini", prompt="Hello", max_tokens=4, **GREEDY)
        assert done.model == "lfm2-tiny"
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=4)
        assert e.value.code == "model_not_found" and "lfm2-tiny" in e.value.message
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0


@pytest.mark.parametrize("name", ["", " ", " padded"])
def test_serve_name_must_be_an_id(name: str, chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["serve", str(chat_ckpt), "--port", "0", "--name", name], monkeypatch, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--name" in err


# ---- load


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_sixteen_clients_with_a_quarter_leaving_mid_stream(endless_ckpt: Path) -> None:
    """16 clients x 8 requests on one server (queue 16): every completed reply equals the reply the same request
    gets alone, none hangs, the queue drains, and the server's memory comes back to its idle level."""
    proc, url, lines = _lfm2_serve(str(endless_ckpt), "--dtype", "float32", "--queue", "16", "--quiet")
    prompts = [[{"role": "user", "content": text}] for text in
               ("What is the capital of France?", "Write a haiku.", "Hello there", "Numbers: 1 2 3")]
    tokens = 24
    name = str(endless_ckpt)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
        expected = [client.chat.completions.create(model=name, messages=p, max_tokens=tokens, **GREEDY)
                    .choices[0].message.content for p in prompts]
        assert len(set(expected)) == len(prompts)
        for p in prompts:  # warm: the cache has grown to its size and every code path has run once
            client.chat.completions.create(model=name, messages=p, max_tokens=tokens, **GREEDY)
        idle = _rss_kb(proc.pid)
        problems: list[str] = []
        counts = {"completed": 0, "left": 0}
        lock = threading.Lock()

        def worker(n: int) -> None:
            own = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)
            for i in range(8):
                k = (n + i) % len(prompts)
                try:
                    if n % 4 == 0:  # a quarter of the clients leave after a few chunks
                        with own.chat.completions.create(model=name, messages=prompts[k], max_tokens=tokens,
                                                         stream=True, **GREEDY) as stream:
                            for j, _ in enumerate(stream):
                                if j == 3:
                                    break
                        with lock:
                            counts["left"] += 1
                        continue
                    if n % 2:
                        r = own.chat.completions.create(model=name, messages=prompts[k], max_tokens=tokens, **GREEDY)
                        text = r.choices[0].message.content
                    else:
                        chunks = own.chat.completions.create(model=name, messages=prompts[k], max_tokens=tokens,
                                                             stream=True, **GREEDY)
                        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    if text != expected[k]:
                        problems.append(f"client {n} request {i}: {text!r} != {expected[k]!r}")
                    with lock:
                        counts["completed"] += 1
                except Exception as e:  # noqa: BLE001 - every failure is a finding
                    problems.append(f"client {n} request {i}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not any(t.is_alive() for t in threads), "a client hangs"
        assert problems == []
        assert counts == {"completed": 12 * 8, "left": 4 * 8}
        health = httpx.get(url + "/health").json()
        _wait(lambda: httpx.get(url + "/health").json()["running"] == 0)
        assert health["queued"] == 0
        after = client.chat.completions.create(model=name, messages=prompts[0], max_tokens=tokens, **GREEDY)
        assert after.choices[0].message.content == expected[0]
        grown = _rss_kb(proc.pid) - idle
        assert grown < 64 * 1024, f"the server holds {grown} kB more than when idle"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0
    assert not any("Traceback" in line or "error" in line.lower() for line in lines), lines
