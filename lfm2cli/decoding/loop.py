"""The generation loop: prefill (chunked), then decode, yielding token ids. It knows nothing about text
or terminals; the caller turns ids into text and decides when to stop early."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from lfm2cli.errors import GenerationError
from lfm2cli.model.cache import HybridCache
from lfm2cli.model.lfm2 import Lfm2ForCausalLM
from lfm2cli.system.memory import peak_memory

PREFILL_CHUNK = 512  # long prompts run in chunks so activations stay small


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # from the call to the first generated token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str | None = None  # stop, length, interrupted, or tool_calls (set by runs.local.TextRun)
    # with finish_reason "length", what ended the reply: "max_tokens" (the caller's cap) or "context" (the
    # model's context was full first); the two need different advice
    length_limit: str | None = None
    context_tokens: int = 0  # the context the reply ran in, for that advice

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from prefill; the rest each cost one decode step
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tps"] = round(self.prefill_tps, 2)
        d["decode_tps"] = round(self.decode_tps, 2)
        return d


def prefill(model: Lfm2ForCausalLM, ids: Sequence[int], cache: HybridCache, chunk: int = PREFILL_CHUNK
            ) -> torch.Tensor:
    """Run new tokens through the model in chunks; returns the logits after the last one."""
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    logits = None
    for start in range(0, tokens.shape[1], chunk):
        logits = model(tokens[:, start:start + chunk], cache)
    assert logits is not None
    return logits


def _check_finite(logits: torch.Tensor, index: int) -> None:
    """NaN or inf logits would be sampled into garbage tokens (or crash the sampler): stop with a reason instead.
    One reduction per token; a sum overflows only for logits no real model produces."""
    if not bool(torch.isfinite(logits.sum(dtype=torch.float32))):
        raise GenerationError(
            f"the model produced NaN/inf logits at generated token {index + 1}; likely damaged weights: check the "
            "checkpoint's files (with --dtype float16, try bfloat16)"
        )


def decode_tokens(model: Lfm2ForCausalLM, prompt_ids: Sequence[int], *, sampler: Callable[..., int], max_tokens: int,
             eos_ids: Iterable[int] = (), cache: HybridCache | None = None,
             context_ids: Sequence[int] | None = None, stats: GenerationStats | None = None,
             prefill_chunk: int = PREFILL_CHUNK) -> Iterator[int]:
    """Yield generated token ids (EOS is not yielded). With a cache, `prompt_ids` continue what the
    cache already holds; `context_ids` are all ids so far, for the repetition penalty."""
    stats = stats if stats is not None else GenerationStats()
    cache = cache if cache is not None else model.new_cache()
    limit = cache.max_len
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    if cache.pos + len(prompt_ids) >= limit:
        raise GenerationError(
            f"the prompt needs {cache.pos + len(prompt_ids)} tokens but the model's context holds {limit}; "
            "shorten it"
        )
    room = limit - cache.pos - len(prompt_ids)
    length_limit = "context" if room < max_tokens else "max_tokens"
    max_tokens = min(max_tokens, room)
    stats.context_tokens = limit
    eos = set(eos_ids)
    history = list(context_ids) if context_ids is not None else list(prompt_ids)
    seen = torch.empty(len(history) + max_tokens, dtype=torch.long, device=model.device)
    seen[: len(history)] = torch.tensor(history, dtype=torch.long)
    n_seen = len(history)
    cache.reserve(cache.pos + len(prompt_ids) + max_tokens)
    stats.prompt_tokens = len(prompt_ids)
    t0 = time.perf_counter()
    # all of the prompt but its last token, which runs through the one-token step as every later token does:
    # serve and chat feed a prompt that way, so generate gives the same numbers (prefill rounds otherwise)
    if len(prompt_ids) > 1:
        prefill(model, prompt_ids[:-1], cache, prefill_chunk)
    step = torch.empty(1, 1, dtype=torch.long, device=model.device)
    step[0, 0] = int(prompt_ids[-1])
    # A model that runs many sequences (serve's seats) takes the choice of the token with the step, and makes it
    # on its own thread right after the step: one after another, instead of every sequence's thread contending
    # for the interpreter lock over a dozen small torch calls each.
    step_and_pick = getattr(model, "step_and_pick", None)
    t_decode = t0
    try:
        for i in range(max_tokens):
            def pick(logits: torch.Tensor, i: int = i, n_seen: int = n_seen) -> int:
                _check_finite(logits[0], i)
                return sampler(logits[0], seen[:n_seen])

            tok = step_and_pick(step, cache, pick) if step_and_pick is not None else pick(model(step, cache))
            now = time.perf_counter()
            if i == 0:
                stats.ttft_s = stats.prefill_s = now - t0
                t_decode = now
            if tok in eos:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens += 1
            seen[n_seen] = tok
            n_seen += 1
            stats.decode_s = now - t_decode  # up to the latest token, so early stops report true rates
            yield tok
            step[0, 0] = tok
        stats.finish_reason = "length"
        stats.length_limit = length_limit
    finally:
        stats.peak_memory_bytes = peak_memory(model.device)
