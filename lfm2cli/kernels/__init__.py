"""The fast paths, applied to a loaded model (plain torch, `lfm2cli.model`) by swapping its modules, the way
gpt-fast swaps in its int8 linear: the model never imports anything from here.

`accelerate` fuses q/k/v and w1/w3 into one matrix each and makes every projection a `Proj` (`proj.py`) in the
fastest form the machine allows: packed for lfm2's native CPU kernels (`native.py`, C in `csrc/`, one code path
per ISA level), prepacked for oneDNN, int8, or blocked for the compiled step. A one-token decode step then runs
every layer in one native call (`native_step.py`) or one compiled graph (`compiled.py`). docs/architecture.md
has the table of which code runs the model on which machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lfm2cli.kernels.proj import Proj, can_prepack
from lfm2cli.model.layers import MLP, Attention, ShortConv, decode_attention
from lfm2cli.model.lfm2 import Lfm2ForCausalLM


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


@dataclass
class Plan:
    """What `apply` will do to a model, decided before its weights are read so that the loader can turn each part
    into its fast form as soon as that part is in memory (`accelerate_unit`)."""

    accelerate: bool = False  # swap in the fast modules at all
    quantize: str | None = None
    prepack: bool = True
    native: bool = False
    compile: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # options asked for and not applied: the reasons


def plan(model: Lfm2ForCausalLM, device: torch.device, dtype: torch.dtype, *, quantize: str | None = None,
         compile: bool = False, fast: bool = True, native: bool = True) -> Plan:
    """Decide the fast form (fused projections; native, prepacked, int8 or int4 weights) and compilation. `fast=False`
    keeps the model exactly as loaded: the reference path the tests compare against; `native=False` leaves the
    native code out (benchmarks compare with it)."""
    skipped: dict[str, str] = {}
    native = native and bool(fast or quantize or compile) and native_available(device, dtype) is None
    if compile:
        from lfm2cli.kernels.compiled import compile_supported

        # the native step decodes faster than the compiled one and needs no compilation (docs/performance.md)
        reason = ("lfm2's native CPU code runs this model faster" if native
                  else "int4 weights have no compiled form" if quantize == "int4" else compile_supported(model))
        if reason is not None:
            skipped["compile"] = reason
            compile = False
    # the compiled step reads its own (blocked) weight form, so nothing is packed for it
    return Plan(accelerate=bool(fast or quantize or compile), quantize=quantize, prepack=not compile,
                native=native and not compile, compile=compile, skipped=skipped)


def units(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The parts `accelerate_unit` converts one at a time, by module name: attention, short conv, each MLP (dense
    or expert) and each MoE router."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (Attention, ShortConv, MLP)) or name.endswith("feed_forward.gate")}


def _convert(proj: Proj, p: Plan, quantize: str | None, in_place: bool = True) -> None:
    if quantize and not proj.keep_precision:
        proj.quantize(quantize)
    if p.native and proj.can_native():
        proj.to_native(in_place=in_place)
    elif p.prepack and proj.weight is not None and can_prepack(proj.weight):
        proj.prepack()


@torch.no_grad()
def accelerate_unit(model: torch.nn.Module, name: str, p: Plan) -> None:
    """Turn one part of the model (see `units`) into its fast form: its projections fused and made `Proj`s,
    quantised and packed as planned. The loader calls it as soon as the part's tensors are read, so that at most
    a few parts are ever in memory in the checkpoint's precision."""
    module = model.get_submodule(name)
    if isinstance(module, (FastAttention, FastShortConv, FastMLP, Proj)):
        return  # done already
    if isinstance(module, Attention):
        FastAttention.swap(module)
    elif isinstance(module, ShortConv):
        FastShortConv.swap(module)
    elif isinstance(module, MLP):
        FastMLP.swap(module)
    else:  # a MoE router: tiny, and it picks the experts, so it keeps the model's precision
        parent, _, attr = name.rpartition(".")
        module = Proj.from_linear(module)
        module.keep_precision = True
        setattr(model.get_submodule(parent), attr, module)
    for proj in projections(module):
        _convert(proj, p, p.quantize)


@torch.no_grad()
def accelerate(model: Lfm2ForCausalLM, quantize: str | None = None, prepack: bool = True, native: bool = False
               ) -> None:
    """Turn a loaded model into its fast form, once: fused projections, every projection a `Proj`, then int8 or
    int4 weights (`quantize`) and, on CPU, each weight in the native kernels' layout (`native=True`, the library
    loaded) or else prepacked for oneDNN where that is possible (`prepack`). Parts the loader converted already
    are kept. The LM head is int8 when the rest is int4: it decides every token and is read once per token."""
    if is_accelerated(model):
        return
    p = Plan(accelerate=True, quantize=quantize, prepack=prepack, native=native)
    for name in units(model):
        accelerate_unit(model, name, p)
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    model.lm_head = Proj(head.detach())
    model.__class__ = FastLfm2
    _convert(model.lm_head, p, "int8" if quantize == "int4" else quantize, in_place=not model.tied)
    if native and all(q.native is not None for q in projections(model)):
        from lfm2cli.kernels.native_step import NativeDecoder

        model.step = NativeDecoder(model)


def native_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """Loads lfm2's native CPU code (built once per machine and level into the cache's kernels/ folder) for bf16
    models on CPU. Returns None when it is in use, else why not; the model then runs on torch's kernels."""
    from lfm2cli.kernels import native
    from lfm2cli.system import paths

    if device.type != "cpu" or dtype != torch.bfloat16:
        return "used for bf16 on CPU only"
    return native.load(paths.cache_dir() / "kernels")


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


def apply(model: Lfm2ForCausalLM, p: Plan) -> None:
    """What loading does after the weights are in place (see `plan`): the fast form, then compilation."""
    if p.accelerate:
        accelerate(model, quantize=p.quantize, prepack=p.prepack, native=p.native)
    if p.compile:
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
