"""Untrusted text (model output, names from checkpoint files, server replies) made safe to show on a terminal.

A terminal acts on control characters: ESC starts sequences that can clear the screen, retitle the window or
write the clipboard (OSC 52), and bidi overrides reorder what the reader sees. Shown text keeps its meaning
but such characters appear as visible escapes (`\\x1b`, `\\u202e`) instead of being acted on."""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, C1 controls, the Unicode bidi embedding/override/isolate marks, and lone
# surrogates (which cannot even be encoded for the terminal); one-line text also escapes line and paragraph breaks
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every character a terminal would act on written as an escape; tabs and newlines kept."""
    return _UNSAFE.sub(_escape, text)


def visible_line(text: str) -> str:
    """`text` for one line of a message (a file or tensor name): newlines and tabs escaped too."""
    return _UNSAFE_LINE.sub(_escape, text)
