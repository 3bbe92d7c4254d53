"""Streaming markdown output: every line shown once, in order, nothing cut, on files and on terminals."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.markdown import Markdown

from lfm2cli.terminal.render import BlockSplitter, MarkdownStream, PlainStream, make_stream, stats_footer

PARAGRAPHS = [f"Paragraph {n} says something short number {n}." for n in range(1, 7)]
CODE_LINES = [f"    total_{n} = compute({n})  # step {n}" for n in range(1, 16)]
ITEMS = [f"item number {n} of the list" for n in range(1, 5)]
IN_ORDER = PARAGRAPHS[:3] + CODE_LINES + ITEMS + PARAGRAPHS[3:]

REPLY = (
    "# A heading for the reply\n\n"
    f"{PARAGRAPHS[0]}\n\n{PARAGRAPHS[1]}\n\n"
    "## Second section\n\n"
    f"{PARAGRAPHS[2]}\n\n"
    "```python\ndef main():\n"
    + "\n".join(CODE_LINES)
    + "\n```\n\n"
    + "".join(f"- {item}\n" for item in ITEMS)
    + "\n1. first step\n2. second step\n\n"
    "---\n\n"
    f"{PARAGRAPHS[3]}\n\n> {PARAGRAPHS[4]}\n\n"
    f"{PARAGRAPHS[5]}"
)


def feed_in_chunks(stream, text: str, size: int = 3) -> None:
    for i in range(0, len(text), size):
        stream.feed(text[i : i + size])


_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


def terminal_screen(raw: str, height: int) -> list[str]:
    """Replay terminal output: what the scrollback plus screen shows at the end.

    Like a real terminal, the cursor cannot move up past the top of the visible screen, so a live
    region taller than the screen would leave duplicated lines behind, which the tests would see.
    """
    raw = _OSC.sub("", raw)
    lines: list[list[str]] = [[]]
    row = col = top = 0
    i = 0
    while i < len(raw):
        m = _CSI.match(raw, i)
        if m:
            arg, cmd = m.groups()
            if cmd == "A":
                row = max(top, row - int(arg or 1))
            elif cmd == "K":
                lines[row] = [] if arg == "2" else lines[row][:col]
            elif cmd not in "mlh":
                raise AssertionError(f"unexpected control sequence {m.group(0)!r}")
            i = m.end()
            continue
        ch = raw[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
            top = max(top, row - height + 1)
        else:
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    return trim_blank_edges(["".join(line).rstrip() for line in lines])


def trim_blank_edges(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def one_shot(text: str, width: int = 60) -> list[str]:
    """The reference: the whole reply rendered at once."""
    console = Console(file=io.StringIO(), width=width, height=10, color_system=None)
    console.print(Markdown(text))
    return trim_blank_edges([line.rstrip() for line in console.file.getvalue().splitlines()])


def assert_each_once_in_order(lines: list[str], expected: list[str]) -> None:
    found = []
    for want in expected:
        hits = [n for n, line in enumerate(lines) if want.strip() in line]
        assert len(hits) == 1, f"{want!r} shown {len(hits)} times"
        found.append(hits[0])
    assert found == sorted(found), "lines out of order"


def test_reply_is_taller_than_the_screen():
    assert len(one_shot(REPLY)) > 3 * 10


def test_streamed_to_a_file_matches_the_whole_reply_rendered_once():
    console = Console(file=io.StringIO(), width=60, height=10, force_terminal=False)
    stream = MarkdownStream(console)
    feed_in_chunks(stream, REPLY)
    stream.finish()
    out = console.file.getvalue()
    assert "\x1b" not in out  # a file gets plain text
    lines = trim_blank_edges([line.rstrip() for line in out.splitlines()])
    assert lines == one_shot(REPLY)
    assert_each_once_in_order(lines, IN_ORDER)


@pytest.mark.parametrize("refresh_per_second", [1e9, 12.0, 1e-9])
def test_streamed_to_a_terminal_leaves_each_line_once(refresh_per_second):
    # 1e9: every feed redraws the live region; 1e-9: it is only redrawn when a block is printed
    raw = io.StringIO()
    console = Console(file=raw, width=60, height=10, force_terminal=True, color_system="truecolor")
    stream = MarkdownStream(console, refresh_per_second=refresh_per_second)
    feed_in_chunks(stream, REPLY)
    stream.finish()
    screen = terminal_screen(raw.getvalue(), height=10)
    assert screen == one_shot(REPLY)
    assert_each_once_in_order(screen, IN_ORDER)


def test_a_tall_unfinished_block_is_cropped_while_live_then_printed_whole():
    raw = io.StringIO()
    console = Console(file=raw, width=60, height=10, force_terminal=True)
    stream = MarkdownStream(console, refresh_per_second=1e9)
    code = "```\n" + "\n".join(CODE_LINES) + "\n"
    feed_in_chunks(stream, code, size=5)
    live = terminal_screen(raw.getvalue(), height=10)
    assert len(live) <= 9  # fits the screen with a row to spare
    assert "more lines above" in live[0]
    assert CODE_LINES[-1].strip() in live[-2] + live[-1]
    assert not any(CODE_LINES[0].strip() in line for line in live)
    stream.feed("```\n")  # closing the fence finishes the block: it goes to the scrollback in full
    stream.finish()
    screen = terminal_screen(raw.getvalue(), height=10)
    assert not any("more lines above" in line for line in screen)
    assert_each_once_in_order(screen, CODE_LINES)


def test_a_finished_block_is_printed_once_however_many_feeds_follow():
    console = Console(file=io.StringIO(), width=60, force_terminal=False)
    stream = MarkdownStream(console)
    feed_in_chunks(stream, f"{PARAGRAPHS[0]}\n\n", size=2)
    assert PARAGRAPHS[0] not in console.file.getvalue()  # a blank line may still lead into a list item
    stream.feed("T")  # ... but the next block has begun
    assert console.file.getvalue().count(PARAGRAPHS[0]) == 1
    feed_in_chunks(stream, "The second paragraph goes on " * 40, size=1)
    assert console.file.getvalue().count(PARAGRAPHS[0]) == 1
    stream.finish()
    out = console.file.getvalue()
    assert out.count(PARAGRAPHS[0]) == 1
    assert "The second paragraph" in out


def test_terminal_output_does_not_redraw_finished_blocks():
    # Each redraw of the live region only contains the unfinished block, so text from a finished block
    # appears in the raw output once as scrollback plus at most the redraws made while it was unfinished.
    raw = io.StringIO()
    console = Console(file=raw, width=200, height=10, force_terminal=True)
    stream = MarkdownStream(console, refresh_per_second=1e9)
    first = "First words of the reply."
    stream.feed(first + "\n\n")
    feed_in_chunks(stream, "".join(f"Sentence {n} of the second paragraph. " for n in range(100)), size=4)
    stream.finish()
    assert raw.getvalue().count(first) <= 2


def test_abort_keeps_what_was_shown_and_adds_the_note():
    console = Console(file=io.StringIO(), width=60, force_terminal=False)
    stream = MarkdownStream(console)
    stream.feed(f"{PARAGRAPHS[0]}\n\n{PARAGRAPHS[1][:12]}")
    stream.abort("[interrupted]")
    stream.feed("more text after the abort")
    stream.finish()
    out = console.file.getvalue()
    assert out.count(PARAGRAPHS[0]) == 1
    assert PARAGRAPHS[1][:12] in out
    assert out.rstrip().endswith("[interrupted]")
    assert "after the abort" not in out


def test_abort_on_a_terminal_clears_the_live_region():
    raw = io.StringIO()
    console = Console(file=raw, width=60, height=10, force_terminal=True)
    stream = MarkdownStream(console, refresh_per_second=1e9)
    feed_in_chunks(stream, "```\n" + "\n".join(CODE_LINES[:12]))
    stream.abort("[interrupted]")
    screen = terminal_screen(raw.getvalue(), height=10)
    assert screen[-1] == "[interrupted]"
    assert_each_once_in_order(screen, CODE_LINES[:12])


@pytest.mark.parametrize(
    "text, blocks, pending",
    [
        ("a\nb\n\nc", ["a\nb"], "c"),
        ("- a\n\n- b\n\nafter\n", ["- a\n\n- b"], "after\n"),
        ("- a\n\n  more of a\n", [], "- a\n\n  more of a\n"),
        ("text\n# Head\nbody\n", ["text", "# Head"], "body\n"),
        ("```\nx\n\n\ny\n```\nafter", ["```\nx\n\n\ny\n```"], "after"),
        ("- item\n\n  ```\n  a\n\n  b\n  ```\n\nnext\n", ["- item\n\n  ```\n  a\n\n  b\n  ```"], "next\n"),
        ("~~~~\n```\n\n~~~\n\n~~~~\n", ["~~~~\n```\n\n~~~\n\n~~~~"], ""),
        ("para\n\n1", ["para"], "1"),
        ("- a\n\n1", [], "- a\n\n1"),  # "1" may begin the next item of the list
        ("- a\n\n1) b\n\nc", ["- a\n\n1) b"], "c"),
        ("\n\n\npara", [], "para"),
    ],
)
def test_block_splitter(text, blocks, pending):
    # fed one character at a time and all at once, the cut points are the same
    for size in (1, len(text)):
        splitter = BlockSplitter()
        got = []
        for i in range(0, len(text), size):
            got += splitter.feed(text[i : i + size])
        assert got == blocks
        assert splitter.pending == pending


@pytest.mark.parametrize("chunk", [1, 7])
def test_plain_stream_writes_the_text_exactly(chunk):
    out, err = io.StringIO(), io.StringIO()
    stream = PlainStream(out, err=err)
    text = "Hello **world**\n\n```\ncode\n```\n  trailing spaces  "
    feed_in_chunks(stream, text, size=chunk)
    assert out.getvalue() == text
    stream.finish()
    assert out.getvalue() == text + "\n"  # the prompt that follows starts on its own line
    assert err.getvalue() == ""


def test_plain_stream_does_not_add_a_second_newline_and_notes_go_to_stderr():
    out, err = io.StringIO(), io.StringIO()
    stream = PlainStream(out, err=err)
    stream.feed("line\n")
    stream.abort("[interrupted]")
    assert out.getvalue() == "line\n"
    assert err.getvalue() == "[interrupted]\n"


def test_stats_footer():
    stats = {"generated_tokens": 42, "decode_tps": 18.2999, "ttft_s": 0.2071}
    assert stats_footer(stats) == "42 tokens · 18.3 tok/s · first token 0.21 s"
    assert stats_footer({"generated_tokens": 1, "ttft_s": 1.5}) == "1 token · first token 1.50 s"
    assert stats_footer({"decode_tps": 7, "ttft_s": None}) == "7.0 tok/s"
    assert stats_footer({}) == ""



def test_make_stream():
    console = Console(file=io.StringIO())
    assert isinstance(make_stream(console, plain=True), PlainStream)
    assert isinstance(make_stream(console, plain=False), MarkdownStream)
    plain = make_stream(console, plain=True)
    plain.feed("x *y*")
    assert console.file.getvalue() == "x *y*"
