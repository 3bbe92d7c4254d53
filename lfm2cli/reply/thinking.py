"""Split a streamed reply into its reasoning (`<think>...</think>`) and its answer, and cap the reasoning.

LFM2.5 thinking models open their reply with one `<think>` block; some chat templates put the `<think>` in the
generation prompt, so the model's output starts inside the block. `ThinkingSplitter` takes the text as it
streams and hands back `Reasoning` and `Answer` pieces, holding back only what could still turn out to be a
marker. `ThinkingBudget` tells a generation loop when to close the block itself.

Choices, and why:
- Only a block at the start of the reply counts. A `<think>` (or `</think>`) later in the answer is answer
  text: the models are trained with one leading block, and an answer that talks about the tags must not
  vanish into hidden reasoning. LFM2.5's template keeps only the text after the last `</think>` of past turns,
  so the answer is what survives there anyway.
- The whitespace around the markers is dropped from both parts, as the template's `| trim` does for past
  turns; `raw_text` keeps every character the model wrote, for history that must re-render it exactly.
- A block still open when generation ends is all reasoning: the model never reached its answer.
- A `<think>` repeated at the start of the block (the prompt opened it and the model wrote it again) is dropped,
  as vLLM's and SGLang's reasoning parsers drop it: it is a marker, not reasoning.
- With `call_start` (tools offered), a tool-call block that begins inside an unclosed `<think>` block ends the
  reasoning there, and the block is answer text, where the tool-call parser finds it: the call is not lost in
  hidden reasoning. SGLang's reasoning parsers treat their tool-call start the same way (Qwen3's `<tool_call>`,
  Kimi K2's section marker), as does vLLM's Qwen3 parser.
"""

from __future__ import annotations

from typing import Literal

OPEN = "<think>"
CLOSE = "</think>"
# What a generation loop writes to end the block for the model: the marker, then the newline the models
# themselves put after it.
CLOSE_TEXT = CLOSE + "\n"

State = Literal["start", "reasoning", "answer"]


class Reasoning(str):
    """Text from inside the `<think>` block."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Reasoning({str.__repr__(self)})"


class Answer(str):
    """Text of the reply proper."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Answer({str.__repr__(self)})"


Piece = Reasoning | Answer


def _partial_tail(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker` (could still become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkingSplitter:
    """Incremental split of one reply. `opened`: the prompt already opened `<think>` (see `opened_by_prompt`).

    `state` is "start" until the reply is known to begin with a block or not, then "reasoning" inside the block
    and "answer" after it (or from the first character when there is no block)."""

    def __init__(self, opened: bool = False, call_start: str | None = None) -> None:
        self._state: State = "reasoning" if opened else "start"
        self._held = ""  # received, not yet released
        self._trim = opened  # drop whitespace at the start of the current part
        self._leading = opened  # at the start of the block, where a repeated `<think>` is dropped
        self._call_start = call_start  # a marker that ends the block implicitly and begins the answer
        self._raw: list[str] = []
        self._reasoning: list[str] = []
        self._answer: list[str] = []
        self._closed = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def reasoning_text(self) -> str:
        """The reasoning released so far (all of it after `close()`)."""
        return "".join(self._reasoning)

    @property
    def answer_text(self) -> str:
        """The answer released so far (all of it after `close()`)."""
        return "".join(self._answer)

    @property
    def raw_text(self) -> str:
        """Everything fed, markers and whitespace included, exactly as the model wrote it."""
        return "".join(self._raw)

    def feed(self, text: str) -> list[Piece]:
        """Add streamed text; return the pieces that are now certain, in order (same kinds merged)."""
        if self._closed:
            raise ValueError("ThinkingSplitter.feed() after close()")
        self._raw.append(text)
        self._held += text
        return self._release(final=False)

    def close(self) -> list[Piece]:
        """End of the reply: release what was held back. A marker prefix left over is plain text then."""
        if self._closed:
            return []
        pieces = self._release(final=True)
        if self._state == "start":
            self._state = "answer"
        self._closed = True
        return pieces

    def _release(self, final: bool) -> list[Piece]:
        out: list[Piece] = []

        def emit(piece: Piece) -> None:
            if not piece:
                return
            (self._reasoning if isinstance(piece, Reasoning) else self._answer).append(str(piece))
            if out and type(out[-1]) is type(piece):
                out[-1] = type(piece)(out[-1] + piece)
            else:
                out.append(piece)

        while True:
            if self._state == "start":
                body = self._held.lstrip()
                if body.startswith(OPEN):
                    self._held = body[len(OPEN):]
                    self._state, self._trim, self._leading = "reasoning", True, True
                    continue
                if OPEN.startswith(body) and not final:
                    return out  # only whitespace or the start of `<think>` so far
                # No block: the reply is all answer, leading whitespace included (a reply without reasoning is
                # the model's text unchanged).
                self._state, self._trim = "answer", False
                continue
            if self._trim:
                self._held = self._held.lstrip()
                if not self._held:
                    return out
                self._trim = False
            if self._state == "answer":
                emit(Answer(self._held))
                self._held = ""
                return out
            if self._leading:
                if self._held.startswith(OPEN):  # written again after the prompt's (or its own) `<think>`
                    self._held, self._trim = self._held[len(OPEN):], True
                    continue
                if OPEN.startswith(self._held) and not final:
                    return out
                self._leading = False
            end = self._held.find(CLOSE)
            call = self._held.find(self._call_start) if self._call_start else -1
            if call >= 0 and (end < 0 or call < end):
                # a call begun inside the block: the reasoning ends, the call block is the answer's
                emit(Reasoning(self._held[:call].rstrip()))
                self._held = self._held[call:]
                self._state = "answer"
                continue
            if end >= 0:
                emit(Reasoning(self._held[:end].rstrip()))
                self._held = self._held[end + len(CLOSE):]
                self._state, self._trim = "answer", True
                continue
            if final:
                emit(Reasoning(self._held.rstrip()))
                self._held = ""
                return out
            # Keep a possible `</think>` (or call marker) prefix, and the whitespace before it, which is dropped if
            # the block ends.
            keep = max(_partial_tail(self._held, CLOSE), _partial_tail(self._held, self._call_start or ""))
            body = self._held[:len(self._held) - keep]
            text = body.rstrip()
            emit(Reasoning(text))
            self._held = self._held[len(text):]
            return out


def opened_by_prompt(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` block, so the model's output starts in it.

    Only the last turn counts (text after the last `<|im_start|>`): an earlier reply cut off inside its
    block, or a user quoting the tag, leaves no block open for the reply being generated."""
    turn = prompt_text.rsplit("<|im_start|>", 1)[-1]
    start = turn.rfind(OPEN)
    return start >= 0 and turn.find(CLOSE, start) < 0


def opened_block(prompt_text: str) -> str:
    """The `<think>` text a rendered prompt ends with (e.g. "<think>\\n"), which the model's reply continues; ""
    when the prompt opens no block (see `opened_by_prompt`). A chat's history keeps it as part of the reply."""
    if not opened_by_prompt(prompt_text):
        return ""
    return prompt_text[prompt_text.rfind(OPEN):]


class ThinkingBudget:
    """At most `max_tokens` generated tokens inside the `<think>` block.

    The generation loop calls `observe(token_id, text)` for each generated token (`text`: what the detokenizer
    made of it). When it returns True the block is still open and the budget is spent: the loop calls
    `force_close()`, feeds the returned text's tokens to the model in place of the next sampled ones, and lets it
    continue with its answer. `open_id`/`close_id` are the ids of `<think>`/`</think>` where the tokenizer has
    them as single tokens, so the budget follows the block even when the detokenizer drops special tokens."""

    def __init__(self, max_tokens: int, *, opened: bool = False, open_id: int | None = None,
                 close_id: int | None = None, call_start: str | None = None) -> None:
        if max_tokens < 0:
            raise ValueError(f"a thinking budget cannot be negative ({max_tokens})")
        self.max_tokens = max_tokens
        self.used = 0  # generated tokens counted inside the block
        self.forced = False
        self._open_id, self._close_id = open_id, close_id
        # Only the state matters here; the splitter is what follows the markers across token boundaries.
        self._splitter = ThinkingSplitter(opened=opened, call_start=call_start)

    @property
    def inside(self) -> bool:
        """Whether the block is open now."""
        return self._splitter.state == "reasoning"

    @property
    def due(self) -> bool:
        """The block is open and the budget is spent: close it before sampling again. With `opened` and a budget
        of 0 this is already True before the first token."""
        return self.inside and self.used >= self.max_tokens

    def observe(self, token_id: int, text: str = "") -> bool:
        """Count one generated token; return `due` after it."""
        counted = self.inside  # tokens written inside the block count, its closing one included
        if token_id == self._open_id:
            text = OPEN
        elif token_id == self._close_id:
            text = CLOSE
        self._splitter.feed(text)
        if counted:
            self.used += 1
        return self.due

    def force_close(self) -> str:
        """Record that the loop closes the block now; returns the text to inject (`</think>` and a newline)."""
        if not self.inside:
            raise ValueError("no open <think> block to close")
        self._splitter.feed(CLOSE_TEXT)
        self.forced = True
        return CLOSE_TEXT
