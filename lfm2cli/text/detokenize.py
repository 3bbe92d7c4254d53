"""Turn a stream of token ids into text as it is generated.

Byte-level BPE tokens can end in the middle of a multi-byte UTF-8 character, and some decoders
treat a token differently depending on what precedes it. So each step decodes a short window: the
already-printed tokens just before the new ones give the context ("prefix"), and only the text the
new tokens add is returned. While that text ends in U+FFFD (a character still incomplete) it is held
back until the next token completes it.

`keep` names special tokens whose text is returned even though special tokens are skipped: the
`<think>`/`</think>` markers of thinking models are special tokens in some tokenizers, and the
reasoning/answer split needs to see them; so are LFM2's `<|tool_call_start|>`/`<|tool_call_end|>`, which the
tool-call parser needs when tools are given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, keep: Mapping[int, str] | None = None
                 ) -> None:
        """`keep`: token id -> text for the special tokens to write out anyway (only matters when skipping)."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._keep = dict(keep or {}) if skip_special_tokens else {}
        self._ids: list[int] = []  # only the window still needed: context + pending tokens
        self._prefix = 0  # start of the context tokens in _ids
        self._read = 0  # first token whose text has not been returned yet
        self._prefix_text = ""  # decode(_ids[_prefix:_read]), cached

    def _decode(self, ids: list[int]) -> str:
        if not self._keep or not any(i in self._keep for i in ids):
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip)
        # A kept token is an added token, whole on its own, so the runs between kept tokens decode apart.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._keep:
                parts += [self._tokenizer.decode(run, skip_special_tokens=True) if run else "", self._keep[i]]
                run = []
            else:
                run.append(i)
        if run:
            parts.append(self._tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text that is now complete (possibly empty)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character still split across tokens
        new = text[len(self._prefix_text):]
        # The tokens just returned become the next context; older ones are no longer needed.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """Text still held back at the end of generation (e.g. an incomplete character, as U+FFFD)."""
        text = self._decode(self._ids[self._prefix:])
        new = text[len(self._prefix_text):] if len(text) > len(self._prefix_text) else ""
        self._ids, self._prefix, self._read, self._prefix_text = [], 0, 0, ""
        return new
