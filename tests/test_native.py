"""lfm2's native CPU code (lfm2cli/kernels/csrc): at every ISA level this CPU can execute (AVX512-BF16 and AVX2 on
a Zen 4/5, AVX2 alone on older CPUs), its bf16 products equal float32 matmuls rounded to bf16, in every padding
case (int8 and int4: tests/test_grouped.py); the decode step's small ops are bit-identical to the torch
layers; it is built once per level and cached; models use it for bf16 on CPU and give the reference path's
answers; without it (no compiler, LFM2_NATIVE=0) everything still runs."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lfm2cli.kernels import native
from lfm2cli.kernels.native_step import NativeDecoder
from lfm2cli.kernels.proj import PlainProj, Proj
from lfm2cli.loading.loader import load, load_model
from lfm2cli.model.config import load_config
from lfm2cli.model.layers import RMSNorm, apply_rope, decode_attention, rope_cos_sin
from lfm2cli.system import cpu
from tests.helpers import native_at_level

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=cpu.native_levels() or ["none"])
def library(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The library built and loaded at one ISA level this CPU executes (each test runs at every such level);
    afterwards the process goes back to the level it would pick itself."""
    with native_at_level(request.param, tmp_path_factory.mktemp("kernels")):
        if native._lib is None:
            pytest.skip(f"native code {native.why_not()}")
        yield request.param


@pytest.fixture(scope="module")
def kernel(library: str) -> str:
    """The library with its matrix kernel: what models use."""
    if not native.ready():
        pytest.skip(f"native code {native.why_not()}")
    assert native.level() == library
    return library


def bf16_close(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """Within one bf16 rounding step of the exact (float32) product: summation order may tip a rounding."""
    step = exact.abs().clamp(min=1e-3) * 2.0 ** -7
    return bool(((got.float() - exact).abs() <= step).all())


@pytest.mark.parametrize("shape", [(64, 64), (70, 38), (8, 2), (1536, 256), (200, 130)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 9, 13, 40])
def test_bf16_product_is_the_rounded_float_product(kernel: None, shape: tuple[int, int], rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g).bfloat16()
    x = torch.randn(rows, shape[1], generator=g).bfloat16()
    y = native.linear(x, native.pack(w), shape[0])
    assert y.dtype == torch.bfloat16 and y.shape == (rows, shape[0])
    assert bf16_close(y, x.float() @ w.float().t())


@pytest.mark.parametrize("shape", [(64, 64), (70, 38), (200, 1040), (130, 2000), (64, 1538)])
def test_a_token_gives_the_same_bits_alone_or_with_others(kernel: None, shape: tuple[int, int]) -> None:
    """One token (decode) and several (a batch of sequences, prefill) sum a row in one order, chunks of long rows
    included: a sequence's numbers do not depend on what it is batched with."""
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=g).bfloat16()
    packed = native.pack(w)
    for rows in (2, 7, 13, 40):
        x = torch.randn(rows, shape[1], generator=g).bfloat16()
        many = native.linear(x, packed, shape[0])
        for t in range(rows):
            assert torch.equal(native.linear(x[t:t + 1], packed, shape[0]), many[t:t + 1]), (rows, t)


def test_group_of_products_equals_each_product(kernel: None) -> None:
    """The MoE step's routed experts run as one group: bit-identical to one product at a time."""
    g = torch.Generator().manual_seed(12)
    packed = [native.pack(torch.randn(136, 96, generator=g).bfloat16()) for _ in range(4)]
    xs = [torch.randn(96, generator=g).bfloat16() for _ in range(4)]
    group = native.linear_group(xs, packed, 136)
    for i, y in enumerate(group):
        assert torch.equal(y, native.linear(xs[i].view(1, -1), packed[i], 136).view(-1))


def test_packing_in_place_equals_packing_a_copy(kernel: None) -> None:
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(3)).bfloat16()
    expected = native.pack(w)
    mine = w.clone()
    packed = native.pack(mine, in_place=True)
    assert packed.data_ptr() == mine.data_ptr() and torch.equal(packed, expected)
    odd = torch.randn(70, 32).bfloat16()  # needs padding rows: packed into new memory, the weight untouched
    before = odd.clone()
    assert torch.equal(native.pack(odd, in_place=True), native.pack(before)) and torch.equal(odd, before)


def test_inputs_of_any_layout_and_leading_shape(kernel: None) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 64, generator=g).bfloat16()
    x = torch.randn(64, 2, 3, generator=g).bfloat16().permute(1, 2, 0)  # [2, 3, 64], not contiguous
    y = native.linear(x, native.pack(w), 96)
    assert y.shape == (2, 3, 96)
    assert bf16_close(y, x.float() @ w.float().t())


def test_proj_switches_to_the_native_form(kernel: None) -> None:
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(80, 64, generator=g).bfloat16(), torch.randn(80, generator=g).bfloat16()
    x = torch.randn(1, 4, 64, generator=g).bfloat16()
    plain, with_bias = PlainProj(w.clone()), PlainProj(w.clone(), b)
    assert plain.can_native()
    p = plain.to_native()
    with_bias = with_bias.to_native()
    assert p.kind == "native" and plain.weight is None and p.nbytes() == 80 * 64 * 2
    assert bf16_close(p(x), x.float() @ w.float().t())
    assert torch.equal(with_bias(x), p(x) + b)
    q = PlainProj(w.clone()).quantized("int8")
    assert q.to_native().kind == "int8-native" and q.qweight is None
    odd = PlainProj(torch.randn(16, 33, generator=g).bfloat16())
    assert not odd.can_native()  # inputs come in pairs: odd widths keep torch's kernels
    partial = PlainProj(torch.randn(16, 34, generator=g).bfloat16())
    partial = partial.quantized("int8")  # not whole groups of 32: kept in bf16, and native as such
    assert partial.quant is None and partial.can_native()


# ---- the decode step's small ops: bit-identical to the torch code of lfm2cli/model/layers.py

BF = torch.bfloat16


def norm(weight: torch.Tensor) -> RMSNorm:
    n = RMSNorm(weight.numel(), 1e-5)
    n.weight.data = weight
    return n


def test_add_rmsnorm_and_silu_mul_equal_torch(library: None) -> None:
    g = torch.Generator().manual_seed(8)
    x, h = torch.randn(1024, generator=g).to(BF), torch.randn(1024, generator=g).to(BF)
    w = (torch.rand(1024, generator=g) + 0.5).to(BF)
    stream = x.clone()
    y = native.add_rmsnorm(stream, h, w, 1e-5)
    assert torch.equal(stream, x + h) and torch.equal(y, norm(w)(x + h))
    assert torch.equal(native.add_rmsnorm(x.clone(), None, w, 1e-5), norm(w)(x))
    gu = (torch.randn(2 * 4608, generator=g) * 4).to(BF)  # wide range: silu's exp over the whole curve
    gate, up = gu.chunk(2)
    assert torch.equal(native.silu_mul(gu), F.silu(gate) * up)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_step_equals_torch(library: None, bias: bool) -> None:
    g = torch.Generator().manual_seed(9)
    h, width = 256, 3
    bcx = torch.randn(3 * h, generator=g).to(BF)
    state = torch.randn(1, h, width - 1, generator=g).to(BF)
    weight = torch.randn(h, 1, width, generator=g).to(BF)
    b = torch.randn(h, generator=g).to(BF) if bias else None
    # the eager code of ShortConv.forward for one token
    B, C, xx = bcx.view(1, 1, -1).chunk(3, dim=-1)
    seq = torch.cat((state, (B * xx).transpose(1, 2)), dim=-1)
    y = (seq * weight[:, 0, :]).sum(-1, keepdim=True)
    if b is not None:
        y = y + b[:, None]
    expected = (C * y.transpose(1, 2)).reshape(-1)
    new_state = state.clone()
    assert torch.equal(native.conv_step(bcx, new_state, weight, b), expected)
    assert torch.equal(new_state, seq[..., 1:])


@pytest.mark.parametrize("pos", [0, 37, 300])
def test_attention_step_equals_torch(library: None, pos: int) -> None:
    g = torch.Generator().manual_seed(pos)
    heads, kv, d, cap = 16, 4, 64, 512
    qkv = torch.randn((heads + 2 * kv) * d, generator=g).to(BF)
    qw, kw = [(torch.rand(d, generator=g) + 0.5).to(BF) for _ in range(2)]
    cos, sin = rope_cos_sin(1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d)), pos, 1, BF)
    k_cache, v_cache = [torch.randn(1, kv, cap, d, generator=g).to(BF) for _ in range(2)]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q, k, v = qkv.view(1, 1, -1).split([heads * d, kv * d, kv * d], dim=-1)
    q = apply_rope(norm(qw)(q.view(1, 1, heads, d)).transpose(1, 2), cos, sin)
    k = apply_rope(norm(kw)(k.view(1, 1, kv, d)).transpose(1, 2), cos, sin)
    k_ref[:, :, pos:pos + 1], v_ref[:, :, pos:pos + 1] = k, v.view(1, 1, kv, d).transpose(1, 2)
    expected = decode_attention(q, k_ref[:, :, :pos + 1], v_ref[:, :, :pos + 1]).reshape(-1)
    out = native.attention_step(qkv, qw, kw, cos, sin, k_cache, v_cache, pos, heads, 1e-5)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(out, expected)


def lockstep(model, first, second, steps: int):
    """Two caches fed the same tokens (the first run's greedy choices), `first()` / `second()` setting the model
    up before each one's step; yields each step's pair of logits."""
    from tests.helpers import prompt

    caches = (model.new_cache(), model.new_cache())
    logits = [model(prompt(9), c) for c in caches]
    for _ in range(steps):
        tok = torch.tensor([[int(logits[0].argmax())]])
        first()
        a = model(tok, caches[0])
        second()
        logits = [a, model(tok, caches[1])]
        yield logits
    assert caches[0].pos == caches[1].pos


@pytest.mark.slow
def test_native_decode_step_gives_the_eager_answers(kernel: None, dense_ckpt: Path, moe_ckpt: Path) -> None:
    """The one-token step in native code against the eager torch layers on the same native products."""
    for path in (dense_ckpt, moe_ckpt):
        model = load(path, device="cpu", dtype="bfloat16", tokenizer=False).model
        decoder = model.decode_step
        assert isinstance(decoder, NativeDecoder)
        for fast, eager in lockstep(model, lambda m=model, d=decoder: setattr(m, "decode_step", d),
                                    lambda m=model: setattr(m, "decode_step", None), 20):
            assert int(fast.argmax()) == int(eager.argmax())
            assert (fast - eager).abs().max() <= 0.01 * (eager.max() - eager.min())  # sums in another order


def test_whole_step_equals_the_per_op_step(kernel: None, dense_ckpt: Path, moe_ckpt: Path) -> None:
    """Models run the step as one native call; the per-op loop (biased projections) makes the same calls in the
    same order, so a dense model's numbers are identical. In MoE layers the whole step also routes in C (sigmoid,
    top-k with expert_bias, normalised weights, each rounded to bf16 as torch does): the same experts, the
    same numbers up to the last bit of a rounding."""
    for path, exact in ((dense_ckpt, True), (moe_ckpt, False)):
        model = load(path, device="cpu", dtype="bfloat16", tokenizer=False).model
        decoder, table = model.decode_step, model.decode_step.layers
        assert table is not None
        for whole, per_op in lockstep(model, lambda d=decoder, t=table: setattr(d, "layers", t),
                                      lambda d=decoder: setattr(d, "layers", None), 12):
            if exact:
                assert torch.equal(whole, per_op)
            else:
                assert int(whole.argmax()) == int(per_op.argmax())
                assert (whole - per_op).abs().max() <= 0.01 * (per_op.max() - per_op.min())


@pytest.mark.slow
def test_build_is_cached_and_keyed_by_source_and_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    try:
        first = native.build(tmp_path / "out", "avx2")
    except OSError as e:
        pytest.skip(f"no C compiler here: {e}")
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path / "out", "avx2") == first and first.stat().st_mtime_ns == stamp  # not built again
    other = native.build(tmp_path / "out", "avx512")  # builds on any x86 machine; runs only on AVX512-BF16
    assert other != first and "avx512" in other.name
    changed = tmp_path / "csrc"
    shutil.copytree(native.SOURCES, changed)
    (changed / "ops.c").write_text((changed / "ops.c").read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCES", changed)
    assert native.build(tmp_path / "out", "avx2") != first  # a new source is a new build, never a stale library
    second = native.build(tmp_path / "out", "avx2")
    kernel = changed / "arch" / "x86" / "avx2.c"
    kernel.write_text(kernel.read_text() + "\n/* changed */\n")
    assert native.build(tmp_path / "out", "avx2") != second  # the level files in subfolders count too
    assert not list((tmp_path / "out").glob(".build-*"))


@pytest.fixture()
def level_zero(tmp_path: Path) -> Path:
    """The library built without a level's flags (level 0: csrc/reference.c's scalar kernels)."""
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    lib = tmp_path / "lfm2-none.so"
    done = subprocess.run([cc, *native.COMMON_FLAGS, f"-I{native.SOURCES}", str(native.SOURCES / "native.c"), "-o",
                           str(lib)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    yield lib
    native.reset()


def test_a_library_without_a_level_loads_cleanly_and_is_not_used(level_zero: Path) -> None:
    """Every level exports every function, so a build without one loads; models then stay on torch."""
    native.reset()
    assert native.attach(level_zero, "avx2") == "built without its avx2 kernel"
    assert not native.ready() and native.level() is None


def test_a_library_that_does_not_match_is_refused_with_the_reason(level_zero: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing function or a struct of another size is a reason in why_not, not an AttributeError or a crash."""
    monkeypatch.setitem(native._SIGNATURES, "lfm2_no_such_function", [])
    native.reset()
    why = native.attach(level_zero, "avx2")
    assert why is not None and "lacks lfm2_no_such_function" in why and native._lib is None
    monkeypatch.delitem(native._SIGNATURES, "lfm2_no_such_function")

    layer = native.Layer

    class Shorter(ctypes.Structure):
        _fields_ = layer._fields_[:-1]

    monkeypatch.setattr(native, "Layer", Shorter)
    native.reset()
    why = native.attach(level_zero, "avx2")
    assert why is not None and "lfm2_layer" in why and not native.ready()
    monkeypatch.setattr(native, "Layer", layer)
    monkeypatch.setitem(native.FORMATS, "int4", native.Format("int4", native.INT4, 32, 289))
    native.reset()
    why = native.attach(level_zero, "avx2")
    assert why is not None and "int4" in why and not native.ready()


def test_models_use_it_for_bf16_and_answer_like_the_reference(kernel: None, dense_ckpt: Path,
                                                             moe_ckpt: Path) -> None:
    from tests.helpers import teacher_forced

    for path, int8_bound in ((dense_ckpt, 0.1), (moe_ckpt, 0.25)):
        ref = load_model(path, load_config(path), CPU, torch.float32, fast=False)
        fast = load(path, device="cpu", dtype="bfloat16", tokenizer=False).model
        kinds = {m.kind for m in fast.modules() if isinstance(m, Proj)}
        assert kinds == {"native"}
        worst, agree, _, _ = teacher_forced(ref, fast)
        assert worst < 0.05 and agree >= 21  # bf16 rounding against the float32 model
        quant = load(path, device="cpu", dtype="bfloat16", tokenizer=False, quantize="int8").model
        assert "int8-native" in {m.kind for m in quant.modules() if isinstance(m, Proj)}
        worst, agree, _, _ = teacher_forced(ref, quant)
        # int8 weights and, in the kernels, int8 activations (kernels/quantize.py): measured 4-7 % dense, 5-17 % MoE
        assert worst < int8_bound and agree >= 19


def test_compile_is_ignored_where_the_native_code_runs(kernel: None, dense_ckpt: Path,
                                                       capfd: pytest.CaptureFixture) -> None:
    """The native step decodes faster than the compiled one and compiles nothing: --compile gives way to it."""
    lm = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False, compile=True)
    assert isinstance(lm.model.decode_step, NativeDecoder)
    assert lm.skipped == {"compile": "lfm2's native CPU code runs this model faster"}
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_without_the_kernel_models_run_on_torch(dense_ckpt: Path, tmp_path: Path) -> None:
    """No compiler on PATH and LFM2_NATIVE=0: a bf16 model still runs, on torch's kernels."""
    import subprocess
    import sys

    # the second case sets LFM2_NATIVE=1 so that an LFM2_NATIVE=0 in the outer environment cannot mask it
    cases = [({"LFM2_NATIVE": "0"}, "LFM2_NATIVE=0"),
             ({"PATH": str(tmp_path), "CC": "", "LFM2_NATIVE": "1"}, "compiler")]
    for extra, reason in cases:
        env = {**os.environ, "LFM2_CACHE": str(tmp_path / "c"), **extra}
        code = ("import sys, torch; from lfm2cli.loading.loader import load; from lfm2cli.kernels import native;"
                f"m = load({str(dense_ckpt)!r}, device='cpu', dtype='bfloat16', tokenizer=False).model;"
                "m(torch.tensor([[1, 2, 3]]));"
                "print(native.why_not()); print(sorted({p.kind for p in m.modules() if hasattr(p, 'kind')}))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        why, kinds = out.stdout.splitlines()
        assert reason in why
        assert "native" not in kinds


def test_one_thread_here_sets_the_calling_threads_team_only(kernel: None) -> None:
    """Serve's job threads run their small torch work on one thread each, the model thread keeps its cores."""
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def job() -> None:
            native.one_thread_here()
            seen.append(torch.get_num_threads())

        t = threading.Thread(target=job)
        t.start()
        t.join()
        assert seen == [1]
        assert torch.get_num_threads() == 2  # this thread's count did not move
    finally:
        torch.set_num_threads(before)
