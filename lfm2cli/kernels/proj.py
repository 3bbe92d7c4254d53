"""`Proj`: the linear layer `lfm2cli.kernels.accelerate` swaps in for the model's `nn.Linear` layers. It holds one
weight in the fastest form for the device: plain (any device), packed for lfm2's own CPU kernels
(`lfm2cli.kernels.native`: bf16, int8 or int4), prepacked for oneDNN (CPU, eager, where the native kernel cannot
run), weight-only int8 or int4 (see `lfm2cli.kernels.quantize`; outside the native kernels they run torch's slow
fallback), or blocked for the compiled decode step (plain or int8). Batch-1 decode is bound by reading weights,
so the form decides its speed.

The blocked form stores [out, in] as [out / BLOCK, in, BLOCK]: a decode product then walks the weights in memory
order with BLOCK output channels side by side in one vector, no horizontal sums; inductor compiles
`(w.float() * x).sum(1)` over it into one fused pass (measured: ~1.4x oneDNN's packed bf16 GEMV on a 2-core Zen 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm2cli.kernels import native
from lfm2cli.kernels.quantize import GROUP
from lfm2cli.system import cpu

BLOCK = 32  # output channels per block in the blocked form (16 and 64 measured slower in the compiled step)
_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # see Proj._unblocked_t


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN prepacking pays on CPU: torch's plain bf16 `linear` reorders the weight on every call. For bf16 it
    needs a CPU that computes bf16 (elsewhere oneDNN raises or crawls): `lfm2cli.system.cpu` decides that."""
    if weight.dtype == torch.bfloat16 and not cpu.onednn_bf16():
        return False
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _adjacent(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """When the loader already read the matrices one after another into one buffer, that buffer as one matrix
    (a view: no copy); else None."""
    first = weights[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.device == first.device for w in weights):
        return None
    if any(a.data_ptr() + a.nbytes != b.data_ptr() or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
           for a, b in zip(weights, weights[1:], strict=False)):
        return None
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


class Proj(nn.Module):
    """y = x W^T (+ b). `weight` stays the plain [out, in] tensor unless it was packed or quantised."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight: torch.Tensor | None = weight
        self.bias = bias
        self.packed: torch.Tensor | None = None  # oneDNN's blocked layout (an opaque tensor)
        self.quant: str | None = None  # "int8" or "int4" once quantised
        self.qweight: torch.Tensor | None = None  # int8 [out, in]; int4: nibbles uint8 [out, in / 2]
        self.scales: torch.Tensor | None = None  # [out, in / 32]: int8 fp16, int4 bf16
        self.blocked: torch.Tensor | None = None  # [out / BLOCK, in, BLOCK]: plain or int8 values
        self.blocked_scales: torch.Tensor | None = None  # int8 blocked: float32 [out / BLOCK, in / 32, BLOCK]
        self.native: torch.Tensor | None = None  # the native kernel's layout: bf16, or int8 / int4 with scales
        self.keep_precision = False  # never quantised (the MoE router: tiny, and it picks the experts)

    @classmethod
    def fuse(cls, layers: list[nn.Linear]) -> Proj:
        """One matrix for several projections of the same input (q/k/v, w1/w3): one weight read per token."""
        if len(layers) == 1:
            return cls.from_linear(layers[0])
        weights = [m.weight.detach() for m in layers]
        weight = _adjacent(weights)
        if weight is None:
            weight = torch.cat(weights, dim=0)
        biases = [m.bias for m in layers]
        bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        return cls(weight, bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Proj:
        return cls(layer.weight.detach(), None if layer.bias is None else layer.bias.detach())

    def prepack(self) -> None:
        """Switch to oneDNN's packed layout. Done at load time, not at first use: packed and plain weights
        sum in different orders, and a model must answer the same before and after its first decode step."""
        assert self.weight is not None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)
        self.weight = None  # the packed copy replaces it: no second copy in memory

    def quantize(self, mode: str) -> None:
        """Weight-only int8 or int4 (`kernels/quantize.py`): made by the native code where it runs (the same bytes as
        the torch definition, far faster at load time). Both group 32 inputs; a weight whose input width is not
        a multiple of 32 keeps its precision (none in the LFM2 checkpoints: their widths are multiples of 256)."""
        from lfm2cli.kernels import quantize

        w = self.weight
        assert w is not None and mode in ("int8", "int4")
        if self.in_features % quantize.GROUP:
            return
        fast = native.ready() and w.dtype == torch.bfloat16 and w.device.type == "cpu"
        make = getattr(native if fast else quantize, f"quantize_{mode}")
        self.qweight, self.scales = make(w)
        self.weight = None
        self.quant = mode

    def can_native(self) -> bool:
        if self.quant is not None:
            return self.qweight is not None and native.can_pack_grouped(self.in_features)
        return self.weight is not None and native.can_pack(self.weight)

    @property
    def native_format(self) -> int:
        """The native form's weight format: native.BF16, INT8 or INT4."""
        return {"int8": native.INT8, "int4": native.INT4}.get(self.quant or "", native.BF16)

    def to_native(self, in_place: bool = False) -> None:
        """Switch to the native kernel's layout (bf16, int8 or int4 weights; see native.c). Replaces the plain copy;
        `in_place` rewrites the weight's own memory (only when nothing else uses that tensor)."""
        assert self.can_native()
        if self.quant is not None:  # the scales travel inside the packed layout
            self.native = native.pack_grouped(self.qweight, self.scales, self.native_format)
            self.scales = None
        else:
            self.native = native.pack(self.weight, in_place=in_place)
        self.weight = self.qweight = None

    def can_block(self) -> bool:
        return self.packed is None and self.quant != "int4" and self.out_features % BLOCK == 0

    def block(self) -> None:
        """Switch to the blocked form (plain or int8) used by the compiled decode step."""
        w = self.qweight if self.qweight is not None else self.weight
        assert w is not None and self.can_block()
        nb = self.out_features // BLOCK
        self.blocked = w.view(nb, BLOCK, self.in_features).transpose(1, 2).contiguous()
        if self.scales is not None:  # int8: [out, in / 32] -> [out / BLOCK, in / 32, BLOCK], as the values
            self.blocked_scales = self.scales.float().view(nb, BLOCK, -1).transpose(1, 2).contiguous()
        self.weight = self.qweight = None

    def _unblocked_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The transposed plain matrix [in, out] (dequantised) from the blocked form, for prefill. Transposed
        because that copy moves whole runs of BLOCK values (twice as fast as [out, in]); written into one
        scratch buffer that every layer reuses, so prefill does not fault in fresh pages for each weight."""
        n = self.in_features * self.out_features
        key = (dtype, self.blocked.device)
        buf = _SCRATCH.get(key)
        if buf is None or buf.numel() < n:
            buf = _SCRATCH[key] = torch.empty(n, dtype=dtype, device=self.blocked.device)
        w = buf[:n].view(self.in_features, self.out_features)
        w.view(self.in_features, -1, BLOCK).copy_(self.blocked.permute(1, 0, 2))
        if self.scales is not None:  # int8: each group of 32 inputs times its scale per output
            w.view(-1, GROUP, self.out_features).mul_(self.scales.t().to(dtype)[:, None, :])
        return w

    @property
    def kind(self) -> str:
        quant = self.quant or ""
        form = ("blocked" if self.blocked is not None else "packed" if self.packed is not None
                else "native" if self.native is not None else "")
        return "-".join(p for p in (quant, form) if p) or "plain"

    def nbytes(self) -> int:
        """Bytes read to apply this layer once (what batch-1 decode costs)."""
        n = self.out_features * self.in_features
        if self.quant is not None:  # a byte (int4: half) per weight, a bf16 scale per 32
            return (n // 2 if self.quant == "int4" else n) + 2 * (n // GROUP)
        for t in (self.packed, self.blocked, self.native, self.weight):
            if t is not None:
                return n * t.dtype.itemsize
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:  # bf16 models only (see prepare_for_inference)
            y = native.linear(x, self.native, self.out_features, self.native_format)
            return y if self.bias is None else y + self.bias
        if self.blocked is not None:
            if torch.compiler.is_compiling() and x.numel() == self.in_features:
                # batch-1 decode inside the compiled step: one fused pass over the blocked weights
                if self.blocked_scales is None:
                    y = (self.blocked.float() * x.reshape(1, -1, 1).float()).sum(1).reshape(-1)
                else:  # int8: each group's sums times its scale, then the groups added up
                    nb, groups = self.blocked.shape[0], self.in_features // GROUP
                    part = (self.blocked.view(nb, groups, GROUP, BLOCK).float()
                            * x.reshape(1, groups, GROUP, 1).float()).sum(2)
                    y = (part * self.blocked_scales).sum(1).reshape(-1)
                y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            else:
                y = torch.matmul(x, self._unblocked_t(x.dtype))
            return y if self.bias is None else y + self.bias
        if self.qweight is not None:
            from lfm2cli.kernels.quantize import grouped_linear

            y = grouped_linear(x, self.qweight, self.scales, self.quant)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
