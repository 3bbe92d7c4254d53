"""The model's layers with their projections as `Proj`s (q/k/v and w1/w3 fused into one matrix each), made from a
loaded layer by taking over its tensors; `lfm2cli.kernels.plan` puts them in place with `setattr`. Each keeps
the attribute names of the checkpoint's tensors it still holds (`conv`, `q_layernorm`, `out_proj`, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm2cli.kernels.proj import PlainProj, Proj
from lfm2cli.model.layers import MLP, Attention, ShortConv, decode_attention


class FastAttention(Attention):
    """Attention with q, k and v in one `Proj` (one weight read per token) and a single query attended with two
    plain matmuls (several times faster than SDPA's kernel for one query)."""

    def __init__(self, attn: Attention) -> None:
        nn.Module.__init__(self)  # not Attention.__init__: it would allocate weights that `attn` already holds
        self.layer, self.n_heads, self.n_kv, self.head_dim = attn.layer, attn.n_heads, attn.n_kv, attn.head_dim
        self.qkv_proj: Proj = PlainProj.fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.out_proj: Proj = PlainProj.from_linear(attn.out_proj)
        self.q_layernorm, self.k_layernorm = attn.q_layernorm, attn.k_layernorm

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        return decode_attention(q, k, v) if q.shape[2] == 1 else super().attend(q, k, v, past)


class FastShortConv(ShortConv):
    """The short convolution with Proj layers, and its prefill conv as k shifted multiply-adds in float32: torch's
    bf16 depthwise conv1d falls back to a per-channel loop on CPUs without oneDNN bf16 support (0.8 s of a
    512-token prefill of LFM2-350M on AVX2); float32 sums, one rounding, as conv1d's own accumulation."""

    def __init__(self, conv: ShortConv) -> None:
        nn.Module.__init__(self)  # not ShortConv.__init__: it would allocate weights that `conv` already holds
        self.layer = conv.layer
        self.conv = conv.conv
        self.in_proj: Proj = PlainProj.from_linear(conv.in_proj)
        self.out_proj: Proj = PlainProj.from_linear(conv.out_proj)

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

    def __init__(self, mlp: MLP) -> None:
        nn.Module.__init__(self)  # not MLP.__init__: it would allocate weights that `mlp` already holds
        self.w13: Proj = PlainProj.fuse([mlp.w1, mlp.w3])
        self.w2: Proj = PlainProj.from_linear(mlp.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


FAST = {Attention: FastAttention, ShortConv: FastShortConv, MLP: FastMLP}  # each plain layer's fast form
