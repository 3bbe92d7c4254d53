from __future__ import annotations

import math

import pytest
import torch

from lfm2cli.errors import UsageError
from lfm2cli.sampling import Sampler, SamplingParams

V = 512


def rand_logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


def support(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_defaults_are_liquid_recommendation() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.seed) == (0.3, 0, 1.0, 0.15, 1.05, None)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1),
                                 dict(min_p=1.1), dict(top_k=-1), dict(repetition_penalty=0.0),
                                 dict(temperature=float("nan"))])
def test_validate_rejects(bad: dict) -> None:
    with pytest.raises(UsageError) as e:
        SamplingParams(**bad).validate()
    assert e.value.exit_code == 2
    with pytest.raises(UsageError):
        Sampler(SamplingParams(**bad))


def test_dict_roundtrip() -> None:
    p = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.0, repetition_penalty=1.2, seed=7)
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict({"top_k": 5, "unknown": 1}) == SamplingParams(top_k=5)


def test_greedy_is_argmax() -> None:
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.0, min_p=0.0))
    for seed in range(10):
        logits = rand_logits(seed)
        assert s(logits, None) == int(logits.argmax())


def test_greedy_still_applies_penalty() -> None:
    logits = torch.zeros(V)
    logits[3], logits[9] = 5.0, 4.5
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5))
    assert s(logits, torch.tensor([1, 2])) == 3
    assert s(logits, torch.tensor([3, 3, 3])) == 9  # 5/1.5 < 4.5


def test_top_k_1_is_greedy() -> None:
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, min_p=0.0, seed=0))
    for seed in range(20):
        logits = rand_logits(seed)
        assert s(logits, torch.tensor([5, 6])) == Sampler(SamplingParams(temperature=0))(logits, torch.tensor([5, 6]))


def test_seed_reproducible() -> None:
    params = SamplingParams(temperature=1.0, min_p=0.0, repetition_penalty=1.0, seed=1234)
    logits = torch.zeros(V)  # uniform: every draw is informative
    s1, s2 = Sampler(params), Sampler(params)
    a = [s1(logits, None) for _ in range(50)]
    assert a == [s2(logits, None) for _ in range(50)]
    other = Sampler(SamplingParams(temperature=1.0, min_p=0.0, repetition_penalty=1.0, seed=99))
    assert a != [other(logits, None) for _ in range(50)]
    assert len(set(a)) > 10


def test_min_p_support() -> None:
    logits = rand_logits(3)
    for min_p in (0.05, 0.15, 0.5):
        s = Sampler(SamplingParams(temperature=0.8, min_p=min_p, repetition_penalty=1.0, seed=0))
        probs = (logits / 0.8).softmax(-1)
        expected = set((probs >= min_p * probs.max()).nonzero().flatten().tolist())
        assert support(s.filtered_logits(logits)) == expected
        assert 1 < len(expected) < V
        assert {s(logits) for _ in range(300)} <= expected


def test_top_p_support() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3] + [0.0] * 4)
    logits = probs.log()
    for top_p, keep in [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})]:
        s = Sampler(SamplingParams(temperature=1.0, top_p=top_p, min_p=0.0, repetition_penalty=1.0, seed=0))
        assert support(s.filtered_logits(logits)) == keep
        assert {s(logits) for _ in range(200)} <= keep


def test_top_k_support() -> None:
    logits = rand_logits(4)
    s = Sampler(SamplingParams(temperature=1.0, top_k=7, min_p=0.0, repetition_penalty=1.0, seed=0))
    assert support(s.filtered_logits(logits)) == set(torch.topk(logits, 7).indices.tolist())


def test_repetition_penalty_matches_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = rand_logits(5)
    generated = torch.tensor([3, 3, 10, 200, 511, 0, 10, 42])
    assert (logits[generated] < 0).any() and (logits[generated] > 0).any()
    for penalty in (1.05, 1.3, 0.8):
        ours = Sampler(SamplingParams(repetition_penalty=penalty)).penalised(logits, generated)
        ref = RepetitionPenaltyLogitsProcessor(penalty=penalty)(generated[None], logits.clone()[None])[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        assert not torch.equal(ours, logits)
        assert math.isclose(float(ours[3]), float(logits[3] / penalty if logits[3] > 0 else logits[3] * penalty))


@pytest.mark.parametrize("cfg", [dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05),
                                 dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
                                 dict(temperature=1.3, top_p=0.6, min_p=0.0, repetition_penalty=1.0)])
def test_pipeline_matches_transformers_processors(cfg: dict) -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    p = SamplingParams(**cfg)
    chain = []
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        chain.append(MinPLogitsWarper(p.min_p))
    for seed in range(5):
        logits = rand_logits(seed, scale=2.0)
        generated = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(seed))
        ref = logits.clone()[None]
        for proc in chain:
            ref = proc(generated[None], ref)
        ours = Sampler(p).filtered_logits(logits, generated)
        assert support(ours) == support(ref[0])
        torch.testing.assert_close(ours.softmax(-1), ref[0].softmax(-1))
