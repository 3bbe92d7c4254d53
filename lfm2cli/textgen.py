"""Text in, text out: builds prompts, turns the token stream into text pieces (whole UTF-8 characters,
stop strings held back) and records why generation stopped. Shared by `generate`, `chat` and `bench`."""

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


def prompt_ids(lm: LoadedModel, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids for a one-shot prompt: the model's chat template, or the text as is with `raw`."""
    tok = require_tokenizer(lm)
    if raw:
        return tok.encode(prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages, add_generation_prompt=True)


def stop_ids(lm: LoadedModel) -> set[int]:
    """The checkpoint's EOS ids plus the tokenizer's EOS (`<|im_end|>` ends a chat turn)."""
    ids = set(lm.config.eos_token_ids)
    if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


@dataclass
class TextRun:
    """One streamed generation: iterate `pieces()` for text; `text`, `tokens` and `stats` fill in."""

    lm: LoadedModel
    prompt: Sequence[int]
    params: SamplingParams
    max_tokens: int
    stops: Sequence[str] = ()
    cache: Any = None
    context_ids: Sequence[int] | None = None
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)

    def pieces(self) -> Iterator[str]:
        detok = StreamingDetokenizer(require_tokenizer(self.lm))
        matcher = StopMatcher(list(self.stops))
        gen = generate(self.lm.model, self.prompt, sampler=Sampler(self.params), max_tokens=self.max_tokens,
                       eos_ids=stop_ids(self.lm), cache=self.cache, context_ids=self.context_ids,
                       stats=self.stats)
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

    def run(self) -> str:
        for _ in self.pieces():
            pass
        return self.text
