"""Read a Hugging Face `config.json` (model_type lfm2 or lfm2_moe) into one frozen dataclass.

Real checkpoints spell the same facts several ways (`layer_types` vs `full_attn_idxs`, `rope_theta` vs
`rope_parameters`, `block_ff_dim` vs `intermediate_size`, ...); everything is normalised here so the
model code reads one name for each fact. Pure Python: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm2cli.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("lfm2", "lfm2_moe")


@dataclass(frozen=True)
class Lfm2Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # "conv" or "full_attention" per layer
    intermediate_size: int  # the config's nominal FFN width; dense layers use dense_ff_dim
    dense_ff_dim: int  # the width of w1/w3 in dense feed-forward layers
    max_position_embeddings: int = 128_000
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    conv_bias: bool = False
    conv_L_cache: int = 3
    tie_word_embeddings: bool = True
    # LFM2-MoE only (zero / defaults for dense models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_dense_layers: int = 0
    use_expert_bias: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # tokens
    bos_token_id: int | None = 1
    pad_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (7,)
    torch_dtype: str | None = None  # dtype the checkpoint says it was saved in

    @property
    def is_moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    @property
    def architecture(self) -> str:
        return "LFM2-MoE" if self.is_moe else "LFM2"

    def is_attention(self, layer: int) -> bool:
        return self.layer_types[layer] != "conv"

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.num_dense_layers

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_attention(i)]


def _dense_ff_dim(raw: dict[str, Any], intermediate_size: int) -> int:
    """LFM2 dense checkpoints store a nominal width that the model shrinks to 2/3, scales and rounds."""
    if not raw.get("block_auto_adjust_ff_dim", True):
        return intermediate_size
    width = int(2 * intermediate_size / 3)
    multiplier = raw.get("block_ffn_dim_multiplier", 1.0)
    if multiplier is not None:
        multiple_of = int(raw.get("block_multiple_of", 256))
        width = int(multiplier * width)
        width = multiple_of * ((width + multiple_of - 1) // multiple_of)
    return width


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_config(raw: dict[str, Any], source: str = "config.json",
                 generation_config: dict[str, Any] | None = None) -> Lfm2Config:
    """Normalise a config dict; `source` names the file in error messages."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; lfm2 runs LFM2 ('lfm2') and "
            f"LFM2-MoE ('lfm2_moe') checkpoints"
        )

    def need(key: str, *alternatives: str) -> Any:
        for k in (key, *alternatives):
            if raw.get(k) is not None:
                return raw[k]
        raise ConfigError(f"{source}: required key '{key}' is missing")

    hidden = int(need("hidden_size"))
    layers = int(need("num_hidden_layers"))
    heads = int(need("num_attention_heads", "num_heads"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if raw.get("layer_types") is not None:
        layer_types = tuple(str(t) for t in raw["layer_types"])
    elif raw.get("full_attn_idxs") is not None:
        idxs = set(raw["full_attn_idxs"])
        layer_types = tuple("full_attention" if i in idxs else "conv" for i in range(layers))
    elif model_type == "lfm2":
        layer_types = ("full_attention",) * layers  # what the reference does with neither key
    else:
        raise ConfigError(f"{source}: required key 'layer_types' is missing")
    if len(layer_types) != layers:
        raise ConfigError(f"{source}: 'layer_types' has {len(layer_types)} entries for {layers} layers")
    unknown = sorted(set(layer_types) - {"conv", "full_attention"})
    if unknown:
        raise ConfigError(f"{source}: unknown layer type(s) {', '.join(unknown)} in 'layer_types'")

    rope = raw.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0)))
    rope_type = rope.get("rope_type", (raw.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")

    # block_ff_dim wins over intermediate_size, as in the reference implementation
    inter = int(need("block_ff_dim", "intermediate_size"))
    tie = raw.get("tie_embedding", raw.get("tie_word_embeddings", True))

    moe: dict[str, Any] = {}
    if model_type == "lfm2_moe":
        moe = dict(
            num_experts=int(need("num_experts")),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_dense_layers=int(raw.get("num_dense_layers", 2)),
            use_expert_bias=bool(raw.get("use_expert_bias", True)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0) or 1.0),
        )
        if moe["num_experts_per_tok"] > moe["num_experts"]:
            raise ConfigError(f"{source}: num_experts_per_tok exceeds num_experts")
    dense_ff = inter if model_type == "lfm2_moe" else _dense_ff_dim(raw, inter)

    eos = _eos_ids(raw.get("eos_token_id"))
    if generation_config and generation_config.get("eos_token_id") is not None:
        eos = _eos_ids(generation_config["eos_token_id"])
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads")
    return Lfm2Config(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(raw.get("head_dim") or hidden // heads),
        layer_types=layer_types,
        intermediate_size=inter,
        dense_ff_dim=dense_ff,
        max_position_embeddings=int(raw.get("max_position_embeddings", 128_000)),
        norm_eps=float(raw.get("norm_eps", raw.get("block_norm_eps", 1e-5))),
        rope_theta=rope_theta,
        conv_bias=bool(raw.get("conv_bias", False)),
        conv_L_cache=int(raw.get("conv_L_cache", 3)),
        tie_word_embeddings=bool(tie),
        bos_token_id=raw.get("bos_token_id", 1),
        pad_token_id=raw.get("pad_token_id", 0),
        eos_token_ids=eos,
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        **moe,
    )


def read_json_object(path: Path) -> dict[str, Any]:
    """One JSON object from a checkpoint's file (config, tokenizer config, ...), or ConfigError saying why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_config(path: str | Path) -> Lfm2Config:
    """Read `config.json` (and `generation_config.json` when present) from a checkpoint directory."""
    root = Path(path)
    cfg_path = root / "config.json" if root.is_dir() else root
    if not cfg_path.is_file():
        raise ConfigError(f"{root}: no config.json here; is this a model checkpoint directory?")
    gen_path = cfg_path.parent / "generation_config.json"
    gen = read_json_object(gen_path) if gen_path.is_file() else None
    return parse_config(read_json_object(cfg_path), source=str(cfg_path), generation_config=gen)
