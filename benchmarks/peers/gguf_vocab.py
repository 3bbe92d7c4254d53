#!/usr/bin/env python3
"""Copy a GGUF that `hf2gguf.py` wrote (no vocabulary) with the checkpoint's tokenizer added, so llama.cpp's
`llama-server` can serve it (it refuses a model whose vocabulary type is "none"). Runs in the venv `setup` makes,
or any Python with `gguf` and `numpy`.

    VENV/bin/python gguf_vocab.py HF_DIR IN.gguf OUT.gguf

The tokenizer is HF_DIR/tokenizer.json, a byte-level BPE as LFM2's is, written as llama.cpp's "gpt2" model with
LFM2's pre-tokenizer ("lfm2"; "gpt-2" for a plain byte-level one, as random test checkpoints have): every entry by
id, its type (control for special added tokens, user-defined for other added ones, normal otherwise), the merges,
the BOS/EOS/pad ids of tokenizer_config.json and the chat template. The list is padded with unused `[PAD<id>]`
entries up to the embedding's rows, as llama.cpp's own converter does for ids no text encodes to. Tensors and
every other key are copied unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gguf

# Keys the writer makes itself, and those this script replaces.
SKIPPED_PREFIXES = ("GGUF.", "general.architecture", "tokenizer.")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken object."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def vocab_entries(tok: dict, rows: int) -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types for ids 0..rows-1, unused placeholders where the tokenizer has no entry."""
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise SystemExit(f"tokenizer.json: a BPE model expected, found {model.get('type')!r}")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= rows:
        raise SystemExit(f"the tokenizer has ids up to {max(by_id)}, more than the model's {rows} embeddings")
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merges(tok: dict) -> list[str]:
    """The BPE merges as "left right" strings (tokenizer.json holds pairs or, in older files, such strings)."""
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in tok["model"].get("merges", [])]


def adds_bos(tok: dict, tok_config: dict, bos: str | None) -> bool:
    """Whether encoding prepends BOS: tokenizer_config.json says so, or the post-processor's template starts with it."""
    if "add_bos_token" in tok_config:
        return bool(tok_config["add_bos_token"])
    single = (tok.get("post_processor") or {}).get("single") or []
    first = single[0] if single else {}
    return bos is not None and first.get("SpecialToken", {}).get("id") == bos


def pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: "lfm2" (LFM2's split of words, numbers and punctuation
    before the byte-level step), or "gpt-2" for a bare byte-level step with its own GPT-2 split, as the test
    suite's and make_random_checkpoint.py's tokenizers have (numbers are split differently there)."""
    pre = tok.get("pre_tokenizer") or {}
    return "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "lfm2"


def add_vocab(w: gguf.GGUFWriter, hf_dir: Path, rows: int) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config_path = hf_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokens, types = vocab_entries(tok, rows)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges(tok))
    ids = {t: i for i, t in enumerate(tokens)}
    model_config = json.loads((hf_dir / "config.json").read_text()) if (hf_dir / "config.json").is_file() else {}
    bos = _token_text(tok_config.get("bos_token"))
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        text = _token_text(tok_config.get(f"{name}_token"))
        fallback = model_config.get(f"{name}_token_id")
        token_id = ids.get(text) if text is not None else fallback if isinstance(fallback, int) else None
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(adds_bos(tok, tok_config, bos))
    w.add_add_eos_token(False)
    template = tok_config.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        w.add_chat_template(template)


def copy_fields(reader: gguf.GGUFReader, w: gguf.GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith(SKIPPED_PREFIXES):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), kind, sub)


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    hf_dir, src, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = int(embedding.shape[1])  # GGUF lists dimensions innermost first: (hidden, vocabulary)
    w = gguf.GGUFWriter(out, arch)
    copy_fields(reader, w)
    add_vocab(w, hf_dir, rows)
    for t in reader.tensors:
        # the reader gives quantised and bf16 data as bytes; the writer turns their shape back into elements
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out}: {src} with the vocabulary of {hf_dir / 'tokenizer.json'} ({rows} entries)")


if __name__ == "__main__":
    main()
