"""What several test modules share and is no fixture: a real `lfm2 serve` app on uvicorn in a thread.

Test modules never import each other; they import from here (and use the fixtures in conftest.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

MODEL = "tiny"  # the id the test servers give their model


@dataclass
class Running:
    url: str
    engine: Any
    lm: Any
    log: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                             timeout=60, **kw)

    def logged(self, pattern: str, timeout: float = 5.0) -> str:
        """The request log line matching `pattern` (the line is written once the response is out)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.log):
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matches {pattern!r}: {self.log}")


@contextmanager
def serving(path: Path, queue: int = 16, **app_options: Any) -> Iterator[Running]:
    """The app on a real uvicorn server in a thread, on a free port of 127.0.0.1."""
    import uvicorn

    from lfm2cli.loading.loader import load
    from lfm2cli.serve.app import create_app
    from lfm2cli.serve.engine import Engine

    lm = load(path, device="cpu", dtype="float32")
    engine = Engine(lm, queue_size=queue, default_max_tokens=app_options.pop("max_tokens", 64),
                    think_budget=app_options.pop("think_budget", None))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    running = Running(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, lm)
    app = create_app(engine, MODEL, aliases=[str(path)], on_request=running.log.append,
                     on_error=running.errors.append, **{"max_body": 256 << 10, **app_options})
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


def screen(raw: str | bytes) -> list[str]:
    """The lines a terminal shows after `raw`: enough of a VT100 for rich's live display (carriage return, line
    feed, cursor up, erase line); colours and other sequences are dropped."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            arg, code = token[2:-1], token[-1]
            if code == "A":
                row = max(0, row - int(arg or 1))
            elif code == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return [line.rstrip() for line in lines]


def api_error(r: Any, status: int) -> dict:
    """The OpenAI-shaped error of response `r` (httpx), which must have `status`: all four fields, no traceback."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    return error


def start_serve(*args: str, cwd: Path | None = None, timeout: float = 120
                ) -> tuple[subprocess.Popen, str, list[str], threading.Thread]:
    """`lfm2 serve ARGS --port 0` in a subprocess, once it listens: the process, its URL, the list its stderr lines
    go to, and the thread reading them (it ends when the process does)."""
    env = {k: v for k, v in os.environ.items() if k != "LFM2_DEBUG"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", "serve", *args, "--port", "0"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "listening on" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not started.wait(timeout):
        proc.kill()
        raise AssertionError(f"lfm2 serve did not start: {lines}")
    return proc, re.search(r"listening on (http://\S+)/v1", lines[-1]).group(1), lines, reader


def memory_capped(gigabytes: float) -> Any:
    """A `preexec_fn` that caps a child's address space, so a command that would grow without bound fails inside
    the cap instead of taking the machine (torch alone maps about 1.5 GB of address space)."""
    import resource

    limit = int(gigabytes * (1 << 30))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return cap


def _tree_peaks(pid: int, peaks: dict[int, int]) -> None:
    """Record the peak resident size (VmHWM, kB) of `pid` and every process below it, as far as /proc shows."""
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                found = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
            if found:
                peaks[current] = max(peaks.get(current, 0), int(found.group(1)))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(child) for child in f.read().split()]
        except (OSError, ValueError):  # gone meanwhile
            continue


def wait_measured(pid: int, deadline: float) -> tuple[int, float]:
    """Wait for child `pid` until `deadline` (time.monotonic), killing it past that: (exit code, peak MB of it and
    its descendants together). Peaks are polled from /proc, not taken from wait4: a child forked from a large test
    process reports that process's size as its own peak."""
    peaks: dict[int, int] = {}
    while True:
        _tree_peaks(pid, peaks)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), sum(peaks.values()) / 1024
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the command ran past its time")
        time.sleep(0.02)
