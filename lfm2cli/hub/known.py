"""The shapes of published LFM2 models, as their hub `config.json` files state them, so that `lfm2 bench --random`
can build a model of the right size without downloading anything. Pure Python: no torch."""

from __future__ import annotations

from typing import Any

from lfm2cli.model.config import Lfm2Config, parse_config

# Attention positions of the 16-layer dense models (LFM2-350M, 700M, 1.2B; LFM2.5-1.2B).
_ATTN_16 = (2, 5, 8, 10, 12, 14)
_ATTN_2_6B = (2, 5, 9, 13, 17, 21, 24, 27)
_ATTN_8B_A1B = (2, 6, 10, 14, 18, 21)
_ATTN_230M = (2, 4, 6, 8, 10, 12)
_ATTN_24B_A2B = tuple(range(2, 40, 4))  # UNCERTAIN: 10 of 40 layers is published, their positions are not


def _layer_types(n: int, attention: tuple[int, ...]) -> list[str]:
    return ["full_attention" if i in attention else "conv" for i in range(n)]


def _dense(hidden: int, ff: int, layers: int, heads: int, attention: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "vocab_size": 65536, "hidden_size": hidden,
        "block_dim": hidden, "block_ff_dim": ff, "intermediate_size": ff, "block_auto_adjust_ff_dim": True,
        "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_heads": heads, "num_key_value_heads": 8,
        "layer_types": _layer_types(layers, attention), "conv_L_cache": 3, "conv_bias": False,
        "max_position_embeddings": 128000, "norm_eps": 1e-05, "rope_theta": 1000000.0, "tie_embedding": True,
        "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, "torch_dtype": "bfloat16", **extra,
    }


def _moe(layers: int, attention: tuple[int, ...], *, experts: int, expert_ff: int, **extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "vocab_size": 65536,
        "hidden_size": 2048, "intermediate_size": 7168, "moe_intermediate_size": expert_ff,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
        "layer_types": _layer_types(layers, attention), "num_experts": experts, "num_experts_per_tok": 4,
        "num_dense_layers": 2, "use_expert_bias": True, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "conv_L_cache": 3, "conv_bias": False, "max_position_embeddings": 128000, "norm_eps": 1e-05,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 7,
        "pad_token_id": 0, "torch_dtype": "bfloat16", **extra,
    }


KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "LiquidAI/LFM2-350M": _dense(1024, 6656, 16, 16, _ATTN_16),
    "LiquidAI/LFM2-700M": _dense(1536, 10240, 16, 24, _ATTN_16),
    "LiquidAI/LFM2-1.2B": _dense(2048, 12288, 16, 32, _ATTN_16),
    "LiquidAI/LFM2-2.6B": _dense(2048, 10752, 30, 32, _ATTN_2_6B, block_auto_adjust_ff_dim=False),
    "LiquidAI/LFM2.5-1.2B-Instruct": _dense(2048, 12288, 16, 32, _ATTN_16),
    "LiquidAI/LFM2-8B-A1B": _moe(24, _ATTN_8B_A1B, experts=32, expert_ff=1792),
    # LFM2-24B-A2B: layers, heads, experts, top-k, expert width and dense layers are published (model card, blog,
    # the vLLM/SGLang kernels); the dense width 7168 and the rest are the 8B's, which the published 23.8B total
    # and 2.3B active parameters confirm. UNCERTAIN: which layers attend (see _ATTN_24B_A2B).
    "LiquidAI/LFM2-24B-A2B": _moe(40, _ATTN_24B_A2B, experts=64, expert_ff=1536),
    # LFM2.5-8B-A1B: the 8B-A1B shape with the 128K-entry tokenizer and rope theta 5e6 (read from its
    # checkpoint). UNCERTAIN: the special token ids of the 128K tokenizer (1/7/0 kept here).
    "LiquidAI/LFM2.5-8B-A1B": _moe(24, _ATTN_8B_A1B, experts=32, expert_ff=1792, vocab_size=128000,
                                   rope_theta=5000000.0),
    # LFM2.5-350M: LFM2-350M's shape, retrained.
    "LiquidAI/LFM2.5-350M": _dense(1024, 6656, 16, 16, _ATTN_16),
    # LFM2.5-230M: 14 layers, 6 attending (read from its config); the feed-forward width 2560 is read from
    # checkpoint shapes (and gives the published 230M parameters), the key that stores it is inferred.
    "LiquidAI/LFM2.5-230M": _dense(1024, 2560, 14, 16, _ATTN_230M, block_auto_adjust_ff_dim=False),
    # LFM2.5-2.6B: 30 layers (8 attending, as in LFM2-2.6B), hidden 2048, 128K vocabulary are published.
    # UNCERTAIN: the feed-forward width (LFM2-2.6B's 10752 here), rope theta (5e6 as LFM2.5-8B-A1B), token ids.
    "LiquidAI/LFM2.5-2.6B": _dense(2048, 10752, 30, 32, _ATTN_2_6B, block_auto_adjust_ff_dim=False,
                                   vocab_size=128000, rope_theta=5000000.0),
}
# Variants share their model's shape.
for _variant in ("Base", "Thinking", "JP"):
    KNOWN_CONFIGS[f"LiquidAI/LFM2.5-1.2B-{_variant}"] = KNOWN_CONFIGS["LiquidAI/LFM2.5-1.2B-Instruct"]
for _model in ("LFM2.5-350M", "LFM2.5-230M", "LFM2.5-2.6B", "LFM2.5-8B-A1B"):
    KNOWN_CONFIGS[f"LiquidAI/{_model}-Base"] = KNOWN_CONFIGS[f"LiquidAI/{_model}"]


def known_names() -> list[str]:
    """The aliases `--random` accepts (those of `lfm2cli.hub.names` whose shape is known here), shortest first."""
    from lfm2cli.hub.names import ALIASES

    return sorted((alias for alias, repo in ALIASES.items() if repo in KNOWN_CONFIGS), key=len)


def known_config(name: str) -> Lfm2Config | None:
    """The config of a published model named by alias (`lfm2-350m`) or repo id (`LiquidAI/LFM2-350M`)."""
    from lfm2cli.hub.names import ALIASES

    key = name.strip().lower()
    repo = ALIASES.get(key) or next((r for r in KNOWN_CONFIGS if r.lower() == key), None)
    if repo is None or repo not in KNOWN_CONFIGS:
        return None
    return parse_config(KNOWN_CONFIGS[repo], source=f"known config of {repo}")
