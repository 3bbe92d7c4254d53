"""benchmarks/serve_bench.py (concurrent streaming clients) against a real `lfm2 serve` on a tiny checkpoint, its
stream parsing and table; benchmarks/peers/gguf_vocab.py (a tokenizer written into a vocabulary-less GGUF)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import serve_bench
from tests.helpers import serving

ROOT = Path(__file__).resolve().parents[1]


def test_stream_events_are_timed_and_counted_from_usage() -> None:
    stream = serve_bench.Stream(sent=0.0)
    lines = [": keep-alive", "data: " + json.dumps({"choices": [{"delta": {"role": "assistant"}}]}),
             "data: " + json.dumps({"choices": [{"delta": {"content": "a"}, "finish_reason": None}]}),
             "", "data: " + json.dumps({"choices": [{"text": "bc", "finish_reason": "length"}]}),
             "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 9}}),
             "data: [DONE]", "data: " + json.dumps({"choices": [{"text": "after the end"}]})]
    serve_bench.read_events(stream, lines)
    assert (stream.chunks, stream.tokens, stream.prompt_tokens, stream.finish_reason) == (2, 3, 9, "length")
    assert stream.generated == 3 and 0 < stream.first <= stream.last
    assert serve_bench.Stream(sent=0.0, chunks=4).generated == 4  # no usage: one token a chunk


def test_prompts_differ_by_seed_and_keep_their_length() -> None:
    opts = serve_bench.Options("http://x", prompt_tokens=50, ids=(100, 400), ignore_eos=True)
    a, b = serve_bench.request_body(opts, 1, 8), serve_bench.request_body(opts, 2, 8)
    assert len(a["prompt"]) == len(b["prompt"]) == 50 and a["prompt"] != b["prompt"]
    assert all(100 <= t < 400 for t in a["prompt"])
    assert a["ignore_eos"] and a["temperature"] == 0 and a["stream"] and a["max_tokens"] == 8
    assert "ignore_eos" not in serve_bench.request_body(serve_bench.Options("http://x"), 1, 8)
    chat = serve_bench.request_body(serve_bench.Options("http://x", api="chat", words=5), 3, 8)
    assert len(chat["messages"][0]["content"].split()) == 6  # the seed, then the words


def test_summary_and_table() -> None:
    streams = [serve_bench.Stream(sent=0.0, first=0.5, last=2.5, chunks=21, tokens=21, prompt_tokens=64,
                                  chunk_times=[0.5 + i / 10 for i in range(21)]),
               serve_bench.Stream(sent=0.0, first=1.0, last=3.0, chunks=11, tokens=11, prompt_tokens=64,
                                  chunk_times=[1.0 + i / 5 for i in range(11)])]
    late = serve_bench.Stream(sent=1.0, first=1.25, last=1.3, chunks=2, tokens=2)
    row = serve_bench.summarise(2, [streams], [(late, True)])
    assert row["aggregate_tok_s"] == pytest.approx(32 / 3.0)
    assert row["stream_tok_s"] == pytest.approx((10 + 5) / 2)
    assert (row["ttft_s"], row["ttft_max_s"], row["late_ttft_s"]) == (0.75, 1.0, 0.25)
    lines = serve_bench.table("x", serve_bench.Options("http://x"), [row])
    # from 1.0 to 2.5 both decode: 15 tokens of the first stream, 7 of the second
    assert row["steady_tok_s"] == pytest.approx(22 / 1.5)
    assert lines[-1] == "| 2 | 64 | 11-21 | 10.7 | 14.7 | 7.5 | 0.750 | 1.000 | 0.250 |"
    serial = [serve_bench.Stream(sent=0.0, first=0.1, last=1.0, chunks=2, tokens=2, chunk_times=[0.1, 1.0]),
              serve_bench.Stream(sent=0.0, first=1.1, last=2.0, chunks=2, tokens=2, chunk_times=[1.1, 2.0])]
    assert serve_bench.steady_rate(serial) is None


@pytest.mark.slow
def test_runs_against_lfm2_serve(endless_ckpt: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with serving(endless_ckpt) as srv:
        for api in ("completions", "chat"):
            rows = serve_bench.main(["--url", srv.url, "--streams", "1,2", "--prompt-tokens", "24",
                                     "--max-tokens", "6", "--api", api, "--json", str(tmp_path / "out.json")])
            assert [r["streams"] for r in rows] == [1, 2] and not any(r["errors"] for r in rows)
            assert all(r["tokens_per_stream"] == (6, 6) for r in rows)  # this checkpoint never picks EOS
            assert all(r["aggregate_tok_s"] and r["ttft_s"] is not None for r in rows)
            assert rows[1]["late_ttft_s"] is not None
            if api == "completions":
                assert rows[0]["prompt_tokens"] == 24
        assert not srv.errors
    out = capsys.readouterr().out
    assert "| streams | prompt tok |" in out and "ignore_eos" not in out
    assert json.loads((tmp_path / "out.json").read_text())["rows"][1]["streams"] == 2


@pytest.mark.slow
def test_gguf_vocab_writes_the_tokenizer_padded_to_the_embedding(chat_ckpt: Path, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    bare, full = tmp_path / "bare.gguf", tmp_path / "vocab.gguf"
    peers = ROOT / "benchmarks" / "peers"
    subprocess.run([sys.executable, peers / "hf2gguf.py", chat_ckpt, bare, "q8_0"], check=True, capture_output=True)
    subprocess.run([sys.executable, peers / "gguf_vocab.py", chat_ckpt, bare, full], check=True, capture_output=True)
    before, after = gguf.GGUFReader(bare), gguf.GGUFReader(full)
    fields = after.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    # the tiny tokenizer is a plain byte-level BPE (GPT-2's split); LFM2's own splits first, as llama.cpp's "lfm2"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(tokens) == len(types) == json.loads((chat_ckpt / "config.json").read_text())["vocab_size"]
    vocab = json.loads((chat_ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[7] == "<|im_end|>" and types[7] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    ids = (fields[f"tokenizer.ggml.{name}_token_id"].contents() for name in ("bos", "eos"))
    assert tuple(ids) == (1, 7)
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0 and "tokenizer.chat_template" in fields
    assert fields["lfm2.block_count"].contents() == before.fields["lfm2.block_count"].contents()
    old = {t.name: t for t in before.tensors}
    assert [t.name for t in after.tensors] == list(old)
    for t in after.tensors:
        assert t.tensor_type == old[t.name].tensor_type and list(t.shape) == list(old[t.name].shape)
        assert np.array_equal(t.data, old[t.name].data)


def test_gguf_vocab_names_lfm2s_pre_tokenizer() -> None:
    pytest.importorskip("gguf")
    from benchmarks.peers import gguf_vocab

    lfm2 = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "..."}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    assert gguf_vocab.pre_tokenizer(lfm2) == "lfm2"
    assert gguf_vocab.pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
