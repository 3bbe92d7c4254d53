"""Will this model fit: what running a model takes in memory, by its config alone (weights in the precision they
are held in, a KV cache, the runtime), and the guard that refuses a load the machine could only answer by killing
the process. `lfm2 info` and `lfm2 list --available` show the same estimate. No torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfm2cli.errors import MemoryLimitError
from lfm2cli.kernels import GROUP, head_quantize
from lfm2cli.loading.checkpoint import expected_tensors, tensor_count
from lfm2cli.model.config import Lfm2Config
from lfm2cli.system import memory
from lfm2cli.terminal.formatting import human_bytes

if TYPE_CHECKING:
    import torch

def _quantized_bytes(rows: int, cols: int, quantize: str | None, dtype_bytes: int) -> int:
    """Bytes of one [rows, cols] projection weight in memory: int8 is a byte per weight, int4 half a byte, plus a
    bf16 scale per 32 inputs each (the model's precision where the width is not a multiple of 32)."""
    n = rows * cols
    if quantize not in ("int8", "int4") or cols % GROUP:
        return n * dtype_bytes
    return (n // 2 if quantize == "int4" else n) + (n // GROUP) * 2


def weight_bytes(cfg: Lfm2Config, quantize: str | None = None, dtype_bytes: int = 2) -> int:
    """Bytes the loaded model's weights take, as lfm2 holds them: projections in `quantize`'s form, the router and
    the norms in the model dtype, the embedding table in the model dtype (it is looked up, one row a token), and
    the LM head as its own copy (for a tied head too), in `head_quantize`'s format."""
    total = 0
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("expert_bias"):
            total += shape[0] * 4
        elif name == "model.embed_tokens.weight":
            total += shape[0] * shape[1] * dtype_bytes
        elif name == "lm_head.weight":
            continue
        elif len(shape) == 2 and not name.endswith("feed_forward.gate.weight"):
            total += _quantized_bytes(shape[0], shape[1], quantize, dtype_bytes)
        else:
            n = 1
            for s in shape:
                n *= s
            total += n * dtype_bytes
    return total + _quantized_bytes(cfg.vocab_size, cfg.hidden_size, head_quantize(quantize), dtype_bytes)


RUNTIME_BYTES = 600_000_000  # torch, the tokenizer, buffers and the largest tensor while it is converted
TENSOR_BYTES = 8192  # each tensor's module, names and bookkeeping (about 4 kB measured on the meta device alone)
CONTEXT_TOKENS = 4096  # the KV cache counted in `memory_needed` (a long chat; the cache grows as it goes)


def memory_needed(cfg: Lfm2Config, quantize: str | None = None, dtype_bytes: int = 2) -> int:
    """What running the model takes, about: its weights (`weight_bytes`), a KV cache of CONTEXT_TOKENS and the
    runtime. The memory guard refuses loads above what is available, and `lfm2 info` shows it per precision."""
    kv = len(cfg.attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes * CONTEXT_TOKENS
    return weight_bytes(cfg, quantize, dtype_bytes) + kv + RUNTIME_BYTES + TENSOR_BYTES * tensor_count(cfg)


def fits_advice(cfg: Lfm2Config, quantize: str | None, dtype_bytes: int, available: int) -> str | None:
    """None when the model fits in `available` bytes; else one line saying what it needs and which precision
    would fit (the largest one that does)."""
    needed = memory_needed(cfg, quantize, dtype_bytes)
    if needed <= available:
        return None
    what = quantize or {4: "float32", 2: "bf16"}.get(dtype_bytes, f"{dtype_bytes * 8}-bit")
    line = f"this model needs ~{human_bytes(needed)} in {what} and ~{human_bytes(available)} is available"
    options = [(q, memory_needed(cfg, q, 2)) for q in (None, "int8", "int4")]
    fitting = [(q, n) for q, n in options if n <= available and n < needed]
    if fitting:
        q, n = fitting[0]
        hint = "--dtype bfloat16" if q is None else f"--quantize {q}"
        return f"{line}; {hint} needs ~{human_bytes(n)} (or pass --force to load it anyway)"
    smallest = "" if quantize == "int4" else f"; even --quantize int4 needs ~{human_bytes(options[-1][1])}"
    return f"{line}{smallest}: close other programs or pick a smaller model (or pass --force to load it anyway)"


def check_fits(cfg: Lfm2Config, quantize: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before anything is read, a load that the system could only answer by killing the process."""
    if device.type not in ("cpu", "cuda"):
        return  # MPS shares memory with the system in ways psutil does not show: leave it to the OS
    advice = fits_advice(cfg, quantize, dtype.itemsize, memory.available_memory(device))
    if advice is not None:
        raise MemoryLimitError(advice)
