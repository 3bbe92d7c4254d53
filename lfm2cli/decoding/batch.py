"""One decode step for several sequences at once (`lfm2 serve`'s continuous batching): each sequence has its own
cache and feeds one token. With the native whole step the batch runs as one native call that reads each weight
once for all of them (`NativeDecoder.batch`); a sequence's logits are the same bits as when it is decoded alone,
so batching never changes what a request generates. Every other form of the model (torch, compiled, CUDA,
LFM2_NATIVE=0) steps the sequences one after another, which is exact by definition."""

from __future__ import annotations

import torch

from lfm2cli.kernels.native_step import NativeDecoder
from lfm2cli.model.cache import HybridCache
from lfm2cli.model.lfm2 import Lfm2ForCausalLM


@torch.inference_mode()
def decode_batch(model: Lfm2ForCausalLM, tokens: list[int], caches: list[HybridCache]) -> torch.Tensor:
    """float32 logits [B, V] for token tokens[i] fed to caches[i], each cache advanced by one position: what B
    calls `model(torch.tensor([[t]]), cache)` return, stacked, to the last bit."""
    if len(tokens) != len(caches):
        raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("a cache appears twice in one batch")
    if not caches:
        return torch.empty(0, model.config.vocab_size, dtype=torch.float32, device=model.device)
    step = model.decode_step
    if len(caches) > 1 and isinstance(step, NativeDecoder):
        return step.batch([int(t) for t in tokens], caches)
    return torch.cat([model(torch.tensor([[int(t)]], device=model.device), c)
                      for t, c in zip(tokens, caches, strict=True)])
