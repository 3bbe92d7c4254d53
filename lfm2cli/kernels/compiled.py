"""The decode step as one graph (`--compile`), for dense LFM2 models: `torch.compile` on CPU, a CUDA graph on GPU.

Batch-1 decode on CPU is bound by reading weights; in eager mode each projection is a oneDNN call on prepacked
weights plus ~25 small ops per layer around it. Compiled, every projection becomes an inductor-generated pass
over the blocked weights (`BlockedProj` in `lfm2cli.kernels.proj`, made at load by the decode plan), and the
norms, RoPE, conv step and residuals fuse around them. Prefill stays eager.

Shapes: the weights are static; the number of cached positions L and the cache capacity are marked dynamic,
so one compilation serves every position and every cache size. The new position's key/value and the conv
states are written into the cache tensors in place by the graph. Compiled code is kept in inductor's on-disk
cache, so only the first run on a machine pays the compile (about 30 s for LFM2-350M on 2 cores).

On CUDA (`CudaGraphDecoder`, not run on a GPU by the tests: they run its arithmetic on CPU) the same step runs
over the whole cache capacity with a mask (static shapes), is captured once as a CUDA graph and replayed per
token; weights stay plain for cuBLAS. Nothing on the CPU path depends on it.
"""

from __future__ import annotations

import torch

from lfm2cli.model.cache import HybridCache
from lfm2cli.model.config import Lfm2Config
from lfm2cli.model.layers import DecoderLayer, apply_rope


def compile_supported(cfg: Lfm2Config) -> str | None:
    """None when the compiled step can run this model, else why not."""
    if cfg.is_moe:
        return "the compiled decode step covers dense models; MoE routing runs eagerly"
    try:
        import torch._inductor  # noqa: F401
    except ImportError:  # pragma: no cover - minimal torch builds
        return "this torch build has no inductor"
    return None


class CompiledDecoder:
    """Callable as `decoder(ids [1, 1], cache) -> float32 logits [1, V]`; advances the cache by one. The model's
    projections are in the blocked form already (the decode plan made them so at load)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._positions = torch.arange(model.config.max_position_embeddings, device=model.device)
        self._fn = torch.compile(self._step, fullgraph=True, dynamic=False)

    def __call__(self, ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        length = cache.pos + 1
        cache.reserve(length + 1)  # capacity > length always: a full buffer would be a special case to compile
        valid = self._positions[:length]  # its length is the (dynamic) number of cached positions
        torch._dynamo.maybe_mark_dynamic(valid, 0)
        ks, vs, convs = cache_tensors(self.model, cache)
        for t in ks + vs:
            torch._dynamo.maybe_mark_dynamic(t, 2)
        self.model.rope(0, length, self.model.dtype)  # grows the table when needed
        cos, sin = self.model._rope  # whole tables: the graph picks the row
        logits = self._fn(ids, valid, cos, sin, ks, vs, convs)
        cache.advance(1)
        return logits

    def _step(self, ids: torch.Tensor, valid: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
              ks: list[torch.Tensor], vs: list[torch.Tensor], convs: list[torch.Tensor]) -> torch.Tensor:
        pos = valid[-1:]  # the new token's position, as a tensor: no host sync, no recompilation
        x = decode_layers(self.model, ids, pos, valid.shape[0], None, cos_table, sin_table, ks, vs, convs)
        return self.model.logits(self.model.model.embedding_norm(x))[:, -1]


class CudaGraphDecoder:
    """Not run on a GPU by the tests. Static-shape decode step captured as a CUDA graph: inputs (token id, position) and
    output live in fixed tensors; the graph is captured again whenever the cache storage is reallocated."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        dev = model.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None
        self.out: torch.Tensor | None = None
        self._key: tuple | None = None

    def prepare(self, ids: torch.Tensor, cache: HybridCache) -> None:
        """Room for the new position, a RoPE table covering the capacity, and the inputs in place."""
        cache.reserve(cache.pos + 2)
        self.model.rope(0, cache.capacity, self.model.dtype)
        self.ids.copy_(ids)
        self.pos.fill_(cache.pos)

    def step(self, cache: HybridCache) -> torch.Tensor:
        """The step on the fixed input tensors, over the whole capacity with a mask (also runs on CPU: tests)."""
        ks, vs, convs = cache_tensors(self.model, cache)
        cos, sin = self.model._rope
        mask = torch.arange(ks[0].shape[2] if ks else 1, device=self.pos.device) <= self.pos
        x = decode_layers(self.model, self.ids, self.pos, None, mask, cos, sin, ks, vs, convs)
        return self.model.logits(self.model.model.embedding_norm(x))[:, -1]

    def _capture(self, cache: HybridCache) -> None:
        convs = cache_tensors(self.model, cache)[2]
        saved = [c.clone() for c in convs]  # warm-up runs really execute: keep the conv states
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(cache)
        torch.cuda.current_stream().wait_stream(side)
        for c, s in zip(convs, saved, strict=True):
            c.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.step(cache)

    def __call__(self, ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        self.prepare(ids, cache)
        ks = cache_tensors(self.model, cache)[0]
        key = (id(cache), cache.capacity, ks[0].data_ptr() if ks else 0, self.model._rope[0].data_ptr())
        if key != self._key:
            self._capture(cache)
            self._key = key
        self.graph.replay()
        cache.advance(1)
        return self.out.clone()


def cache_tensors(model: torch.nn.Module, cache: HybridCache
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Whole key and value buffers per attention layer and conv states per conv layer, in layer order."""
    cfg = model.config
    ks, vs, convs = [], [], []
    for i in range(cfg.num_hidden_layers):
        if cfg.is_attention(i):
            k, v = cache.kv_buffers(i)
            ks.append(k)
            vs.append(v)
        else:
            convs.append(cache.conv_state(i))
    return ks, vs, convs


def decode_layers(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, length: int | None,
                  mask: torch.Tensor | None, cos_table: torch.Tensor, sin_table: torch.Tensor,
                  ks: list[torch.Tensor], vs: list[torch.Tensor], convs: list[torch.Tensor]) -> torch.Tensor:
    """One token through every layer, writing the caches in place. Attention reads the first `length` cached
    positions, or (`mask`) the whole capacity with positions after `pos` masked out."""
    cos, sin = cos_table.index_select(0, pos), sin_table.index_select(0, pos)
    x = model.model.embed_tokens(ids)  # [1, 1, h]
    ki = ci = 0
    for layer in model.model.layers:
        h = layer.operator_norm(x)
        if layer.is_attention:
            h = _attention(layer, h, cos, sin, ks[ki], vs[ki], pos, length, mask)
            ki += 1
        else:
            h = _conv(layer, h, convs[ci])
            ci += 1
        x = x + h
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return x


def _attention(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
               v_buf: torch.Tensor, pos: torch.Tensor, length: int | None, mask: torch.Tensor | None
               ) -> torch.Tensor:
    a = layer.self_attn
    q, k, v = a.project(x)
    q = a.q_layernorm(q.view(1, 1, a.n_heads, a.head_dim)).transpose(1, 2)
    k = a.k_layernorm(k.view(1, 1, a.n_kv, a.head_dim)).transpose(1, 2)
    v = v.view(1, 1, a.n_kv, a.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_buf.index_copy_(2, pos, k)
    v_buf.index_copy_(2, pos, v)
    keys, values = (k_buf, v_buf) if length is None else (k_buf[:, :, :length], v_buf[:, :, :length])
    qg = q.reshape(1, a.n_kv, a.n_heads // a.n_kv, a.head_dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * (a.head_dim ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
    return a.out_proj(out.reshape(1, 1, -1))


def _conv(layer: DecoderLayer, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    c = layer.conv
    b_gate, c_gate, xx = c.in_proj(x).chunk(3, dim=-1)
    bx = (b_gate * xx).transpose(1, 2)  # [1, h, 1]
    seq = torch.cat((state, bx), dim=-1)
    y = (seq * c.conv.weight[:, 0, :]).sum(-1, keepdim=True)
    if c.conv.bias is not None:
        y = y + c.conv.bias[:, None]
    state.copy_(seq[..., 1:])
    return c.out_proj(c_gate * y.transpose(1, 2))
