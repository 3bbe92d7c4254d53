"""One-token decode through every layer on lfm2's native CPU code (native.c), for bf16 models on CPU.

In eager torch a decode step of LFM2-350M spends ~10 ms outside its matrix products: ~60 small ops per layer
(norms, RoPE, the conv step, SwiGLU, attention over the cache, residual adds), each paying dispatch and an
allocation. Here each sublayer's small ops are one native call, and the products are the native kernel's
(`Proj` in its native form), so the step costs little more than reading the weights. The numbers are those of
the eager path: every op rounds to bf16 where the torch code does (tests/test_native.py). Prefill stays in
torch, where these costs are shared by every token of the chunk.
"""

from __future__ import annotations

import torch

from lfm2cli.model import native
from lfm2cli.model.cache import HybridCache
from lfm2cli.model.layers import MLP


class NativeDecoder:
    """Callable as `decoder(ids [1, 1], cache) -> float32 logits [1, V]`; advances the cache by one."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        layers = model.model.layers
        # the norm that follows each layer's feed-forward: the next layer's operator norm, last the final norm
        self.next_norms = [layer.operator_norm for layer in layers[1:]] + [model.model.embedding_norm]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model.model.embedding_norm(x))

    def __call__(self, ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        model, pos = self.model, cache.pos
        if pos + 1 > cache.max_len:
            raise ValueError(f"cache holds at most {cache.max_len} positions; {pos + 1} requested")
        cache.reserve(pos + 1)
        cos, sin = model.rope(pos, pos + 1, model.dtype)
        layers = model.model.layers
        x = model.model.embed_tokens(ids).reshape(-1)  # the residual stream, updated in place below
        first = layers[0].operator_norm
        h = native.add_rmsnorm(x, None, first.weight, first.eps)
        for i, layer in enumerate(layers):
            if layer.is_attention:
                a = layer.self_attn
                k_cache, v_cache = cache.kv_buffers(i)
                y = native.attention_step(a.qkv_proj(h), a.q_layernorm.weight, a.k_layernorm.weight, cos, sin,
                                          k_cache, v_cache, pos, a.n_heads, a.q_layernorm.eps)
                y = a.out_proj(y)
            else:
                c = layer.conv
                y = c.out_proj(native.conv_step(c.in_proj(h), cache.conv_state(i), c.conv.weight, c.conv.bias))
            h = native.add_rmsnorm(x, y, layer.ffn_norm.weight, layer.ffn_norm.eps)
            ff = layer.feed_forward
            if isinstance(ff, MLP):
                y = ff.w2(native.silu_mul(ff.w13(h)))
            else:  # MoE: routing stays in torch; its experts' products are native
                y = ff(h.view(1, 1, -1)).reshape(-1)
            norm = self.next_norms[i]
            h = native.add_rmsnorm(x, y, norm.weight, norm.eps)
        cache.advance(1)
        return model.logits(h.view(1, 1, -1))[:, -1]
