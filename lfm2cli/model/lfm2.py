"""The LFM2 causal LM, dense or MoE: embeddings, decoder layers, final norm, LM head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lfm2cli.model.cache import HybridCache
from lfm2cli.model.config import Lfm2Config
from lfm2cli.model.layers import MLP, DecoderLayer, Linear, RMSNorm, rope_cos_sin
from lfm2cli.model.moe import SparseMoE

ROPE_TABLE_MIN = 4096  # positions whose cos/sin are computed up front; the table doubles when needed


class Lfm2Backbone(nn.Module):
    """`model.*` in the checkpoint."""

    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        # an explicit (uninitialised) weight skips nn.Embedding's random init: on the meta device that init
        # imports torch._dynamo, 1.7 s of cold start
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, SparseMoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.dense_ff_dim))
            for i in range(cfg.num_hidden_layers)
        )
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Lfm2ForCausalLM(nn.Module):
    def __init__(self, cfg: Lfm2Config, own_head: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.model = Lfm2Backbone(cfg)
        # tied unless the checkpoint really carries its own head
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if own_head else None
        self.tied = not own_head
        self.inv_freq: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin per position, model dtype
        # a faster one-token decode step, (ids [1, 1], cache) -> float32 logits [1, V] advancing the cache, and
        # the plan it belongs to: attached at load by lfm2cli.kernels.plan (None: every step runs `forward`)
        self.decode_step: Callable[[torch.Tensor, HybridCache], torch.Tensor] | None = None
        self.decode_plan: object | None = None

    def setup_runtime(self, device: torch.device) -> None:
        """Create the tensors that are not in the checkpoint (RoPE frequencies) on the target device."""
        d = self.config.head_dim
        self.inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                                       device=device) / d))
        self._rope = None

    def rope(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions start..start+length-1, sliced from a table computed once (not per token)."""
        end = start + length
        if self._rope is None or self._rope[0].shape[0] < end or self._rope[0].dtype != dtype:
            size = max(ROPE_TABLE_MIN, 1 << (end - 1).bit_length())
            self._rope = rope_cos_sin(self.inv_freq, 0, size, dtype)
        cos, sin = self._rope
        return cos[start:end], sin[start:end]

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of final-normed hidden states; a tied head reads the embedding table."""
        if self.lm_head is not None:
            return self.lm_head(x).float()
        return torch.nn.functional.linear(x, self.model.embed_tokens.weight).float()

    def new_cache(self, capacity: int = 256, max_len: int | None = None) -> HybridCache:
        cfg = self.config
        conv = [i for i in range(cfg.num_hidden_layers) if not cfg.is_attention(i)]
        return HybridCache(conv, cfg.attention_layers, cfg.hidden_size, cfg.conv_L_cache,
                           cfg.num_key_value_heads, cfg.head_dim, max_len or cfg.max_position_embeddings,
                           self.device, self.dtype, capacity)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """input_ids [1, T] -> float32 logits for the last position [1, V] (or [1, T, V] with all_logits).
        With a cache, positions continue from `cache.pos` and the cache advances by T; a one-token step with a
        cache runs the attached `decode_step` when there is one."""
        if self.inv_freq is None:
            self.setup_runtime(self.device)
        if self.decode_step is not None and cache is not None and input_ids.shape[1] == 1 and not all_logits:
            return self.decode_step(input_ids, cache)
        t = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        x = self.model.embed_tokens(input_ids)
        rope = self.rope(start, t, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, cache)
        if cache is not None:
            cache.advance(t)
        if not all_logits:
            x = x[:, -1:]
        x = self.model.embedding_norm(x)
        logits = self.logits(x)
        return logits if all_logits else logits[:, -1]
