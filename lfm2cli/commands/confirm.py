"""Questions the commands ask the user before doing something big (a download, a deletion)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO


def ask_yes_no(question: str, default: bool, stdin: TextIO | None = None, out: TextIO | None = None) -> bool:
    """Ask on stderr (stdout may be piped into something); end of input means no."""
    stdin = stdin or sys.stdin
    out = out or sys.stderr
    out.write(f"{question} {'[Y/n]' if default else '[y/N]'} ")
    out.flush()
    line = stdin.readline()
    if not line:
        out.write("\n")
        return False
    answer = line.strip().lower()
    return default if not answer else answer in ("y", "yes")


def confirm_download() -> Callable[[str], bool] | None:
    """The `confirm` callback `resolve_model` takes: ask when stdin and stderr are a terminal, else None (then
    a model that is not downloaded is an error that says how to get it)."""
    if sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty():
        return lambda question: ask_yes_no(question, default=True)
    return None
