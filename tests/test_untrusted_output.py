"""Model output is untrusted input (issue 24): what a model or a server sends is shown, never acted on by the
terminal, and a server that ignores `max_tokens` is cut off. A tiny OpenAI-style server on 127.0.0.1 plays the
hostile side, so the real `lfm2 generate --endpoint` runs against it."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import memory_capped

HOSTILE = ("Hello \x1b]52;c;ZXZpbA==\x07clipboard, \x1b]0;owned\x07title, \x1b[2Jclear, "
           "\u202ereversed\u202c and a bell\x07.")


class _Server(BaseHTTPRequestHandler):
    endless = False

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def chunk(text: str, finish: str | None = None) -> bytes:
            body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n".encode()

        try:
            if self.endless:  # ignores max_tokens: sends until the client hangs up
                for _ in range(10**6):
                    self.wfile.write(chunk("spam " * 200))
            else:
                self.wfile.write(chunk(HOSTILE))
                self.wfile.write(chunk("", "stop") + b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


def _serve(endless: bool) -> Iterator[str]:
    handler = type("Handler", (_Server,), {"endless": endless})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture
def hostile() -> Iterator[str]:
    yield from _serve(endless=False)


@pytest.fixture
def endless() -> Iterator[str]:
    yield from _serve(endless=True)


def _env(tmp_path) -> dict[str, str]:
    env = {**os.environ, "LFM2_HOME": str(tmp_path), "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("LFM2_DEBUG", None)
    return env


def _on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, bytes]:
    """Run the command with stdout and stderr on a pseudo-terminal; everything it wrote there, and its exit code."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                            preexec_fn=memory_capped(3))
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {timeout} s: {out[-500:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
    return proc.wait(timeout=timeout), out


@pytest.mark.slow
def test_escape_sequences_in_a_reply_are_shown_not_run_on_a_terminal(hostile: str, tmp_path) -> None:
    code, out = _on_a_terminal([sys.executable, "-m", "lfm2cli", "generate", "--endpoint", hostile, "-p", "hi"],
                               _env(tmp_path))
    assert code == 0, out
    for raw in (b"\x1b]52;", b"\x1b]0;", b"\x1b[2J", "\u202e".encode(), b"\x07"):
        assert raw not in out
    text = out.decode()
    assert "\\x1b]52;c;ZXZpbA==" in text and "\\u202e" in text and "clipboard" in text


@pytest.mark.slow
def test_a_piped_reply_is_passed_on_byte_for_byte(hostile: str, tmp_path) -> None:
    """A pipe gets the answer as the model wrote it: it is data for the next program, not a screen."""
    proc = subprocess.run([sys.executable, "-m", "lfm2cli", "generate", "--endpoint", hostile, "-p", "hi"],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120,
                          preexec_fn=memory_capped(3))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == HOSTILE


@pytest.mark.slow
def test_a_server_that_ignores_max_tokens_is_cut_off(endless: str, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lfm2cli", "generate", "--endpoint", endless, "-p", "hi", "-n", "5",
                           "--json"], capture_output=True, text=True, env=_env(tmp_path), timeout=120,
                          preexec_fn=memory_capped(3))
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["finish_reason"] == "length"
    assert len(reply["text"]) <= 5 * 128 + 1000  # 98 MB before the bound


@pytest.mark.slow
def test_error_messages_show_control_characters_in_names(tmp_path) -> None:
    """A path with ESC, NUL-free bidi and newline characters is quoted visibly in the one error line."""
    name = tmp_path / "evil\x1b]0;owned\x07\u202ename"
    proc = subprocess.run([sys.executable, "-m", "lfm2cli", "generate", str(name), "-p", "hi"],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120,
                          preexec_fn=memory_capped(3))
    assert proc.returncode != 0
    assert "\x1b" not in proc.stderr and "\u202e" not in proc.stderr and "\x07" not in proc.stderr
    assert "\\x1b]0;owned" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_info_shows_control_characters_in_token_strings(chat_ckpt, tmp_path) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(chat_ckpt, ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["pad_token"] = "<pad\x1b]52;c;ZXZpbA==\x07>"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    for args in (["info", str(ckpt)], ["info", str(ckpt), "--json"]):
        proc = subprocess.run([sys.executable, "-m", "lfm2cli", *args], capture_output=True, text=True,
                              env=_env(tmp_path), timeout=120, preexec_fn=memory_capped(3))
        assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout + proc.stderr
    code, out = _on_a_terminal([sys.executable, "-m", "lfm2cli", "info", str(ckpt)], _env(tmp_path))
    assert b"\x1b]52" not in out and b"\\x1b]52" in out
