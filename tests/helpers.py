"""What several test modules share that is no fixture: the entry point run in this process, checkpoint copies with
another template or thinking tokens, model comparisons, a scripted sampler, schemas, a real `lfm2 serve` (in a thread
or a subprocess) and measured child processes.

Test modules never import each other, nor conftest.py; they import from here and use conftest.py's fixtures."""

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
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import openai
    import torch

    from lfm2cli.chat.session import ChatSession


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    """The real entry point in this process, its error boundary included (so a test can patch the library):
    (exit code, stdout, stderr)."""
    from lfm2cli.cli import main

    monkeypatch.delenv("LFM2_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["lfm2", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@contextmanager
def native_at_level(level: str, directory: Path) -> Iterator[None]:
    """lfm2's native library built and loaded at one ISA level (LFM2_NATIVE_ISA); afterwards the process goes
    back to the level it would pick itself."""
    from lfm2cli.kernels import native

    saved = os.environ.get("LFM2_NATIVE_ISA")
    os.environ["LFM2_NATIVE_ISA"] = level
    native.reset()
    try:
        native.load(directory)
        yield
    finally:
        if saved is None:
            os.environ.pop("LFM2_NATIVE_ISA", None)
        else:
            os.environ["LFM2_NATIVE_ISA"] = saved
        native.reset()


# ---- checkpoint copies with another chat template or thinking tokens

def thinking_copy(src: Path, dst: Path, template: str | None = None) -> Path:
    """A copy of `src` whose tokenizer has `<think>`/`</think>` as special tokens (and `template`, if given)."""
    import shutil

    from tests.tiny_tokenizer import add_think_tokens, make_tokenizer

    path = Path(shutil.copytree(src, dst))
    if template is not None:
        make_tokenizer(path, chat_template=template)
    add_think_tokens(path)
    return path


def template_copy(src: Path, dst: Path, template: str, as_file: bool = True) -> Path:
    """A copy of the checkpoint `src` at `dst` whose chat template is `template`, written to chat_template.jinja
    (`as_file`) or to tokenizer_config.json's `chat_template`; returns the file that holds it."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if as_file:
        (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
        return dst / "chat_template.jinja"
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return config_file


def opening_template() -> str:
    """The test template with a generation prompt that opens the block, as some thinking models' templates do."""
    from tests.tiny_tokenizer import BUILTIN_TEMPLATE

    old = "{{- '<|im_start|>assistant\\n' -}}"
    assert BUILTIN_TEMPLATE.count(old) == 1
    return BUILTIN_TEMPLATE.replace(old, "{{- '<|im_start|>assistant\\n<think>\\n' -}}")


# ---- models compared token by token

def prompt(n: int, seed: int = 1) -> torch.Tensor:
    """`n` random token ids (batch of one) below the tiny checkpoints' 512 embeddings."""
    import torch

    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def teacher_forced(a: Any, b: Any, n_prompt: int = 16, steps: int = 24, seed: int = 1
                   ) -> tuple[float, int, list[int], list[int]]:
    """Feed both models the same tokens (a's greedy choices); return (max |logit diff| / logit range of a,
    number of steps where both pick the same token, a's tokens, b's tokens)."""
    import torch

    ids = prompt(n_prompt, seed)
    ca, cb = a.new_cache(), b.new_cache()
    la, lb = a(ids, ca), b(ids, cb)
    worst, agree, toks_a, toks_b = 0.0, 0, [], []
    for _ in range(steps):
        worst = max(worst, ((la - lb).abs().max() / (la.max() - la.min())).item())
        ta, tb = int(la.argmax()), int(lb.argmax())
        toks_a.append(ta)
        toks_b.append(tb)
        agree += ta == tb
        step = torch.tensor([[ta]])
        la, lb = a(step, ca), b(step, cb)
    return worst, agree, toks_a, toks_b


# ---- chat sessions

EOS = 7  # <|im_end|> of the tiny tokenizer
# a long first message, so that what a later turn adds is small next to the whole conversation
LONG = ("A language model reads text as a sequence of tokens and predicts the next one. Small models can run "
        "on a laptop, a phone or a single graphics card. ") * 4


def assert_cache_holds(s: ChatSession) -> None:
    """The session's cache is what a fresh prefill of `cached_ids` gives: same logits for a probe token."""
    import torch

    from lfm2cli.decoding.loop import prefill

    model = s.lm.model
    probe = torch.tensor([[42]])
    fresh = model.new_cache()
    prefill(model, s.cached_ids, fresh)
    snap = s.cache.snapshot()
    ours = model(probe, s.cache)
    s.cache.restore(snap)
    assert s.cache.pos == len(s.cached_ids)
    torch.testing.assert_close(ours, model(probe, fresh), rtol=1e-4, atol=1e-4)


class Script:
    """Stands in for the sampler: each reply takes the next script of ids (then EOS); a reply with no script left
    is EOS at once. `seen` records what the model had in context before each reply (the whole prompt)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, *replies: str | list[int]) -> None:
        from lfm2cli.text.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        # canonical encodings: re-encoding the text gives the same ids, as for a model that wrote them
        self.replies = [tok.encode(r) if isinstance(r, str) else list(r) for r in replies]
        self.seen: list[list[int]] = []
        monkeypatch.setattr("lfm2cli.runs.local.Sampler", self._sampler)

    def _sampler(self, params: Any, prompt_len: int | None = None) -> Any:
        ids = iter(self.replies.pop(0) if self.replies else [])
        first = True

        def sample(logits: Any, seen: Any) -> int:
            nonlocal first
            if first:
                self.seen.append(seen.tolist())
                first = False
            return next(ids, EOS)

        return sample


# ---- structured output

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}},
        "required": ["name", "age", "tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
                 "required": ["id", "ok"], "additionalProperties": False},
        "score": {"type": "number"}, "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}},
        "required": ["user", "score", "note"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                                 "level": {"enum": ["low", "high"]}},
                "required": ["date", "level"], "additionalProperties": False},
    "list": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 5},
}


# ---- a real `lfm2 serve`

MODEL = "tiny"  # the id the test servers give their model


@dataclass
class Running:
    url: str
    engine: Any
    lm: Any
    log: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def client(self, **kw: Any) -> openai.OpenAI:
        import openai

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
                    think_budget=app_options.pop("think_budget", None), parallel=app_options.pop("parallel", 1))
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


# ---- child processes measured and capped

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


def functions_file(tmp_path: Path, source: str) -> Path:
    """A `--functions` file in tmp_path from `source`, whose `{trace}` names a file the functions write to (so a
    test can see they ran)."""
    path = tmp_path / "tools.py"
    path.write_text(source.format(trace=str(tmp_path / "trace.json")), encoding="utf-8")
    return path
