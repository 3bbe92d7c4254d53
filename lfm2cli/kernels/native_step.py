"""One-token decode through every layer on lfm2's native CPU code (csrc/), for bf16 models on CPU.

In eager torch a decode step of LFM2-350M spends ~10 ms outside its matrix products: ~60 small ops per layer
(norms, RoPE, the conv step, SwiGLU, attention over the cache, residual adds), each paying dispatch and an
allocation. Here each sublayer's small ops are one native call, and the products are the native kernel's
(`Proj` in its native form), so the step costs little more than reading the weights. The numbers are those of
the eager path: every op rounds to bf16 where the torch code does (tests/test_native.py). Models run the
whole step in one native call (`lfm2_decode_step`), routing and the routed experts of MoE layers included;
the per-op loop here (routing in torch) serves models with biased projections. `NativeDecoder.batch` steps
several sequences (each its own cache) in one call that reads each weight once for all of them, a sequence's
numbers the same bits as alone (`lfm2cli.decoding.batch`, `lfm2 serve`'s continuous batching).
Prefill stays in torch, where these costs are shared by every token of the chunk.
"""

from __future__ import annotations

import ctypes

import torch

from lfm2cli.kernels import native
from lfm2cli.kernels.proj import Proj
from lfm2cli.model.cache import HybridCache
from lfm2cli.model.layers import MLP
from lfm2cli.model.moe import SparseMoE


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weights(proj: Proj) -> tuple[int, int]:
    """A native weight's pointer (packed weights, with their scales when quantised) and format
    (native.BF16/INT8/INT4)."""
    return proj.native.data_ptr(), proj.native_format


class NativeDecoder:
    """Callable as `decoder(ids [1, 1], cache) -> float32 logits [1, V]`; advances the cache by one. `batch`
    steps several sequences at once with the same numbers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        layers = model.model.layers
        # the norm that follows each layer's feed-forward: the next layer's operator norm, last the final norm
        self.next_norms = [layer.operator_norm for layer in layers[1:]] + [model.model.embedding_norm]
        biased = any(p.bias is not None for p in model.modules() if isinstance(p, Proj))
        self._keep: list[ctypes.Array] = []  # the experts' pointer arrays the table points into
        self.layers = None if biased else self._layer_table()  # one native call per step

    def _layer_table(self) -> ctypes.Array:
        """The weights' pointers per layer; the caches' are filled in per step (a cache can grow or change)."""
        layers = self.model.model.layers
        table = (native.Layer * len(layers))()
        for entry, layer in zip(table, layers, strict=True):
            op = layer.self_attn if layer.is_attention else layer.conv
            inner = op.qkv_proj if layer.is_attention else op.in_proj
            entry.attention = int(layer.is_attention)
            entry.op_norm, entry.ffn_norm = _ptr(layer.operator_norm.weight), _ptr(layer.ffn_norm.weight)
            entry.in_w, entry.in_f = _weights(inner)
            entry.in_rows = inner.out_features
            entry.out_w, entry.out_f = _weights(op.out_proj)
            ff = layer.feed_forward
            if isinstance(ff, MLP):
                entry.w13, entry.w13_f = _weights(ff.w13)
                entry.w2, entry.w2_f = _weights(ff.w2)
                entry.ff = ff.w2.in_features
            else:
                self._moe_entry(entry, ff)
            if layer.is_attention:
                entry.q_norm, entry.k_norm = _ptr(op.q_layernorm.weight), _ptr(op.k_layernorm.weight)
            else:
                entry.conv_w, entry.conv_b = _ptr(op.conv.weight), _ptr(op.conv.bias)
        return table

    def _moe_entry(self, entry: native.Layer, moe: SparseMoE) -> None:
        """A sparse layer's router, routing settings and per-expert weight pointers."""
        def array(ptrs: list[int | None]) -> int | None:
            if all(p is None for p in ptrs):
                return None
            arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
            self._keep.append(arr)
            return ctypes.addressof(arr)

        entry.experts, entry.top_k = len(moe.experts), moe.top_k
        entry.norm_topk, entry.scaling = int(moe.norm_topk_prob), moe.scaling
        entry.gate, entry.expert_bias = moe.gate.native.data_ptr(), _ptr(moe.expert_bias)
        entry.e_w13 = array([e.w13.native.data_ptr() for e in moe.experts])
        entry.e_w2 = array([e.w2.native.data_ptr() for e in moe.experts])
        entry.e_ff = moe.experts[0].w2.in_features
        # one format per kind of expert weight: the experts share their shapes, so their quantisation
        entry.e_w13_f, entry.e_w2_f = moe.experts[0].w13.native_format, moe.experts[0].w2.native_format
        assert all((e.w13.native_format, e.w2.native_format) == (entry.e_w13_f, entry.e_w2_f) for e in moe.experts)

    def _whole_step(self, ids: torch.Tensor, cache: HybridCache, cos: torch.Tensor, sin: torch.Tensor
                    ) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        for i, entry in enumerate(self.layers):
            if entry.attention:
                k_cache, v_cache = cache.kv_buffers(i)
                entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            else:
                entry.state = cache.conv_state(i).data_ptr()
        x = model.model.embed_tokens(ids).reshape(-1)
        final = model.model.embedding_norm
        h = native.decode_step(self.layers, x, final.weight, cache.pos, cache.capacity, cfg.num_attention_heads,
                               cfg.num_key_value_heads, cfg.head_dim, cfg.conv_L_cache, cos, sin, final.eps)
        cache.advance(1)
        return model.logits(h.view(1, 1, -1))[:, -1]

    def batch(self, tokens: list[int], caches: list[HybridCache]) -> torch.Tensor:
        """One token for each of B sequences, each in its own cache, in one native call that reads each weight
        once for all B: float32 logits [B, V], each row the bits `self(ids, cache)` gives it alone. Each cache
        advances by one. Models with biased projections (no whole step) run the rows one by one."""
        if self.layers is None:
            return torch.cat([self(torch.tensor([[t]]), c) for t, c in zip(tokens, caches, strict=True)])
        model, cfg = self.model, self.model.config
        for cache in caches:
            if cache.pos + 1 > cache.max_len:
                raise ValueError(f"cache holds at most {cache.max_len} positions; {cache.pos + 1} requested")
            cache.reserve(cache.pos + 1)  # before the pointers are read: growing reallocates the KV storage
        pos = torch.tensor([c.pos for c in caches], dtype=torch.int64)
        cap = torch.tensor([c.capacity for c in caches], dtype=torch.int64)
        cos, sin = model.rope(0, int(pos.max()) + 1, model.dtype)
        cos, sin = cos[pos].contiguous(), sin[pos].contiguous()
        ptrs = (ctypes.c_void_p * (2 * len(self.layers) * len(caches)))()
        j = 0
        for cache in caches:
            for i, entry in enumerate(self.layers):
                pair = cache.kv_buffers(i) if entry.attention else (cache.conv_state(i), None)
                ptrs[j], ptrs[j + 1] = _ptr(pair[0]), _ptr(pair[1])
                j += 2
        x = model.model.embed_tokens(torch.tensor(tokens, dtype=torch.long))
        final = model.model.embedding_norm
        h = native.decode_batch(self.layers, x, final.weight, pos, cap, ptrs, cfg.num_attention_heads,
                                cfg.num_key_value_heads, cfg.head_dim, cfg.conv_L_cache, cos, sin, final.eps)
        for cache in caches:
            cache.advance(1)
        return model.logits(h.view(len(caches), 1, -1))[:, -1]

    def __call__(self, ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        model, pos = self.model, cache.pos
        if pos + 1 > cache.max_len:
            raise ValueError(f"cache holds at most {cache.max_len} positions; {pos + 1} requested")
        cache.reserve(pos + 1)
        cos, sin = model.rope(pos, pos + 1, model.dtype)
        if self.layers is not None:
            return self._whole_step(ids, cache, cos, sin)
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
