"""A progress bar on stderr while a model's weights are read or built: bytes, speed and time left, gone once the
model is ready. Only on a terminal: stderr that is piped or logged gets nothing, so scripts see what they saw
before. The loader only calls a function with (bytes done, bytes in all); the bar lives here."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

NUMBERS_WIDTH = 70  # the bar, bytes, speed and time left: what is left of the line is the description's


def _fit(text: str, width: int) -> str:
    """`text` in `width` characters (at least 20): its end kept, as a path's last parts say the most."""
    width = max(width, 20)
    return text if len(text) <= width else "…" + text[-(width - 1):]


class LoadBar:
    """A transient rich bar, started by the loader's first call (so nothing shows for a load that fails before
    reading anything) and erased by `close`. Call it as the loader's `progress` callback."""

    def __init__(self, description: str, console: Any = None) -> None:
        self.description = description
        self.console = console
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            console = self.console or Console(stderr=True)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=30), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            text = _fit(self.description, console.width - NUMBERS_WIDTH)
            self.task = self.bar.add_task(escape(text), total=total, completed=done)
        else:
            self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = self.task = None


@contextmanager
def loading_bar(description: str, stream: TextIO | None = None) -> Iterator[LoadBar | None]:
    """A LoadBar for the loader while the block runs, when `stream` (stderr) is a terminal; else None."""
    stream = stream or sys.stderr
    if stream is None or not stream.isatty():
        yield None
        return
    bar = LoadBar(description)
    try:
        yield bar
    finally:
        bar.close()  # also when loading fails: the error line must not sit under a half-drawn bar


class StatusLine:
    """`lfm2 bench`'s one line of what it is doing on a terminal (rewritten in place), which gives way to a LoadBar
    while the model is read or built; nothing when stderr is not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream is not None and self.stream.isatty()
        self.message = ""
        self.bar: LoadBar | None = None

    def say(self, message: str) -> None:
        self.message = message
        if self.tty:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self.stream.write(f"\r\033[K{message}")
            self.stream.flush()

    def load(self, done: int, total: int) -> None:
        """The loader's progress callback: the bar, described by the last message, on the status line."""
        if not self.tty:
            return
        if self.bar is None:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.bar = LoadBar(self.message)
        self.bar(done, total)

    def close(self) -> None:
        """Erase the bar (if any) and the line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
