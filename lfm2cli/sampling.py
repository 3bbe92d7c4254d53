"""Choosing the next token from the model's logits.

The pipeline follows transformers' default `generate()` processors, in the same order: repetition
penalty, temperature, top-k, top-p, min-p, then a draw from the softmax. Everything is vectorised:
this runs once per generated token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from lfm2cli.errors import UsageError

if TYPE_CHECKING:  # torch is imported lazily so commands can import SamplingParams cheaply
    import torch


SEED_MAX = 2**63 - 1  # torch seeds a generator with a 64-bit integer; a stored seed must also fit SQLite's
COUNT_MAX = 2**63 - 1  # top_k and max_tokens: anything larger cannot be stored or compared in torch

# The one set of rules for every sampling setting, whoever sets it: the command-line options, /set in chat, a
# conversation's saved settings. name -> (kind, check, what a valid value is)
_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "temperature": (float, lambda v: 0 <= v, "a finite number >= 0 (0 means greedy)"),
    "top_k": (int, lambda v: 0 <= v <= COUNT_MAX, "a whole number >= 0 (0 disables it)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 disables it)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 disables it)"),
    "repetition_penalty": (float, lambda v: 0 < v, "a finite number > 0 (1 disables it)"),
    "seed": (int, lambda v: 0 <= v <= SEED_MAX, f"a whole number from 0 to {SEED_MAX} (2**63-1)"),
    "max_tokens": (int, lambda v: 1 <= v <= COUNT_MAX, "a whole number >= 1"),
}
SETTINGS = tuple(_RULES)


def flag(name: str) -> str:
    """The command-line option of a setting: top_p -> --top-p."""
    return "--" + name.replace("_", "-")


def parse_setting(name: str, text: str) -> Any:
    """A setting typed as text (`/set NAME VALUE`) -> its validated value; `none`, `off` or `random` clear
    the seed."""
    if name not in _RULES:
        raise UsageError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
    raw = text.strip()
    if name == "seed" and raw.lower() in ("none", "off", "random"):
        return None
    kind = _RULES[name][0]
    try:
        value: Any = int(raw) if kind is int else float(raw)
    except ValueError:
        raise UsageError(f"{name} must be {_RULES[name][2]}, got {raw!r}") from None
    return validate_setting(name, value)


def validate_setting(name: str, value: Any, label: str | None = None) -> Any:
    """`value` if it is valid for the setting `name`, as the setting's type (an int given for a float is
    widened); else UsageError naming `label` (default: the setting's name) and what a valid value is."""
    if name not in _RULES:
        raise UsageError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
    kind, check, expected = _RULES[name]
    if name == "seed" and value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        # an int this large would overflow float() itself: it is out of range for every float setting
        value = float(value) if abs(value) < 2**1023 else math.inf
    # bool is an int to Python but never a sensible setting; nan and inf fail every check
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and kind is float:
        ok = math.isfinite(value)
    if not ok or not check(value):
        raise UsageError(f"{label or name} must be {expected}, got {value!r}")
    return value


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
        """Check every field by the rules of `validate_setting` (messages name the command-line flags)."""
        for f in fields(self):
            validate_setting(f.name, getattr(self, f.name), label=flag(f.name))
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
