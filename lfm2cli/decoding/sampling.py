"""Choosing the next token from the model's logits.

The pipeline follows transformers' default `generate()` processors, in the same order: repetition
penalty, temperature, top-k, top-p, min-p, then a draw from the softmax. OpenAI's logit bias comes first and its
presence and frequency penalties right after the repetition penalty (each is off by default). Everything is vectorised:
this runs once per generated token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from lfm2cli.errors import UsageError

if TYPE_CHECKING:  # torch is imported lazily so commands can import SamplingParams cheaply
    import torch


SEED_MAX = 2**63 - 1  # torch seeds a generator with a 64-bit integer; a stored seed must also fit SQLite's
COUNT_MAX = 2**63 - 1  # top_k and max_tokens: anything larger cannot be stored or compared in torch
# Temperature and repetition penalty scale logits (|logit| < ~1e4): kept within [1e-3, 1e3] their product stays
# far inside float32's range, so the softmax never sees inf - inf. Anything outside would only overflow.
SCALE_MIN, SCALE_MAX = 1e-3, 1e3
PENALTY_MAX = 2.0  # presence and frequency penalty, OpenAI's range
BIAS_MAX = 100.0  # a logit bias, OpenAI's range: +-100 already bans or forces a token
BIAS_ENTRIES_MAX = 1024  # OpenAI takes 300; a bias for every token of the vocabulary is not a bias

# The one set of rules for every sampling setting, whoever sets it: the command-line options, /set in chat, a
# conversation's saved settings. name -> (kind, check, what a valid value is)
_RULES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "temperature": (float, lambda v: v == 0 or SCALE_MIN <= v <= SCALE_MAX,
                    f"0 (greedy) or a number from {SCALE_MIN:g} to {SCALE_MAX:g}"),
    "top_k": (int, lambda v: 0 <= v <= COUNT_MAX, "a whole number >= 0 (0 disables it)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 disables it)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 disables it)"),
    "repetition_penalty": (float, lambda v: SCALE_MIN <= v <= SCALE_MAX,
                           f"a number from {SCALE_MIN:g} to {SCALE_MAX:g} (1 disables it)"),
    "seed": (int, lambda v: 0 <= v <= SEED_MAX, f"a whole number from 0 to {SEED_MAX} (2**63-1)"),
    "max_tokens": (int, lambda v: 1 <= v <= COUNT_MAX, "a whole number >= 1"),
    # OpenAI's ranges. Subtracted, not scaled: at most 2 x the context length (~1e6), far inside float32
    "presence_penalty": (float, lambda v: -PENALTY_MAX <= v <= PENALTY_MAX,
                         f"a number from -{PENALTY_MAX:g} to {PENALTY_MAX:g} (0 disables it)"),
    "frequency_penalty": (float, lambda v: -PENALTY_MAX <= v <= PENALTY_MAX,
                          f"a number from -{PENALTY_MAX:g} to {PENALTY_MAX:g} (0 disables it)"),
    "logit_bias": (dict, lambda v: True, 'token ids and biases from -100 to 100, like {"50256": -100} or '
                                         "50256=-100,13=5"),
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
    if name == "logit_bias":
        return validate_setting(name, parse_bias(raw))
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
    if name == "logit_bias":
        return _checked_bias(value, label or name, expected)
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


def parse_bias(text: str) -> Any:
    """`--logit-bias` / `/set logit_bias` text: JSON (`{"13": -100}`) or `ID=BIAS` pairs split by commas or spaces
    (`13=-100,42=5`); `none` or `off` clears it. What is not either is returned as is, for the check to refuse."""
    raw = text.strip()
    if raw.lower() in ("", "none", "off", "{}"):
        return {}
    if raw.startswith("{"):
        import json

        try:
            return json.loads(raw)
        except ValueError:
            return raw
    pairs = [p for p in raw.replace(",", " ").split() if p]
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            return raw
        try:
            out[key.strip()] = float(value)
        except ValueError:
            return raw
    return out


def _checked_bias(value: Any, label: str, expected: str) -> dict[int, float]:
    """A logit bias as {token id: bias}: keys may be ints or digit strings (JSON objects have string keys)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{label} must be {expected}, got {str(value)[:80]!r}")
    if len(value) > BIAS_ENTRIES_MAX:
        raise UsageError(f"{label}: {len(value)} entries are too many (at most {BIAS_ENTRIES_MAX})")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().isdigit() and key.strip().isascii():
            token = int(key)
        if token is None or token < 0:
            raise UsageError(f"{label}: {str(key)[:40]!r} is not a token id (a whole number >= 0); expected {expected}")
        ok = isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias)
        if not ok or not -BIAS_MAX <= bias <= BIAS_MAX:
            raise UsageError(f"{label}: the bias of token {token} must be a number from -{BIAS_MAX:g} to "
                             f"{BIAS_MAX:g}, got {bias!r}")
        out[token] = float(bias)
    return out


def check_bias_ids(bias: dict[int, float] | None, vocab: int, label: str = "--logit-bias") -> None:
    """UsageError when a biased token id is not in a vocabulary of `vocab` tokens."""
    bad = next((t for t in bias or {} if t >= vocab), None)
    if bad is not None:
        raise UsageError(f"{label}: token id {bad} is outside the vocabulary (0 to {vocab - 1})")


@dataclass
class SamplingParams:
    # Liquid AI's recommended settings for LFM2 chat.
    temperature: float = 0.3
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.15
    repetition_penalty: float = 1.05
    seed: int | None = None
    # OpenAI's: subtracted from the logit of each token the reply already holds, once / per occurrence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        # checked once, where settings become a SamplingParams: whoever holds one (a session, a Sampler) need not
        self.validate()

    def validate(self) -> SamplingParams:
        """Check every field by the rules of `validate_setting` (messages name the command-line flags)."""
        for f in fields(self):
            value = validate_setting(f.name, getattr(self, f.name), label=flag(f.name))
            if f.name == "logit_bias":
                self.logit_bias = value  # keys as ints, whatever the dict held
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a dict (e.g. saved history); unknown keys are ignored, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def argmax(scores: torch.Tensor) -> int:
    """The index of the largest of a row of scores, the first of equal ones, a NaN counting as largest: what
    `torch.argmax` gives. On the CPU numpy's finds it: torch's took 75 us over a 65k vocabulary, numpy's 5 (2-core
    Zen 4), which eight streams served together pay one after another every step."""
    import torch

    if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 1:
        return int(scores.detach().numpy().argmax())
    return int(scores.argmax())


class Sampler:
    """`sampler(logits, generated) -> token id`, stateful only through its random generator."""

    def __init__(self, params: SamplingParams, prompt_len: int | None = None) -> None:
        """`prompt_len`: how many of the ids each call gets are the prompt (the rest is the reply, which presence
        and frequency penalties count); None: as many as the first call gets."""
        self.params = params
        self.prompt_len = prompt_len
        self._generators: dict[torch.device, torch.Generator] = {}
        self._bias: torch.Tensor | None = None

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
        """The logit bias added, then the CTRL-style repetition penalty over every id seen (prompt and reply: each
        token already seen is made less likely once, however often it occurred: positive logits divided, negative
        ones multiplied), then OpenAI's presence and frequency penalties over the reply's tokens."""
        import torch

        p = self.params
        logits = logits.float()
        if p.logit_bias:
            if self._bias is None or self._bias.device != logits.device:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
                self._bias = torch.zeros(logits.shape[-1]).index_put_((ids,), torch.tensor(list(
                    p.logit_bias.values()))).to(logits.device)
            logits = logits + self._bias
        if generated is None or generated.numel() == 0:
            return logits
        ids = generated.reshape(-1).to(device=logits.device, dtype=torch.long)
        if self.prompt_len is None:
            self.prompt_len = ids.numel()
        if p.repetition_penalty != 1.0:
            seen = logits.gather(0, ids)
            seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
            # Duplicate ids write the same value, so each token is penalised exactly once.
            logits = logits.scatter(0, ids, seen)
        reply = ids[self.prompt_len:]
        if (p.presence_penalty or p.frequency_penalty) and reply.numel():
            counts = torch.bincount(reply, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

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
            return argmax(self.penalised(logits, generated))
        probs = self.filtered_logits(logits, generated).softmax(-1)
        # Inverse-CDF draw: one uniform number and a binary search, far cheaper than multinomial
        # over a 65k vocabulary. Zero-probability tokens have no width in the CDF, so never win.
        cdf = probs.cumsum(-1)
        total = cdf[-1:]
        u = torch.rand(1, generator=self._generator(probs.device), device=probs.device) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # stay below the top
        # A NaN anywhere in probs makes the total NaN: checked in the same read as the token (one sync a token).
        token = int(torch.where(torch.isfinite(total), torch.searchsorted(cdf, u, right=True), -1))
        if token < 0:
            # Only non-finite logits from the model itself get here (the settings cannot overflow): never let
            # NaN reach the draw, where searchsorted would return an id past the vocabulary.
            scores = torch.nan_to_num(self.penalised(logits, generated), nan=float("-inf"))
            return argmax(scores)
        return token


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's own distribution at its step, and the `top` most
    likely tokens there with theirs (most likely first)."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def model_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The log-softmax of the raw logits: temperature 1, before any bias, penalty, truncation or grammar mask,
    so a token's logprob says how likely the model found it whatever the request's settings (vLLM's default)."""
    import torch

    return torch.log_softmax(logits.float(), -1)


def read_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry from `model_logprobs`, with the `top` most likely tokens (one read from the device)."""
    import torch

    if top <= 0:
        return TokenLogprob(token, float(logprobs[token]))
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    # the chosen token's value rides along with the top ones: one copy to the host for all of them
    flat = torch.cat([logprobs[token:token + 1], values]).tolist()
    return TokenLogprob(token, flat[0], list(zip(ids.tolist(), flat[1:], strict=True)))
