"""Every fast path gives the reference path's answers: fused and prepacked projections, the blocked weights and
compiled decode step, int8 weights (within their stated bound), the MoE decode path; plus the published configs
and random-weight models that `lfm2 bench --random` builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lfm2cli.errors import UsageError
from lfm2cli.hub.known import KNOWN_CONFIGS, known_config, known_names
from lfm2cli.kernels.plan import accelerate, is_accelerated
from lfm2cli.kernels.proj import BLOCK, PlainProj, Proj
from lfm2cli.kernels.quantize import GROUP, check_mode, dequantize_int8, quantize_int8
from lfm2cli.loading.checkpoint import parameter_counts
from lfm2cli.loading.loader import load, load_model, random_model
from lfm2cli.model.config import load_config
from tests.helpers import prompt, teacher_forced

TOL = 1e-4
CPU = torch.device("cpu")
# inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def reference(path: Path, dtype: torch.dtype = torch.float32):
    """The model exactly as loaded: separate q/k/v and w1/w3, plain nn.Linear, SDPA attention."""
    return load_model(path, load_config(path), CPU, dtype, fast=False)


# ---- fused, prepacked and MoE paths ----

@pytest.mark.parametrize("ckpt", ["dense_ckpt", "moe_ckpt"])
def test_fast_path_equals_reference_path(ckpt: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(ckpt)
    ref = reference(path)
    fast = load(path, device="cpu", dtype="float32", tokenizer=False).model
    assert is_accelerated(fast) and not is_accelerated(ref)
    kinds = {m.kind for m in fast.modules() if isinstance(m, Proj)}
    assert kinds <= {"packed", "plain"} and kinds  # prepacked for oneDNN where it can be
    assert not hasattr(fast.model.layers[1].self_attn, "q_proj")  # q/k/v fused: no second copy kept
    # full forward, prefill + decode, continuation after a cached prefix
    ids = prompt(20)
    assert (fast(ids, all_logits=True) - ref(ids, all_logits=True)).abs().max().item() < TOL
    worst, agree, toks_ref, toks_fast = teacher_forced(ref, fast)
    assert toks_ref == toks_fast
    assert worst < TOL


def test_moe_decode_path_equals_grouped_prefill_path(moe_ckpt: Path) -> None:
    """Decode runs only the routed experts one by one; prefill groups tokens per expert. Same numbers."""
    model = load(moe_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    ids = prompt(12, seed=7)
    whole = model(ids, all_logits=True)[0]
    cache = model.new_cache()
    one_by_one = torch.cat([model(ids[:, i:i + 1], cache) for i in range(ids.shape[1])])
    assert (whole - one_by_one).abs().max().item() < TOL


@pytest.mark.slow
def test_bf16_fast_path_is_close_to_bf16_reference(dense_ckpt: Path) -> None:
    ref = reference(dense_ckpt, torch.bfloat16)
    fast = load(dense_ckpt, device="cpu", dtype="bfloat16", tokenizer=False).model
    worst, agree, _, _ = teacher_forced(ref, fast)
    assert worst < 0.03 and agree >= 22  # bf16 rounding differs between the paths, the answers do not


# ---- projections in every form ----

@pytest.mark.parametrize("shape", [(96, 64), (64, 100), (33, 48), (512, 64)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_proj_forms_agree(shape: tuple[int, int], rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g) / shape[1] ** 0.5
    bias = torch.randn(shape[0], generator=g)
    x = torch.randn(1, rows, shape[1], generator=g)
    expected = torch.nn.functional.linear(x, weight, bias)
    plain = PlainProj(weight.clone(), bias)
    packed = plain.prepacked()
    assert plain.weight is None and packed.kind == "packed"  # the packed copy replaces the plain one
    assert (packed(x) - expected).abs().max().item() < TOL
    if shape[0] % BLOCK == 0:
        blocked = PlainProj(weight.clone(), bias).blocked()
        assert blocked.kind == "blocked" and blocked.blocked.shape == (shape[0] // BLOCK, shape[1], BLOCK)
        assert (blocked(x) - expected).abs().max().item() < TOL  # eager: the blocked weights unblocked
    q = PlainProj(weight.clone(), bias).quantized("int8")
    if shape[1] % GROUP == 0:
        deq = dequantize_int8(q.qweight, q.scales)
        assert (q(x) - torch.nn.functional.linear(x, deq, bias)).abs().max().item() < TOL
    else:  # not whole groups of 32: kept as it was
        assert q.quant is None and (q(x) - expected).abs().max().item() < TOL


def test_int8_rounding_bound() -> None:
    """Each weight moves by at most half a quantisation step of its group of 32: max|group| / 254."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 3, 64)[:, None]
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (64, 256 // GROUP)
    err = (dequantize_int8(q, scales) - w).abs().view(64, -1, GROUP)
    assert (err <= scales.float()[..., None] / 2 * (1 + 2 ** -20)).all()
    assert torch.equal(scales, (w.abs().view(64, -1, GROUP).amax(-1) / 127).half())


def test_quantize_mode_names() -> None:
    assert check_mode("none") is None and check_mode(None) is None and check_mode("int8") == "int8"
    assert check_mode("int4") == "int4"
    with pytest.raises(UsageError, match="int8 or int4"):
        check_mode("int3")


# ---- int8 model: the stated bound ----

@pytest.mark.slow
@pytest.mark.parametrize("ckpt, bound, min_agree", [("dense_ckpt", 0.06, 21), ("moe_ckpt", 0.15, 19)])
def test_int8_logits_stay_within_bound(ckpt: str, bound: float, min_agree: int,
                                       request: pytest.FixtureRequest) -> None:
    """Stated bound (docs/performance.md): on these tiny random checkpoints, int8 logits stay within 6% of the
    logit range (MoE: 15%, a changed expert choice moves more) and greedy picks agree on >= 21 of 24 steps
    (MoE >= 19). Real checkpoints, wider rows, do better: errors average out over more inputs."""
    path = request.getfixturevalue(ckpt)
    full = load(path, device="cpu", dtype="float32", tokenizer=False).model
    int8 = reference(path)  # torch's int8 path, also where lfm2 would not choose it (slower on AVX2-only CPUs)
    accelerate(int8, quantize="int8")
    assert {m.kind for m in int8.modules() if isinstance(m, Proj) and not m.keep_precision} == {"int8"}
    for seed in (1, 2):
        worst, agree, _, _ = teacher_forced(full, int8, seed=seed)
        assert worst < bound
        assert agree >= min_agree


def test_int8_halves_decode_bytes(dense_ckpt: Path) -> None:
    from lfm2cli.benchmark import decode_bytes

    full, int8 = reference(dense_ckpt, torch.bfloat16), reference(dense_ckpt, torch.bfloat16)
    accelerate(full)
    accelerate(int8, quantize="int8")
    assert 0.45 < decode_bytes(int8) / decode_bytes(full) < 0.6


# ---- compiled decode step ----

def _compiler_available() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None or shutil.which("clang++") is not None


needs_compiler = pytest.mark.skipif(not _compiler_available(), reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fast_decode_gives_eager_tokens(dense_ckpt: Path, quantize: str | None) -> None:
    eager = reference(dense_ckpt)  # torch's eager int8 path even where lfm2 would not choose it (AVX2-only)
    accelerate(eager, quantize=quantize)
    compiled = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False, quantize=quantize,
                    compile=True).model
    assert compiled.decode_step is not None
    assert {m.kind for m in compiled.modules() if isinstance(m, Proj)} == {"int8-blocked" if quantize else "blocked"}
    # long enough that the KV cache grows (256 -> 512 positions) under the compiled step
    worst, agree, toks_eager, toks_compiled = teacher_forced(eager, compiled, n_prompt=250, steps=12)
    assert toks_eager == toks_compiled
    assert worst < TOL


def test_static_masked_decode_step_matches_eager(dense_ckpt: Path) -> None:
    """The step the CUDA graph captures (attention over the whole cache capacity, later positions masked, inputs
    in fixed tensors), run eagerly on CPU: the GPU path itself is untested here, its arithmetic is not."""
    from lfm2cli.kernels.compiled import CudaGraphDecoder

    eager = load(dense_ckpt, device="cpu", dtype="float32", tokenizer=False).model
    static = load_model(dense_ckpt, load_config(dense_ckpt), CPU, torch.float32, fast=False)
    accelerate(static, prepack=False)
    decoder = CudaGraphDecoder(static)
    ids = prompt(10)
    ca, cb = eager.new_cache(), static.new_cache(capacity=12)  # grows while decoding
    la, lb = eager(ids, ca), static(ids, cb)
    for _ in range(8):
        step = torch.tensor([[int(la.argmax())]])
        la = eager(step, ca)
        decoder.prepare(step, cb)
        lb = decoder.step(cb)
        cb.advance(1)
        assert (la - lb).abs().max().item() < TOL
    assert cb.capacity > cb.pos + 1  # so the mask really hid positions


def test_compile_is_skipped_for_moe(moe_ckpt: Path) -> None:
    lm = load(moe_ckpt, device="cpu", dtype="float32", tokenizer=False, compile=True)
    assert lm.model.decode_step is None and is_accelerated(lm.model) and "compile" in lm.skipped


@pytest.mark.slow
def test_generate_command_takes_quantize_and_compile(chat_ckpt: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    run = [sys.executable, "-m", "lfm2cli", "generate", str(chat_ckpt), "--prompt", "hi", "-n", "5",
           "--temperature", "0", "--dtype", "float32"]
    plain = subprocess.run(run, capture_output=True, text=True, cwd=root, timeout=120)
    int8 = subprocess.run([*run, "--quantize", "int8"], capture_output=True, text=True, cwd=root, timeout=120)
    assert plain.returncode == 0 and int8.returncode == 0, int8.stderr
    bad = subprocess.run([*run, "--quantize", "int3"], capture_output=True, text=True, cwd=root, timeout=120)
    assert bad.returncode == 2 and "'int3' is not one of 'none', 'int8', 'int4'" in bad.stderr
    no_compile = subprocess.run([*run, "--no-compile"], capture_output=True, text=True, cwd=root, timeout=120)
    assert no_compile.returncode == 0 and no_compile.stdout == plain.stdout


# ---- published configs and random models ----

def test_known_configs_match_published_sizes() -> None:
    published = {  # parameter counts as stated on the model cards (total, active)
        "lfm2-350m": (354_483_968, 354_483_968), "lfm2-700m": (742_489_344, 742_489_344),
        "lfm2-1.2b": (1_170_340_608, 1_170_340_608), "lfm2-2.6b": (2_569_272_320, 2_569_272_320),
    }
    for name, counts in published.items():
        assert parameter_counts(known_config(name)) == counts
    total, active = parameter_counts(known_config("LiquidAI/LFM2-8B-A1B"))
    assert round(total / 1e9, 1) == 8.3 and round(active / 1e9, 1) == 1.6
    assert known_config("lfm2.5-1.2b") is not None and known_config("no-such-model") is None
    # the newer shapes, against the totals Liquid AI publishes (model cards: 23.8B / 2.3B active, 2.69B, 230M)
    total, active = parameter_counts(known_config("lfm2-24b-a2b"))
    assert round(total / 1e9, 1) == 23.8 and round(active / 1e9, 1) == 2.3
    assert round(parameter_counts(known_config("lfm2.5-2.6b"))[0] / 1e9, 2) == 2.70
    assert round(parameter_counts(known_config("lfm2.5-230m"))[0] / 1e6) == 230
    big_vocab = {"LiquidAI/LFM2.5-8B-A1B", "LiquidAI/LFM2.5-2.6B"}
    for repo in KNOWN_CONFIGS:
        assert known_config(repo).vocab_size == (128000 if repo.removesuffix("-Base") in big_vocab else 65536)
    assert {"lfm2-350m", "lfm2-24b-a2b", "lfm2.5-8b-a1b", "lfm2.5-230m"} <= set(known_names())


def test_random_model_has_the_config_shape() -> None:
    from lfm2cli.model.config import parse_config
    from tests.tiny import DENSE

    cfg = parse_config({**DENSE, "model_type": "lfm2"})
    model = random_model(cfg, CPU, torch.bfloat16, fast=False)
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert params["model.embed_tokens.weight"].shape == (512, 64)
    assert sum(p.numel() for p in params.values()) == parameter_counts(cfg)[0]
    logits = model(prompt(8))
    assert torch.isfinite(logits).all()


# ---- the decode plan ----

PARTS = (("self_attn.", "attention q/k/v, out"), (".conv.", "conv in, out"), (".experts.", "MoE experts w1/w3, w2"),
         ("feed_forward.gate", "MoE router"), ("feed_forward.", "MLP w1/w3, w2"), ("lm_head", "LM head"))
IMPLEMENTATIONS = {"native": "native", "packed": "oneDNN", "plain": "torch", "int8": "torch", "int4": "torch",
                   "blocked": "compiled"}


@pytest.mark.parametrize("ckpt, dtype, quantize", [("dense_ckpt", "float32", None), ("dense_ckpt", "bfloat16", None),
                                                   ("moe_ckpt", "bfloat16", "int4"), ("moe_ckpt", "float32", "int8")])
def test_the_plan_says_what_loading_did(ckpt: str, dtype: str, quantize: str | None,
                                        request: pytest.FixtureRequest) -> None:
    """The plan is decided from the config before any weight is read; every projection then has the form its
    part's row names, and the one-token step is the one the plan names."""
    from lfm2cli.kernels.native_step import NativeDecoder
    from lfm2cli.kernels.plan import DTYPE_NAMES

    lm = load(request.getfixturevalue(ckpt), device="cpu", dtype=dtype, tokenizer=False, quantize=quantize)
    assert lm.plan is lm.model.decode_plan
    rows = {r.part: r for r in lm.plan.rows}
    for name, m in lm.model.named_modules():
        if isinstance(m, Proj):
            row = rows[next(part for key, part in PARTS if key in name)]
            assert IMPLEMENTATIONS[m.kind.split("-")[-1]] in row.implementation, (name, m.kind, row)
            assert (m.quant or DTYPE_NAMES[lm.dtype]) in row.format.split(" / "), (name, m.kind, row)
    step = {"native": NativeDecoder, "eager": type(None)}[lm.plan.step()]
    assert isinstance(lm.model.decode_step, step) and "one-token step" in rows and "prefill" in rows
    assert lm.plan.lines()[0].split() == ["part", "implementation", "format", "why", "not", "faster"]


def test_plan_without_weights_names_why_not(dense_ckpt: Path) -> None:
    """A float32 model on CPU is planned from its config alone: torch or oneDNN, each row saying why the
    native code does not run it; --compile gives way to the native step where that runs."""
    from lfm2cli.kernels.plan import plan

    cfg = load_config(dense_ckpt)
    p = plan(cfg, CPU, torch.float32)
    assert p.step() == "eager" and p.kernels()[0] == "torch"
    assert all(r.why_not == "native code used for bf16 on CPU only" for r in p.rows if r.part == "LM head")
    reference = plan(cfg, CPU, torch.float32, fast=False)
    assert {r.implementation for r in reference.rows if r.part == "LM head"} == {"torch, as loaded"}
    with_native = plan(cfg, CPU, torch.bfloat16, compile=True)
    if with_native.native:
        assert with_native.skipped == {"compile": "lfm2's native CPU code runs this model faster"}
        assert with_native.step() == "native"
