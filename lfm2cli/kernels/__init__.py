"""The fast paths, applied to a loaded model (plain torch, `lfm2cli.model`) by putting fast modules in place of its
own with `setattr`, the way gpt-fast swaps in its int8 linear: the model never imports anything from here.

`plan.py` decides once, at load, which code runs each part of the model on this machine (the decode plan) and
applies it: q/k/v and w1/w3 fused into one matrix each (`layers.py`), every projection a `Proj` (`proj.py`) in the
fastest form the machine allows: packed for lfm2's native CPU kernels (`native.py`, C in `csrc/`, one code path
per ISA level), prepacked for oneDNN, int8 or int4 (`quantize.py`), or blocked for the compiled step. A one-token
decode step then runs every layer in one native call (`native_step.py`) or one compiled graph (`compiled.py`).

This file holds the quantised formats' shared facts without importing torch: `lfm2 info`'s memory estimate
(`lfm2cli.loading.checkpoint`) reads them too.
"""

from __future__ import annotations

GROUP = 32  # inputs per int8 / int4 scale


def head_quantize(quantize: str | None) -> str | None:
    """The LM head's weight format for a model quantised as `quantize`: int8 when the rest is int4, since the head
    decides every token and is read once per token (llama.cpp keeps it at 6-8 bits in its 4-bit files too)."""
    return "int8" if quantize == "int4" else quantize
