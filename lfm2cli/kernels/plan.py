"""The decode plan: which code runs each part of the model on this machine, decided once before any weight is
read, from the config, the device, the dtype and the options (never from weight values), then applied part by
part as the loader reads them (`accelerate_unit`) and, last, the one-token step attached (`apply`). `lfm2 bench`
and `lfm2 info --plan` print it. docs/architecture.md has the table of which code runs on which machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lfm2cli.kernels import GROUP, head_quantize
from lfm2cli.kernels.layers import FAST, FastAttention, FastMLP, FastShortConv
from lfm2cli.kernels.proj import BLOCK, BlockedHead, BlockedProj, NativeProj, PlainProj, Proj, prepack_supported
from lfm2cli.model.config import Lfm2Config
from lfm2cli.model.lfm2 import Lfm2ForCausalLM

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
COLUMNS = ("part", "implementation", "format", "why not faster")
FIELDS = ("part", "implementation", "format", "why_not")


@dataclass
class Row:
    part: str
    implementation: str
    format: str
    why_not: str = ""  # why a faster implementation does not run this part here

    def cells(self) -> tuple[str, str, str, str]:
        return self.part, self.implementation, self.format, self.why_not


@dataclass
class Plan:
    """What loading makes of a model on this machine. The flags decide each projection's form (`form`); `rows`
    say the same per part of the model, for people."""

    device: torch.device
    dtype: torch.dtype
    accelerate: bool = False  # swap in the fast modules at all (False: the reference path, as loaded)
    quantize: str | None = None
    prepack: bool = True
    native: bool = False
    compile: bool = False
    native_note: str | None = None  # why lfm2's native code does not run this model, where it does not
    skipped: dict[str, str] = field(default_factory=dict)  # options asked for and not applied: the reasons
    rows: list[Row] = field(default_factory=list)

    def form(self, out: int, inn: int, quantize: str | None) -> tuple[str, str | None]:
        """The form of an [out, in] projection ('native', 'packed', 'blocked', 'plain', or 'linear' for the
        reference path) and its weight quantisation (None where the width has no whole groups of 32)."""
        q = quantize if quantize and inn % GROUP == 0 else None
        if not self.accelerate:
            return "linear", None
        if self.compile and self.device.type != "cuda":  # the CUDA graph reads plain weights (cuBLAS)
            return ("blocked" if out % BLOCK == 0 and q != "int4" else "plain"), q
        if self.native and inn % (GROUP if q else 2) == 0:
            return "native", q
        if self.prepack and q is None and prepack_supported(self.dtype, self.device):
            return "packed", None
        return "plain", q

    def step(self) -> str:
        """The one-token decode step: 'compiled', 'cuda graph', 'native' or 'eager'."""
        if self.compile:
            return "cuda graph" if self.device.type == "cuda" else "compiled"
        native_rows = [r for r in self.rows if r.part not in ("one-token step", "prefill")]
        if self.native and native_rows and all(r.implementation.startswith("native") for r in native_rows):
            return "native"
        return "eager"

    def kernels(self) -> tuple[str, str | None]:
        """Which code runs the matrix products ('native avx512', 'native avx2', 'compiled' or 'torch'), and for a
        bf16 model on CPU that is not native, why not (`lfm2 bench`)."""
        from lfm2cli.kernels import native

        if any(r.implementation.startswith("native") for r in self.rows):
            return f"native {native.level()}", None
        if any(r.implementation.startswith("compiled") for r in self.rows):
            return "compiled", None
        cpu_bf16 = self.device.type == "cpu" and self.dtype == torch.bfloat16
        return "torch", (f"native code {native.why_not()}" if cpu_bf16 and native.why_not() else None)

    def table(self) -> list[dict[str, str]]:
        """The rows as JSON objects (`lfm2 bench --json`, `lfm2 info --plan --json`)."""
        return [dict(zip(FIELDS, r.cells(), strict=True)) for r in self.rows]

    def lines(self) -> list[str]:
        return plan_lines(self.table())


def plan_lines(table: list[dict[str, str]]) -> list[str]:
    """A plan's rows (`Plan.table`) as aligned plain text under a header line."""
    cells = [COLUMNS, *(tuple(row[f] for f in FIELDS) for row in table)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def native_available(device: torch.device, dtype: torch.dtype) -> str | None:
    """Loads lfm2's native CPU code (built once per machine and level into the cache's kernels/ folder) for bf16
    models on CPU. Returns None when it is in use, else why not; the model then runs on torch's kernels."""
    from lfm2cli.kernels import native
    from lfm2cli.system import paths

    if device.type != "cpu" or dtype != torch.bfloat16:
        return "used for bf16 on CPU only"
    return native.load(paths.cache_dir() / "kernels")


def plan(cfg: Lfm2Config, device: torch.device, dtype: torch.dtype, *, quantize: str | None = None,
         compile: bool = False, fast: bool = True, native: bool = True) -> Plan:
    """Decide the fast form (fused projections; native, prepacked, int8 or int4 weights) and compilation. `fast=False`
    keeps the model exactly as loaded: the reference path the tests compare against; `native=False` leaves the
    native code out (benchmarks compare with it)."""
    accelerate = bool(fast or quantize or compile)
    note = ("left out (native=False)" if not native else "left out: the reference path" if not accelerate
            else native_available(device, dtype))
    skipped: dict[str, str] = {}
    if compile:
        from lfm2cli.kernels.compiled import compile_supported

        # the native step decodes faster than the compiled one and needs no compilation (docs/performance.md)
        reason = ("lfm2's native CPU code runs this model faster" if note is None
                  else "int4 weights have no compiled form" if quantize == "int4" else compile_supported(cfg))
        if reason is not None:
            skipped["compile"] = reason
            compile = False
    # the compiled step reads its own (blocked) weight form, so nothing is packed for it
    p = Plan(device, dtype, accelerate=accelerate, quantize=quantize, prepack=not compile,
             native=note is None and not compile, compile=compile, native_note=note, skipped=skipped)
    p.rows = plan_rows(cfg, p)
    p.rows.append(step_row(cfg, p))
    return p


def _parts(cfg: Lfm2Config) -> list[tuple[str, list[tuple[int, int]], str | None]]:
    """The kinds of projection in the model: a name, the [out, in] shapes, and the weight quantisation."""
    h, n = cfg.hidden_size, cfg.num_hidden_layers
    nq, nkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    parts = []
    if cfg.attention_layers:
        parts.append(("attention q/k/v, out", [(nq + 2 * nkv, h), (h, nq)], "model"))
    if len(cfg.attention_layers) < n:
        parts.append(("conv in, out", [(3 * h, h), (h, h)], "model"))
    if any(not cfg.is_moe_layer(i) for i in range(n)):
        parts.append(("MLP w1/w3, w2", [(2 * cfg.dense_ff_dim, h), (h, cfg.dense_ff_dim)], "model"))
    if cfg.is_moe:
        m = cfg.moe_intermediate_size
        parts.append(("MoE experts w1/w3, w2", [(2 * m, h), (h, m)], "model"))
        parts.append(("MoE router", [(cfg.num_experts, h)], None))  # tiny, and it picks the experts
    parts.append(("LM head", [(cfg.vocab_size, h)], "head"))
    return parts


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


IMPLEMENTATIONS = {"packed": "oneDNN, prepacked", "blocked": "compiled, blocked weights", "plain": "torch",
                   "linear": "torch, as loaded"}


def _why_not(p: Plan, kind: str, q: str | None, inn: int) -> str:
    """Why an [out, inn] projection in form `kind` does not run on the native kernels (or oneDNN)."""
    if kind == "native" or not p.accelerate:
        return "" if kind == "native" else "the reference path (fast=False)"
    if p.native:
        return f"input width {inn} is not a multiple of {GROUP if q else 2}"
    why = f"native code {p.native_note}"
    if kind == "plain" and q is None and p.prepack and p.device.type == "cpu":
        why += f"; oneDNN prepacks no {dtype_name(p.dtype)} here"
    return why


def plan_rows(cfg: Lfm2Config, p: Plan) -> list[Row]:
    """The plan per part of the model: each kind of projection, then prefill (`step_row` adds the step)."""
    from lfm2cli.kernels import native

    dtype = dtype_name(p.dtype)
    rows = []
    for part, shapes, quant in _parts(cfg):
        asked = {"model": p.quantize, "head": head_quantize(p.quantize), None: None}[quant]
        cells = []
        for out, inn in shapes:
            kind, q = p.form(out, inn, asked)
            impl = f"native {native.level()}" if kind == "native" else IMPLEMENTATIONS[kind]
            if kind == "plain" and q:
                impl = "torch, dequantised per call"
            cells.append((impl, q or dtype, _why_not(p, kind, q, inn)))
        rows.append(Row(part, *(" / ".join(dict.fromkeys(c[i] for c in cells if c[i])) for i in range(3))))
    rows.append(Row("prefill", "torch, projections as above", dtype))
    return rows


def step_row(cfg: Lfm2Config, p: Plan) -> Row:
    """The one-token decode step's row, from the projections' rows."""
    from lfm2cli.kernels import native

    dtype = dtype_name(p.dtype)
    step = p.step()
    if step == "compiled":
        return Row("one-token step", "torch.compile graph (inductor)", dtype)
    if step == "cuda graph":
        return Row("one-token step", "CUDA graph", dtype)
    if step == "native":
        if cfg.conv_bias:
            return Row("one-token step", f"native {native.level()}, a call per operation", dtype,
                       "the whole-step kernel takes no projection biases")
        return Row("one-token step", f"native {native.level()}, one call per token", dtype)
    why = p.skipped.get("compile") or ("not every projection is native" if p.native
                                       else f"native code {p.native_note}")
    return Row("one-token step", "torch, layer by layer", dtype, why)


def units(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The parts `accelerate_unit` converts one at a time, by module name: attention, short conv, each MLP (dense
    or expert) and each MoE router."""
    return {name: m for name, m in model.named_modules()
            if type(m) in FAST or name.endswith("feed_forward.gate")}


def convert(proj: PlainProj, p: Plan, quantize: str | None, in_place: bool = True) -> Proj:
    """`proj` in the form the plan gives it (quantised to `quantize` where its width allows)."""
    kind, q = p.form(proj.out_features, proj.in_features, None if proj.keep_precision else quantize)
    new = proj.quantized(q) if q else proj
    if kind == "native":
        return new.to_native(in_place=in_place)
    if kind == "packed":
        return new.prepacked()
    if kind == "blocked":
        return new.blocked()
    return new


@torch.no_grad()
def accelerate_unit(model: torch.nn.Module, name: str, p: Plan) -> None:
    """Turn one part of the model (see `units`) into its fast form: its projections fused and made `Proj`s,
    quantised and packed as planned, the new module put in the old one's place. The loader calls it as soon as
    the part's tensors are read, so that at most a few parts are ever in memory in the checkpoint's precision."""
    module = model.get_submodule(name)
    if isinstance(module, (FastAttention, FastShortConv, FastMLP, Proj)):
        return  # done already
    if type(module) in FAST:
        fast = FAST[type(module)](module)
        for attr, child in list(fast.named_children()):
            if isinstance(child, PlainProj):
                setattr(fast, attr, convert(child, p, p.quantize))
    else:  # a MoE router: tiny, and it picks the experts, so it keeps the model's precision
        router = PlainProj.from_linear(module)
        router.keep_precision = True
        fast = convert(router, p, None)
    model.set_submodule(name, fast)


def is_accelerated(model: Lfm2ForCausalLM) -> bool:
    return isinstance(model.lm_head, Proj)


def projections(model: torch.nn.Module) -> list[Proj]:
    return [m for m in model.modules() if isinstance(m, Proj)]


@torch.no_grad()
def accelerate(model: Lfm2ForCausalLM, quantize: str | None = None, prepack: bool = True, native: bool = False,
               p: Plan | None = None) -> None:
    """Turn a loaded model into its fast form, once: fused projections, every projection a `Proj`, in the forms
    of plan `p`; without one, int8 or int4 weights (`quantize`) and, on CPU, each weight in the native kernels'
    layout (`native=True`, the library loaded) or else prepacked for oneDNN where that is possible (`prepack`).
    Parts the loader converted already are kept. The LM head gets its own copy (for a tied head, of the
    embedding table: the table itself stays plain for lookups)."""
    if is_accelerated(model):
        return
    if p is None:
        p = Plan(model.device, model.dtype, accelerate=True, quantize=quantize, prepack=prepack, native=native)
    for name in units(model):
        accelerate_unit(model, name, p)
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    head = convert(PlainProj(head.detach()), p, head_quantize(p.quantize), in_place=not model.tied)
    model.lm_head = BlockedHead(head) if isinstance(head, BlockedProj) else head
    if p.native and all(isinstance(m, NativeProj) for m in projections(model)):
        from lfm2cli.kernels.native_step import NativeDecoder

        model.decode_step = NativeDecoder(model)


def apply(model: Lfm2ForCausalLM, p: Plan) -> None:
    """What loading does after the weights are in place (see `plan`): the fast form, then the compiled step."""
    if p.accelerate:
        accelerate(model, p=p)
    if p.compile:
        from lfm2cli.kernels.compiled import CompiledDecoder, CudaGraphDecoder

        model.decode_step = CudaGraphDecoder(model) if model.device.type == "cuda" else CompiledDecoder(model)
    model.decode_plan = p
