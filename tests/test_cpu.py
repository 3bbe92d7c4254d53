"""What the CPU can do is decided in one place (system/cpu.py), and LFM2_CPU_HIDE makes any machine look like one
without those features: the AVX2 level and the torch fallback then run here as they would on such a CPU, and a
bf16 model never reaches torch's oneDNN bf16 path where the CPU cannot run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfm2cli.errors import UsageError
from lfm2cli.kernels.proj import can_prepack
from lfm2cli.loading.loader import load, resolve_dtype
from lfm2cli.system import cpu

CPU = torch.device("cpu")
x86 = pytest.mark.skipif("avx2" not in cpu.flags(), reason="an x86-64 CPU with AVX2")


def test_hidden_flags_are_gone_from_every_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LFM2_CPU_HIDE", raising=False)
    everything = cpu.flags()
    monkeypatch.setenv("LFM2_CPU_HIDE", "avx512*, amx*, avx_vnni")
    left = cpu.flags()
    assert not any(f.startswith(("avx512", "amx")) or f == "avx_vnni" for f in left)
    assert left == {f for f in everything if not f.startswith(("avx512", "amx")) and f != "avx_vnni"}
    assert "avx512" not in cpu.native_levels()
    assert not cpu.bf16_compute() or cpu.is_arm()
    assert not cpu.onednn_bf16()
    monkeypatch.setenv("LFM2_CPU_HIDE", "avx2")
    assert cpu.native_levels() == []  # the AVX512 level builds on AVX2 too


@x86
def test_native_level_follows_the_cpu_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LFM2_CPU_HIDE", raising=False)
    monkeypatch.delenv("LFM2_NATIVE_ISA", raising=False)
    best = cpu.native_levels()[0]
    assert cpu.native_level() == (best, None)
    monkeypatch.setenv("LFM2_NATIVE_ISA", "avx2")
    assert cpu.native_level() == ("avx2", None)  # every CPU with a level runs the AVX2 one
    monkeypatch.setenv("LFM2_NATIVE_ISA", "none")
    assert cpu.native_level()[0] is None
    monkeypatch.setenv("LFM2_NATIVE_ISA", "sse9")
    with pytest.raises(UsageError, match="LFM2_NATIVE_ISA=sse9 is not a native kernel level"):
        cpu.native_level()
    monkeypatch.setenv("LFM2_NATIVE_ISA", "avx512")
    monkeypatch.setenv("LFM2_CPU_HIDE", "avx512_bf16")
    level, why = cpu.native_level()
    assert level is None and "lacks" in why and "avx512_bf16" in why
    monkeypatch.delenv("LFM2_NATIVE_ISA")
    assert cpu.native_level() == ("avx2", None)  # without AVX512-BF16 the AVX2 level is the best


def test_no_onednn_bf16_prepack_without_bf16_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(32, 32)
    monkeypatch.setenv("LFM2_CPU_HIDE", "avx512_bf16,amx_bf16")
    if not cpu.is_arm():
        assert not can_prepack(w.bfloat16())
    assert can_prepack(w) == (torch.backends.mkldnn.is_available()
                              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@pytest.mark.slow
def test_auto_dtype_is_bf16_only_where_something_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from lfm2cli.kernels import native

    monkeypatch.setenv("LFM2_CPU_HIDE", "avx512_bf16,amx_bf16")
    monkeypatch.setenv("LFM2_NATIVE", "0")
    native.reset()
    try:
        if not cpu.is_arm():
            assert resolve_dtype("auto", CPU) == torch.float32  # no bf16 arithmetic, no native kernels
        monkeypatch.setenv("LFM2_NATIVE", "1")
        native.reset()
        expected = torch.bfloat16 if native.load(Path(os.environ["LFM2_CACHE"]) / "kernels") is None else None
        if expected is not None:
            assert resolve_dtype("auto", CPU) == torch.bfloat16  # the native kernels read bf16 at any level
    finally:
        native.reset()


def run_generate(ckpt: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **extra_env}
    return subprocess.run([sys.executable, "-m", "lfm2cli", "generate", str(ckpt), "-p", "hi", "-n", "6", "-t", "0",
                           "-v", *args], capture_output=True, text=True, env=env, timeout=180,
                          cwd=Path(__file__).parent.parent)


@pytest.mark.slow
@pytest.mark.parametrize("native_env", ["1", "0"])
def test_bf16_runs_as_on_a_cpu_without_avx512(chat_ckpt: Path, native_env: str) -> None:
    """`--dtype bfloat16` and `--dtype auto` on a CPU without AVX512 (here: with its flags hidden), with the native
    AVX2 kernels and without any native code: both run, and agree with the float32 answer's first tokens."""
    hide = {"LFM2_CPU_HIDE": "avx512*,amx*,avx_ne_convert", "LFM2_NATIVE": native_env}
    bf16 = run_generate(chat_ckpt, hide, "--dtype", "bfloat16")
    assert bf16.returncode == 0, bf16.stderr
    auto = run_generate(chat_ckpt, hide)
    assert auto.returncode == 0, auto.stderr
    f32 = run_generate(chat_ckpt, {"LFM2_NATIVE": native_env}, "--dtype", "float32")
    assert f32.returncode == 0 and bf16.stdout.strip() and f32.stdout.strip()
    if native_env == "0" and not cpu.is_arm():
        assert auto.stdout == f32.stdout  # float32 where nothing computes bf16


def test_model_runs_on_torch_in_bf16_with_bf16_hidden(dense_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch fallback for bf16 without bf16 arithmetic: plain weights, never oneDNN's bf16 prepack."""
    from lfm2cli.kernels import native

    monkeypatch.setenv("LFM2_CPU_HIDE", "avx512*,amx*,avx_ne_convert")
    monkeypatch.setenv("LFM2_NATIVE", "0")
    native.reset()
    try:
        model = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
        kinds = {m.kind for m in model.modules() if hasattr(m, "kind")}
        assert kinds == {"plain"}
        cache = model.new_cache()
        logits = model(torch.tensor([[1, 2, 3]]), cache)
        assert torch.isfinite(logits).all()
        assert torch.isfinite(model(torch.tensor([[int(logits.argmax())]]), cache)).all()
    finally:
        native.reset()


@pytest.mark.parametrize("value", ["avx3", "AVX-512", "neon" if not cpu.is_arm() else "avx2", "1"])
def test_an_unknown_native_isa_is_an_error_in_one_line(value: str, chat_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A typo (or another architecture's level) must not quietly turn the native kernels off: one line that names
    the value and what this architecture accepts, exit 2, whatever the dtype."""
    import io

    from tests.helpers import run_main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    monkeypatch.setenv("LFM2_NATIVE_ISA", value)
    for dtype in ("auto", "float32"):
        code, out, err = run_main(["generate", str(chat_ckpt), "-p", "hi", "-n", "1", "--dtype", dtype], monkeypatch,
                                  capsys)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: LFM2_NATIVE_ISA={value} is not a native kernel level")
        assert all(level in lines[0] for level in [*cpu.level_table(), "none", "auto"])
        assert all(level in lines[0] for level in [*cpu.LEVELS, *cpu.ARM_LEVELS])  # each architecture's values


@pytest.mark.parametrize("value", ["", "auto", "none", "NONE", " none "])
def test_the_native_isa_values_every_machine_accepts(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LFM2_NATIVE_ISA", value)
    monkeypatch.delenv("LFM2_CPU_HIDE", raising=False)
    level, why = cpu.native_level()
    if value.strip().lower() == "none":
        assert (level, why) == (None, "turned off by LFM2_NATIVE_ISA=none")
    else:
        assert level == (cpu.native_levels() or [None])[0]
