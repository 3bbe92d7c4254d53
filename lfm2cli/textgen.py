"""Text in, text out: builds prompts, turns the token stream into text pieces (whole UTF-8 characters,
stop strings held back) and records why generation stopped. Shared by `generate`, `chat` and `bench`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lfm2cli.detokenize import StreamingDetokenizer
from lfm2cli.errors import CheckpointError
from lfm2cli.generation import GenerationStats, generate
from lfm2cli.loading import LoadedModel
from lfm2cli.sampling import Sampler, SamplingParams
from lfm2cli.stops import StopMatcher


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
