"""Streaming output of a chat reply: markdown rendered block by block, or plain text.

A reply arrives a few characters at a time. Re-rendering the whole message on every token gets slower as
the reply grows, and a live region taller than the terminal cannot be redrawn (the lines that scrolled off
get printed again). So the text is split into markdown blocks: a finished block is printed once, into the
scrollback, and only the last, unfinished block is drawn in a transient live region, cropped to the screen.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from lfm2cli.terminal.safetext import visible

# Any indentation is accepted for fences so that a fence inside a list item is tracked too: treating
# something as a fence only ever keeps lines together, which is always safe.
_FENCE_OPEN = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:\s|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])(?:\s|$)")


class BlockSplitter:
    """Cuts streamed markdown into top-level blocks that render the same alone as inside the whole text.

    A cut is only made where CommonMark guarantees the two sides are independent: at a blank line (unless
    the next line continues a list or an indented block), before an unindented heading or fence, and after
    a heading line or a top-level fenced code block. Everything else stays together, which is always safe.
    """

    def __init__(self) -> None:
        self._buf = ""  # text of the current (unfinished) block and anything after it
        self._scanned = 0  # offset in _buf of the first line not yet classified
        self._reset_block()

    def _reset_block(self) -> None:
        self._has_content = False
        self._is_list = False
        self._blank_after = False  # a blank line followed the block's content
        self._fence: tuple[str, int] | None = None  # (fence char, length) while inside a fence
        self._fence_whole_block = False  # the open fence started the block, so its end ends the block

    @property
    def pending(self) -> str:
        """The text not yet returned as a finished block."""
        return self._buf

    def feed(self, text: str) -> list[str]:
        """Add streamed text; return the blocks it finished (without surrounding blank lines)."""
        self._buf += text
        done: list[str] = []
        while (nl := self._buf.find("\n", self._scanned)) >= 0:
            start, self._scanned = self._scanned, nl + 1
            self._line(self._buf[start:nl].rstrip("\r"), start, done)
        self._maybe_cut_at_partial_line(done)
        return done

    def _cut(self, offset: int, done: list[str]) -> None:
        block = self._buf[:offset].strip("\r\n")
        if block.strip():
            done.append(block)
        self._buf = self._buf[offset:]
        self._scanned -= offset
        self._reset_block()

    def _line(self, line: str, start: int, done: list[str]) -> None:
        if self._fence is not None:
            char, length = self._fence
            closing = line.strip()
            if len(closing) >= length and closing == char * len(closing):
                self._fence = None
                if self._fence_whole_block:
                    self._cut(self._scanned, done)
            return
        if not line.strip():
            if self._has_content:
                self._blank_after = True
            else:  # blank lines between blocks are dropped; the separator is added when printing
                self._cut(self._scanned, done)
            return

        indented = line[:1] in (" ", "\t")
        fence = _FENCE_OPEN.match(line)
        if fence and fence.group(1)[0] == "`" and "`" in fence.group(2):
            fence = None  # a backtick fence's info string cannot contain backticks (it is inline code)
        heading = _HEADING.match(line)
        if self._has_content:
            if self._blank_after:
                continues = indented or (self._is_list and _LIST_ITEM.match(line))
                if not continues:
                    self._cut(start, done)
            elif not indented and (heading or fence):
                self._cut(start, done)

        starts_block = not self._has_content
        self._has_content = True
        self._blank_after = False
        if _LIST_ITEM.match(line):
            self._is_list = True
        if fence:
            marker = fence.group(1)
            self._fence = (marker[0], len(marker))
            self._fence_whole_block = starts_block
        elif heading and starts_block:
            self._cut(self._scanned, done)  # an ATX heading is a block of exactly one line

    def _maybe_cut_at_partial_line(self, done: list[str]) -> None:
        # After a blank line, the first character of the next line often already shows that a new block
        # starts; cutting now moves the finished block into the scrollback a whole line earlier.
        if not self._blank_after or self._scanned >= len(self._buf):
            return
        first = self._buf[self._scanned]
        if first.isspace() or (self._is_list and first in "-*+0123456789"):
            return
        self._cut(self._scanned, done)


def _blank(line: list[Segment]) -> bool:
    return all(not seg.text.strip() and not (seg.style and seg.style.bgcolor) for seg in line)


def _trim(lines: list[list[Segment]]) -> list[list[Segment]]:
    """Drop blank lines around a rendered block: the separator between blocks is added once, by us."""
    start, end = 0, len(lines)
    while start < end and _blank(lines[start]):
        start += 1
    while end > start and _blank(lines[end - 1]):
        end -= 1
    return lines[start:end]


class _Lines:
    """Already rendered lines, printed as they are."""

    def __init__(self, lines: list[list[Segment]]) -> None:
        self._lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self._lines:
            yield from line
            yield Segment.line()


class _Tail:
    """The unfinished block as drawn in the live region: at most a screen's height, newest lines kept."""

    def __init__(self, stream: MarkdownStream) -> None:
        self._stream = stream

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = self._stream._splitter.pending
        if not text.strip() or self._stream._closed:
            return
        lines = self._stream._render(text)
        # One row is left for the cursor; the live region must fit the screen or it cannot be redrawn.
        room = max(2, console.size.height - 1)
        if len(lines) > room:
            hidden = len(lines) - (room - 1)
            note = Segment(f"… {hidden} more lines above", Style(dim=True))
            lines = [[note], *lines[-(room - 1) :]]
        for i, line in enumerate(lines):
            if i:
                yield Segment.line()
            yield from line


class MarkdownStream:
    """Renders a streamed reply as markdown: finished blocks go to the scrollback once, the rest is live."""

    def __init__(self, console: Console, *, refresh_per_second: float = 12.0, code_theme: str = "monokai"):
        self.console = console
        self._splitter = BlockSplitter()
        self._interval = 1.0 / refresh_per_second if refresh_per_second > 0 else float("inf")
        self._code_theme = code_theme
        self._live: Live | None = None
        self._last_refresh = float("-inf")
        self._blocks_printed = 0
        self._closed = False

    def _render(self, block: str) -> list[list[Segment]]:
        """Lines of one block as they will appear, with the blank separator line before all but the first."""
        markdown = Markdown(block.strip("\r\n"), code_theme=self._code_theme)
        lines = _trim(self.console.render_lines(markdown, self.console.options, pad=False))
        return [[], *lines] if self._blocks_printed and lines else lines

    def _print_block(self, block: str) -> None:
        lines = self._render(block)
        if lines:
            self.console.print(_Lines(lines))
            self._blocks_printed += 1

    def feed(self, text: str) -> None:
        """Show the next chunk of the reply."""
        if self._closed or not text:
            return
        finished = self._splitter.feed(visible(text))  # model text must not drive the terminal
        for block in finished:
            # while the live region is up, printing redraws it below the new scrollback lines
            self._print_block(block)
        if not self.console.is_terminal or self.console.is_dumb_terminal:
            return  # nothing live on a file or dumb terminal: blocks appear as they finish
        if not self._splitter.pending.strip():
            return
        now = time.monotonic()
        if self._live is None:
            self._live = Live(
                _Tail(self),
                console=self.console,
                auto_refresh=False,
                transient=True,
                vertical_overflow="crop",
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        elif finished or now - self._last_refresh < self._interval:
            return  # printing already redrew it, or it was drawn a moment ago
        self._last_refresh = now
        self._live.refresh()

    def _stop_live(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.update(Text(""))  # the final redraw on stop must not print the tail in full
            live.stop()

    def _close(self) -> None:
        self._closed = True
        self._stop_live()
        if self._splitter.pending.strip():
            self._print_block(self._splitter.pending)

    def finish(self) -> None:
        """The reply is complete: print what is left of it."""
        if not self._closed:
            self._close()

    def abort(self, note: str | None = None) -> None:
        """Stop early (Ctrl-C, error): keep what was shown, then print `note` dimmed if given."""
        if self._closed:
            return
        self._close()
        if note:
            self.console.print(Text(note, style="dim"))


class PlainStream:
    """Writes the reply exactly as generated (piped output, --plain); notes and statistics go to `err`."""

    def __init__(self, file: TextIO, *, err: TextIO | None = None, ensure_newline: bool = True):
        self.file = file
        self.err = err
        self._ensure_newline = ensure_newline
        self._last = "\n"  # last character written, to end the reply on a line of its own
        self._closed = False
        try:  # on a terminal (chat --plain) control characters are shown, not acted on; a pipe gets the bytes
            self._terminal = file.isatty()
        except (AttributeError, ValueError, OSError):
            self._terminal = False

    def feed(self, text: str) -> None:
        if self._closed or not text:
            return
        if self._terminal:
            text = visible(text)
        self.file.write(text)
        self.file.flush()
        self._last = text[-1]

    def finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ensure_newline and self._last != "\n":
            self.file.write("\n")
        self.file.flush()

    def abort(self, note: str | None = None) -> None:
        self.finish()
        if note:
            err = self.err or sys.stderr
            err.write(note + "\n")
            err.flush()


THOUGHT_MODES = ("show", "hide", "fold")


class _ThoughtTail:
    """The reasoning while it streams in fold or hide mode: its newest lines, dimmed, at most a screen's height
    (a live region taller than the screen cannot be redrawn); in hide mode only a status line."""

    def __init__(self, stream: ThoughtStream) -> None:
        self._stream = stream

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self._stream.mode == "hide":
            yield Text("thinking…", style="dim")
            return
        room = max(1, min(console.size.height - 1, 8))
        # only the end of the text can be on screen: wrapping all of a long reasoning on every refresh is waste
        text = self._stream.text[-room * max(options.max_width, 1):]
        lines = console.render_lines(Text(visible(text), style="dim"), options, pad=False)[-room:]
        for i, line in enumerate(lines):
            if i:
                yield Segment.line()
            yield from line


class ThoughtStream:
    """A reply's reasoning, shown per `mode`, before its answer. `show`: dimmed, and it stays. `fold`: dimmed in
    a live region while it streams, replaced by one dim line (`end(summary)`) when the answer starts. `hide`:
    nothing stays (a transient "thinking…" while it runs). Without `live` (plain output, not a terminal) fold and
    hide draw nothing while it streams, and show writes the text exactly as it came."""

    def __init__(self, console: Console, mode: str, *, live: bool = True, refresh_per_second: float = 12.0):
        if mode not in THOUGHT_MODES:
            raise ValueError(f"mode must be one of {THOUGHT_MODES}, not {mode!r}")
        self.console = console
        self.mode = mode
        self.text = ""
        self._live_ok = live and console.is_terminal and not console.is_dumb_terminal
        self._live: Live | None = None
        self._interval = 1.0 / refresh_per_second if refresh_per_second > 0 else float("inf")
        self._last_refresh = float("-inf")
        self._ended = False

    def feed(self, text: str) -> None:
        if self._ended or not text:
            return
        self.text += text
        if self.mode == "show":
            if self.console.is_terminal:
                self.console.print(Text(visible(text), style="dim"), end="", soft_wrap=True)
            else:
                self.console.file.write(text)  # as written: no tab expansion, no styles
                self.console.file.flush()
            return
        if not self._live_ok:
            return
        now = time.monotonic()
        if self._live is None:
            self._live = Live(_ThoughtTail(self), console=self.console, auto_refresh=False, transient=True,
                              vertical_overflow="crop", redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        elif now - self._last_refresh < self._interval:
            return
        self._last_refresh = now
        self._live.refresh()

    def end(self, summary: str | None = None) -> None:
        """The reasoning is over (the answer starts, or the reply ended): fold it to `summary` in fold mode,
        end its line in show mode. Only the first call counts."""
        if self._ended:
            return
        self._ended = True
        live, self._live = self._live, None
        if live is not None:
            live.update(Text(""))  # the final redraw on stop must not print the tail in full
            live.stop()
        if not self.text:
            return
        if self.mode == "show":
            if not self.text.endswith("\n"):
                self.console.file.write("\n")
            if self.console.is_terminal:
                self.console.file.write("\n")  # a blank line between the reasoning and the answer
            self.console.file.flush()
        elif self.mode == "fold" and summary:
            self.console.print(Text(summary, style="dim"), soft_wrap=True)


def stats_footer(stats: dict) -> str:
    """One line such as `42 tokens · 18.3 tok/s · first token 0.21 s`; missing (or None) keys are skipped."""
    parts = []
    tokens = stats.get("generated_tokens")
    if tokens is not None:
        parts.append(f"{tokens} token" + ("" if tokens == 1 else "s"))
    tps = stats.get("decode_tps")
    if tps is not None:
        from lfm2cli.terminal.formatting import rate

        parts.append(f"{rate(tps)} tok/s")  # '-' when no token was decoded
    ttft = stats.get("ttft_s")
    if ttft is not None:
        parts.append(f"first token {ttft:.2f} s")
    return " · ".join(parts)


def make_stream(console: Console, plain: bool) -> MarkdownStream | PlainStream:
    """PlainStream on the console's file when `plain` (not a TTY, or --plain), else MarkdownStream."""
    if plain:
        return PlainStream(console.file)
    return MarkdownStream(console)


def print_sections(sections: list[tuple[str, list[tuple[str, str]]]], console: Console | None = None) -> None:
    """Titled groups of label/value rows as one table (`lfm2 info`, chat's /info)."""
    from rich import box
    from rich.table import Table

    table = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column()
    for n, (title, rows) in enumerate(sections):
        if n:
            table.add_section()
        table.add_row(Text(title, style="bold cyan"), "")
        for label, value in rows:
            # Text(), not markup: token strings such as "[PAD]" must print as they are
            table.add_row(Text("  " + label), Text(visible(value)))  # values come from checkpoint files
    (console or Console()).print(table)


def print_report(lines: list[str], columns: tuple[str, ...], rows: list[tuple[str, ...]], *, plain: bool,
                 console: Console | None = None, out: TextIO | None = None) -> None:
    """Summary lines, then a table whose first column is a label and the others numbers (`lfm2 bench`): plain
    aligned text for pipes (`out`), or a rich table on `console`."""
    if plain:
        out = out or sys.stdout
        for line in lines:
            print(line, file=out)
        table = [columns, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
        for r in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip(), file=out)
        return
    from rich import box
    from rich.table import Table

    console = console or Console()
    for line in lines:
        console.print(Text(line))
    grid = Table(box=box.SIMPLE, pad_edge=False)
    for i, col in enumerate(columns):
        grid.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        grid.add_row(*r)
    console.print(grid)
