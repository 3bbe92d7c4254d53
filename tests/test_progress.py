"""Progress while a model loads (issue 23): on a terminal, a bar of the bytes of weights read (or built, for
`bench --random`) with speed and time left, gone once the model is ready; on stderr that is not a terminal,
nothing. The terminal is a real pseudo-terminal, read back through a small VT100 screen."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lfm2cli.loading.checkpoint import read_all_headers
from lfm2cli.loading.loader import KEEP_FLOAT32, load, random_model
from lfm2cli.model.config import load_config
from tests.helpers import screen

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
BAR = "━"  # rich's bar glyph


def _calls(run) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    run(lambda done, total: calls.append((done, total)))
    return calls


def _counts_up_to(calls: list[tuple[int, int]], total: int) -> None:
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:], strict=False)) and len(calls) > 2


def test_the_loader_counts_every_byte_of_the_weights(chat_ckpt: Path) -> None:
    total = sum(t.end - t.start for t in read_all_headers(chat_ckpt).values())
    calls = _calls(lambda cb: load(chat_ckpt, device="cpu", dtype="float32", progress=cb))
    _counts_up_to(calls, total)


def test_random_weights_count_the_bytes_built(chat_ckpt: Path) -> None:
    from lfm2cli.model.lfm2 import Lfm2ForCausalLM

    cfg = load_config(chat_ckpt)
    with torch.device("meta"):
        shape = Lfm2ForCausalLM(cfg)
    total = sum(t.numel() * (4 if name.endswith(KEEP_FLOAT32) else 2)
                for name, t in [*shape.named_parameters(), *shape.named_buffers()])
    calls = _calls(lambda cb: random_model(cfg, torch.device("cpu"), torch.bfloat16, progress=cb))
    _counts_up_to(calls, total)


# ---- on a terminal, and not

def _clean_env() -> dict[str, str]:
    """This environment, less what would make rich ignore the terminal or size it."""
    drop = {"LFM2_DEBUG", "COLUMNS", "LINES", "FORCE_TERMINAL", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "NO_COLOR",
            "TERM"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "TERM": "xterm-256color"}


def _on_a_terminal(args: list[str], stdin: bytes = b"", stop: Callable[[bytes], bool] | None = None
                   ) -> tuple[int, bytes, bytes]:
    """`lfm2 ARGS` with stderr on a 120-column pseudo-terminal and stdin, stdout pipes: (exit code, stdout, the
    bytes the terminal got). `stop`: Ctrl-C once it says yes to what the terminal has shown (for `serve`)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "lfm2cli", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=slave, env=_clean_env())
    os.close(slave)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            shown.extend(chunk)
            if stop is not None and stop(bytes(shown)):
                proc.send_signal(signal.SIGINT)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(stdin, timeout=300)
    finally:
        proc.kill()
        reader.join(30)
        os.close(master)
    return proc.returncode, out, bytes(shown)




def _serving(shown: bytes) -> bool:
    """Whether the server that printed `shown` answers (then Ctrl-C stops it cleanly)."""
    import httpx

    found = re.search(rb"listening on (http://\S+)/v1", shown)
    if found is None:
        return False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(found.group(1).decode() + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return True


def _commands(ckpt: Path) -> dict[str, tuple[list[str], bytes, str, Callable[[bytes], bool] | None]]:
    """Each command that loads a model: its arguments, its stdin, what its bar says, and when to stop it."""
    tiny = ["--dtype", "float32"]
    greedy = ["-t", "0", *tiny]
    return {
        "generate": (["generate", str(ckpt), "-p", "hi", "-n", "2", "-v", *greedy], b"", f"loading {ckpt.name}", None),
        "chat": (["chat", str(ckpt), "-n", "2", *greedy], b"hi\n", f"loading {ckpt.name}", None),
        "serve": (["serve", str(ckpt), "--port", "0", *tiny], b"", f"loading {ckpt.name}", _serving),
        "bench --random": (["bench", "--random", str(ckpt / "config.json"), "--prompt-tokens", "4", "--gen-tokens",
                            "2", "--repeat", "1", *tiny], b"",
                           "config.json with random weights (float32)", None),
    }


@posix_only
@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench --random"])
def test_a_terminal_shows_a_load_bar_that_is_gone_once_loaded(command: str, chat_ckpt: Path, home: Path) -> None:
    args, stdin, label, stop = _commands(chat_ckpt)[command]
    code, out, shown = _on_a_terminal(args, stdin, stop)
    assert code == 0, shown.decode(errors="replace")
    text = shown.decode("utf-8", "replace")
    drawn = [line for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n").splitlines()
             if label in line and BAR in line]
    assert drawn, text
    # the last drawing is complete: all the bytes, a speed, a time left
    assert re.search(r"(\d+\.\d)/\1 kB +\S+ [kMG]?B/s +\d+:\d\d:\d\d$", drawn[-1]), drawn[-1]
    final = screen(shown)
    assert not [line for line in final if BAR in line or label in line], final
    if command == "generate":  # what followed the bar is on the screen
        assert any(re.match(r"\d+ prompt tokens, 2 generated", line) for line in final), final
    assert "\x1b" not in out.decode() and BAR not in out.decode()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "chat", "bench --random"])
def test_piped_stderr_gets_no_bar(command: str, chat_ckpt: Path, home: Path) -> None:
    args, stdin, label, _ = _commands(chat_ckpt)[command]
    run = subprocess.run([sys.executable, "-m", "lfm2cli", *args], input=stdin, capture_output=True,
                         env=_clean_env(), timeout=300)
    err = run.stderr.decode()
    assert run.returncode == 0, err
    assert label not in err and BAR not in err and "\x1b" not in err and "B/s" not in err
    if command == "generate":
        assert re.fullmatch(r"\d+ prompt tokens, 2 generated .*\n", err), err
