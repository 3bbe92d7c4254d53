#!/usr/bin/env python3
"""Write an LFM2 / LFM2-MoE Hugging Face checkpoint as GGUF, without a vocabulary, for side-by-side speed runs
against llama.cpp (speed does not depend on the values, so random weights do). Runs in the venv `setup` makes.

    hf2gguf.py HF_DIR OUT.gguf [bf16|f32|q8_0|q4_0]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import torch
from safetensors import safe_open

FILE_TYPES = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f32": gguf.LlamaFileType.ALL_F32,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
QUANT_TYPES = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
               "q4_0": gguf.GGMLQuantizationType.Q4_0}


def write_config(w: gguf.GGUFWriter, cfg: dict, kind: str, moe: bool, tensors: dict) -> None:
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["full_attention" if i in cfg["full_attn_idxs"] else "conv" for i in range(n)]
    w.add_block_count(n)
    w.add_context_length(cfg.get("max_position_embeddings", 128000))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv([cfg["num_key_value_heads"] if t != "conv" else 0 for t in types])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))))
    w.add_layer_norm_rms_eps(cfg.get("norm_eps", 1e-5))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_shortconv_l_cache(cfg.get("conv_L_cache", 3))
    w.add_tokenizer_model("none")
    w.add_file_type(FILE_TYPES[kind])
    if not moe:
        w.add_feed_forward_length(tensors["model.layers.0.feed_forward.w1.weight"].shape[0])
        return
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_leading_dense_block_count(cfg["num_dense_layers"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_weights_norm(cfg.get("norm_topk_prob", True))
    w.add_expert_weights_scale(cfg.get("routed_scaling_factor", 1.0))


def read_tensors(src: Path, cfg: dict, moe: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint; an MoE layer's experts stacked into one tensor per projection, as GGUF
    keeps them."""
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    if moe:
        for b in range(cfg["num_dense_layers"], cfg["num_hidden_layers"]):
            for wn in ("w1", "w2", "w3"):
                parts = [tensors.pop(f"model.layers.{b}.feed_forward.experts.{e}.{wn}.weight")
                         for e in range(cfg["num_experts"])]
                tensors[f"layers.{b}.feed_forward.experts.{wn}.weight"] = torch.stack(parts)
    return tensors


def write_tensors(w: gguf.GGUFWriter, tensors: dict, arch: gguf.MODEL_ARCH, n: int, kind: str) -> None:
    names = gguf.get_tensor_name_map(arch, n)
    for k, t in tensors.items():
        key = k.replace(".expert_bias", ".expert_bias.bias") if k.endswith(".expert_bias") else k
        if "conv.conv" in key:
            t = t.squeeze(1)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SystemExit(f"no GGUF name for {k}")
        values = t.float().numpy()
        # norms, biases, the conv kernel and the router stay float32, as llama.cpp's own converter keeps them
        small = t.ndim == 1 or "conv.conv" in key or "expert_bias" in key or "gate.weight" in key
        if kind == "f32" or small:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, QUANT_TYPES[kind]), raw_dtype=QUANT_TYPES[kind])


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    src, out = Path(sys.argv[1]), sys.argv[2]
    kind = sys.argv[3] if len(sys.argv) > 3 else "bf16"
    if kind not in FILE_TYPES:
        raise SystemExit(f"unknown kind {kind!r}: bf16, f32, q8_0 or q4_0")
    cfg = json.loads((src / "config.json").read_text())
    moe = cfg["model_type"] == "lfm2_moe"
    arch = gguf.MODEL_ARCH.LFM2MOE if moe else gguf.MODEL_ARCH.LFM2
    tensors = read_tensors(src, cfg, moe)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    write_config(w, cfg, kind, moe, tensors)
    write_tensors(w, tensors, arch, cfg["num_hidden_layers"], kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", out)


if __name__ == "__main__":
    main()
