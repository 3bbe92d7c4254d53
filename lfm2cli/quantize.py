"""Weight-only int8 quantisation, done at load time: each output channel (row) of a weight matrix gets one scale,
max|row| / 127, and the row is stored as round(w / scale) in int8. Activations stay in the model dtype.

Error bound: each weight moves by at most scale / 2 = max|row| / 254, so a dot product with x moves by at most
max|row| * sum|x| / 254. Tested on the tiny random checkpoints (tests/test_fastpath.py): logits within 6% of the
full-precision logit range (MoE 15%, where an expert choice can flip) and greedy agreement on >= 21 of 24 steps.

On CPU the matmul is torch's own `_weight_int8pack_mm` (reads int8, scales per channel). Inside a compiled
decode step the batch-1 product is written as an upcast-multiply-sum so that inductor fuses it into one pass
over the int8 weights. Elsewhere (CUDA, MPS) the weight is dequantised on the fly (a fallback: correct, not fast).
"""

from __future__ import annotations

import torch

QUANT_MODES = ("none", "int8")
GEMM_ROWS = 32  # from this many rows on, converting to the model dtype and one GEMM beats the int8 kernel


def check_mode(mode: str | None) -> str | None:
    """'none'/None -> None; 'int8' -> 'int8'; anything else is a usage error."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANT_MODES:
        from lfm2cli.errors import UsageError

        raise UsageError(f"unknown quantisation {mode!r}; use none or int8")
    return mode


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in], scales [out] in the weight's dtype)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(scales.dtype) * scales[:, None]


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
