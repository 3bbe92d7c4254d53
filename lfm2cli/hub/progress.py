"""Download progress on stderr: a rich bar on a terminal, plain lines in pipes and logs. `pull_model` reports to
any object with these four methods; the commands pick one with `make_progress`."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from lfm2cli.terminal.formatting import human_bytes


class Progress(Protocol):
    def start(self, name: str, total: int, done: int) -> None: ...
    def file(self, name: str, size: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self, ok: bool) -> None: ...


class LineProgress:
    """Plain lines for pipes and logs: one per file, one per tenth of the download, one at the end."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = self.done = self.first = 0
        self.started = 0.0
        self.next_tenth = 1

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def start(self, name: str, total: int, done: int) -> None:
        self.total, self.done, self.first, self.started = total, done, done, time.monotonic()
        self.next_tenth = done * 10 // total + 1 if total else 11
        resumed = f", {human_bytes(done)} already here" if done else ""
        self._say(f"pulling {name}: {human_bytes(total - done)} to download{resumed}")

    def file(self, name: str, size: int) -> None:
        self._say(f"  {name} ({human_bytes(size)})")

    def advance(self, n: int) -> None:
        self.done += n
        if self.total and self.next_tenth <= 10 and self.done * 10 >= self.next_tenth * self.total:
            self.next_tenth = self.done * 10 // self.total + 1
            self._say(f"  {self.done * 100 // self.total}% ({human_bytes(self.done)} of {human_bytes(self.total)})")

    def finish(self, ok: bool) -> None:
        if ok:
            took = max(time.monotonic() - self.started, 1e-3)
            got = self.done - self.first
            self._say(f"downloaded {human_bytes(got)} in {took:.1f} s ({human_bytes(got / took)}/s)")


class RichProgress:
    """One bar for the whole download on a terminal: bytes, speed and time left."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn(), console=console or Console(stderr=True))
        self.name = ""
        self.task: Any = None

    def start(self, name: str, total: int, done: int) -> None:
        from rich.markup import escape

        self.name = escape(name)
        self.bar.start()
        self.task = self.bar.add_task(self.name, total=total, completed=done)

    def file(self, name: str, size: int) -> None:
        from rich.markup import escape

        self.bar.update(self.task, description=f"{self.name} [dim]{escape(name)}[/dim]")

    def advance(self, n: int) -> None:
        self.bar.update(self.task, advance=n)

    def finish(self, ok: bool) -> None:
        self.bar.update(self.task, description=self.name)
        self.bar.stop()


def make_progress(stream: TextIO | None = None) -> Progress:
    """A bar on a terminal, plain lines otherwise; both on stderr so stdout stays the answer."""
    stream = stream or sys.stderr
    return RichProgress() if stream.isatty() else LineProgress(stream)
