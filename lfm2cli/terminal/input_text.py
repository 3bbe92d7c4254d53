"""Text from the command line and stdin as the tokenizer can take it: invalid UTF-8 (which Python hands over as
lone surrogates) becomes U+FFFD, with one note saying where it came from."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def as_text(data: bytes | str) -> tuple[str, bool]:
    """Text the tokenizer can take from bytes or a str that may hold invalid UTF-8: bad bytes become U+FFFD.
    Returns (text, whether anything was replaced). Python hands undecodable stdin and argv bytes over as lone
    surrogates (surrogateescape), which the tokenizer refuses, so a str is turned back into its bytes first."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
            return data, False
        except UnicodeEncodeError:
            try:
                data = data.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # surrogates that did not come from bytes
                data = data.encode("utf-8", "surrogatepass")
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True


def read_stdin_text(stream: Any = None) -> tuple[str, bool]:
    """All of stdin (or `stream`) as text, invalid UTF-8 replaced: see `as_text`. Reads the bytes underneath when
    there are any, so neither a strict locale decoder nor surrogateescape sees them first."""
    stream = sys.stdin if stream is None else stream
    raw = getattr(stream, "buffer", None)
    return as_text(raw.read() if raw is not None else stream.read())


def replaced_note(sources: Sequence[str]) -> str:
    """The one note a run prints when `as_text` had to replace bytes, naming where they came from."""
    return (f"note: {' and '.join(dict.fromkeys(sources))} held invalid UTF-8; the bad bytes were replaced with "
            "U+FFFD, the replacement character")


def read_prompt(prompt: str | None, system: str | None) -> tuple[str, str | None]:
    """`lfm2 generate`'s prompt and system prompt. Piped stdin comes before the instruction
    (`cat notes | lfm2 generate -p "Summarise"`); `--prompt -` reads the whole prompt from stdin. Invalid UTF-8
    anywhere becomes U+FFFD, with one note on stderr."""
    from lfm2cli.errors import UsageError

    bad: list[str] = []
    piped = None
    if sys.stdin is not None and not sys.stdin.isatty():
        piped, replaced = read_stdin_text(sys.stdin)
        bad += ["stdin"] if replaced else []
    if prompt is not None and prompt != "-":
        prompt, replaced = as_text(prompt)
        bad += ["--prompt"] if replaced else []
    if system is not None:
        system, replaced = as_text(system)
        bad += ["--system"] if replaced else []
    if bad:
        sys.stderr.write(replaced_note(bad) + "\n")
    if prompt == "-":
        if piped is None:
            raise UsageError("--prompt - reads the prompt from stdin, but stdin is a terminal; pipe text in")
        text = piped
    elif piped and piped.strip():
        text = piped.rstrip("\n") + ("\n\n" + prompt if prompt else "")
    elif prompt is None:
        raise UsageError("no prompt: pass --prompt TEXT or pipe text on stdin")
    else:
        text = prompt
    if not text.strip():
        raise UsageError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    return text, system
