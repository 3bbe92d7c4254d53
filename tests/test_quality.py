"""int8 and int4 weights: the per-weight error bounds lfm2cli/kernels/quantize.py documents, and logit quality next to
llama.cpp's Q8_0 and Q4_0 (the `gguf` package) on the same weights of a shrunk LFM2 shape. The measurement code is
benchmarks/quality.py's; docs/performance.md ("Quality of int8 and int4 against GGUF Q8_0 and Q4_0") has the
numbers on the published shapes."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lfm2cli.hub.known import known_config
from lfm2cli.kernels.quantize import GROUP, dequantize_int4, quantize_int4, quantize_int8

_spec = importlib.util.spec_from_file_location(
    "lfm2_bench_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py")
quality = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(quality)  # registered first: its dataclasses look their module up

DISTS = ("normal", "student-t3")
# float32 computes w / scale with a relative error of 2^-24, so q may round the other way within 127 * 2^-24 (int8)
# or 8 * 2^-24 (int4) of a tie: the bounds below allow that much, in units of the scale, and nothing more
ROUNDING = 2.0 ** -16
# int4's top-1 agreement with bf16 on the shrunk shapes below: measured 51 % to 70 % (Q4_0 52 % to 67 %). A random
# model's logits are close together, and 4-bit weights move them by ~30 % of their norm: the argmax often changes
TOP1_FLOOR_INT4 = 0.40


def weights(dist: str, dtype: torch.dtype, shape: tuple[int, int] = (192, 1024), seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return quality.sample(shape, dist, gen).div_(shape[1] ** 0.5).to(dtype)


# ---- (a) the per-weight bounds of lfm2cli/kernels/quantize.py's docstring ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", DISTS)
def test_int8_moves_each_weight_at_most_half_a_step(dist: str, dtype: torch.dtype) -> None:
    """'|w - q d| <= d / 2 with d <= max|w of the group| / 127 (1 + 2^-11)', d in fp16."""
    w = weights(dist, dtype)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16 and q.abs().max() <= 127
    out, inn = w.shape
    step = scales.double()[..., None]
    g = w.double().view(out, -1, GROUP)
    err = (g - q.double().view(out, -1, GROUP) * step).abs()  # what the kernels multiply
    top = g.abs().amax(-1, keepdim=True)
    assert (top > 127 * 2.0 ** -14).all()  # normal fp16 scales here; the subnormal ones: the next test
    assert (err <= step / 2 * (1 + ROUNDING)).all()
    assert (step <= top / 127 * (1 + 2.0 ** -11)).all()
    assert (err <= top / 254 * (1 + 2.0 ** -11) * (1 + ROUNDING)).all()


def test_int8_tiny_groups_move_by_at_most_the_documented_amount() -> None:
    """Groups whose largest weight is below 127 * 2^-14 get an fp16 subnormal scale (or 0): each weight then moves
    by at most max(d / 2, 127 * 2^-25), as quantize.py says."""
    w = torch.randn(64, 4 * GROUP, generator=torch.Generator().manual_seed(5))
    w = w * torch.logspace(-9, -2, 64)[:, None]  # groups from 1e-9 to 1e-2
    q, scales = quantize_int8(w)
    g = w.double().view(64, -1, GROUP)
    step = scales.double()[..., None]
    err = (g - q.double().view(64, -1, GROUP) * step).abs()
    assert (err <= torch.clamp(step / 2, min=127 * 2.0 ** -25) * (1 + ROUNDING)).all()
    assert (scales[:8] == 0).all() and (q[:8] == 0).all()  # below ~3.8e-6 the scale underflows to 0


# quantize.py's |w - q d| <= |d| (1 + 2^-5) for every weight: d = m / -8 is rounded to bf16, 8 significant bits, so
# |m| <= 8 |d| (1 + 2^-8), and a weight of m's opposite sign as large as m, clamped to q = 7, is left
# 8 |d| (1 + 2^-8) - 7 |d| = |d| (1 + 2^-5) away (test_int4_documented_clamp_bound reaches it)
CLAMP = 1 + 2.0 ** -5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", DISTS)
def test_int4_error_bound(dist: str, dtype: torch.dtype) -> None:
    """quantize.py: |w - q d| <= |d| / 2 but for weights of m's opposite sign beyond 7.5 |d| (clamped to 7), and
    <= |d| (1 + 2^-5) for all (see CLAMP), where |d| <= max|w of the group| / 8 (1 + 2^-8); a dot product with x
    moves by at most the sum over groups of that times sum|x over the group|."""
    w = weights(dist, dtype)
    out, inn = w.shape
    nibbles, scales = quantize_int4(w)
    assert nibbles.shape == (out, inn // 2) and nibbles.dtype == torch.uint8
    assert scales.shape == (out, inn // GROUP) and scales.dtype == torch.bfloat16
    deq = dequantize_int4(nibbles, scales)
    groups = w.double().view(out, -1, GROUP)
    d = scales.double()[..., None]
    err = (groups - deq.double().view(out, -1, GROUP)).abs()
    group_max = groups.abs().amax(-1, keepdim=True)
    assert (d.abs() <= group_max / 8 * (1 + 2.0 ** -8)).all()
    assert (err <= d.abs() * CLAMP).all()
    clamped = (groups * d > 0) & (groups.abs() > 7.5 * d.abs())  # the sign of d is the opposite of m's
    assert (err[~clamped] <= (d.abs() / 2 * (1 + ROUNDING)).expand_as(err)[~clamped]).all()
    x = torch.randn(8, inn, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moved = (x @ (w.double() - deq.double()).T).abs()
    limit = (x.abs().view(8, 1, -1, GROUP).sum(-1) * scales.double().abs()[None] * CLAMP).sum(-1)
    assert (moved <= limit * (1 + 1e-9)).all()


def test_int4_documented_clamp_bound() -> None:
    w = torch.zeros(1, GROUP)
    w[0, 0], w[0, 1] = -8.03, 8.029  # d = 1.00375 rounds down to bf16 1.0; 8.029 clamps to q = 7
    deq = dequantize_int4(*quantize_int4(w))
    d = quantize_int4(w)[1].float()[0, 0].abs()
    worst = (w - deq).abs().max()
    assert d * (1 + 2.0 ** -6) < worst <= d * CLAMP  # the documented factor is reached, not just allowed


def test_int4_matches_q4_0_step_for_step() -> None:
    """The same rule as Q4_0 (d = m / -8) with a bf16 scale for fp16's: per-weight errors equal to the scale's
    rounding, so the RMS errors of the two agree to 1 %."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize, quantize

    for dist in DISTS:
        w = weights(dist, torch.bfloat16)
        ours = dequantize_int4(*quantize_int4(w))
        q4 = dequantize(quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
        e_ours = torch.dist(ours, w.float())
        e_q4 = torch.dist(torch.from_numpy(q4), w.float())
        assert e_ours <= e_q4 * 1.01, dist


# ---- (b) logits of a shrunk LFM2 shape against GGUF ----

def shrunk(moe: bool) -> object:
    """LFM2-350M (or LFM2-8B-A1B) narrowed to hidden 256 and two layers, a conv one and one that attends (MoE: the
    first dense, the second sparse, 8 experts of width 128, top 2), with a 2048-token vocabulary."""
    cfg = known_config("lfm2-8b-a1b" if moe else "lfm2-350m")
    extra = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_dense_layers=1) if moe else {}
    return dataclasses.replace(cfg, num_hidden_layers=2, layer_types=("conv", "full_attention"), vocab_size=2048,
                               hidden_size=256, num_attention_heads=4, num_key_value_heads=2, dense_ff_dim=512,
                               **extra)


_RESULTS: dict[tuple[bool, str], dict] = {}


def results(moe: bool, dist: str) -> dict:
    """{format: (bits per weight, weight RMS error, Scores)} of the shrunk shape, measured once per session."""
    pytest.importorskip("gguf")
    key = (moe, dist)
    if key not in _RESULTS:
        cfg = shrunk(moe)
        ids = quality.prompts(cfg.vocab_size, 4, 32, seed=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small products: on a busy machine, threads that wait for each other cost 10x
        try:
            _RESULTS[key] = quality.measure(cfg, dist, ids, seed=quality.shape_seed(cfg, dist, 0))
        finally:
            torch.set_num_threads(threads)
    return _RESULTS[key]


CASES = [(moe, dist) for moe in (False, True) for dist in DISTS]
IDS = [f"{'moe' if moe else 'dense'}-{dist}" for moe, dist in CASES]


@pytest.mark.parametrize(("moe", "dist"), CASES, ids=IDS)
def test_int4_logits_no_worse_than_q4_0(moe: bool, dist: str) -> None:
    r = results(moe, dist)
    (bits4, _, int4), (bits_q4, _, q4) = r["int4"], r["Q4_0"]
    assert bits4 == pytest.approx(4.5) and bits_q4 == pytest.approx(4.5)  # the same size
    assert int4.mean_err <= q4.mean_err * 1.05
    assert int4.top1 >= TOP1_FLOOR_INT4
    assert int4.top1 >= q4.top1 - 0.05


@pytest.mark.parametrize(("moe", "dist"), CASES, ids=IDS)
def test_int8_logits_no_worse_than_q8_0(moe: bool, dist: str) -> None:
    """The same size and the same weight error as Q8_0 (the bf16 scale's coarser rounding: measured +0.4 %). At
    8 bits the logit error is small enough that on the MoE shape it mostly comes from the few expert choices that
    flip, which differ between any two formats: measured 0.99-1.01x Q8_0's dense, 0.95-1.16x MoE."""
    r = results(moe, dist)
    (bits8, rms8, int8), (bits_q8, rms_q8, q8) = r["int8"], r["Q8_0"]
    assert bits8 == pytest.approx(8.5) and bits_q8 == pytest.approx(8.5)
    assert rms8 <= rms_q8 * 1.01
    assert int8.mean_err <= q8.mean_err * (1.25 if moe else 1.05)
    assert int8.top1 >= q8.top1 - 0.05


@pytest.mark.parametrize(("moe", "dist"), CASES, ids=IDS)
def test_int8_logits_close_to_bf16(moe: bool, dist: str) -> None:
    """What int8 does keep here: logits within a few % of bf16's (measured 2.2 % to 7.0 %), the argmax at 92 % to
    96 % of the positions."""
    scores = results(moe, dist)["int8"][2]
    assert scores.mean_err <= 0.12
    assert scores.top1 >= 0.85


def test_bits_per_weight() -> None:
    """The storage of each format per projection weight, as the docs table states it."""
    pytest.importorskip("gguf")
    shapes = [(1024, 1024), (4608, 1024), (1024, 4608)]
    assert quality.bits_per_weight("int4", shapes) == pytest.approx(4.5)
    assert quality.bits_per_weight("Q4_0", shapes) == pytest.approx(4.5)
    assert quality.bits_per_weight("Q8_0", shapes) == pytest.approx(8.5)
    assert quality.bits_per_weight("int8", shapes) == pytest.approx(8.5)
    w = weights("normal", torch.bfloat16, (64, 256))
    for fmt in quality.FORMATS:  # the sizes the round trips really store
        _, bits = quality.ROUNDTRIP[fmt](w)
        assert bits / w.numel() == pytest.approx(quality.bits_per_weight(fmt, [(64, 256)])), fmt
