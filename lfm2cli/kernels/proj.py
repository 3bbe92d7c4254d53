"""The projections `lfm2cli.kernels` swaps in for the model's `nn.Linear` layers, one class per weight form: plain
(any device), prepacked for oneDNN (CPU, eager, where the native kernel cannot run), weight-only int8 or int4 (see
`lfm2cli.kernels.quantize`; outside the native kernels they run torch's slow fallback), packed for lfm2's own CPU
kernels (`lfm2cli.kernels.native`: bf16, int8 or int4), or blocked for the compiled decode step (plain or int8).
Batch-1 decode is bound by reading weights, so the form decides its speed. A conversion returns a new module and
leaves the old one empty (its weight may have been rewritten in place); the caller puts the new one in its place.

The blocked form stores [out, in] as [out / BLOCK, in, BLOCK]: a decode product then walks the weights in memory
order with BLOCK output channels side by side in one vector, no horizontal sums; inductor compiles
`(w.float() * x).sum(1)` over it into one fused pass (measured: ~1.4x oneDNN's packed bf16 GEMV on a 2-core Zen 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm2cli.kernels import GROUP, native
from lfm2cli.system import cpu

BLOCK = 32  # output channels per block in the blocked form (16 and 64 measured slower in the compiled step)
_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # see BlockedProj._unblocked_t


def prepack_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN prepacking pays on CPU: torch's plain bf16 `linear` reorders the weight on every call. For bf16 it
    needs a CPU that computes bf16 (elsewhere oneDNN raises or crawls): `lfm2cli.system.cpu` decides that."""
    if dtype == torch.bfloat16 and not cpu.onednn_bf16():
        return False
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def can_prepack(weight: torch.Tensor) -> bool:
    return prepack_supported(weight.dtype, weight.device)


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
    """y = x W^T (+ b), W [out, in] in one of the forms below."""

    kind = ""  # the form, as `lfm2 bench` and the tests name it
    quant: str | None = None  # "int8" or "int4" for quantised weights

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = bias
        self.keep_precision = False  # never quantised (the MoE router: tiny, and it picks the experts)

    def _successor(self, new: Proj) -> Proj:
        """`new` as this projection's replacement: same bias and precision rule; this one is left empty."""
        new.keep_precision = self.keep_precision
        self.bias = None
        return new

    def nbytes(self) -> int:
        """Bytes read to apply this layer once (what batch-1 decode costs)."""
        raise NotImplementedError


class PlainProj(Proj):
    """The weight as loaded: torch's `linear` (cuBLAS on GPU)."""

    kind = "plain"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[0], weight.shape[1], bias)
        self.weight: torch.Tensor | None = weight

    @classmethod
    def fuse(cls, layers: list[nn.Linear]) -> PlainProj:
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
    def from_linear(cls, layer: nn.Linear) -> PlainProj:
        return cls(layer.weight.detach(), None if layer.bias is None else layer.bias.detach())

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _take(self) -> torch.Tensor:
        w, self.weight = self.weight, None
        assert w is not None, "this projection was converted already"
        return w

    def prepacked(self) -> PackedProj:
        """oneDNN's packed layout. Made at load time, not at first use: packed and plain weights sum in different
        orders, and a model must answer the same before and after its first decode step."""
        packed = torch.ops.mkldnn._reorder_linear_weight(self._take(), 1)
        return self._successor(PackedProj(packed, self.out_features, self.in_features, self.bias))

    def quantized(self, mode: str) -> Proj:
        """Weight-only int8 or int4 (`kernels/quantize.py`): made by the native code where it runs (the same bytes
        as the torch definition, far faster at load time). Both group 32 inputs; a weight whose input width is not
        a multiple of 32 keeps its precision: this projection itself is returned (none in the LFM2 checkpoints:
        their widths are multiples of 256)."""
        from lfm2cli.kernels import quantize

        assert mode in ("int8", "int4")
        if self.in_features % GROUP:
            return self
        w = self.weight
        fast = native.ready() and w.dtype == torch.bfloat16 and w.device.type == "cpu"
        q, scales = getattr(native if fast else quantize, f"quantize_{mode}")(self._take())
        return self._successor(QuantProj(q, scales, mode, self.out_features, self.in_features, self.bias))

    def can_native(self) -> bool:
        return self.weight is not None and native.can_pack(self.weight)

    def to_native(self, in_place: bool = False) -> NativeProj:
        """The native kernel's bf16 layout; `in_place` rewrites the weight's own memory (only when nothing else
        uses that tensor)."""
        assert self.can_native()
        packed = native.pack(self._take(), in_place=in_place)
        return self._successor(NativeProj(packed, native.BF16, None, self.out_features, self.in_features, self.bias))

    def can_block(self) -> bool:
        return self.out_features % BLOCK == 0

    def blocked(self) -> BlockedProj:
        """The blocked form the compiled decode step reads."""
        assert self.can_block()
        nb = self.out_features // BLOCK
        w = self._take().view(nb, BLOCK, self.in_features).transpose(1, 2).contiguous()
        return self._successor(BlockedProj(w, None, None, self.bias))


class PackedProj(Proj):
    """oneDNN's prepacked layout (an opaque tensor)."""

    kind = "packed"

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None
                 ) -> None:
        super().__init__(out_features, in_features, bias)
        self.packed = packed

    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.packed.dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class QuantProj(Proj):
    """Weight-only int8 or int4 in groups of 32 inputs, run by torch's fallback (`grouped_linear`: dequantised per
    call; it saves memory, not time)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mode: str, out_features: int, in_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__(out_features, in_features, bias)
        self.qweight: torch.Tensor | None = qweight  # int8 [out, in]; int4: nibbles uint8 [out, in / 2]
        self.scales: torch.Tensor | None = scales  # [out, in / 32]: int8 fp16, int4 bf16
        self.quant = self.kind = mode

    def nbytes(self) -> int:
        n = self.out_features * self.in_features  # a byte (int4: half) per weight, a 16-bit scale per 32
        return (n // 2 if self.quant == "int4" else n) + 2 * (n // GROUP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lfm2cli.kernels.quantize import grouped_linear

        y = grouped_linear(x, self.qweight, self.scales, self.quant)
        return y if self.bias is None else y + self.bias

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, s = self.qweight, self.scales
        assert q is not None and s is not None, "this projection was converted already"
        self.qweight = self.scales = None
        return q, s

    def can_native(self) -> bool:
        return self.qweight is not None and native.can_pack_grouped(self.in_features)

    def to_native(self, in_place: bool = False) -> NativeProj:
        """The native kernel's grouped layout (the scales travel inside it)."""
        assert self.can_native()
        fmt = native.INT4 if self.quant == "int4" else native.INT8
        packed = native.pack_grouped(*self._take(), fmt)
        return self._successor(NativeProj(packed, fmt, self.quant, self.out_features, self.in_features, self.bias))

    def can_block(self) -> bool:
        return self.quant == "int8" and self.out_features % BLOCK == 0

    def blocked(self) -> BlockedProj:
        """int8 in the blocked form: values and scales [out, in / 32] both as [out / BLOCK, in..., BLOCK]."""
        assert self.can_block()
        q, scales = self._take()
        nb = self.out_features // BLOCK
        values = q.view(nb, BLOCK, self.in_features).transpose(1, 2).contiguous()
        blocked_scales = scales.float().view(nb, BLOCK, -1).transpose(1, 2).contiguous()
        return self._successor(BlockedProj(values, blocked_scales, scales, self.bias))


class NativeProj(Proj):
    """Packed for lfm2's native CPU kernels: bf16 (`native.pack`), or int8 / int4 with their scales
    (`native.pack_grouped`). bf16 models on CPU only."""

    def __init__(self, packed: torch.Tensor, fmt: int, quant: str | None, out_features: int, in_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__(out_features, in_features, bias)
        self.native = packed
        self.native_format = fmt  # native.BF16, INT8 or INT4
        self.quant = quant
        self.kind = f"{quant}-native" if quant else "native"

    def nbytes(self) -> int:
        n = self.out_features * self.in_features
        if self.quant is not None:
            return (n // 2 if self.quant == "int4" else n) + 2 * (n // GROUP)
        return n * self.native.dtype.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native.linear(x, self.native, self.out_features, self.native_format)
        return y if self.bias is None else y + self.bias


class BlockedProj(Proj):
    """The blocked form (plain or int8) of the compiled decode step: inside it, a one-token product is one fused
    pass; outside (prefill), the weight is unblocked into a scratch buffer and multiplied there."""

    def __init__(self, blocked: torch.Tensor, blocked_scales: torch.Tensor | None, scales: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        nb, inn, _ = blocked.shape
        super().__init__(nb * BLOCK, inn, bias)
        self.blocked = blocked  # [out / BLOCK, in, BLOCK]
        self.blocked_scales = blocked_scales  # int8: float32 [out / BLOCK, in / 32, BLOCK]
        self.scales = scales  # int8: the plain [out, in / 32] scales, for prefill
        self.quant = None if scales is None else "int8"
        self.kind = "int8-blocked" if scales is not None else "blocked"

    def nbytes(self) -> int:
        n = self.out_features * self.in_features
        return n + 2 * (n // GROUP) if self.quant else n * self.blocked.dtype.itemsize

    def one_token(self, x: torch.Tensor) -> torch.Tensor:
        """The product for one token, in the fused form inductor compiles."""
        if self.blocked_scales is None:
            y = (self.blocked.float() * x.reshape(1, -1, 1).float()).sum(1).reshape(-1)
        else:  # int8: each group's sums times its scale, then the groups added up
            nb, groups = self.blocked.shape[0], self.in_features // GROUP
            part = (self.blocked.view(nb, groups, GROUP, BLOCK).float()
                    * x.reshape(1, groups, GROUP, 1).float()).sum(2)
            y = (part * self.blocked_scales).sum(1).reshape(-1)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.numel() == self.in_features:
            return self.one_token(x)
        y = torch.matmul(x, self._unblocked_t(x.dtype))
        return y if self.bias is None else y + self.bias

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


class BlockedHead(BlockedProj):
    """The LM head in the blocked form: its one-position product outside the compiled step (the last prompt
    position, after prefill) is compiled too; eagerly the whole head would first be copied to the plain layout."""

    def __init__(self, head: BlockedProj) -> None:
        super().__init__(head.blocked, head.blocked_scales, head.scales, head.bias)
        self.keep_precision = head.keep_precision
        self._one_token = torch.compile(self.one_token, fullgraph=True, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and not torch.compiler.is_compiling():
            return self._one_token(x)
        return super().forward(x)
