"""Weight-only int8 quantisation, done at load time: each output channel (row) of a weight matrix gets one scale,
max|row| / 127, and the row is stored as round(w / scale) in int8. Activations stay in the model dtype.

The scale is stored in the model dtype and q is rounded against the stored scale, so the bound holds for what
the kernels multiply. Error bound: each weight moves by at most scale / 2 = max|row| / 254 (times 1 + 2^-8 for a
bf16 scale), so a dot product with x moves by at most max|row| * sum|x| / 254 (the same). Tested on the tiny
random checkpoints (tests/test_fastpath.py): logits within 6% of the full-precision logit range (MoE 15%, where
an expert choice can flip) and greedy agreement on >= 21 of 24 steps. One scale per row is 8.0 bits a weight
against Q8_0's 8.5, and its steps are coarser: 1.5-1.6x Q8_0's logit error on normal weights, 3-4x on
heavy-tailed ones (docs/performance.md).

Where lfm2's native CPU code runs (bf16 models on x86-64, `lfm2cli.kernels.native`), it quantises at load time
and multiplies the int8 weights itself. Elsewhere on CPU the matmul is torch's own `_weight_int8pack_mm` (reads
int8, scales per channel); inside a compiled decode step the batch-1 product is written as an
upcast-multiply-sum so that inductor fuses it into one pass over the int8 weights; on CUDA and MPS the weight is
dequantised on the fly (a fallback: correct, not fast).

Weight-only int4 (`quantize_int4`): groups of INT4_GROUP = 32 consecutive inputs of a row share one scale, and
the group is stored as 4-bit q in -8..7, the rule of llama.cpp's Q4_0: d = m / -8 with m the group's value of
largest magnitude (its sign kept, so m lands on -8, the side with the extra level), q = round(w / d) clamped to
-8..7. The scale is stored in bf16: 4.5 bits per weight as Q4_0 (a float32 scale would be 5, 11 % more bytes per
decode step), float32's exponent range (fp16, Q4_0's choice, goes subnormal for groups below ~5e-4), and q is
rounded against the stored scale, so its 8-bit mantissa moves the grid, not the error bound.
Error bound: |w - q d| <= |d| / 2 for every weight but those of m's opposite sign beyond 7.5 |d| (clamped to 7),
and <= |d| (1 + 2^-5) for all (|m| <= 8 |d| (1 + 2^-8) once d is rounded to bf16, so a weight of m's opposite
sign as large as m, clamped to 7, is left |d| (1 + 2^-5) away), where |d| <= max|w of the group| / 8 (1 + 2^-8).
A dot product with x then moves by at most sum over groups of |d| (1 + 2^-5) sum|x over the group|. Tested on
the tiny random checkpoints (tests/test_int4.py, rows of 2-3 groups): logits within 60 % of the bf16 logit
range (measured 37-51 %; int8: 3-13 %) and greedy picks agreeing on >= 6 of 24 steps (MoE >= 8): random
weights have no structure for the model to lean on, the worst case for 4 bits. Against llama.cpp's Q4_0 on the
same weights: 0.998-1.001x its logit error (docs/performance.md).
The native kernels (lfm2cli/kernels/csrc/linear_int4.c) run it for bf16 models on x86-64; they also round each
token to int8 per group of 32, as llama.cpp's Q8_0 activations (each activation moves by at most max|x of its
group| / 254), in prefill too (~1.8x faster than widening the weights to bf16). `int4_linear` is the torch
fallback (dequantises per call, in slices of rows: correct, not fast). A weight whose input width is not a
multiple of 32 is quantised to int8 instead (`lfm2cli.kernels.proj.Proj.quantize`).
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32  # inputs per int4 scale
GEMM_ROWS = 32  # from this many rows on, converting to the model dtype and one GEMM beats the int8 kernel


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


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], scales [out] in the weight's dtype). Slice by slice of rows, so
    that the float32 temporaries stay small (an LM head is 0.5 GB in float32)."""
    out, inn = weight.shape
    q = torch.empty(out, inn, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out, dtype=weight.dtype, device=weight.device)
    for rows in _row_slices(out, inn):
        w = weight[rows].float()
        s = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(weight.dtype)  # as stored: what the kernels use
        q[rows] = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[rows] = s
    return q, scales



def _has_int8pack_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scales)^T -> [..., out] in x's dtype."""
    lead = x.shape[:-1]
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling() and rows == 1:
        # one pass over the int8 weights; inductor turns this into a fused, vectorised kernel
        y = (q.float() * x.reshape(1, -1).float()).sum(-1) * scales.float()
        return y.to(x.dtype).reshape(*lead, -1)
    if (rows < GEMM_ROWS and x.device.type == "cpu" and _has_int8pack_mm()
            and x.dtype in (torch.bfloat16, torch.float32, torch.float16)
            and q.shape[1] % 16 == 0):  # the kernel reads whole blocks of 16 (other widths crash or go wrong)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), q, scales.to(x.dtype))
        return y.reshape(*lead, -1)
    # many rows (prefill), or no int8 kernel: int8 -> model dtype is exact, and the per-channel scale
    # commutes with the matmul, so scale the output instead of building a dequantised matrix
    return torch.nn.functional.linear(x, q.to(x.dtype)) * scales.to(x.dtype)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight, in a multiple of INT4_GROUP -> (nibbles uint8 [out, in / 2]: byte k holds q + 8 of
    input 2k in its low half and of input 2k + 1 in its high half; scales bf16 [out, in / INT4_GROUP])."""
    out, inn = weight.shape
    if inn % INT4_GROUP:
        raise ValueError(f"int4 needs an input width that is a multiple of {INT4_GROUP}, not {inn}")
    nib = torch.empty(out, inn // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out, inn // INT4_GROUP, dtype=torch.bfloat16, device=weight.device)
    for rows in _row_slices(out, inn):
        w = weight[rows].float().view(-1, inn // INT4_GROUP, INT4_GROUP)
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
    q = torch.stack([nibbles & 15, nibbles >> 4], dim=-1).view(out, -1, INT4_GROUP).float() - 8.0
    return (q * scales.float()[..., None]).view(out, 2 * half)


def int4_linear(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] in x's dtype, W dequantised slice by slice of rows in x's dtype. The fallback
    where the native kernel cannot run (which also rounds x to int8 per group: see above)."""
    out = nibbles.shape[0]
    parts = [torch.nn.functional.linear(x, dequantize_int4(nibbles[r], scales[r]).to(x.dtype))
             for r in _row_slices(out, 2 * nibbles.shape[1])]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
