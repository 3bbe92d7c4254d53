"""`lfm2 bench`: JSON fields, plain output, option parsing, the bytes-per-token model, random and real models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfm2cli.benchmark import COLUMNS, bench, decode_bytes, random_config, rows, summary
from lfm2cli.errors import UsageError
from lfm2cli.loading.checkpoint import parameter_counts
from lfm2cli.loading.loader import load
from lfm2cli.terminal.render import print_report

RUN_FIELDS = {"prompt_tokens", "gen_tokens", "repeat", "prefill_tps", "decode_tps", "ttft_s",
              "ceiling_tps", "decode_fraction_of_ceiling"}
TOP_FIELDS = {"model", "architecture", "parameters", "active_parameters", "device", "dtype", "quantize", "compile",
              "threads", "kernels", "kernels_note", "random_weights", "load_s", "memory_bandwidth_gbs",
              "memory_bandwidth_range_gbs", "decode_bytes_per_token", "decode_ceiling_tps", "peak_memory_bytes", "runs"}


def lfm2(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent.parent)


@pytest.mark.slow
def test_bench_random_json(dense_ckpt: Path) -> None:
    """--random builds the model from a config alone (here the tiny checkpoint's config.json)."""
    r = lfm2("bench", "--random", str(dense_ckpt / "config.json"), "--prompt-tokens", "8,16", "--gen-tokens", "4",
             "--repeat", "2", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert TOP_FIELDS <= set(data)
    assert data["random_weights"] is True and data["dtype"] == "float32" and data["quantize"] == "none"
    assert data["kernels"] == "torch"  # the native code is for bf16
    assert data["tuning"] is None  # nor is there a tuning of it to show
    head = next(row for row in data["plan"] if row["part"] == "LM head")
    assert head["format"] == "fp32" and head["why_not"] == "native code used for bf16 on CPU only"
    assert [run["prompt_tokens"] for run in data["runs"]] == [8, 16]
    for run in data["runs"]:
        assert RUN_FIELDS <= set(run)
        assert run["gen_tokens"] == 4 and run["repeat"] == 2
        for key in ("prefill_tps", "decode_tps", "ttft_s"):
            spread = run[key]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert run["decode_fraction_of_ceiling"] == pytest.approx(
            run["decode_tps"]["median"] / data["decode_ceiling_tps"], rel=0.02)
    assert data["memory_bandwidth_gbs"] > 0 and data["peak_memory_bytes"] > data["decode_bytes_per_token"]
    assert data["decode_ceiling_tps"] == pytest.approx(
        data["memory_bandwidth_gbs"] * 1e9 / data["decode_bytes_per_token"], rel=0.01)


@pytest.mark.slow
def test_bench_real_checkpoint_plain_output(moe_ckpt: Path) -> None:
    r = lfm2("bench", str(moe_ckpt), "--prompt-tokens", "6", "--gen-tokens", "3", "--repeat", "1",
             "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"model: {moe_ckpt}, LFM2-MoE")
    assert "int8 weights" in r.stdout and "ceiling" in r.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("prompt"))
    assert "decode tok/s" in lines[header] and lines[header + 1].split()[0] == "6"
    assert "\x1b[" not in r.stdout  # piped: no terminal codes
    if "native code" not in lines[1] and "native" in lines[1]:  # the native library runs it: its tuning is shown
        # the suite keeps the compiled tuning (LFM2_TUNING=off in tests/conftest.py)
        assert "native decode tuning: streams=4, ahead=0, part_kb=512 (compiled defaults (LFM2_TUNING))" in lines
    plan = lines[lines.index("decode plan (which code runs each part of the model here):") + 1:]
    assert plan[0].split()[:3] == ["part", "implementation", "format"]
    parts = [line.split("  ")[0] for line in plan[1:]]
    assert {"MoE experts w1/w3, w2", "MoE router", "LM head", "one-token step"} <= set(parts)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--random", "lfm2-9000m"], "--random needs a published model"),
    (["--random", "lfm2-350m", "--prompt-tokens", "12,x"], "--prompt-tokens takes whole numbers"),
    (["--random", "lfm2-350m", "--quantize", "int3"], "'int3' is not one of 'none', 'int8', 'int4'"),
])
def test_bench_usage_errors(args: list[str], message: str) -> None:
    r = lfm2("bench", *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_in_process_repeated_prompt_options(dense_ckpt: Path) -> None:
    result = bench(str(dense_ckpt), prompt_lengths=[5, 9], gen_tokens=3, repeat=2, device="cpu", dtype="bfloat16")
    assert [r.prompt_tokens for r in result.runs] == [5, 9] and result.dtype == "bfloat16"
    assert result.random_weights is False and result.model == str(dense_ckpt)
    from io import StringIO

    out = StringIO()
    print_report(summary(result), COLUMNS, rows(result), plain=True, out=out)
    assert "median (min-max)" in out.getvalue()
    if result.kernels.startswith("native"):
        assert result.tuning == {"streams": 4, "ahead": 0, "part_kb": 512, "source": "compiled defaults (LFM2_TUNING)"}
        assert "native decode tuning: streams=4, ahead=0, part_kb=512" in out.getvalue()
    with pytest.raises(UsageError):
        bench(str(dense_ckpt), gen_tokens=1)


def test_prompt_token_option_forms() -> None:
    from lfm2cli.commands.bench import _lengths

    assert _lengths(None) == [128, 512]
    assert _lengths(["64", "256,1024"]) == [64, 256, 1024]
    with pytest.raises(UsageError):
        _lengths(["0"])


@pytest.mark.parametrize("ckpt", ["dense_ckpt", "moe_ckpt"])
@pytest.mark.parametrize("fast", [False, True])
def test_decode_bytes_counts_active_weights(ckpt: str, fast: bool, request: pytest.FixtureRequest) -> None:
    """Bytes per decoded token = active parameters x 2 (bf16) + the one embedding row looked up: the tied head
    reads the whole table, MoE layers only their top-k experts. Same with fused/prepacked weights."""
    from lfm2cli.loading.loader import load_model
    from lfm2cli.model.config import load_config

    path = request.getfixturevalue(ckpt)
    cfg = load_config(path)
    model = load_model(path, cfg, torch.device("cpu"), torch.bfloat16, fast=fast)
    _, active = parameter_counts(cfg)
    # MoE routing biases are buffers, not parameters, and are read too (float32)
    extra = sum(b.numel() * b.element_size() for b in model.buffers())
    assert decode_bytes(model) == active * 2 + cfg.hidden_size * 2 + extra


def test_random_config_names(dense_ckpt: Path) -> None:
    assert random_config("lfm2-350m")[0].hidden_size == 1024
    assert random_config("LiquidAI/LFM2-1.2B")[0].hidden_size == 2048
    assert random_config(str(dense_ckpt))[0].hidden_size == 64
    with pytest.raises(UsageError):
        random_config("nope")


def test_bench_loaded_model_unchanged(dense_ckpt: Path) -> None:
    """Bench uses the same loader as generate: the model answers the same after a bench run."""
    model = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    before = model(torch.tensor([[1, 2, 3]]))
    from lfm2cli.benchmark import run_bench

    runs, _ = run_bench(model, [4], 3, 1, bytes_per_token=1000, bandwidth=1e5)
    assert runs[0].prompt_tokens == 4 and runs[0].decode_tps.median > 0
    assert torch.equal(model(torch.tensor([[1, 2, 3]])), before)


def test_each_run_is_set_against_the_bandwidth_measured_next_to_it(dense_ckpt: Path) -> None:
    """On a shared host the bandwidth moves between runs: each run's share of the ceiling uses its own probe."""
    from lfm2cli.benchmark import run_bench

    model = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    probes = iter([1e6, 4e6, 1e6, 4e6])
    runs, measured = run_bench(model, [4, 6], 3, 2, bytes_per_token=1000, bandwidth=lambda: next(probes))
    assert measured == [1e6, 1e6, 4e6, 4e6]  # per length: the probes before its runs (lengths interleaved)
    first, second = runs
    assert (first.ceiling_tps.min, first.ceiling_tps.max) == (1e3, 1e3)
    assert (second.ceiling_tps.min, second.ceiling_tps.max) == (4e3, 4e3)
    assert first.decode_fraction_of_ceiling == pytest.approx(first.decode_tps.median / 1e3)
    assert second.decode_fraction_of_ceiling == pytest.approx(second.decode_tps.median / 4e3)


def test_the_probe_reads_the_embedding_table_only_when_no_cache_holds_it(dense_ckpt: Path) -> None:
    from types import SimpleNamespace

    from lfm2cli.benchmark import PROBE_MIN_BYTES, bandwidth_probe

    small = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    assert bandwidth_probe(small) is None  # the tiny table sits in a cache: bench keeps its first measurement
    table = torch.zeros(PROBE_MIN_BYTES // 2, dtype=torch.bfloat16)
    probe = bandwidth_probe(SimpleNamespace(model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=table))))
    assert probe is not None and probe() > 1e8  # bytes/s: any real memory reads faster than 100 MB/s
