"""Choosing the next token from the model's logits.

The pipeline follows transformers' default `generate()` processors, in the same order: repetition
penalty, temperature, top-k, top-p, min-p, then a draw from the softmax. Everything is vectorised:
this runs once per generated token."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from lfm2cli.errors import UsageError

if TYPE_CHECKING:  # torch is imported lazily so commands can import SamplingParams cheaply
    import torch


@dataclass
class SamplingParams:
    # Liquid AI's recommended settings for LFM2 chat.
    temperature: float = 0.3
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.15
    repetition_penalty: float = 1.05
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if not self.temperature >= 0:
            raise UsageError(f"--temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top-k must be a whole number >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"--min-p must be in [0, 1] (0 disables it), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UsageError(f"--repetition-penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise UsageError(f"--seed must be a whole number, got {self.seed!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a dict (e.g. saved history); unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Sampler:
    """`sampler(logits, generated) -> token id`, stateful only through its random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.validate()
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        # One generator per device: multinomial needs it on the logits' device.
        gen = self._generators.get(device)
        if gen is None:
            import torch

            gen = torch.Generator(device=device)
            if self.params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.params.seed)
            self._generators[device] = gen
        return gen

    def penalised(self, logits: torch.Tensor, generated: torch.Tensor | None) -> torch.Tensor:
        """CTRL-style repetition penalty: each token already seen is made less likely once,
        however often it occurred (positive logits divided, negative ones multiplied)."""
        import torch

        penalty = self.params.repetition_penalty
        logits = logits.float()
        if penalty == 1.0 or generated is None or generated.numel() == 0:
            return logits
        ids = generated.reshape(-1).to(device=logits.device, dtype=torch.long)
        seen = logits.gather(0, ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        # Duplicate ids write the same value, so each token is penalised exactly once.
        return logits.scatter(0, ids, seen)

    def filtered_logits(self, logits: torch.Tensor, generated: torch.Tensor | None = None) -> torch.Tensor:
        """Logits after penalty, temperature and truncation; removed tokens are -inf.
        Its softmax is the distribution `__call__` samples from (temperature > 0)."""
        import torch

        p = self.params
        scores = self.penalised(logits, generated)
        if p.temperature > 0 and p.temperature != 1.0:
            scores = scores / p.temperature
        vocab = scores.shape[-1]
        if 0 < p.top_k < vocab:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = sorted_scores.softmax(-1)
            # Drop a token once the more likely ones already hold top_p of the mass; the best always stays.
            mass_before = probs.cumsum(-1) - probs
            drop_sorted = mass_before >= p.top_p
            drop_sorted[0] = False
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        if p.min_p > 0.0:
            probs = scores.softmax(-1)
            # Keep tokens at least min_p times as likely as the best one (the best always qualifies).
            scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor, generated: torch.Tensor | None = None) -> int:
        import torch

        if self.params.temperature == 0:
            return int(self.penalised(logits, generated).argmax())
        probs = self.filtered_logits(logits, generated).softmax(-1)
        # Inverse-CDF draw: one uniform number and a binary search, far cheaper than multinomial
        # over a 65k vocabulary. Zero-probability tokens have no width in the CDF, so never win.
        cdf = probs.cumsum(-1)
        total = cdf[-1:]
        u = torch.rand(1, generator=self._generator(probs.device), device=probs.device) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # stay below the top
        return int(torch.searchsorted(cdf, u, right=True))
