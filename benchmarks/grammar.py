#!/usr/bin/env python3
"""What constrained decoding (--schema, --format json, --tool-choice) costs per token, next to a decode step of
the LFM2-350M shape, measured in one run on one machine. Grammar engines: llguidance (what lfm2 uses) and, when
installed, xgrammar (the alternative the choice was made against).

    python benchmarks/grammar.py                 # the table
    python benchmarks/grammar.py --write         # also into docs/performance.md between the grammar markers

The grammar's cost depends on the vocabulary, so a byte-level BPE tokenizer with LFM2's 65,536 entries and its
control tokens is trained once on the Python standard library's sources (cached under ~/.cache/lfm2-bench).
For each output below (a JSON document for a schema, any JSON object, a tool call), its tokens are replayed through
the engine: for each token, the mask over the whole vocabulary is computed, applied to a logits row, and the token
consumed: exactly the work lfm2 adds to a decode step. The decode step is timed on LFM2-350M's shape with random
weights (bf16 on CPU, lfm2's own kernels), and the ratio is the cost.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree, not whatever lfm2cli is installed
sys.path.insert(0, str(ROOT / "tests"))

CACHE = Path(os.environ.get("LFM2_BENCH_CACHE", Path.home() / ".cache" / "lfm2-bench"))
VOCAB = 65536
MARKERS = ("<!-- grammar:begin -->", "<!-- grammar:end -->")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,}$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "status": {"enum": ["active", "inactive", "pending"]},
    },
    "required": ["name", "age", "tags", "status"], "additionalProperties": False,
}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
       "tags": ["mathematics", "analytical engine", "notes on the engine", "poetical science"],
       "address": {"city": "London", "zip": "W1"}, "status": "inactive"}
FREE = {"summary": "The meeting moved to Thursday; Paris office joins remotely.", "actions": [
    {"owner": "Kim", "task": "send the agenda", "due": "2026-12-03"},
    {"owner": "Lee", "task": "book the room", "due": None}], "urgent": False, "count": 2}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {
                                               "location": {"type": "string"},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                                               "required": ["location"]}}}]
CALL = '<|tool_call_start|>[get_weather(location="Paris, France", unit="celsius")]<|tool_call_end|>'


def tokenizer_file() -> Path:
    """LFM2-sized byte-level BPE, trained once (a minute or two on 2 cores) and cached."""
    from tiny_tokenizer import SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = CACHE / f"bpe-{VOCAB}.json"
    if path.is_file():
        return path
    std = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(f"{std}/**/*.py", recursive=True) if "site-packages" not in f)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    print(f"training a {VOCAB}-token tokenizer on {len(files)} files (once)", file=sys.stderr)
    tok.train_from_iterator((Path(f).read_text(encoding="utf-8", errors="replace") for f in files), trainer)
    CACHE.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def replay_llguidance(tok, grammar, ids, vocab, eos):
    """Seconds per token to mask and consume `ids`, through lfm2's own Constraint (what generation runs)."""
    import torch

    from lfm2cli.decoding.constraints import Constraint

    t0 = time.perf_counter()
    c = Constraint(tok, grammar, vocab, [eos])
    setup = time.perf_counter() - t0
    logits = torch.randn(vocab)
    t0 = time.perf_counter()
    for t in ids:
        masked = c.mask(logits)
        assert masked[t] > float("-inf"), "the grammar refused the document's own token"
        c.accept(t)
    return (time.perf_counter() - t0) / len(ids), setup


def replay_xgrammar(tok_json, kind, ids, vocab, eos):
    import torch
    import xgrammar as xgr
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json), eos_token="<|im_end|>")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    if kind == "schema":
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    elif kind == "object":
        compiled = compiler.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False)
    else:
        return None, None
    setup = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    t0 = time.perf_counter()
    for t in ids:
        matcher.fill_next_token_bitmask(bitmask)
        masked = logits.clone()
        xgr.apply_token_bitmask_inplace(masked, bitmask)
        assert matcher.accept_token(t), "xgrammar refused the document's own token"
    return (time.perf_counter() - t0) / len(ids), setup


def decode_step_s(repeat: int) -> float:
    """Median seconds per decode step of LFM2-350M's shape (random bf16 weights, this machine's kernels)."""
    import torch

    from lfm2cli.benchmark import random_config
    from lfm2cli.decoding.loop import decode_tokens
    from lfm2cli.loading import loader

    loader.configure_threads(torch.device("cpu"))
    cfg, _ = random_config("lfm2-350m")
    model = loader.random_model(cfg, torch.device("cpu"), torch.bfloat16)
    times = []
    for _ in range(repeat):
        prompt = list(range(100, 164))
        t0 = None
        n = 0
        for _tok in decode_tokens(model, prompt, sampler=lambda lg, _s: int(lg.argmax()), max_tokens=65):
            if t0 is None:
                t0 = time.perf_counter()
            n += 1
        times.append((time.perf_counter() - t0) / (n - 1))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="put the table into docs/performance.md")
    args = ap.parse_args()

    from lfm2cli.decoding.constraints import json_grammar, tool_call_grammar
    from lfm2cli.text.tokenizer import load_tokenizer

    directory = CACHE / "tokenizer"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_bytes(tokenizer_file().read_bytes())
    tok = load_tokenizer(directory)
    eos = tok.eos_token_id
    cases = [
        ("schema (6 fields, enum, pattern, nested)", "schema", json_grammar(SCHEMA), json.dumps(DOC)),
        ("--format json (any object)", "object", json_grammar(None), json.dumps(FREE)),
        ("--tool-choice required", "tool", tool_call_grammar(TOOLS), CALL),
    ]
    step = decode_step_s(args.repeat)
    try:
        import xgrammar  # noqa: F401

        have_xgr = True
    except ImportError:
        have_xgr = False
    lines = [f"LFM2-350M shape, bf16 decode step: {step * 1e3:.2f} ms (median of {args.repeat} runs of 64 tokens); "
             f"tokenizer: {VOCAB:,} tokens.", "",
             "| output | tokens | llguidance per token | share of a decode step | setup |"
             + (" xgrammar per token | xgrammar setup |" if have_xgr else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if have_xgr else "")]
    # llguidance first, all of it: xgrammar leaves worker threads behind that would compete for the CPU
    rows = []
    for label, _kind, grammar, text in cases:
        ids = tok.encode(text) + [eos]
        per, setup = min((replay_llguidance(tok, grammar, ids, VOCAB, eos) for _ in range(args.repeat)),
                         key=lambda r: r[0])
        rows.append([f"| {label} | {len(ids)} | {per * 1e6:.0f} µs | {per / step:.1%} | {setup * 1e3:.0f} ms |"])
    for row, (_label, kind, _grammar, text) in zip(rows, cases, strict=True) if have_xgr else ():
        ids = tok.encode(text) + [eos]
        x = [replay_xgrammar(tok.to_json(), kind, ids, VOCAB, eos) for _ in range(args.repeat)]
        if x[0][0] is None:
            row.append(" n/a | n/a |")
        else:
            xper, xsetup = min(x, key=lambda r: r[0])
            row.append(f" {xper * 1e6:.0f} µs | {xsetup * 1e3:.0f} ms |")
    lines += ["".join(row) for row in rows]
    table = "\n".join(lines)
    print(table)
    if args.write:
        doc = ROOT / "docs" / "performance.md"
        text = doc.read_text(encoding="utf-8")
        begin, end = MARKERS
        if begin not in text or end not in text:
            raise SystemExit(f"{doc} has no {begin} ... {end} markers")
        head, rest = text.split(begin, 1)
        doc.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


if __name__ == "__main__":
    main()
