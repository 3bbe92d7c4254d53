"""Weight-only int8 and int4 quantisation, done at load time. Both group the inputs of each row: GROUP = 32
consecutive inputs share one 16-bit scale, as llama.cpp's Q8_0 and Q4_0 do. Activations stay in the model dtype.

int8 (`quantize_int8`): the rule of Q8_0, d = max|w of the group| / 127 stored in fp16 (Q8_0's type: 11
significant bits; a bf16 scale's 8 measured ~1 % more weight error), q = round(w / d) in -127..127. 8.5 bits per
weight, as Q8_0 (a scale per row would be 8.0, but its steps follow the row's largest weight: measured 1.5x Q8_0's
logit error on normal weights and 3-4x on heavy-tailed ones, docs/performance.md).
Error bound: |w - q d| <= d / 2 with d <= max|w of the group| / 127 (1 + 2^-11), except in groups whose max|w| is
below 127 * 2^-14 (~7.8e-3), where d is an fp16 subnormal: there each weight moves by at most
max(d / 2, 127 * 2^-25 ~ 3.8e-6).

int4 (`quantize_int4`): the rule of Q4_0: d = m / -8 with m the group's value of largest magnitude (its sign
kept, so m lands on -8, the side with the extra level), q = round(w / d) clamped to -8..7, d stored in bf16
(float32's exponent range; fp16, Q4_0's choice, goes subnormal for groups below ~5e-4, and at 4 bits the scale's
8 significant bits cost nothing measurable). 4.5 bits per weight.
Error bound: |w - q d| <= |d| / 2 for every weight but those of m's opposite sign beyond 7.5 |d| (clamped to 7),
and <= |d| (1 + 2^-5) for all (|m| <= 8 |d| (1 + 2^-8) once d is rounded to bf16, so a weight of m's opposite
sign as large as m, clamped to 7, is left |d| (1 + 2^-5) away), where |d| <= max|w of the group| / 8 (1 + 2^-8).

In both, q is rounded against the stored scale, so the scale's rounding moves the grid, not the error bound. A dot
product with x then moves by at most the sum over groups of the bound times sum|x over the group|. Tested on the
tiny random checkpoints (tests/test_fastpath.py, tests/test_grouped.py, tests/test_native.py): int8 logits within
6 % of the full-precision logit range (MoE 15 %, where an expert choice can flip), 10 % (MoE 25 %) with the
kernels' int8 activations (measured 4-7 %, MoE 5-17 %); int4 within 60 % (random weights have no structure for
the model to lean on, the worst case for 4 bits). Against llama.cpp on the same weights: the same weight error as
Q8_0 and Q4_0 (docs/performance.md).

The native kernels (csrc/quantize.c and csrc/arch/*/quant.c) run both for bf16 models on x86-64; they also round
each token to int8 per group of 32, as llama.cpp's Q8_0 activations (each activation moves by at most max|x of
its group| / 254). `grouped_linear` is the torch fallback elsewhere (dequantises per call, in slices of rows:
correct, not fast: it saves memory, not time); inside a compiled decode step int8 runs from the blocked form
(`lfm2cli.kernels.proj`). A weight whose input width is not a multiple of 32 keeps the model's precision.
"""

from __future__ import annotations

import torch

from lfm2cli.kernels import GROUP  # inputs per scale, int8 and int4

QUANT_MODES = ("none", "int8", "int4")


def check_mode(mode: str | None) -> str | None:
    """'none'/None -> None; 'int8', 'int4' -> themselves; anything else is a usage error."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANT_MODES:
        from lfm2cli.errors import UsageError

        raise UsageError(f"unknown quantisation {mode!r}; use none, int8 or int4")
    return mode


_CHUNK = 1 << 22  # weights per slice of rows converted at once: bounds its float32 temporaries


def _row_slices(rows: int, width: int) -> list[slice]:
    step = max(1, _CHUNK // max(width, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _groups(weight: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of a [out, in] weight as float32 [rows, in / GROUP, GROUP]."""
    return weight[rows].float().view(-1, weight.shape[1] // GROUP, GROUP)


def _check_width(inn: int) -> None:
    if inn % GROUP:
        raise ValueError(f"int8 and int4 need an input width that is a multiple of {GROUP}, not {inn}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight, in a multiple of GROUP -> (int8 [out, in], scales fp16 [out, in / GROUP]). Slice by
    slice of rows, so that the float32 temporaries stay small (an LM head is 0.5 GB in float32)."""
    out, inn = weight.shape
    _check_width(inn)
    q = torch.empty(out, inn, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out, inn // GROUP, dtype=torch.float16, device=weight.device)
    for rows in _row_slices(out, inn):
        w = _groups(weight, rows)
        d = (w.abs().amax(-1) / 127.0).to(torch.float16)  # as stored: what the kernels use
        df = d.float()[..., None]
        qs = torch.where(df != 0, w / torch.where(df != 0, df, 1.0), 0.0).round_().clamp_(-127, 127)
        q[rows] = qs.to(torch.int8).view(-1, inn)
        scales[rows] = d
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q, scales) of `quantize_int8` -> the float32 weight q * d (exact: 7 and 11 significant bits)."""
    out, inn = q.shape
    return (q.float().view(out, -1, GROUP) * scales.float()[..., None]).view(out, inn)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight, in a multiple of GROUP -> (nibbles uint8 [out, in / 2]: byte k holds q + 8 of
    input 2k in its low half and of input 2k + 1 in its high half; scales bf16 [out, in / GROUP])."""
    out, inn = weight.shape
    _check_width(inn)
    nib = torch.empty(out, inn // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out, inn // GROUP, dtype=torch.bfloat16, device=weight.device)
    for rows in _row_slices(out, inn):
        w = _groups(weight, rows)
        hi, lo = w.amax(-1), w.amin(-1)
        d = (torch.where(hi >= -lo, hi, lo) / -8.0).to(torch.bfloat16)  # the signed extreme lands on -8
        df = d.float()[..., None]
        q = torch.where(df != 0, w / torch.where(df != 0, df, 1.0), 0.0).round_().clamp_(-8, 7)
        u = (q + 8).to(torch.uint8).view(-1, inn // 2, 2)
        nib[rows] = u[..., 0] | (u[..., 1] << 4)
        scales[rows] = d
    return nib, scales


def dequantize_int4(nibbles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(nibbles, scales) of `quantize_int4` -> the float32 weight q * d (exact: 4 and 8 significant bits)."""
    out, half = nibbles.shape
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).view(out, -1, GROUP).float() - 8.0
    return (q * scales.float()[..., None]).view(out, 2 * half)


def grouped_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mode: str) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] in x's dtype, W (int8 q or int4 nibbles, with their scales) dequantised slice
    by slice of rows in x's dtype. The fallback where the native kernels cannot run."""
    dequantize = dequantize_int4 if mode == "int4" else dequantize_int8
    width = scales.shape[1] * GROUP
    parts = [torch.nn.functional.linear(x, dequantize(q[r], scales[r]).to(x.dtype))
             for r in _row_slices(q.shape[0], width)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
