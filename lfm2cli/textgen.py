"""Text in, text out: builds prompts, turns the token stream into text pieces (whole UTF-8 characters,
stop strings held back, reasoning told apart from the answer on request) and records why generation stopped.
Shared by `generate`, `chat` and `bench`."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.detokenize import StreamingDetokenizer
from lfm2cli.errors import CheckpointError
from lfm2cli.generation import GenerationStats, generate
from lfm2cli.loading import LoadedModel
from lfm2cli.sampling import Sampler, SamplingParams
from lfm2cli.stops import StopMatcher
from lfm2cli.thinking import CLOSE, OPEN, Answer, Reasoning, ThinkingSplitter


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


def length_stop_note(stats: GenerationStats, max_tokens: int) -> str | None:
    """Why a reply that finished with "length" stopped: the caller's cap or a full context. None otherwise."""
    if stats.finish_reason != "length":
        return None
    if stats.length_limit == "context":
        return f"stopped because the model's context is full ({stats.context_tokens} tokens)"
    return f"stopped at the max_tokens limit ({max_tokens} tokens)"


def require_tokenizer(lm: LoadedModel) -> Any:
    if lm.tokenizer is None:
        raise CheckpointError(f"{lm.path}: no tokenizer.json; the checkpoint needs its tokenizer files")
    return lm.tokenizer


def prompt_text(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False) -> str:
    """The text of a one-shot prompt: the model's chat template rendered, or the text as is with `raw`."""
    if raw:
        return prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return require_tokenizer(lm).apply_chat_template(messages, add_generation_prompt=True)


def encode_prompt(lm: LoadedModel, text: str, raw: bool = False) -> list[int]:
    """Token ids for `prompt_text`'s result: a raw prompt gets BOS, a rendered template already begins with it."""
    return require_tokenizer(lm).encode(text, add_special_tokens=raw)


def prompt_ids(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids for a one-shot prompt: the model's chat template, or the text as is with `raw`."""
    return encode_prompt(lm, prompt_text(lm, prompt, system, raw), raw)


def thinking_markers(tokenizer: Any) -> dict[int, str]:
    """Ids of `<think>`/`</think>` where the tokenizer has them as special tokens (which decoding skips)."""
    special = getattr(tokenizer, "special_tokens", {})
    return {special[m]: m for m in (OPEN, CLOSE) if m in special}


def stop_ids(lm: LoadedModel) -> set[int]:
    """The checkpoint's EOS ids plus the tokenizer's EOS (`<|im_end|>` ends a chat turn)."""
    ids = set(lm.config.eos_token_ids)
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


@dataclass
class TextRun:
    """One streamed generation: iterate `pieces()` for text; `text`, `tokens` and `stats` fill in.

    With `think`, a leading `<think>` block is split off (`opened`: the prompt already opened it): `pieces()`
    yields `Reasoning` and `Answer` pieces, `text` holds the answer and `reasoning` the block's text. Stop
    strings apply to the answer only, so a stop string the model happens to think about does not end the reply.
    Without `think`, pieces are plain text exactly as before."""

    lm: LoadedModel
    prompt: Sequence[int]
    params: SamplingParams
    max_tokens: int
    stops: Sequence[str] = ()
    cache: Any = None
    context_ids: Sequence[int] | None = None
    think: bool = False
    opened: bool = False
    text: str = ""
    reasoning: str = ""
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def pieces(self) -> Iterator[str]:
        if self.think:
            yield from self._split_pieces()
            return
        detok = StreamingDetokenizer(require_tokenizer(self.lm))
        matcher = StopMatcher(list(self.stops))
        gen = self._generate()
        try:
            for tok in gen:
                self.tokens.append(tok)
                out, hit = matcher.feed(detok.add(tok))
                if out:
                    self.text += out
                    yield out
                if hit:
                    self.stats.finish_reason = "stop"
                    return
            out, _ = matcher.feed(detok.flush())
            out += matcher.flush()
            if out:
                self.text += out
                yield out
        except KeyboardInterrupt:
            self.stats.finish_reason = "interrupted"
            raise
        finally:
            gen.close()

    def _generate(self) -> Iterator[int]:
        return generate(self.lm.model, self.prompt, sampler=Sampler(self.params), max_tokens=self.max_tokens,
                        eos_ids=stop_ids(self.lm), cache=self.cache, context_ids=self.context_ids,
                        stats=self.stats)

    def _split_pieces(self) -> Iterator[Reasoning | Answer]:
        tok = require_tokenizer(self.lm)
        detok = StreamingDetokenizer(tok, keep=thinking_markers(tok))
        splitter = ThinkingSplitter(opened=self.opened)
        matcher = StopMatcher(list(self.stops))
        hit = False

        def sorted_out(pieces: list[Reasoning | Answer]) -> Iterator[Reasoning | Answer]:
            nonlocal hit
            for piece in pieces:
                if isinstance(piece, Reasoning):
                    self.reasoning += piece
                    yield piece
                    continue
                out, hit = matcher.feed(piece)
                if out:
                    self.text += out
                    yield Answer(out)
                if hit:
                    return

        gen = self._generate()
        try:
            for t in gen:
                self.tokens.append(t)
                yield from sorted_out(splitter.feed(detok.add(t)))
                if hit:
                    self.stats.finish_reason = "stop"
                    return
            yield from sorted_out(splitter.feed(detok.flush()) + splitter.close())
            if hit:
                self.stats.finish_reason = "stop"
                return
            out = matcher.flush()
            if out:
                self.text += out
                yield Answer(out)
        except KeyboardInterrupt:
            self.stats.finish_reason = "interrupted"
            raise
        finally:
            gen.close()

    def run(self) -> str:
        for _ in self.pieces():
            pass
        return self.text
