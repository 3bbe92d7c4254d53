"""Builders for tiny random checkpoints, written by the reference implementation's `save_pretrained`
so our loader reads exactly what the hub format holds. Imported by conftest and by tests directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DENSE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "full_attention"],
    block_multiple_of=32, max_position_embeddings=2048, eos_token_id=7, bos_token_id=1, pad_token_id=0,
)
MOE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
    num_dense_layers=1, layer_types=["conv", "full_attention", "conv", "conv"],
    max_position_embeddings=2048, eos_token_id=7, bos_token_id=1, pad_token_id=0,
)


def _randomise(model: Any, seed: int) -> None:
    """The reference initialises norms to one and biases to zero; random values test far more."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("bias"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))


def make_checkpoint(path: Path, moe: bool = False, seed: int = 0, dtype: str = "float32",
                    max_shard_size: str | None = None, **overrides: Any) -> Path:
    """Write a random LFM2 (or LFM2-MoE) checkpoint to `path` and return `path`."""
    import torch
    from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM

    kwargs = {**(MOE if moe else DENSE), **overrides}
    torch.manual_seed(seed)
    cfg = (Lfm2MoeConfig if moe else Lfm2Config)(**kwargs)
    model = (Lfm2MoeForCausalLM if moe else Lfm2ForCausalLM)(cfg).eval()
    _randomise(model, seed)
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **extra)
    return path


def reference_model(path: Path, dtype: str = "float32") -> Any:
    """The `transformers` model for a checkpoint directory: our oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.eval()


def edit_config(path: Path, **changes: Any) -> None:
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg, indent=2))
