"""LFM2-MoE's sparse feed-forward: a sigmoid router picks top-k experts, each a SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from lfm2cli.model.config import Lfm2Config
from lfm2cli.model.layers import MLP, Linear


class SparseMoE(nn.Module):
    def __init__(self, cfg: Lfm2Config) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        # expert_bias only chooses experts; kept in float32 whatever the model dtype
        bias = torch.zeros(cfg.num_experts, dtype=torch.float32) if cfg.use_expert_bias else None
        self.register_buffer("expert_bias", bias)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixing weights [N, k] and expert ids [N, k] for tokens x [N, hidden]."""
        scores = self.gate(x).sigmoid()
        if self.expert_bias is not None:
            ids = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
            weights = scores.gather(1, ids)
        else:
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return weights * self.scaling, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.route(flat)
        if flat.shape[0] == 1:
            # decode: touch only the k routed experts' weights (one host sync for k small ints)
            out = torch.zeros_like(flat)
            for slot, e in enumerate(ids[0].tolist()):
                out += self.experts[e](flat) * weights[:, slot:slot + 1]
            return out.view(shape)
        # prefill: group tokens by expert so each expert runs one matmul over its tokens
        out = torch.zeros_like(flat)
        order = ids.flatten().argsort(stable=True)
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
        token_of = order // self.top_k
        w_sorted = weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = token_of[start:start + n]
            y = self.experts[e](flat[tok]) * w_sorted[start:start + n, None].to(flat.dtype)
            out.index_add_(0, tok, y)
            start += n
        return out.view(shape)
