"""The fast paths, applied to a loaded model (plain torch, `lfm2cli.model`) by swapping its modules, the way
gpt-fast swaps in its int8 linear: the model never imports anything from here.

`accelerate` fuses q/k/v and w1/w3 into one matrix each and makes every projection a `Proj` (`proj.py`) in the
fastest form the machine allows: packed for lfm2's native CPU kernels (`native.py`, C in `csrc/`, one code path
per ISA level), prepacked for oneDNN, int8, or blocked for the compiled step. A one-token decode step then runs
every layer in one native call (`native_step.py`) or one compiled graph (`compiled.py`). docs/architecture.md
has the table of which code runs the model on which machine.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from lfm2cli import cpu
from lfm2cli.kernels.proj import Proj, can_prepack
from lfm2cli.model.layers import MLP, Attention, ShortConv, decode_attention
from lfm2cli.model.lfm2 import Lfm2ForCausalLM
from lfm2cli.model.moe import SparseMoE


class FastAttention(Attention):
    """Attention with q, k and v in one `Proj` (one weight read per token) and a single query attended with two
    plain matmuls (several times faster than SDPA's kernel for one query)."""

    qkv_proj: Proj

    @classmethod
    def swap(cls, attn: Attention) -> None:
        attn.qkv_proj = Proj.fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.out_proj = Proj.from_linear(attn.out_proj)
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.__class__ = cls

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        return decode_attention(q, k, v) if q.shape[2] == 1 else super().attend(q, k, v, past)


class FastShortConv(ShortConv):
    """The short convolution with Proj layers, and its prefill conv as k shifted multiply-adds in float32: torch's
    bf16 depthwise conv1d falls back to a per-channel loop on CPUs without oneDNN bf16 support (0.8 s of a
    512-token prefill of LFM2-350M on AVX2); float32 sums, one rounding, as conv1d's own accumulation."""

    @classmethod
    def swap(cls, conv: ShortConv) -> None:
        conv.in_proj = Proj.from_linear(conv.in_proj)
        conv.out_proj = Proj.from_linear(conv.out_proj)
        conv.__class__ = cls

    def causal_conv(self, seq: torch.Tensor) -> torch.Tensor:
        k = self.conv.weight.shape[-1]
        t = seq.shape[-1] - k + 1
        if t == 1 or seq.device.type != "cpu":
            return super().causal_conv(seq)
        w, s = self.conv.weight[:, 0, :].float(), seq.float()
        y = s[..., :t] * w[:, :1]
        for j in range(1, k):
            y.addcmul_(s[..., j:j + t], w[:, j:j + 1])
        if self.conv.bias is not None:
            y += self.conv.bias.float()[:, None]
        return y.to(seq.dtype)


class FastMLP(MLP):
    """SwiGLU with w1 and w3 in one `Proj`."""

    w13: Proj

    @classmethod
    def swap(cls, mlp: MLP) -> None:
        mlp.w13 = Proj.fuse([mlp.w1, mlp.w3])
        mlp.w2 = Proj.from_linear(mlp.w2)
        del mlp.w1, mlp.w3
        mlp.__class__ = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class FastLfm2(Lfm2ForCausalLM):
    """The model after `accelerate`: its LM head is a `Proj` (for a tied head, a second copy of the embedding
    table in the kernel's form: the table itself stays plain for lookups), and one-token decode steps go to
    `step` (the native or compiled step) when there is one."""

    step = None  # callable (ids [1, 1], cache) -> float32 logits [1, V]; may have `head(x)` for the last position

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache=None, all_logits: bool = False) -> torch.Tensor:
        if input_ids.shape[1] == 1 and cache is not None and self.step is not None and not all_logits:
            if self.inv_freq is None:
                self.setup_runtime(self.device)
            return self.step(input_ids, cache)
        return super().forward(input_ids, cache, all_logits)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        head = getattr(self.step, "head_logits", None)
        if head is not None and x.shape[-2] == 1:
            return head(x)
        return super().logits(x)


def is_accelerated(model: torch.nn.Module) -> bool:
    return isinstance(model, FastLfm2)


def projections(model: torch.nn.Module) -> list[Proj]:
    return [m for m in model.modules() if isinstance(m, Proj)]


@torch.no_grad()
def accelerate(model: Lfm2ForCausalLM, quantize: str | None = None, prepack: bool = True, native: bool = False
               ) -> None:
    """Turn a loaded model into its fast form, once: fused projections, every projection a `Proj`, then int8
    weights (`quantize="int8"`) and, on CPU, each weight in the native kernels' layout (`native=True`, the
    library loaded) or else prepacked for oneDNN where that is possible (`prepack`)."""
    if is_accelerated(model):
        return
    for layer in model.model.layers:
        if layer.is_attention:
            FastAttention.swap(layer.self_attn)
        else:
            FastShortConv.swap(layer.conv)
        ff = layer.feed_forward
        if isinstance(ff, SparseMoE):
            ff.gate = Proj.from_linear(ff.gate)
            ff.gate.keep_precision = True  # tiny, and it picks the experts
            for expert in ff.experts:
                FastMLP.swap(expert)
        else:
            FastMLP.swap(ff)
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    model.lm_head = Proj(head.detach())
    model.__class__ = FastLfm2
    for proj in projections(model):
        if quantize == "int8" and not proj.keep_precision:
            proj.quantize_int8()
        if native and proj.can_native():
            proj.to_native(in_place=not (model.tied and proj is model.lm_head))  # a tied head shares the table
        elif prepack and proj.weight is not None and can_prepack(proj.weight):
            proj.prepack()
    if native and all(p.native is not None for p in projections(model)):
        from lfm2cli.kernels.native_step import NativeDecoder

        model.step = NativeDecoder(model)


def native_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """Loads lfm2's native CPU code (built once per machine and level into the cache's kernels/ folder) for bf16
    models on CPU. Returns None when it is in use, else why not; the model then runs on torch's kernels."""
    from lfm2cli import paths
    from lfm2cli.kernels import native

    if device.type != "cpu" or dtype != torch.bfloat16:
        return "used for bf16 on CPU only"
    return native.load(paths.cache_dir() / "kernels")


def torch_int8_slower(device: torch.device) -> str | None:
    """Why int8 weights on torch's kernels would decode slower than the model's own dtype here, or None. Measured:
    `_weight_int8pack_mm` beats bf16 on AVX512 CPUs (1.1-1.4x) but runs at ~0.3x float32 on AVX2-only ones."""
    if device.type == "cpu" and not cpu.is_arm() and "avx512f" not in cpu.flags():
        return ("without lfm2's native kernels, torch's int8 kernel is slower than unquantised weights on this "
                f"CPU (no AVX512); native code {native_why_not()}")
    return None


def native_why_not() -> str:
    from lfm2cli.kernels import native

    return native.why_not() or "unused for this dtype (bf16 only)"


def enable_compile(model: Lfm2ForCausalLM) -> str | None:
    """Run one-token decode steps through a compiled graph (see compiled.py). Returns why not, if it cannot."""
    from lfm2cli.kernels.compiled import CompiledDecoder, CudaGraphDecoder, compile_supported

    reason = compile_supported(model)
    if reason is None:
        accelerate(model, prepack=False)
        model.step = CudaGraphDecoder(model) if model.device.type == "cuda" else CompiledDecoder(model)
    return reason


def apply(model: Lfm2ForCausalLM, device: torch.device, *, quantize: str | None = None, compile: bool = False,
          fast: bool = True, native: bool = True) -> None:
    """What loading does after the weights are in place: the fast form (fused projections; native, prepacked or
    int8 weights), then compilation. `fast=False` keeps the model exactly as loaded: the reference path the
    tests compare against; `native=False` leaves the native code out (benchmarks compare with it)."""
    native = native and bool(fast or quantize or compile) and native_available(device, model.dtype) is None
    if quantize == "int8" and not native and not compile and (reason := torch_int8_slower(device)):
        sys.stderr.write(f"note: --quantize int8 ignored: {reason}\n")
        quantize = None
    if compile:
        from lfm2cli.kernels.compiled import compile_supported

        # the native step decodes faster than the compiled one and needs no compilation (docs/performance.md)
        reason = "lfm2's native CPU code runs this model faster" if native else compile_supported(model)
        if reason is not None:
            sys.stderr.write(f"note: --compile ignored: {reason}\n")
            compile = False
    if fast or quantize or compile:
        # the compiled step reads its own (blocked) weight form, so nothing is packed for it
        accelerate(model, quantize=quantize, prepack=not compile, native=native and not compile)
    if compile:
        enable_compile(model)


def which(model: Lfm2ForCausalLM) -> tuple[str, str | None]:
    """Which code runs the model's matrix products ('native avx512', 'native avx2', 'compiled' or 'torch'), and
    for a bf16 model on CPU that is not native, why not (for bench)."""
    from lfm2cli.kernels import native

    projs = projections(model)
    if any(p.native is not None for p in projs):
        return f"native {native.level()}", None
    if any(p.blocked is not None for p in projs):
        return "compiled", None
    cpu_bf16 = model.device.type == "cpu" and model.dtype == torch.bfloat16
    return "torch", (f"native code {native.why_not()}" if cpu_bf16 and native.why_not() else None)
