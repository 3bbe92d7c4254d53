"""What is on disk in a checkpoint directory, read without torch: weight files, safetensors headers,
the tensors a config requires, and a check that they agree. Used by loading, `info` and `pull`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from lfm2cli.config import Lfm2Config
from lfm2cli.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: BF16, F32, ...
    shape: tuple[int, ...]
    file: Path
    start: int  # byte offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded (hub layout)."""
    root = Path(root)
    if (root / INDEX_FILE).is_file():
        try:
            index = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{root / INDEX_FILE}: not a valid safetensors index") from e
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointError(f"{root}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [root / s for s in shards]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CheckpointError(f"{root}: only pickle weights (.bin/.pt) found; lfm2 loads safetensors only")
    raise CheckpointError(f"{root}: no model.safetensors or {INDEX_FILE} found")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Parse one safetensors header; returns the tensors and the byte offset where data begins.
    Checks that every tensor's bytes lie inside the file, so truncated downloads are caught early."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header") from e
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        info = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path, start, end)
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, tensor {name} needs {data_start + end});"
                " download it again"
            )
        tensors[name] = info
    return tensors, data_start


def read_all_headers(root: Path) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for file in weight_files(root):
        tensors, _ = read_header(file)
        out.update(tensors)
    return out


def expected_tensors(cfg: Lfm2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model needs, with its shape. `lm_head.weight` is listed only when untied."""
    h, hd = cfg.hidden_size, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.embedding_norm.weight": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "operator_norm.weight"] = (h,)
        out[p + "ffn_norm.weight"] = (h,)
        if cfg.is_attention(i):
            a = p + "self_attn."
            out[a + "q_proj.weight"] = (cfg.num_attention_heads * hd, h)
            out[a + "k_proj.weight"] = (cfg.num_key_value_heads * hd, h)
            out[a + "v_proj.weight"] = (cfg.num_key_value_heads * hd, h)
            out[a + "out_proj.weight"] = (h, cfg.num_attention_heads * hd)
            out[a + "q_layernorm.weight"] = (hd,)
            out[a + "k_layernorm.weight"] = (hd,)
        else:
            c = p + "conv."
            out[c + "in_proj.weight"] = (3 * h, h)
            out[c + "out_proj.weight"] = (h, h)
            out[c + "conv.weight"] = (h, 1, cfg.conv_L_cache)
            if cfg.conv_bias:
                out[c + "in_proj.bias"] = (3 * h,)
                out[c + "out_proj.bias"] = (h,)
                out[c + "conv.bias"] = (h,)
        f = p + "feed_forward."
        if cfg.is_moe_layer(i):
            m = cfg.moe_intermediate_size
            out[f + "gate.weight"] = (cfg.num_experts, h)
            if cfg.use_expert_bias:
                out[f + "expert_bias"] = (cfg.num_experts,)
            for e in range(cfg.num_experts):
                out[f"{f}experts.{e}.w1.weight"] = (m, h)
                out[f"{f}experts.{e}.w3.weight"] = (m, h)
                out[f"{f}experts.{e}.w2.weight"] = (h, m)
        else:
            ff = cfg.dense_ff_dim
            out[f + "w1.weight"] = (ff, h)
            out[f + "w3.weight"] = (ff, h)
            out[f + "w2.weight"] = (h, ff)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


def uses_own_head(cfg: Lfm2Config, names: set[str] | dict) -> bool:
    """Untied only when the config says so and the checkpoint really has a head."""
    return not cfg.tie_word_embeddings and "lm_head.weight" in names


def check_tensors(cfg: Lfm2Config, found: dict[str, TensorInfo], where: str) -> None:
    """Raise one CheckpointError listing missing, unexpected and wrongly shaped tensors."""
    want = expected_tensors(cfg)
    if "lm_head.weight" in want and "lm_head.weight" not in found:
        del want["lm_head.weight"]  # untied in name only: fall back to the embedding, as the reference does
    optional = {"lm_head.weight"}
    missing = [n for n in want if n not in found]
    unexpected = [n for n in found if n not in want and n not in optional]
    wrong = [f"{n} {list(found[n].shape)} (expected {list(s)})" for n, s in want.items()
             if n in found and tuple(found[n].shape) != s]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match its config.json; " + "; ".join(problems))


def parameter_counts(cfg: Lfm2Config) -> tuple[int, int]:
    """(total, active per token) parameter counts; the embedding counts once even when tied. `expert_bias` is
    a buffer, not a parameter (as transformers registers it), so it does not count."""
    total = active = 0
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("expert_bias"):
            continue
        n = 1
        for s in shape:
            n *= s
        total += n
        if ".experts." in name:
            active += n * cfg.num_experts_per_tok // cfg.num_experts
        else:
            active += n
    return total, active


GROUP = 32  # inputs per int8 / int4 scale (lfm2cli.quantize)


def _quantized_bytes(rows: int, cols: int, quantize: str | None, dtype_bytes: int) -> int:
    """Bytes of one [rows, cols] projection weight in memory: int8 is a byte per weight, int4 half a byte, plus a
    bf16 scale per 32 inputs each (the model's precision where the width is not a multiple of 32)."""
    n = rows * cols
    if quantize not in ("int8", "int4") or cols % GROUP:
        return n * dtype_bytes
    return (n // 2 if quantize == "int4" else n) + (n // GROUP) * 2


def weight_bytes(cfg: Lfm2Config, quantize: str | None = None, dtype_bytes: int = 2) -> int:
    """Bytes the loaded model's weights take, as lfm2 holds them: projections in `quantize`'s form, the router and
    the norms in the model dtype, the embedding table in the model dtype (it is looked up, one row a token), and
    the LM head as its own copy (for a tied head too) in int8 when the projections are int4: the head decides
    every token, and llama.cpp keeps it at 6-8 bits in its 4-bit files as well."""
    total = 0
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("expert_bias"):
            total += shape[0] * 4
        elif name == "model.embed_tokens.weight":
            total += shape[0] * shape[1] * dtype_bytes
        elif name == "lm_head.weight":
            continue
        elif len(shape) == 2 and not name.endswith("feed_forward.gate.weight"):
            total += _quantized_bytes(shape[0], shape[1], quantize, dtype_bytes)
        else:
            n = 1
            for s in shape:
                n *= s
            total += n * dtype_bytes
    head = "int8" if quantize == "int4" else quantize
    return total + _quantized_bytes(cfg.vocab_size, cfg.hidden_size, head, dtype_bytes)


RUNTIME_BYTES = 600_000_000  # torch, the tokenizer, buffers and the largest tensor while it is converted
CONTEXT_TOKENS = 4096  # the KV cache counted in `memory_needed` (a long chat; the cache grows as it goes)


def memory_needed(cfg: Lfm2Config, quantize: str | None = None, dtype_bytes: int = 2) -> int:
    """What running the model takes, about: its weights (`weight_bytes`), a KV cache of CONTEXT_TOKENS and the
    runtime. The memory guard refuses loads above what is available, and `lfm2 info` shows it per precision."""
    kv = len(cfg.attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes * CONTEXT_TOKENS
    return weight_bytes(cfg, quantize, dtype_bytes) + kv + RUNTIME_BYTES
