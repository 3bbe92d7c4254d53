"""The sampler a local run hands to the decoding loop: sampling, plus the tokens it forces (closing a `<think>`
block whose budget is spent) and the logits it masks (a grammar's, and the end of a reply that must still
answer). On request it also keeps each token's logprob under the model's own distribution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lfm2cli.decoding.constraints import Constraint
from lfm2cli.decoding.sampling import Sampler, TokenLogprob, model_logprobs, read_logprob
from lfm2cli.reply.thinking import ThinkingBudget, ThinkingSplitter


class Steer:
    """The sampler a TextRun hands to the decoding loop: it closes the `<think>` block when the budget is spent
    (feeding `</think>` itself, token by token) and masks the answer's logits with the grammar. The loop yields
    each token to the TextRun before asking for the next, so the splitter and budget state are current here.

    `logprobs` (the number of most likely tokens to keep with each, 0 for none; None: nothing is computed):
    `scored` gets one entry per token chosen, forced ones included, read from the logits before any mask."""

    def __init__(self, sampler: Sampler, tokenizer: Any, splitter: ThinkingSplitter | None,
                 budget: ThinkingBudget | None, constraint: Constraint | None, open_id: int | None,
                 eos_ids: Sequence[int] = (), call_id: int | None = None, logprobs: int | None = None) -> None:
        import torch

        self.sampler, self.tokenizer = sampler, tokenizer
        self.splitter, self.budget, self.constraint = splitter, budget, constraint
        self.open_id = open_id
        self.eos = torch.tensor(eos_ids, dtype=torch.long)
        self.forced: list[int] = []
        # `<|tool_call_start|>` written inside the reasoning ends it (ThinkingSplitter): under a grammar that
        # begins with it (a forced call) it is the grammar's first token; under any other it may not be written
        self.call_id = call_id
        self._call_starts_grammar: bool | None = None
        self.logprobs = logprobs
        self.scored: list[TokenLogprob] = []

    def __call__(self, logits: Any, seen: Any) -> int:
        if self.logprobs is None:
            return self._choose(logits, seen)
        logprobs = model_logprobs(logits)  # first: a mask may write into the logits
        tok = self._choose(logits, seen)
        self.scored.append(read_logprob(logprobs, tok, self.logprobs))
        return tok

    def _choose(self, logits: Any, seen: Any) -> int:
        if self.budget is not None and not self.forced and self.budget.due:
            self.forced = self.tokenizer.encode(self.budget.force_close())
        if self.forced:
            return self.forced.pop(0)
        state = self.splitter.state if self.splitter is not None else "answer"
        if self.constraint is None:
            return self.sampler(logits, seen)
        if state == "reasoning":
            return self._reasoning(logits, seen, self.constraint)
        masked = self.constraint.mask(logits)
        if state == "start" and self.open_id is not None:
            masked[self.open_id] = logits[self.open_id]  # a thinking model may still open its block first
        tok = self.sampler(masked, seen)
        if tok != self.open_id or state != "start":
            self.constraint.accept(tok)
        return tok

    def _reasoning(self, logits: Any, seen: Any, constraint: Constraint) -> int:
        """A token inside the `<think>` block under a grammar: free text, but no ending here, as the answer the
        grammar promises must still come."""
        logits = logits.index_fill(0, self.eos, float("-inf"))
        if self.call_id is None:
            return self.sampler(logits, seen)
        if self._call_starts_grammar is None:
            self._call_starts_grammar = bool(constraint.allowed()[self.call_id])
        if not self._call_starts_grammar:
            logits[self.call_id] = float("-inf")
        tok = self.sampler(logits, seen)
        if tok == self.call_id:
            constraint.accept(tok)
        return tok
