"""Describe a checkpoint directory without loading its weights: config, safetensors headers, tokenizer
files and memory estimates. Pure Python (no torch), so `lfm2 info` is instant even for the biggest models.

`describe()` returns a JSON-ready dict; `sections()` and `plain_lines()` turn it into human rows that
the command prints as a rich table (terminal) or `key: value` lines (pipes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm2cli.errors import CheckpointError
from lfm2cli.loading.checkpoint import TensorInfo, inspect_checkpoint, parameter_counts, undecodable_ids
from lfm2cli.loading.fit import memory_needed
from lfm2cli.model.config import Lfm2Config, read_json_object
from lfm2cli.terminal.formatting import human_bytes, human_count
from lfm2cli.text.tokenizer import token_text

BF16_BYTES = 2
KV_TOKENS = 1000  # the KV-cache estimate is quoted per this many tokens
MAX_SHARD_ROWS = 6  # more shards than this are summarised in one row
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # earlier files win


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """Tokenizer side files are optional for `info`: a broken one is reported, not fatal."""
    if not path.is_file():
        return None
    try:
        return read_json_object(path)
    except CheckpointError as e:
        problems.append(f"{path.name}: {str(e).removeprefix(str(path) + ': ')}")
        return None


def _tokens(root: Path, cfg: Lfm2Config, problems: list[str]) -> dict[str, Any]:
    files = {name: _read_json(root / name, problems) for name in TOKEN_FILES}
    out: dict[str, Any] = {}
    for kind in ("bos", "eos", "pad"):
        out[f"{kind}_token"] = next(
            (t for data in files.values() if data and (t := token_text(data.get(f"{kind}_token")))), None)
    out["bos_token_id"] = cfg.bos_token_id
    out["eos_token_ids"] = list(cfg.eos_token_ids)
    out["pad_token_id"] = cfg.pad_token_id
    tok_cfg = files["tokenizer_config.json"] or {}
    if (root / "chat_template.jinja").is_file():
        source = "chat_template.jinja"
    elif tok_cfg.get("chat_template"):
        source = "tokenizer_config.json"
    else:
        source = None
    out["chat_template"] = source is not None
    out["chat_template_source"] = source
    out["tokenizer"] = (root / "tokenizer.json").is_file()
    return out


def _files(root: Path) -> list[dict[str, Any]]:
    # stat() follows symlinks, so hub-cache snapshots (links into blobs/) report real sizes
    return [{"name": p.name, "bytes": p.stat().st_size}
            for p in sorted(root.iterdir()) if not p.name.startswith(".") and p.is_file()]


def describe(path: Path) -> dict[str, Any]:
    """Everything `lfm2 info` shows, as a JSON-ready dict. Reads only config, headers and small files.
    Raises CheckpointError/ConfigError where the config or a header cannot be read; what else would stop a load
    (tensors, dtypes, token ids, tokenizer files) is listed in "problems"."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    # the check loading runs: what it finds is in "problems", and `lfm2 info` exits 1 for it
    found = inspect_checkpoint(root)
    cfg, problems = found.config, list(found.problems)
    total, active = parameter_counts(cfg)
    dtypes, stored, stored_active = _stored(cfg, found.headers)
    files = _files(root)
    side_problems: list[str] = []  # tokenizer side files info reads itself; loading reports them as well
    desc = {
        "path": str(root.resolve()),
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "parameters": {"total": total, "active": active},
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "conv_kernel": cfg.conv_L_cache,
        "tied_embeddings": cfg.tie_word_embeddings,
        "dtypes": dtypes,
        "config_dtype": cfg.torch_dtype,
        "layers": _layers(cfg),
        "attention": {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                      "head_dim": cfg.head_dim, "layers": cfg.attention_layers},
        "feed_forward": _feed_forward(cfg),
        "tokens": {**_tokens(root, cfg, side_problems),
                   "undecodable_ids": _span(undecodable_ids(cfg, found.tokenizer))},
        "files": files,
        "files_total_bytes": sum(f["bytes"] for f in files),
        "memory": _memory(cfg, total, active, stored, stored_active),
        "problems": problems,
        "notes": found.notes,  # loads, but cannot generate text: the check says so instead of "ok" (exit 0)
    }
    problems += [p for p in side_problems if not any(p.split(":")[0] in q for q in problems)]
    return desc


def _stored(cfg: Lfm2Config, headers: dict[str, TensorInfo]) -> tuple[dict[str, int], int, int]:
    """The weights as stored: elements per dtype (most first), their bytes, and the bytes a token reads."""
    dtypes: dict[str, int] = {}
    stored = stored_active = 0
    for t in headers.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
        size = t.end - t.start
        stored += size
        # a token reads k of the E experts of each MoE layer
        if cfg.is_moe and ".experts." in t.name:
            size = size * cfg.num_experts_per_tok // cfg.num_experts
        stored_active += size
    return dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), stored, stored_active


def _layers(cfg: Lfm2Config) -> dict[str, Any]:
    n, attn = cfg.num_hidden_layers, cfg.attention_layers
    moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
    return {
        "count": n,
        "layout": "".join("A" if cfg.is_attention(i) else "C" for i in range(n)),
        "ffn_layout": "".join("M" if cfg.is_moe_layer(i) else "D" for i in range(n)),
        "conv": n - len(attn),
        "attention": len(attn),
        "dense": n - len(moe_layers),
        "moe": len(moe_layers),
        "per_layer": [{"index": i, "mixer": "attention" if cfg.is_attention(i) else "conv",
                       "ffn": "moe" if cfg.is_moe_layer(i) else "dense"} for i in range(n)],
    }


def _feed_forward(cfg: Lfm2Config) -> dict[str, Any]:
    ffn: dict[str, Any] = {"dense_ff_dim": cfg.dense_ff_dim}
    if cfg.is_moe:
        ffn.update(expert_ff_dim=cfg.moe_intermediate_size, experts=cfg.num_experts,
                   experts_per_token=cfg.num_experts_per_tok, num_dense_layers=cfg.num_dense_layers)
    return ffn


def _memory(cfg: Lfm2Config, total: int, active: int, stored: int, stored_active: int) -> dict[str, Any]:
    """The weights' sizes, the KV cache and conv state in bf16, and what running takes in each precision."""
    conv_layers = cfg.num_hidden_layers - len(cfg.attention_layers)
    kv_per_token = len(cfg.attention_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim * BF16_BYTES
    memory: dict[str, Any] = {
        "weights_bf16_bytes": total * BF16_BYTES,
        "weights_stored_bytes": stored,
        "kv_cache_bf16_bytes_per_1000_tokens": kv_per_token * KV_TOKENS,
        "kv_cache_bf16_bytes_full_context": kv_per_token * cfg.max_position_embeddings,
        # a conv layer remembers its last kernel-1 inputs (hidden_size wide), as lfm2's HybridCache does
        "conv_state_bf16_bytes": conv_layers * cfg.hidden_size * (cfg.conv_L_cache - 1) * BF16_BYTES,
    }
    memory["to_run_bytes"] = {"bf16": memory_needed(cfg), "int8": memory_needed(cfg, "int8"),
                              "int4": memory_needed(cfg, "int4")}
    if cfg.is_moe:
        memory["active_weights_bf16_bytes_per_token"] = active * BF16_BYTES
        memory["active_weights_stored_bytes_per_token"] = stored_active
    return memory


def _span(ids: range) -> list[int] | None:
    return [ids.start, ids.stop - 1] if ids else None


def _tokenizer_text(tok: dict[str, Any]) -> str:
    """Whether there is a tokenizer, and the ids the model can emit that it cannot decode."""
    if not tok["tokenizer"]:
        return "no"
    gap = tok.get("undecodable_ids")
    return f"yes; ids {gap[0]} to {gap[1]} (in the model's vocabulary) decode to nothing" if gap else "yes"


def _dtypes_text(dtypes: dict[str, int]) -> str:
    if len(dtypes) <= 1:
        return ", ".join(dtypes) or "none"
    total = sum(dtypes.values()) or 1
    return ", ".join(f"{name} ({100 * count / total:.1f}%)" for name, count in dtypes.items())


def _number(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:g}"


def _token_text_row(text: str | None, ids: list[int]) -> str:
    id_text = ", ".join(str(i) for i in ids)
    if text is None:
        return f"id {id_text}" if ids else "not set"
    return f"{text} (id {id_text})" if ids else text


def sections(desc: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The description as titled groups of (label, human-readable value) rows."""
    is_moe = desc["model_type"] == "lfm2_moe"
    return [("Model", _model_rows(desc)),
            ("Layers", _layer_rows(desc, is_moe)),
            ("Attention", _attention_rows(desc["attention"])),
            ("Feed-forward", _feed_rows(desc["feed_forward"], is_moe)),
            ("Tokens", _token_rows(desc["tokens"])),
            ("Files", _file_rows(desc)),
            ("Memory", _memory_rows(desc, is_moe))]


def _model_rows(desc: dict[str, Any]) -> list[tuple[str, str]]:
    p = desc["parameters"]
    return [
        ("architecture", desc["architecture"]),
        ("model type", desc["model_type"]),
        ("path", desc["path"]),
        ("parameters", f"{human_count(p['total'])} ({p['total']:,})"),
        ("active per token", f"{human_count(p['active'])} ({p['active']:,})"),
        ("hidden size", str(desc["hidden_size"])),
        ("vocab size", f"{desc['vocab_size']:,}"),
        ("context length", f"{desc['context_length']:,} tokens"),
        ("rope theta", _number(desc["rope_theta"])),
        ("tied embeddings", "yes" if desc["tied_embeddings"] else "no"),
        ("dtype on disk", _dtypes_text(desc["dtypes"])),
        ("check", "; ".join(desc["problems"]) or "; ".join(desc.get("notes", ())) or "ok"),
    ]


def _layer_rows(desc: dict[str, Any], is_moe: bool) -> list[tuple[str, str]]:
    lay = desc["layers"]
    rows = [
        ("layers", f"{lay['count']} ({lay['conv']} conv, {lay['attention']} attention)"),
        ("layout", f"{lay['layout']} (C conv, A attention)"),
        ("conv kernel", str(desc["conv_kernel"])),
    ]
    if is_moe:
        rows += [("feed-forward layout", f"{lay['ffn_layout']} (D dense, M MoE)"),
                 ("feed-forward layers", f"{lay['dense']} dense, {lay['moe']} MoE")]
    return rows


def _attention_rows(att: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("attention heads", str(att["heads"])),
        ("kv heads", str(att["kv_heads"])),
        ("head dim", str(att["head_dim"])),
        ("attention layers", ", ".join(str(i) for i in att["layers"]) or "none"),
    ]


def _feed_rows(ffn: dict[str, Any], is_moe: bool) -> list[tuple[str, str]]:
    rows = [("dense width", str(ffn["dense_ff_dim"]))]
    if is_moe:
        rows += [("expert width", str(ffn["expert_ff_dim"])),
                 ("experts", str(ffn["experts"])),
                 ("experts per token", str(ffn["experts_per_token"])),
                 ("dense layers", str(ffn["num_dense_layers"]))]
    return rows


def _token_rows(tok: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("bos token", _token_text_row(tok["bos_token"], [] if tok["bos_token_id"] is None
                                      else [tok["bos_token_id"]])),
        ("eos token", _token_text_row(tok["eos_token"], tok["eos_token_ids"])),
        ("pad token", _token_text_row(tok["pad_token"], [] if tok["pad_token_id"] is None
                                      else [tok["pad_token_id"]])),
        ("chat template", f"yes ({tok['chat_template_source']})" if tok["chat_template"] else "no"),
        ("tokenizer.json", _tokenizer_text(tok)),
    ]


def _file_rows(desc: dict[str, Any]) -> list[tuple[str, str]]:
    shards = [f for f in desc["files"] if f["name"].endswith(".safetensors")]
    if len(shards) > MAX_SHARD_ROWS:  # one row for a long run of shards keeps the table readable
        files = [(f["name"], human_bytes(f["bytes"])) for f in desc["files"] if f not in shards]
        files.insert(0, ("shards", f"{len(shards)} safetensors files, {human_bytes(sum(f['bytes'] for f in shards))}"))
    else:
        files = [(f["name"], human_bytes(f["bytes"])) for f in desc["files"]]
    files.append(("total", human_bytes(desc["files_total_bytes"])))
    return files


def _memory_rows(desc: dict[str, Any], is_moe: bool) -> list[tuple[str, str]]:
    mem = desc["memory"]
    rows = [("weights", _weights_text(mem["weights_stored_bytes"], mem["weights_bf16_bytes"], desc["dtypes"]))]
    if is_moe:
        rows += [("weights read per token", _weights_text(mem["active_weights_stored_bytes_per_token"],
                                                          mem["active_weights_bf16_bytes_per_token"],
                                                          desc["dtypes"]))]
    run = mem["to_run_bytes"]
    rows += [(f"to run, {key}", f"~{human_bytes(run[key])}") for key in ("bf16", "int8", "int4")]
    rows += [
        ("KV cache per 1,000 tokens (bf16)", human_bytes(mem["kv_cache_bf16_bytes_per_1000_tokens"])),
        ("KV cache at full context (bf16)", human_bytes(mem["kv_cache_bf16_bytes_full_context"])),
        ("conv state (bf16, fixed)", human_bytes(mem["conv_state_bf16_bytes"])),
    ]
    return rows


def _weights_text(stored: int, bf16: int, dtypes: dict[str, int]) -> str:
    """One row for the weights: their size as stored, and in bf16 (what lfm2 runs) when they are stored otherwise."""
    if not dtypes:
        return f"{human_bytes(bf16)} in bf16 (none stored)"
    if list(dtypes) == ["BF16"]:
        return f"{human_bytes(stored)} (BF16)"
    as_stored = f"as stored ({next(iter(dtypes))})" if len(dtypes) == 1 else "as stored"
    return f"{human_bytes(stored)} {as_stored}, {human_bytes(bf16)} in bf16"


def plain_lines(desc: dict[str, Any]) -> list[str]:
    """`key: value` lines for pipes; a file's row gets a `file ` prefix so keys stay distinct (`file
    config.json: 1.2 kB`, `shards: 25 safetensors files, 9.6 GB`, `files total: 9.6 GB`)."""
    lines = []
    for title, rows in sections(desc):
        for label, value in rows:
            key = label
            if title == "Files":
                key = {"total": "files total", "shards": "shards"}.get(label, f"file {label}")
            lines.append(f"{key}: {value}")
    return lines
