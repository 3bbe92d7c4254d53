"""What is on disk in a checkpoint directory, read without torch: weight files, safetensors headers,
the tensors a config requires, and a check that they agree. Used by loading, `info` and `pull`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm2cli.errors import CheckpointError
from lfm2cli.model.config import MAX_TENSORS, Lfm2Config, load_config, parse_json, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
# Bytes of headers and index a checkpoint may have for each tensor its config declares: a header entry is a name
# (under 100 characters in every published checkpoint) and four short fields, and an index entry is less. With
# a little room for metadata, this keeps a 100 MB header in a tiny checkpoint from being parsed at all.
BYTES_PER_TENSOR = 1024
METADATA_BYTES = 1 << 20
SHARD_METADATA_BYTES = 64 << 10  # more room for each shard's own __metadata__
MAX_DIMS = 8  # a weight has 1 to 3 dimensions; 8 leaves room and keeps a shape from being a list of millions
MAX_DIM = 1 << 48


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


# safetensors dtypes and their bits per element. lfm2 can describe every one of them, but weights must be one of
# FLOAT_DTYPES: an integer or 8-bit float tensor read as weights would run and give garbage.
SAFETENSORS_DTYPES = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                      "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64,
                      "F64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def _shard_path(root: Path, name: object, index: Path) -> Path:
    """A weight_map entry as a file of this checkpoint: a plain file name, never a path out of the directory. A
    symlink may point into the checkpoint or, in the standard Hugging Face cache, into the repo's blobs/."""
    if not isinstance(name, str):
        raise CheckpointError(f"{index}: weight_map value {json.dumps(name)} is not a string; expected the file "
                              "name of a shard such as model-00001-of-00002.safetensors")
    if name in ("", ".", "..") or "/" in name or "\\" in name or Path(name).is_absolute() or "\0" in name:
        raise CheckpointError(f"{index}: weight_map names {name!r}, which is not a file of this checkpoint; "
                              "expected a plain file name inside the checkpoint directory")
    file = root / name
    _stays_inside(root, file, f"{index}: shard {name}")
    return file


def _stays_inside(root: Path, file: Path, what: str) -> None:
    """A weight file that is a link must lead into the checkpoint (or, in the standard Hugging Face cache, into
    the repo's blobs/): a link to elsewhere, or a loop of links, is refused by name."""
    if not file.is_symlink():
        return
    try:
        real, home = file.resolve(strict=True), root.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a loop, on Pythons before 3.13
        cause = "a loop of links" if "loop" in str(e).lower() or getattr(e, "errno", 0) == 40 else \
            (getattr(e, "strerror", None) or "a broken link")
        raise CheckpointError(f"{what} is a link that cannot be followed ({cause}); expected the file itself in "
                              "the checkpoint directory") from None
    allowed = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    if not any(real.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{what} is a link to {real}, outside the checkpoint directory; "
                              "expected the file itself in the checkpoint directory")


def tensor_count(cfg: Lfm2Config) -> int:
    """How many tensors `expected_tensors(cfg)` lists, counted without listing them."""
    per_conv = 3 + (3 if cfg.conv_bias else 0)
    attention = len(cfg.attention_layers)
    n = 2 + (0 if cfg.tie_word_embeddings else 1)
    n += 2 * cfg.num_hidden_layers + 6 * attention + per_conv * (cfg.num_hidden_layers - attention)
    for i in range(cfg.num_hidden_layers):
        n += 1 + (1 if cfg.use_expert_bias else 0) + 3 * cfg.num_experts if cfg.is_moe_layer(i) else 3
    return n


def index_budget(cfg: Lfm2Config | None) -> int:
    """Bytes that an index, or all safetensors headers together, may take for `cfg` (MAX_HEADER without one)."""
    if cfg is None:
        return MAX_HEADER
    return min(MAX_HEADER, METADATA_BYTES + BYTES_PER_TENSOR * tensor_count(cfg))


def _read_index(root: Path, cfg: Lfm2Config | None) -> dict[str, object] | None:
    """The index's weight_map (None for a single-file checkpoint), read within `index_budget(cfg)` bytes."""
    index_path = root / INDEX_FILE
    if not index_path.exists():
        return None
    weight_map = read_json_object(index_path, limit=index_budget(cfg)).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' is {'missing' if weight_map is None else 'not valid'}; "
                              "expected an object mapping tensor names to shard file names")
    tensors = MAX_TENSORS if cfg is None else tensor_count(cfg)
    if len(weight_map) > tensors + 64:  # a little room for tensors the model does not use (a spare lm_head)
        raise CheckpointError(f"{index_path}: 'weight_map' has {len(weight_map):,} entries for a model of "
                              f"{tensors:,} tensors; the index is damaged: download the model again")
    return weight_map


def _index_files(root: Path, weight_map: dict[str, object]) -> list[Path]:
    index_path = root / INDEX_FILE
    for value in weight_map.values():
        if not isinstance(value, str):
            _shard_path(root, value, index_path)  # raises, naming the value
    # each shard checked once, however many tensors it holds
    shards = [_shard_path(root, name, index_path) for name in dict.fromkeys(weight_map.values())]
    missing = sorted(s.name for s in shards if not s.is_file())
    if missing:
        raise CheckpointError(f"{root}: shard(s) named in {INDEX_FILE} are missing: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return sorted(shards)


def weight_files(root: Path, cfg: Lfm2Config | None = None) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded (hub layout). Shards named by the index must
    be files of the checkpoint itself: an index cannot make lfm2 read `../../etc/passwd`. With `cfg`, the index
    may take only the bytes and entries that many tensors need."""
    root = Path(root)
    weight_map = _read_index(root, cfg)
    if weight_map is not None:
        return _index_files(root, weight_map)
    if (root / SINGLE_FILE).exists() or (root / SINGLE_FILE).is_symlink():
        _stays_inside(root, root / SINGLE_FILE, str(root / SINGLE_FILE))
        if not (root / SINGLE_FILE).is_file():
            raise CheckpointError(f"{root / SINGLE_FILE}: not a regular file; expected the weights themselves")
        return [root / SINGLE_FILE]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise CheckpointError(f"{root}: only pickle weights (.bin/.pt) found; lfm2 loads safetensors only")
    raise CheckpointError(f"{root}: no model.safetensors or {INDEX_FILE} found")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, meta: object, size: int, data_start: int) -> TensorInfo:
    """One header entry, checked: a damaged header is one line naming the file, the tensor and the field."""
    damaged = "the file is damaged; download it again"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object; expected "
                              '{"dtype": ..., "shape": [...], "data_offsets": [start, end]} (' + damaged + ")")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unknown dtype {json.dumps(dtype)}; expected a safetensors "
                              f"dtype such as {', '.join(FLOAT_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_whole(s) and s < MAX_DIM for s in shape):
        raise CheckpointError(f"{path}: tensor {name} has shape {_shown(shape)}; expected a list of at most "
                              f"{MAX_DIMS} whole numbers >= 0 ({damaged})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets {_shown(offsets)}; expected [start, end] "
                              f"with 0 <= start <= end ({damaged})")
    info = TensorInfo(name, dtype, tuple(shape), path, offsets[0], offsets[1])
    need = (info.numel * SAFETENSORS_DTYPES[dtype] + 7) // 8
    if info.end - info.start != need:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets {offsets} ({info.end - info.start} bytes) "
                              f"but {dtype} {list(shape)} takes {need} bytes ({damaged})")
    if data_start + info.end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, tensor {name} needs {data_start + info.end});"
            " download it again"
        )
    return info


def _shown(value: object, limit: int = 60) -> str:
    """A JSON value from a file, quoted in a message at most `limit` characters long."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: a tensor named twice would load whichever came last."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"{twice!r} is given twice")
    return out


def _check_layout(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Each tensor's bytes lie apart from every other's and start on a multiple of its element size, as the
    safetensors format requires: overlapping tensors would share bytes, and which layout was meant is unknown."""
    previous: TensorInfo | None = None
    for t in sorted((t for t in tensors.values() if t.end > t.start), key=lambda t: (t.start, t.end)):
        bits = SAFETENSORS_DTYPES[t.dtype]
        if bits % 8 == 0 and t.start % (bits // 8):
            raise CheckpointError(f"{path}: tensor {t.name} starts at byte {t.start}, not a multiple of its "
                                  f"{t.dtype} element size ({bits // 8} bytes); the file is damaged: download it again")
        if previous is not None and t.start < previous.end:
            raise CheckpointError(f"{path}: tensors {previous.name} and {t.name} overlap (bytes {previous.start}-"
                                  f"{previous.end} and {t.start}-{t.end}); the file is damaged: download it again")
        previous = t


def read_header(path: Path, limit: int = MAX_HEADER) -> tuple[dict[str, TensorInfo], int]:
    """Parse one safetensors header; returns the tensors and the byte offset where data begins.
    Checks every entry's form and that its bytes lie inside the file and apart, so damaged or truncated downloads
    are caught before anything is read. A header longer than `limit` bytes is refused before it is read."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n})")
        if n > limit:
            raise CheckpointError(f"{path}: the safetensors header is {n:,} bytes, more than the {limit:,} that "
                                  "the tensors of its config.json need; the file is damaged: download it again")
        try:
            header = parse_json(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            cause = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8" if isinstance(
                e, UnicodeDecodeError) else str(e)
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {cause}); "
                                  "download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}); expected an "
                              "object of tensor entries; download it again")
    data_start = 8 + n
    tensors = {name: _tensor_info(path, name, meta, size, data_start)
               for name, meta in header.items() if name != "__metadata__"}
    _check_layout(path, tensors)
    return tensors, data_start


def read_all_headers(root: Path, cfg: Lfm2Config | None = None) -> dict[str, TensorInfo]:
    """Every tensor of every weight file. With `cfg`, all headers together may take only `index_budget(cfg)`
    bytes and a little for each file's metadata, and the index `index_budget(cfg)`: a header is refused from its
    length, before it is read. A tensor in two files, or an index that places a tensor in a shard that does not
    hold it, is refused: which copy would load is not clear."""
    root = Path(root)
    weight_map = _read_index(root, cfg)
    files = _index_files(root, weight_map) if weight_map is not None else weight_files(root, cfg)
    budget = index_budget(cfg) + SHARD_METADATA_BYTES * len(files)
    out: dict[str, TensorInfo] = {}
    for file in files:
        tensors, data_start = read_header(file, limit=budget)
        if cfg is not None:
            budget -= data_start - 8
        for name, t in tensors.items():
            if name in out:
                raise CheckpointError(f"{root}: tensor {name} is in both {out[name].file.name} and {file.name}; "
                                      "expected each tensor in one file (which copy loads would depend on file "
                                      "order): download the model again")
            out[name] = t
    if weight_map is not None:
        wrong = [n for n, shard in weight_map.items() if n not in out or out[n].file.name != shard]
        if wrong:
            where = f"in {weight_map[wrong[0]]}, which does not hold it"
            raise CheckpointError(f"{root / INDEX_FILE}: 'weight_map' places {wrong[0]} {where}"
                                  + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
                                  + "; the index and the shards disagree: download the model again")
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


def tensor_problems(cfg: Lfm2Config, found: dict[str, TensorInfo], where: str) -> list[str]:
    """One line listing missing, unexpected, wrongly shaped and non-float tensors; empty when all agree."""
    want = expected_tensors(cfg)
    if "lm_head.weight" in want and "lm_head.weight" not in found:
        del want["lm_head.weight"]  # untied in name only: fall back to the embedding, as the reference does
    optional = {"lm_head.weight"}
    missing = [n for n in want if n not in found]
    unexpected = [n for n in found if n not in want and n not in optional]
    wrong = [f"{n} {list(found[n].shape)} (expected {list(s)})" for n, s in want.items()
             if n in found and tuple(found[n].shape) != s]
    dtypes = [f"{n} {found[n].dtype} in {found[n].file.name}" for n in want
              if n in found and found[n].dtype not in FLOAT_DTYPES]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                         ("not a float dtype", dtypes)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if dtypes:
        problems[-1] += f" (expected {', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]})"
    if not problems:
        return []
    return [f"{where}: checkpoint does not match its config.json; " + "; ".join(problems)]


def check_tensors(cfg: Lfm2Config, found: dict[str, TensorInfo], where: str) -> None:
    """Raise one CheckpointError listing missing, unexpected, wrongly shaped and non-float tensors."""
    problems = tensor_problems(cfg, found, where)
    if problems:
        raise CheckpointError(problems[0])


@dataclass
class Inspection:
    """A checkpoint as read without its weights, and every reason it cannot be loaded: the one check that both
    loading and `lfm2 info` run, so that info never says ok to what generate refuses."""

    root: Path
    config: Lfm2Config
    headers: dict[str, TensorInfo]
    tokenizer: Any = None  # lfm2cli.text.tokenizer.Tokenizer, when asked for and the checkpoint has tokenizer.json
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what loads but cannot generate text (no tokenizer files)

    def raise_problems(self) -> None:
        if self.problems:
            raise CheckpointError("; ".join(self.problems))


def _token_problems(root: Path, cfg: Lfm2Config, tokenizer: Any) -> list[str]:
    """Token ids must index the embedding table: the config's special ids, and every id the tokenizer can give."""
    v = cfg.vocab_size
    problems = []
    generation = root / "generation_config.json"  # its eos_token_id wins over config.json's (lfm2cli.model.config)
    eos_file = "config.json"
    if generation.is_file() and read_json_object(generation).get("eos_token_id") is not None:
        eos_file = generation.name
    special = [("bos_token_id", cfg.bos_token_id, "config.json"), ("pad_token_id", cfg.pad_token_id, "config.json")]
    special += [("eos_token_id", i, eos_file) for i in cfg.eos_token_ids]
    for key, value, file in special:
        if value is not None and value >= v:
            problems.append(f"{root / file}: '{key}' {value} is past the embedding table ('vocab_size' {v} in "
                            f"config.json); expected an id below {v}")
    if tokenizer is not None and tokenizer.max_token_id >= v:
        problems.append(f"{root / 'tokenizer.json'}: token ids go up to {tokenizer.max_token_id} but the embedding "
                        f"table has {v} rows ('vocab_size' in config.json); expected a tokenizer whose ids are "
                        f"below {v}")
    return problems


def undecodable_ids(cfg: Lfm2Config, tokenizer: Any) -> range:
    """Ids the model can emit that the tokenizer has no text for (an embedding table padded past the tokenizer,
    common and harmless while the model never picks them); empty when none."""
    return range(tokenizer.max_token_id + 1 if tokenizer is not None else cfg.vocab_size, cfg.vocab_size)


def inspect_checkpoint(root: Path, tokenizer: bool = True) -> Inspection:
    """Read config, headers and (when `tokenizer` and present) the tokenizer, and check that they agree. A config
    or header that cannot be read at all raises (ConfigError/CheckpointError); everything else that would stop a
    load is collected in `problems`."""
    root = Path(root)
    cfg = load_config(root)
    headers = read_all_headers(root, cfg)
    found = Inspection(root, cfg, headers)
    found.problems += tensor_problems(cfg, headers, str(root))
    file = root / "tokenizer.json"
    if tokenizer and (file.exists() or file.is_symlink()):  # present but not a readable file is a problem
        from lfm2cli.text.tokenizer import load_tokenizer

        try:
            found.tokenizer = load_tokenizer(root, max_tokens=cfg.max_position_embeddings)
        except CheckpointError as e:
            found.problems.append(str(e))
    found.problems += _token_problems(root, cfg, found.tokenizer)
    if tokenizer and found.tokenizer is None and not found.problems:
        found.notes.append(f"no tokenizer.json in {root}: bench runs it, but generate, chat and serve need the "
                           "tokenizer files")
    return found


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
