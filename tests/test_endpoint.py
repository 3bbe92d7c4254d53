"""`generate --endpoint` and `chat --endpoint`: the same commands with generation by an OpenAI-compatible server,
here a real `lfm2 serve` on 127.0.0.1 running the tiny checkpoint in a subprocess."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.helpers import run_main

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", "serve", str(ckpt), "--port", str(port), "--dtype",
                             "float32", "--device", "cpu", "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "LFM2_DEBUG": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lfm2 serve exited: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("lfm2 serve did not start")


@pytest.fixture(scope="module")
def server(chat_ckpt: Path) -> Iterator[str]:
    proc, url = _start(chat_ckpt)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def keyed_server(chat_ckpt: Path) -> Iterator[str]:
    proc, url = _start(chat_ckpt, "--api-key", KEY)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _generate(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return run_main(["generate", *args], monkeypatch, capsys)


@pytest.mark.slow
def test_greedy_text_equals_the_local_run(server: str, chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """The server renders the same template and runs the same model: greedy output is the same text."""
    args = ["-p", "Tell me about Paris", "-t", "0", "-n", "24"]
    code, local, err = _generate([str(chat_ckpt), *args, "--dtype", "float32"], monkeypatch, capsys)
    assert code == 0, err
    code, remote, err = _generate(["--endpoint", server, *args], monkeypatch, capsys)
    assert code == 0, err
    assert remote == local and local.strip()


def test_json_output_names_the_server_model_and_counts_tokens(server: str, chat_ckpt: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    code, out, err = _generate(["--endpoint", server + "/v1", "-p", "Hi", "-t", "0", "-n", "8", "--json"],
                               monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == str(chat_ckpt)  # the first (only) model the server lists
    assert data["stats"]["generated_tokens"] == 8 and data["stats"]["prompt_tokens"] > 0
    assert data["finish_reason"] == "length"


def test_schema_and_tool_choice_travel_to_the_server(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    for seed in range(3):
        code, out, err = _generate(["--endpoint", server, "-p", "Hi", "-t", "1", "--seed", str(seed), "--schema",
                                    json.dumps(schema), "-n", "200"], monkeypatch, capsys)
        assert code == 0, err
        jsonschema.validate(json.loads(out), schema)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]))
    code, out, err = _generate(["--endpoint", server, "-p", "Weather?", "--tools", str(tools), "--tool-choice",
                                "required", "-t", "1", "--seed", "1", "--json", "-n", "200"], monkeypatch, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["finish_reason"] == "tool_calls"
    assert data["tool_calls"] and data["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "city" in json.loads(data["tool_calls"][0]["function"]["arguments"])


@pytest.mark.slow
def test_chat_through_the_server_keeps_history(server: str, tmp_path: Path) -> None:
    env = {**os.environ, "LFM2_HOME": str(tmp_path / "home"), "LFM2_DEBUG": ""}
    run = subprocess.run([sys.executable, "-m", "lfm2cli", "chat", "--endpoint", server, "-t", "0", "-n", "12"],
                         input="Hello there\nAnd again\n/stats\n", capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "cache reuse across turns is the server's" in run.stderr
    conv = run.stderr.split("lfm2 chat --resume ")[-1].split()[0]
    shown = subprocess.run([sys.executable, "-m", "lfm2cli", "history", "export", conv, "--format", "json"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    messages = json.loads(shown.stdout)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert all(m["content"] for m in messages)


@pytest.mark.slow
def test_chat_tool_loop_through_the_server(server: str, tmp_path: Path) -> None:
    marker = tmp_path / "called.json"
    functions = tmp_path / "tools.py"
    functions.write_text(
        "import json\nfrom typing import Literal\n\n"
        "def get_weather(city: Literal['Paris', 'Oslo']) -> str:\n"
        '    """Current weather in a city."""\n'
        f"    open({str(marker)!r}, 'w').write(json.dumps({{'city': city}}))\n"
        "    return '18 degrees'\n")
    env = {**os.environ, "LFM2_HOME": str(tmp_path / "home"), "LFM2_DEBUG": ""}
    run = subprocess.run([sys.executable, "-m", "lfm2cli", "chat", "--endpoint", server, "--functions",
                          str(functions), "--tool-choice", "required", "--yes-tools", "-t", "1", "--seed", "0",
                          "-n", "300"],
                         input="Weather in Paris?\n", capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    called = json.loads(marker.read_text())
    assert f'tool call: get_weather(city={json.dumps(called["city"], ensure_ascii=False)})' in run.stderr
    assert "→ 18 degrees" in run.stderr


@pytest.mark.slow
def test_errors_are_one_line(keyed_server: str, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    code, out, err = _generate(["--endpoint", keyed_server, "-p", "Hi", "-n", "4"], monkeypatch, capsys)
    assert code == 1 and out == ""
    assert err.strip().startswith(f"error: {keyed_server} answered 401") and err.strip().endswith("pass --api-key")
    code, out, err = _generate(["--endpoint", keyed_server, "--api-key", KEY, "-p", "Hi", "-n", "4", "-t", "0"],
                               monkeypatch, capsys)
    assert code == 0 and out.strip(), err
    code, _, err = _generate(["--endpoint", keyed_server, "--api-key", KEY, "--remote-model", "nope", "-p", "Hi"],
                             monkeypatch, capsys)
    assert code == 1 and "answered 404" in err and len(err.strip().splitlines()) == 1


def test_unreachable_server_and_local_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
                                              ) -> None:
    port = _free_port()  # nothing listens there
    code, _, err = _generate(["--endpoint", f"http://127.0.0.1:{port}", "-p", "Hi"], monkeypatch, capsys)
    assert code == 1 and f"cannot reach http://127.0.0.1:{port} (" in err and "Traceback" not in err
    code, _, err = _generate(["--endpoint", "localhost:8000", "-p", "Hi"], monkeypatch, capsys)
    assert code == 2 and "expected an http:// or https:// URL" in err
    for option in (["--quantize", "int8"], ["--think-budget", "3"], ["--dtype", "bfloat16"]):
        code, _, err = _generate(["--endpoint", f"http://127.0.0.1:{port}", "-p", "Hi", *option], monkeypatch,
                                 capsys)
        assert code == 2 and f"{option[0]} applies to a model run here" in err
