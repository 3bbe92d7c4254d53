"""The building blocks both LFM2 architectures share, in plain torch. Attribute names equal checkpoint tensor names
(`conv.in_proj`, `self_attn.q_layernorm`, `feed_forward.w1`, ...) so loading needs no mapping table. Fast paths
live in `lfm2cli.kernels`, which swaps modules after loading; nothing here knows of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lfm2cli.model.cache import HybridCache
from lfm2cli.model.config import Lfm2Config


class Linear(nn.Linear):
    """nn.Linear without torch's random init: weights always come from a checkpoint (or `random_model`), and on
    the meta device that init costs ~1 ms per layer of pure Python."""

    def reset_parameters(self) -> None:
        pass


class Conv1d(nn.Conv1d):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))  # always loaded; ones() on the meta device is slow
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 and scale in the model dtype, as the reference does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, start: int, length: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions start..start+length-1, shape [length, head_dim]."""
    pos = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [B, heads, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token over the whole cache, q [1, H, 1, D], k/v [1, KV, L, D].
    Plain matmuls, softmax in float32: several times faster than SDPA's kernel for a single query."""
    b, h, _, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv, d)  # the query heads that share each KV head, as rows
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (d ** -0.5)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, 1, d)


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k, then RoPE."""

    FUSED = ("q_proj", "k_proj", "v_proj")  # read into one buffer by the loader (kernels fuse them into one matrix)

    def __init__(self, cfg: Lfm2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.out_proj = Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        """Causal attention of the t new positions (after `past` cached ones) over k/v [B, KV, past + t, D]."""
        t = q.shape[2]
        if t == 1 or past == 0:
            # one new token sees everything; a fresh prompt is plainly causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=self.n_kv != self.n_heads)
        # a continuation: new token i may see the cached prefix and new tokens up to i
        mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: HybridCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q = self.q_layernorm(q.view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(k.view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.append_kv(self.layer, k, v)
        out = self.attend(q, k, v, past)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class ShortConv(nn.Module):
    """Gated short convolution: in_proj to B, C, x; B*x; depthwise causal conv; C*that; out_proj."""

    def __init__(self, cfg: Lfm2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        h, k = cfg.hidden_size, cfg.conv_L_cache
        self.conv = Conv1d(h, h, kernel_size=k, groups=h, bias=cfg.conv_bias, padding=k - 1)
        self.in_proj = Linear(h, 3 * h, bias=cfg.conv_bias)
        self.out_proj = Linear(h, h, bias=cfg.conv_bias)

    def causal_conv(self, seq: torch.Tensor) -> torch.Tensor:
        """The depthwise conv over [b, h, k-1+t] (the k-1 earlier inputs first) -> [b, h, t]."""
        weight = self.conv.weight  # [h, 1, k]
        if seq.shape[-1] == weight.shape[-1]:
            # decode: the conv is one dot product per channel, no conv1d dispatch
            y = (seq * weight[:, 0, :]).sum(-1, keepdim=True)
            return y if self.conv.bias is None else y + self.conv.bias[:, None]
        return F.conv1d(seq, weight, self.conv.bias, groups=seq.shape[1])

    def forward(self, x: torch.Tensor, cache: HybridCache | None) -> torch.Tensor:
        b, t, h = x.shape
        B, C, xx = self.in_proj(x).chunk(3, dim=-1)
        bx = (B * xx).transpose(1, 2)  # [b, h, t]
        weight = self.conv.weight  # [h, 1, k]
        width = weight.shape[-1]
        if cache is None:
            state = bx.new_zeros(b, h, width - 1)
        else:
            state = cache.conv_state(self.layer)
        seq = torch.cat((state, bx), dim=-1)  # [b, h, k-1+t]
        y = self.causal_conv(seq)
        if cache is not None:
            cache.set_conv_state(self.layer, seq[..., -(width - 1):])
        out = C * y.transpose(1, 2)
        return self.out_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    FUSED = ("w1", "w3")

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.w1 = Linear(hidden, width, bias=False)
        self.w3 = Linear(hidden, width, bias=False)
        self.w2 = Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: operator (conv or attention), then feed-forward (dense or MoE)."""

    def __init__(self, cfg: Lfm2Config, layer: int, feed_forward: nn.Module) -> None:
        super().__init__()
        self.is_attention = cfg.is_attention(layer)
        if self.is_attention:
            self.self_attn = Attention(cfg, layer)
        else:
            self.conv = ShortConv(cfg, layer)
        self.feed_forward = feed_forward
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: HybridCache | None) -> torch.Tensor:
        h = self.operator_norm(x)
        h = self.self_attn(h, rope, cache) if self.is_attention else self.conv(h, cache)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x))
