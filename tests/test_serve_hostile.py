"""`lfm2 serve` against hostile or careless clients: every mistake a client can make is a 4xx naming the field (never
a 500), a request's memory is bounded by its body (not by what tokenising it would cost), and browsers' pages from
other sites, or reaching the server under another name (DNS rebinding), are refused. Each test sends its bad
request to a real `lfm2 serve` subprocess and then checks the server still answers a good one."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import api_error, run_main

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class Server:
    """`lfm2 serve CKPT ARGS --port 0` in a subprocess, its stderr lines collected."""

    def __init__(self, ckpt: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("LFM2_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", "serve", str(ckpt), "--dtype", "float32",
                                      *args, "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if "listening on" in line:
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(120):
            self.proc.kill()
            raise AssertionError(f"lfm2 serve did not start: {self.lines}")
        self.url = re.search(r"listening on (http://\S+)/v1", self.lines[-1]).group(1)
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def post(self, path: str, body: Any = None, raw: bytes | None = None, **headers: str) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()
        return self.client.post(path, content=content, headers={"Content-Type": "application/json", **headers})

    def completed(self) -> int:
        """Jobs run so far, once none is running (a reply is out a moment before its job counts as done)."""
        for _ in range(500):
            health = self.client.get("/health").json()
            if health["running"] == 0 and health["queued"] == 0:
                return health["completed"]
            time.sleep(0.01)
        raise AssertionError(f"the server stays busy: {health}")

    def answers(self) -> None:
        """A good request still gets its reply."""
        r = self.post(CHAT, {"messages": HELLO, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        assert code == 0, self.lines
        assert not any("Traceback" in line or line.startswith("error in") for line in self.lines), self.lines


@pytest.fixture(scope="module")
def srv(chat_ckpt: Path) -> Iterator[Server]:
    """The server as users start it: every limit at its default."""
    server = Server(chat_ckpt)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def roomy(chat_ckpt: Path) -> Iterator[Server]:
    """A server taking 8 MB bodies, one more site and one more host name."""
    server = Server(chat_ckpt, "--max-body", "8M", "--quiet", "--allow-origin", "https://app.example.com",
                    "--allow-host", "lfm2.example.com")
    yield server
    server.stop()


def _nested(depth: int) -> dict:
    value: dict = {"city": "Paris"}
    for _ in range(depth):
        value = {"a": value}
    return value


def _call(arguments: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}


def _tool(parameters: Any, **extra: Any) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters, **extra}}


CHAT_MISTAKES = [
    # (what, raw body or JSON body, the param named, words of the message)
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
     "messages[0].content", "lone surrogate (\\ud800) at character 3"),
    ("lone surrogate in a tool name", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
     b'"function", "function": {"name": "get\\udc00"}}]}', "tools[0].function.name", "lone surrogate"),
    ("lone surrogate in a stop string", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udbff"]}',
     "stop[0]", "lone surrogate"),
    ("lone surrogate inside tool-call arguments",
     {"messages": [*HELLO, _call('{"city": "\\udfff"}')]}, "messages[1].tool_calls[0].function.arguments.city",
     "lone surrogate"),
    ("x-guidance that is not an object", {"messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "x-guidance": 5}}}},
     "response_format", "x-guidance must be an object"),
    ("properties: 5", {"messages": HELLO, "tools": [_tool({"type": "object", "properties": 5})]}, "tools",
     "parameters.properties must be an object"),
    ("properties: 5, forced", {"messages": HELLO, "tool_choice": "required",
                               "tools": [_tool({"type": "object", "properties": 5})]}, "tools", "properties"),
    ("required: 5, forced", {"messages": HELLO, "tool_choice": "required",
                             "tools": [_tool({"type": "object", "required": 5})]}, "tools",
     "parameters.required must be a list"),
    ("a property schema that is a number", {"messages": HELLO, "tool_choice": "required", "tools": [
        _tool({"type": "object", "properties": {"x": 5}})]}, "tools", "parameters.properties.x must be"),
    ("a description that is a list", {"messages": HELLO, "tools": [_tool({}, description=["x"])]}, "tools",
     "description must be a string, not a JSON array"),
    ("tool-call arguments nested 900 deep", {"messages": [*HELLO, _call(json.dumps(_nested(900)))]},
     "messages[1].tool_calls*", "nested"),
    ("tool-call arguments nested 100000 deep", {"messages": [*HELLO, _call("[" * 100_000)]},
     "messages[1].tool_calls*", "nested"),
    ("tool parameters nested 900 deep", {"messages": HELLO, "tools": [_tool(_nested(900))]},
     "tools[0].function.parameters.a.a*", "nested more than 64 levels"),
    ("an unknown field nested 900 deep", {"messages": HELLO, "metadata": _nested(900)}, "metadata.a.a*",
     "nested more than 64 levels"),
    ("temperature 1e-45", {"messages": HELLO, "temperature": 1e-45}, "temperature", "temperature must be"),
    ("temperature 1e-320", {"messages": HELLO, "temperature": 1e-320}, "temperature", "temperature must be"),
    ("repetition_penalty 1e-40", {"messages": HELLO, "repetition_penalty": 1e-40}, "repetition_penalty",
     "repetition_penalty must be"),
    ("temperature and penalty 1e308", {"messages": HELLO, "temperature": 1e308, "repetition_penalty": 1e308},
     "temperature", "temperature must be"),
    ("40,000 tools", {"messages": HELLO, "tools": [{"name": "f"}] * 40_000}, "tools",
     "40000 tools are too many; this server takes at most 128"),
    ("100 tools too large for the context", {"messages": HELLO, "tools": [
        _tool({}, description="d" * 4000) for _ in range(100)]}, "tools", "tool schemas are"),
    ("n of 10**30", {"messages": HELLO, "n": 10**30}, "n", "n: expected 1 to 8 choices"),
    ("negative max_tokens", {"messages": HELLO, "max_tokens": -5}, "max_tokens", "max_tokens must be"),
    ("max_tokens past any context", {"messages": HELLO, "max_tokens": 2**70}, "max_tokens", "max_tokens must be"),
    ("10^5 stop strings", {"messages": HELLO, "stop": ["a"] * 100_000}, "stop", "at most 16 strings"),
    ("a huge logit_bias", {"messages": HELLO, "logit_bias": {str(i): 1 for i in range(20_000)}}, "logit_bias",
     "entries are too many"),
    ("logit_bias of the wrong type", {"messages": HELLO, "logit_bias": [1]}, "logit_bias", "must be token ids"),
    ("the role 'function'", {"messages": [{"role": "function", "content": "x"}]}, "messages[0].role",
     "expected one of"),
    ("a role that is a list", {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role",
     "expected one of"),
    ("a content part of an unknown type", {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages[0].content", "only text parts"),
    ("a content part that is a list", {"messages": [{"role": "user", "content": [["x"]]}]},
     "messages[0].content", "only text parts"),
    ("a name that is a number", {"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name",
     "expected a string, got number"),
    ("reasoning_content that is an object", {"messages": [{"role": "assistant", "content": "x",
                                                           "reasoning_content": {}}, *HELLO]},
     "messages[0].reasoning_content", "expected a string, got object"),
    ("a tool call that is a number", {"messages": [{"role": "assistant", "tool_calls": [5]}]},
     "messages[0].tool_calls", "not a call object"),
    ("messages far longer than the context", {"messages": [{"role": "user", "content": "abcd " * 400}] * 100},
     "messages", "far more than fit"),
    ("a body nested 100,000 deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     "not valid JSON (nested too deeply)"),
    ("NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None,
     "NaN is not a JSON value"),
    ("a number beyond a double", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1e999}', None,
     "too large for a double"),
    ("an integer of 5000 digits", b'{"messages": [{"role": "user", "content": "x"}], "seed": ' + b"9" * 5000 + b"}",
     None, "not valid JSON"),
]


@pytest.mark.parametrize("what, body, param, words", CHAT_MISTAKES, ids=[c[0] for c in CHAT_MISTAKES])
def test_a_client_mistake_is_a_400_naming_the_field(srv: Server, what: str, body: Any, param: str | None,
                                                    words: str) -> None:
    before = srv.completed()
    r = srv.post(CHAT, raw=body) if isinstance(body, bytes) else srv.post(CHAT, body)
    error = api_error(r, 400)
    assert words in error["message"]
    if param is not None and param.endswith("*"):  # the field and the path into it
        assert error["param"].startswith(param[:-1]) and error["message"].startswith(error["param"])
    else:
        assert error["param"] == param
    assert srv.completed() == before  # nothing ran
    srv.answers()


@pytest.mark.parametrize("body, param, words", [
    (b'{"prompt": "a\\udfff"}', "prompt", "lone surrogate (\\udfff) at character 1"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be"),
    ({"prompt": "x", "stop": {"a": 1}}, "stop", "expected a string or a list"),
    ({"prompt": [1, -1]}, "prompt", "outside the vocabulary"),
    ({"prompt": "a b " * 100_000}, "prompt", "the prompt needs far more"),
])
def test_a_completions_mistake_is_a_400_naming_the_field(srv: Server, body: Any, param: str, words: str) -> None:
    r = srv.post(COMPLETIONS, raw=body) if isinstance(body, bytes) else srv.post(COMPLETIONS, body)
    error = api_error(r, 400)
    assert error["param"] == param and words in error["message"]
    srv.answers()


GOOD_CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Weather?"}], "name": "me"},
                          _call('{"city": "Paris"}'),
                          {"role": "tool", "tool_call_id": "c1", "content": "22 C"}],
             "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
             "max_tokens": 2, "temperature": 0, "stop": ["zz"], "stream_options": {"include_usage": True}}
GOOD_SCHEMA = {"messages": HELLO, "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
    "name": "p", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}
GOOD_COMPLETION = {"prompt": ["The quick brown fox"], "max_tokens": 2, "stop": ["x"], "seed": 1, "best_of": 1,
                   "stream": False}


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


def _replaced(body: Any, path: tuple, value: Any) -> Any:
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def test_a_wrong_json_type_anywhere_is_a_4xx(srv: Server) -> None:
    """Every value of three good bodies replaced, in turn, by values of every JSON type: never a 5xx, always an
    error body."""
    wrong = [None, False, -1, 2.5, "", "x", [], [[]], [{}], {}, {"type": "text"}]
    failures = []
    for endpoint, good in ((CHAT, GOOD_CHAT), (CHAT, GOOD_SCHEMA), (COMPLETIONS, GOOD_COMPLETION)):
        assert srv.post(endpoint, good).status_code == 200
        for path in list(_paths(good))[1:]:
            for value in wrong:
                body = _replaced(good, path, value)
                r = srv.post(endpoint, body)
                if r.status_code >= 500 or (r.status_code != 200 and "error" not in r.json()):
                    failures.append(f"{path} = {value!r}: {r.status_code} {r.text[:200]}")
    assert failures == []
    srv.answers()


def test_a_trailing_slash_is_a_404_not_a_redirect_built_from_the_host(srv: Server) -> None:
    r = srv.post(CHAT + "/", {"messages": HELLO}, Host="127.0.0.1")
    error = api_error(r, 404)
    assert "location" not in r.headers and "did you mean /v1/chat/completions?" in error["message"]
    assert "did you mean" not in api_error(srv.client.get("/v1/nothing/"), 404)["message"]
    srv.answers()


# ---- browsers


def test_a_cross_site_page_is_refused_before_anything_runs(srv: Server) -> None:
    """A page on another site can POST text/plain to 127.0.0.1 without asking (no CORS preflight): refused."""
    before = srv.completed()
    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    for origin in ("https://evil.example", "null", "http://localhost.evil.example", "not an origin"):
        r = srv.client.post(CHAT, content=body, headers={"Content-Type": "text/plain", "Origin": origin})
        error = api_error(r, 403)
        assert error["code"] == "origin_not_allowed" and "--allow-origin" in error["message"]
        assert repr(origin) in error["message"]
    assert srv.completed() == before
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", srv.url):  # this machine's pages, itself
        r = srv.client.post(CHAT, content=body, headers={"Content-Type": "text/plain", "Origin": origin})
        assert r.status_code == 200, (origin, r.text)


def test_a_host_name_that_is_not_the_servers_is_refused(srv: Server) -> None:
    """DNS rebinding: a page at http://evil.example:PORT whose name now points at 127.0.0.1 sends Host:
    evil.example (and no Origin of another site, as it is the page's own)."""
    before = srv.completed()
    port = srv.url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "rebind.127.0.0.1.nip.io", "a b", f"evil.example:{port}@127.0.0.1"):
        r = srv.client.post(CHAT, content=json.dumps({"messages": HELLO}).encode(), headers={
            "Host": host, "Origin": f"http://{host}"})
        error = api_error(r, 403)
        assert error["code"] == "host_not_allowed" and "--allow-host" in error["message"]
    assert api_error(srv.client.get("/health", headers={"Host": "evil.example"}), 403)["code"] == "host_not_allowed"
    assert srv.completed() == before
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
        assert srv.client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    srv.answers()


def test_allowed_sites_and_host_names(roomy: Server) -> None:
    ok = {"messages": HELLO, "max_tokens": 2}
    assert roomy.post(CHAT, ok, Origin="https://app.example.com").status_code == 200
    assert roomy.post(CHAT, ok, Host="lfm2.example.com:443").status_code == 200
    assert api_error(roomy.post(CHAT, ok, Origin="https://other.example.com"), 403)["code"] == "origin_not_allowed"
    assert api_error(roomy.post(CHAT, ok, Host="other.example.com"), 403)["code"] == "host_not_allowed"


# ---- memory


def _rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


def _burst(server: Server, raws: list[tuple[str, bytes]], proc: psutil.Process) -> tuple[int, int]:
    """Each body alone, then each twice at once (8 in flight); the most RSS seen in each part. Every one is a 400."""
    peaks = [0, 0]
    part = 0
    sampling = True

    def sample() -> None:
        while sampling:
            peaks[part] = max(peaks[part], _rss(proc))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    replies: list[httpx.Response] = []
    try:
        for path, raw in raws:
            replies.append(server.post(path, raw=raw))
        part = 1
        threads = [threading.Thread(target=lambda p=path, r=raw: replies.append(server.post(p, raw=r)))
                   for path, raw in raws for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sampling = False
        sampler.join()
    assert len(replies) == 3 * len(raws)
    for r in replies:
        assert api_error(r, 400)["code"] == "context_length_exceeded"
    return peaks[0], peaks[1]


def test_big_bodies_cost_memory_in_proportion_to_the_body(roomy: Server) -> None:
    """8 MB bodies that cannot fit the context, one and then eight at once: refused with a 400 while the server's
    memory grows by a small multiple of the bodies (it grew 1.1 GB per body when the whole text was tokenised,
    and kept most of it), and what stays afterwards does not grow with more of them."""
    proc = psutil.Process(roomy.proc.pid)
    size = 8_000_000
    bodies = [
        (CHAT, {"messages": [{"role": "user", "content": "a " * (size // 2 - 40)}]}),  # refused before the template
        (CHAT, {"messages": [{"role": "user", "content": "a"}] * 200_000}),  # many small objects
        (COMPLETIONS, {"prompt": "a b " * (size // 4 - 10)}),  # tokenised in pieces, stopped early
        (COMPLETIONS, {"prompt": [1] * (size // 3 - 10)}),  # token ids
    ]
    raws = [(path, json.dumps(body).encode()) for path, body in bodies]
    assert all(len(raw) <= 8 << 20 for _, raw in raws)
    roomy.answers()
    idle = _rss(proc)
    one, eight = _burst(roomy, raws, proc)
    # 200,000 small JSON objects are ~100 MB as Python objects: the most costly 8 MB body; two are worked on at once
    assert one - idle < 20 * size, f"one 8 MB body at a time: {(one - idle) >> 20} MB"
    assert eight - idle < 50 * size, f"eight 8 MB bodies at once: {(eight - idle) >> 20} MB"
    time.sleep(0.5)
    kept = _rss(proc)
    assert kept - idle < 128 << 20, f"kept after 12 bodies: {(kept - idle) >> 20} MB"
    # what stays must not grow burst after burst; the second burst may still warm the allocator's per-thread
    # arenas (each request runs in its own thread), so the third is measured against the second
    _burst(roomy, raws, proc)
    time.sleep(0.5)
    warm = _rss(proc)
    assert warm - kept < 64 << 20, f"kept after 12 more: {(warm - kept) >> 20} MB more"
    _burst(roomy, raws, proc)
    time.sleep(0.5)
    assert _rss(proc) - warm < 32 << 20, f"kept after 12 more again: {(_rss(proc) - warm) >> 20} MB more"
    roomy.answers()


def test_a_body_over_the_limit_is_a_413_before_it_is_read(srv: Server, roomy: Server) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}  # over the 1 MiB default of a 2k context
    error = api_error(srv.post(CHAT, big), 413)
    assert error["code"] == "request_too_large" and "1048576 bytes" in error["message"] and "--max-body" in \
        error["message"]
    assert roomy.post(CHAT, big).status_code == 400  # 8M here: read, and refused for the context instead
    srv.answers()


# ---- the command


@pytest.mark.parametrize("args, words", [
    (["--api-key", "clé"], "--api-key: use printable ASCII only"),
    (["--api-key", " key"], "--api-key: use printable ASCII only"),
    (["--allow-origin", "https://app.example.com/path"], "--allow-origin: 'https://app.example.com/path' is not an "
                                                         "origin"),
    (["--allow-host", "a/b"], "--allow-host: 'a/b' is not a host name"),
    (["--max-body", "12Q"], "--max-body 12Q: expected a size"),
    (["--max-body", "10"], "--max-body 10: expected a size of at least 1K"),
])
def test_bad_serve_options_are_one_line_before_the_model_loads(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture, tmp_path: Path,
                                                               args: list[str], words: str) -> None:
    code, out, err = run_main(["serve", str(tmp_path / "none"), *args], monkeypatch, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
