"""Read a Hugging Face `config.json` (model_type lfm2 or lfm2_moe) into one frozen dataclass.

Real checkpoints spell the same facts several ways (`layer_types` vs `full_attn_idxs`, `rope_theta` vs
`rope_parameters`, `block_ff_dim` vs `intermediate_size`, ...); everything is normalised here so the
model code reads one name for each fact. Pure Python: no torch.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm2cli.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("lfm2", "lfm2_moe")
# Bounds on what a config may declare, checked before anything is built per layer or per expert: far above every
# published model (the deepest have under 200 layers; DeepSeek-V3, among the largest MoE, has 256 experts and
# about 45,000 tensors), far below what would exhaust memory on the names and modules alone.
MAX_SIZE = 2**31 - 1  # any one width, count or length
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_TENSORS = 1 << 17
JSON_LIMIT = 16 << 20  # bytes of a checkpoint's small JSON files (config, generation and tokenizer configs)
MAX_DIGITS = 40  # digits of one number in a JSON file: more is damage, and int() of 4,300+ digits raises


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


class _Reader:
    """Typed reads of one config dict: a value of the wrong type or range becomes one ConfigError naming the file,
    the key, the value and the form expected, instead of a bare ValueError from int() or a model that is wrong."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def fail(self, key: str, value: Any, expected: str) -> ConfigError:
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return ConfigError(f"{self.source}: '{key}' is {shown}; expected {expected}")

    def find(self, key: str, *alternatives: str, required: bool = False) -> tuple[str, Any]:
        """The first of `key` and its other spellings with a value (null counts as absent); (key, None) if none."""
        for k in (key, *alternatives):
            if self.raw.get(k) is not None:
                return k, self.raw[k]
        if required:
            raise ConfigError(f"{self.source}: required key '{key}' is missing")
        return key, None

    def whole(self, key: str, *alternatives: str, minimum: int = 1, default: int | None = None,
              required: bool = False, null_ok: bool = False, maximum: int = MAX_SIZE) -> int | None:
        # an explicit null where no default makes sense (max_position_embeddings: null) is an error, not "absent"
        if not required and not null_ok and key in self.raw and self.raw[key] is None and not alternatives:
            raise self.fail(key, None, f"a whole number >= {minimum}")
        name, value = self.find(key, *alternatives, required=required)
        if value is None:
            return default
        # JSON writers sometimes spell whole numbers as 64.0; bools are ints to Python but never a size
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(name, value, f"a whole number >= {minimum}")
        if value > maximum:
            raise self.fail(name, value, f"a whole number from {minimum} to {maximum:,}")
        return value

    def number(self, key: str, *alternatives: str, default: float, positive: bool = True) -> float:
        name, value = self.find(key, *alternatives)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise self.fail(name, value, "a number > 0" if positive else "a finite number")
        return float(value)

    def flag(self, key: str, *alternatives: str, default: bool) -> bool:
        name, value = self.find(key, *alternatives)
        if value is None:
            return default
        if not isinstance(value, bool) and value not in (0, 1):
            raise self.fail(name, value, "true or false")
        return bool(value)

    def token_id(self, key: str, default: int | None) -> int | None:
        if key not in self.raw:
            return default
        value = self.raw[key]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, value, "a token id (a whole number >= 0) or null")
        return value

    def token_ids(self, key: str) -> tuple[int, ...] | None:
        """A token id or a list of them (`eos_token_id`); None when absent."""
        value = self.raw.get(key)
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise self.fail(key, value, "a token id or a list of token ids (whole numbers >= 0)")
        return tuple(values)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, value, 'an object such as {"rope_type": "default", "rope_theta": 1000000.0}')
        return value


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _dense_ff_dim(r: _Reader, intermediate_size: int) -> int:
    """LFM2 dense checkpoints store a nominal width that the model shrinks to 2/3, scales and rounds."""
    if not r.flag("block_auto_adjust_ff_dim", default=True):
        return intermediate_size
    width = int(2 * intermediate_size / 3)
    if r.raw.get("block_ffn_dim_multiplier", 1.0) is not None:
        multiplier = r.number("block_ffn_dim_multiplier", default=1.0)
        multiple_of = r.whole("block_multiple_of", default=256)
        width = int(multiplier * width)
        width = multiple_of * ((width + multiple_of - 1) // multiple_of)
    if width < 1:
        raise ConfigError(f"{r.source}: the feed-forward width works out to {width}; 'intermediate_size' "
                          "(or 'block_ff_dim') must be larger")
    return width


def _layer_types(r: _Reader, layers: int, model_type: str) -> tuple[str, ...]:
    raw, source = r.raw, r.source
    if raw.get("layer_types") is not None:
        value = raw["layer_types"]
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise r.fail("layer_types", value, 'a list of "conv" or "full_attention", one per layer')
        layer_types = tuple(value)
    elif raw.get("full_attn_idxs") is not None:
        value = raw["full_attn_idxs"]
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                  and 0 <= i < layers for i in value):
            raise r.fail("full_attn_idxs", value, f"a list of layer indices from 0 to {layers - 1}")
        idxs = set(value)
        layer_types = tuple("full_attention" if i in idxs else "conv" for i in range(layers))
    elif model_type == "lfm2":
        layer_types = ("full_attention",) * layers  # what the reference does with neither key
    else:
        raise ConfigError(f"{source}: required key 'layer_types' is missing")
    if len(layer_types) != layers:
        raise ConfigError(f"{source}: 'layer_types' has {len(layer_types)} entries for {layers} layers "
                          "('num_hidden_layers'); expected one per layer")
    unknown = sorted(set(layer_types) - {"conv", "full_attention"})
    if unknown:
        raise ConfigError(f"{source}: unknown layer type(s) {', '.join(unknown)} in 'layer_types'; "
                          'expected "conv" or "full_attention"')
    return layer_types


def _check_scale(source: str, layers: int, moe_layers: int, experts: int) -> None:
    """Refuse a model whose tensors could not even be listed: a count from the declared sizes (at most 12 per
    layer, 3 per expert and 2 per router), before one name is made."""
    tensors = 12 * layers + moe_layers * (3 * experts + 2) + 3
    if tensors > MAX_TENSORS:
        raise ConfigError(f"{source}: {layers} layers of {experts} experts make {tensors:,} tensors; lfm2 loads at "
                          f"most {MAX_TENSORS:,} (the largest published models have under 50,000)")


def parse_config(raw: dict[str, Any], source: str = "config.json",
                 generation_config: dict[str, Any] | None = None,
                 generation_source: str = "generation_config.json") -> Lfm2Config:
    """Normalise a config dict; `source` (and `generation_source`) name the files in error messages. Every value
    is checked for type and range here, so nothing downstream meets a size of "sixty-four" or zero heads."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; lfm2 runs LFM2 ('lfm2') and "
            f"LFM2-MoE ('lfm2_moe') checkpoints"
        )
    r = _Reader(raw, source)
    hidden = r.whole("hidden_size", required=True)
    layers = r.whole("num_hidden_layers", required=True, maximum=MAX_LAYERS)
    heads = r.whole("num_attention_heads", "num_heads", required=True)
    kv_heads = r.whole("num_key_value_heads", default=heads, null_ok=True)
    layer_types = _layer_types(r, layers, model_type)
    rope_theta = _rope_theta(r)
    # block_ff_dim wins over intermediate_size, as in the reference implementation
    inter = r.whole("block_ff_dim", "intermediate_size", required=True)
    tie = r.flag("tie_embedding", "tie_word_embeddings", default=True)
    moe = _moe_fields(r, layers) if model_type == "lfm2_moe" else {}
    dense_ff = inter if model_type == "lfm2_moe" else _dense_ff_dim(r, inter)
    eos = r.token_ids("eos_token_id") or ()
    if generation_config:
        gen_eos = _Reader(generation_config, generation_source).token_ids("eos_token_id")
        if gen_eos is not None:
            eos = gen_eos
    head_dim = _head_dim(r, hidden, heads, kv_heads)
    torch_dtype = raw.get("dtype") or raw.get("torch_dtype")
    if torch_dtype is not None and not isinstance(torch_dtype, str):
        raise r.fail("torch_dtype" if raw.get("dtype") is None else "dtype", torch_dtype,
                     'a dtype name such as "bfloat16"')
    return Lfm2Config(
        model_type=model_type,
        vocab_size=r.whole("vocab_size", required=True),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        layer_types=layer_types,
        intermediate_size=inter,
        dense_ff_dim=dense_ff,
        max_position_embeddings=r.whole("max_position_embeddings", default=128_000),
        norm_eps=r.number("norm_eps", "block_norm_eps", default=1e-5),
        rope_theta=rope_theta,
        conv_bias=r.flag("conv_bias", default=False),
        conv_L_cache=r.whole("conv_L_cache", default=3),
        tie_word_embeddings=tie,
        bos_token_id=r.token_id("bos_token_id", 1),
        pad_token_id=r.token_id("pad_token_id", 0),
        eos_token_ids=eos,
        torch_dtype=torch_dtype,
        **moe,
    )


def _rope_theta(r: _Reader) -> float:
    """RoPE's base, from `rope_parameters` or the top level; any rope type but the default is refused."""
    rope = r.mapping("rope_parameters")
    scaling = r.mapping("rope_scaling")
    rope_theta = r.number("rope_theta", default=1_000_000.0)
    if rope.get("rope_theta") is not None:  # the newer spelling wins
        rope_theta = _Reader({"rope_parameters.rope_theta": rope["rope_theta"]}, r.source).number(
            "rope_parameters.rope_theta", default=rope_theta)
    rope_type = rope.get("rope_type", scaling.get("rope_type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{r.source}: rope type {rope_type!r} is not supported (only 'default')")
    return rope_theta


def _moe_fields(r: _Reader, layers: int) -> dict[str, Any]:
    """An LFM2-MoE config's expert fields, as `Lfm2Config` names them."""
    experts = r.whole("num_experts", required=True, maximum=MAX_EXPERTS)
    top_k = r.whole("num_experts_per_tok", required=True)
    if top_k > experts:
        raise r.fail("num_experts_per_tok", top_k, f"a whole number from 1 to num_experts ({experts})")
    dense_layers = r.whole("num_dense_layers", default=2, minimum=0)
    if dense_layers > layers:
        raise r.fail("num_dense_layers", dense_layers, f"a whole number from 0 to num_hidden_layers ({layers})")
    _check_scale(r.source, layers, layers - dense_layers, experts)
    return dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=r.whole("moe_intermediate_size", required=True),
        num_dense_layers=dense_layers,
        use_expert_bias=r.flag("use_expert_bias", default=True),
        norm_topk_prob=r.flag("norm_topk_prob", default=True),
        routed_scaling_factor=r.number("routed_scaling_factor", default=1.0),
    )


def _head_dim(r: _Reader, hidden: int, heads: int, kv_heads: int) -> int:
    """Each attention head's width: `head_dim`, else the hidden size shared by the heads."""
    if heads % kv_heads:
        raise ConfigError(f"{r.source}: 'num_attention_heads' ({heads}) is not a multiple of "
                          f"'num_key_value_heads' ({kv_heads}); expected a whole multiple")
    head_dim = r.whole("head_dim", default=None, null_ok=True)
    if head_dim is None:
        head_dim = hidden // heads
        if head_dim < 1:
            raise ConfigError(f"{r.source}: 'hidden_size' ({hidden}) is smaller than 'num_attention_heads' "
                              f"({heads}); expected at least one dimension per head")
    return head_dim


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise ValueError(f"a number of {digits:,} digits")
    return int(text)


def parse_json(text: str | bytes, object_pairs_hook: Any = None) -> Any:
    """json.loads for untrusted text, with causes a reader can act on: a number of more than MAX_DIGITS digits
    and nesting deeper than Python's recursion limit are ValueErrors saying so (not a RecursionError, nor int()'s
    advice to raise a limit)."""
    try:
        return json.loads(text, parse_int=_bounded_int, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise ValueError("nested too deeply (more than about 1,000 levels)") from None


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes; ConfigError naming it otherwise.
    Opened without blocking and checked before reading, so a FIFO or a device in its place never hangs or fills
    memory."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file; expected the file itself")
        if info.st_size > limit:
            raise ConfigError(f"{path}: {info.st_size:,} bytes, more than the {limit:,} this file may have; "
                              "the file is damaged or not what its name says")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since fstat
        raise ConfigError(f"{path}: more than the {limit:,} bytes this file may have")
    return data


def read_json_object(path: Path, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """One JSON object from a checkpoint's file (config, tokenizer config, ...), or ConfigError saying why not."""
    raw = read_regular(path, limit)
    try:
        data = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; expected a JSON object in UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def load_config(path: str | Path) -> Lfm2Config:
    """Read `config.json` (and `generation_config.json` when present) from a checkpoint directory."""
    root = Path(path)
    cfg_path = root / "config.json" if root.is_dir() else root
    if not cfg_path.exists():  # something else in its place (a FIFO, a directory) is read_regular's to name
        raise ConfigError(f"{root}: no config.json here; is this a model checkpoint directory?")
    gen_path = cfg_path.parent / "generation_config.json"
    gen = read_json_object(gen_path) if gen_path.exists() else None
    return parse_config(read_json_object(cfg_path), source=str(cfg_path), generation_config=gen,
                        generation_source=str(gen_path))
