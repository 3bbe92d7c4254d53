from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lfm2cli.decoding.sampling import Sampler, SamplingParams, argmax, flag, parse_setting, validate_setting
from lfm2cli.errors import UsageError

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


# ---------------------------------------------------------------- one set of rules for every setting

@pytest.mark.parametrize("name, value, shown", [
    ("seed", 2**63, "9223372036854775808"), ("seed", 99999999999999999999999, "99999999999999999999999"),
    ("seed", -1, "-1"), ("seed", 1.5, "1.5"), ("seed", True, "True"), ("temperature", math.inf, "inf"),
    ("temperature", math.nan, "nan"), ("temperature", -0.5, "-0.5"), ("temperature", 10**400, "inf"),
    ("top_p", math.nan, "nan"), ("top_p", 0, "0.0"), ("min_p", math.inf, "inf"),
    ("repetition_penalty", math.inf, "inf"), ("top_k", -1, "-1"), ("top_k", 2**63, "9223372036854775808"),
    ("top_k", 2.0, "2.0"), ("max_tokens", 0, "0"), ("max_tokens", "5", "'5'"),
    # values that pass a plain "> 0" but overflow the logits' arithmetic (issue 24)
    ("temperature", 1e-45, "1e-45"), ("temperature", 5e-324, "5e-324"), ("temperature", 1e308, "1e+308"),
    ("repetition_penalty", 1e-40, "1e-40"), ("repetition_penalty", 1e308, "1e+308"),
    ("repetition_penalty", 0.0, "0.0"),
])
def test_validate_setting_refuses_with_the_name_and_the_value(name: str, value, shown: str) -> None:
    with pytest.raises(UsageError) as e:
        validate_setting(name, value)
    assert e.value.exit_code == 2
    assert str(e.value).startswith(f"{name} must be ") and str(e.value).endswith(f", got {shown}")
    with pytest.raises(UsageError, match=f"^{flag(name)} must be "):
        validate_setting(name, value, label=flag(name))


def test_validate_setting_accepts_and_normalises() -> None:
    assert validate_setting("seed", 2**63 - 1) == 2**63 - 1 and validate_setting("seed", None) is None
    assert validate_setting("temperature", 0) == 0.0 and isinstance(validate_setting("temperature", 0), float)
    assert validate_setting("top_p", 1) == 1.0 and validate_setting("max_tokens", 1) == 1
    with pytest.raises(UsageError, match="unknown setting 'nope'"):
        validate_setting("nope", 1)


def test_params_and_parse_use_the_same_rules() -> None:
    with pytest.raises(UsageError, match=r"^--seed must be a whole number from 0 to 9223372036854775807"):
        SamplingParams(seed=2**64).validate()
    with pytest.raises(UsageError, match=r"^--temperature must be 0 \(greedy\) or a number from 0.001 to 1000"):
        SamplingParams(temperature=math.inf).validate()
    assert parse_setting("seed", " off ") is None and parse_setting("seed", "42") == 42
    assert parse_setting("temperature", "0.5") == 0.5
    for text in ("inf", "nan", "-1", "hot"):
        with pytest.raises(UsageError, match=f"^temperature must be .*got .*{text}"):
            parse_setting("temperature", text)


@pytest.mark.slow
@pytest.mark.parametrize("option, value", [("--seed", "99999999999999999999999"), ("--seed", "-3"),
                                           ("--temperature", "inf"), ("--top-p", "nan"), ("--max-tokens", "0")])
def test_generate_refuses_an_out_of_range_option_in_one_line(option: str, value: str, tmp_path) -> None:
    """Checked by the option itself, before a model is looked for: exit 2, the option and the value named."""
    env = {**os.environ, "LFM2_HOME": str(tmp_path)}
    env.pop("LFM2_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "lfm2cli", "generate", str(tmp_path / "no-model"), "-p", "hi",
                           option, value], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {option} must be ") and proc.stderr.count("\n") == 1
    assert proc.stderr.rstrip().endswith(f"got {float(value) if value in ('inf', 'nan') else value}")
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("settings", [dict(temperature=1e-3, repetition_penalty=1e3),
                                      dict(temperature=1e3, repetition_penalty=1e-3),
                                      dict(temperature=1e3, repetition_penalty=1e3),
                                      dict(temperature=1e-3, repetition_penalty=1e-3)])
def test_the_extremes_the_rule_allows_still_sample_a_real_token(settings: dict) -> None:
    """At the bounds of the rule, with large logits and every token seen, the draw stays inside the vocabulary."""
    torch.manual_seed(0)
    logits = torch.randn(1000) * 1e4
    generated = torch.arange(1000)
    s = Sampler(SamplingParams(min_p=0.0, top_p=0.9, seed=1, **settings))
    for _ in range(5):
        token = s(logits, generated)
        assert 0 <= token < 1000


def test_non_finite_logits_from_the_model_fall_back_to_the_best_finite_token() -> None:
    logits = torch.full((50,), float("nan"))
    logits[7] = 3.0
    logits[9] = float("inf")
    token = Sampler(SamplingParams(temperature=0.7, seed=0))(logits)
    assert token in (7, 9)
    assert 0 <= Sampler(SamplingParams(temperature=0.7, seed=0))(torch.full((50,), float("nan"))) < 50


@pytest.mark.slow
@pytest.mark.parametrize("option, value", [("--temperature", "1e-320"), ("--repetition-penalty", "1e-40"),
                                           ("--temperature", "1e308")])
def test_generate_refuses_sampling_values_that_would_overflow(option: str, value: str, chat_ckpt, tmp_path) -> None:
    """Issue 24: these passed validation and crashed sampling with an IndexError; now exit 2 before loading."""
    env = {**os.environ, "LFM2_HOME": str(tmp_path)}
    env.pop("LFM2_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "lfm2cli", "generate", str(chat_ckpt), "-p", "hi", option, value],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {option} must be ") and proc.stderr.count("\n") == 1


def test_presence_and_frequency_penalties_count_only_the_reply_and_the_bias_comes_first() -> None:
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.0, presence_penalty=1.5, frequency_penalty=0.5,
                               logit_bias={3: 5.0}), prompt_len=2)
    # ids 1 and 1 are the prompt; the reply holds 2 three times and 4 once
    out = s.penalised(torch.zeros(6), torch.tensor([1, 1, 2, 2, 2, 4]))
    assert out.tolist() == [0.0, 0.0, -0.5 * 3 - 1.5, 5.0, -0.5 - 1.5, 0.0]
    # without prompt_len, the first call's ids are the prompt
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=1.0, frequency_penalty=2.0))
    assert s(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1])) == 1
    assert s(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1, 1])) == 2  # 1 - 2 x 1 < 0.5


def test_logit_bias_is_read_from_text_json_and_saved_settings() -> None:
    assert parse_setting("logit_bias", "13=-100, 42=5") == {13: -100.0, 42: 5.0}
    assert parse_setting("logit_bias", '{"13": 100}') == {13: 100.0}
    assert parse_setting("logit_bias", "off") == {}
    saved = SamplingParams(logit_bias={7: 1.5}).to_dict()
    assert SamplingParams.from_dict(json.loads(json.dumps(saved))).validate().logit_bias == {7: 1.5}
    for text, shown in (("13", "must be token ids"), ("13=200", "from -100 to 100"), ("-1=5", "not a token id"),
                        ('{"a": 1}', "not a token id")):
        with pytest.raises(UsageError, match=shown):
            parse_setting("logit_bias", text)
    with pytest.raises(UsageError, match="--presence-penalty must be a number from -2 to 2"):
        SamplingParams(presence_penalty=2.5).validate()


@pytest.mark.parametrize("case", ["random", "ties", "nan", "inf", "strided", "bfloat16"])
def test_argmax_is_torchs(case: str) -> None:
    """The greedy pick (numpy's argmax on the CPU) is torch.argmax's: the first of equal maxima, NaN largest."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(65536, generator=g)
    if case == "ties":
        x = x.round()
        x[[7, 900, 60000]] = x.max() + 1
    elif case == "nan":
        x[[123, 5000]] = float("nan")
    elif case == "inf":
        x[[40, 41]] = float("inf")
    elif case == "strided":
        x = torch.randn(2, 65536, generator=g).t()[:, 1]
    elif case == "bfloat16":
        x = x.to(torch.bfloat16)
    assert argmax(x) == int(torch.argmax(x))
