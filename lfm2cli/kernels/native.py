"""lfm2's native CPU code (csrc/native.c): built once per machine and level with the system's C compiler and loaded
with ctypes. `Proj` runs its matrix products here and a one-token decode step runs every layer's small operations
here too (`lfm2cli.kernels.native_step`), for bf16 models on x86-64 CPUs with AVX2 + FMA + F16C or better and on
ARM64 CPUs.

Levels, one code path each, chosen once when the library is loaded (`lfm2cli.system.cpu.native_level`):
on x86-64 `avx512`
(AVX512-BF16 and VNNI: Zen 4 and later, Sapphire Rapids and later) and `avx2` (x86-64-v3: Haswell and later,
Zen 1-3, every recent Intel laptop); on ARM64 `bf16` (dotprod + BF16: Apple M2 and later, Graviton 3/4),
`dotprod` (Apple M1, Raspberry Pi 5, Graviton 2) and `neon` (any ARMv8.0, e.g. Raspberry Pi 3/4). All read the same
packed layouts, so a packed model runs on any level. The library is cached under a key made of the sources, the
compiler, the architecture and the level's flags. Building takes about a second, once. `LFM2_NATIVE=0` turns the
native code off; `LFM2_NATIVE_ISA` picks the level.

macOS (Apple clang has no OpenMP of its own): the library is built against torch's libomp.dylib, the runtime torch
already loaded (one thread pool), else Homebrew's libomp where torch has none; without either it is built without
OpenMP and its kernels run on one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lfm2cli.system import cpu

SOURCES = Path(__file__).with_name("csrc")
ROWS = 64  # output channels per tile in the kernels: packed weights are padded to a multiple of this
COMMON_FLAGS = ["-O3", "-mtune=native", "-fopenmp", "-shared", "-fPIC"]
# Each level's flags and C id (lfm2_native_isa(); 0: a build without a level), from cpu.NATIVE_LEVELS.
LEVEL_FLAGS = {level.name: cpu.level_flags(level.name) for level in cpu.NATIVE_LEVELS}
LEVEL_IDS: dict[int, str | None] = {0: None, **{level.id: level.name for level in cpu.NATIVE_LEVELS}}

_lib: ctypes.CDLL | None = None  # the loaded library
_level: str | None = None  # its kernel level; models use the library only when it has one
_why_not: str | None = "not loaded"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # argument types; the functions return nothing (those of _RESULTS return what it says)
    "lfm2_linear": [_P, _P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int],
    "lfm2_linear_group": [_I, _P, _P, _P, _I, _I, ctypes.c_int, ctypes.c_int],
    "lfm2_pack": [_P, _P, _I, _I, _I, ctypes.c_int],
    "lfm2_pack_inplace": [_P, _I, _I, ctypes.c_int],
    "lfm2_pack_grouped": [_P, _P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_int],
    "lfm2_quantize_int4": [_P, _I, _I, _P, _P, ctypes.c_int],
    "lfm2_quantize_int8": [_P, _I, _I, _P, _P, ctypes.c_int],
    "lfm2_add_rmsnorm": [_P, _P, _P, _P, _I, _F],
    "lfm2_silu_mul": [_P, _P, _I],
    "lfm2_conv_step": [_P, _P, _P, _P, _P, _I, _I],
    "lfm2_attention_step": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, ctypes.c_int],
    "lfm2_decode_step": [_P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _F, ctypes.c_int],
    "lfm2_decode_batch": [_P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _F, ctypes.c_int],
    "lfm2_native_isa": [],
    "lfm2_layer_size": [],
    "lfm2_format_bytes": [ctypes.c_int, _P],
    "lfm2_set_tuning": [_P],
    "lfm2_get_tuning": [_P],
    "lfm2_tuning_size": [],
    "lfm2_set_thread_team": [ctypes.c_int],
}
_RESULTS = {"lfm2_native_isa": ctypes.c_int, "lfm2_layer_size": _I, "lfm2_format_bytes": _I,
            "lfm2_set_tuning": ctypes.c_int, "lfm2_tuning_size": _I}


class Layer(ctypes.Structure):
    """One layer of `lfm2_decode_step` (csrc/step.c's lfm2_layer): pointers to its weights and caches. Loading
    checks its size against the C struct's (lfm2_layer_size), so a field added on one side only is a clear
    refusal, not a crash."""

    _fields_ = [("attention", _I), ("op_norm", _P), ("ffn_norm", _P), ("in_w", _P), ("in_rows", _I),
                ("out_w", _P), ("w13", _P), ("w2", _P), ("ff", _I),
                ("conv_w", _P), ("conv_b", _P), ("state", _P), ("q_norm", _P), ("k_norm", _P), ("k_cache", _P),
                ("v_cache", _P), ("experts", _I), ("top_k", _I), ("norm_topk", _I), ("scaling", _F), ("gate", _P),
                ("expert_bias", _P), ("e_w13", _P), ("e_w2", _P), ("e_ff", _I),
                # each weight's format id (FORMATS), the experts' per kind
                ("in_f", _I), ("out_f", _I), ("w13_f", _I), ("w2_f", _I), ("e_w13_f", _I), ("e_w2_f", _I)]


class Tuning(ctypes.Structure):
    """The decode kernels' CPU-dependent choices (csrc/common.h's lfm2_tuning), set at load by
    `lfm2cli.kernels.tuning`; none changes a result's bits. Checked against the C struct's size at load."""

    _fields_ = [("streams", ctypes.c_int32), ("ahead", ctypes.c_int32), ("part_kb", ctypes.c_int32)]

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, _ in self._fields_}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _source_text() -> str:
    """Every C source under csrc/, subfolders included, with its path: the build's cache key."""
    files = sorted(p for p in SOURCES.rglob("*") if p.suffix in (".c", ".h") and p.is_file())
    return "\0".join(f"{p.relative_to(SOURCES).as_posix()}\0{p.read_text()}" for p in files)


def macos_openmp() -> list[str]:
    """The flags that build with OpenMP under Apple clang: torch's own libomp.dylib (the runtime already in the
    process, so one thread pool), else Homebrew's where torch has none; [] (one thread) without either."""
    for lib in (Path(torch.__file__).parent / "lib", Path("/opt/homebrew/opt/libomp/lib"),
                Path("/usr/local/opt/libomp/lib")):
        if (lib / "libomp.dylib").exists():
            return ["-Xclang", "-fopenmp", f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]
    return []


def compile_flags(level: str) -> list[str]:
    """The compiler's flags for `level` on this system."""
    if sys.platform == "darwin":  # Apple clang: no -fopenmp of its own, a .dylib
        return ["-O3", "-dynamiclib", "-fPIC", "-Wno-unknown-pragmas", *macos_openmp(), *LEVEL_FLAGS[level]]
    return [*COMMON_FLAGS, *LEVEL_FLAGS[level]]


def build(directory: Path, level: str) -> Path:
    """Compile csrc/native.c for `level` into `directory` unless a build for these sources, compiler, architecture
    and level is there already. Raises OSError (no compiler, failed build) with the reason."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = compile_flags(level)
    machine = platform.machine().lower() or "unknown"
    key = hashlib.sha256("\0".join([_source_text(), cc, version, machine, sys.platform, " ".join(flags)]).encode()
                         ).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    target = directory / f"lfm2-native-{machine}-{level}-{key}{suffix}"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".build-{os.getpid()}-{key}{suffix}"
    done = subprocess.run([cc, *flags, f"-I{SOURCES}", str(SOURCES / "native.c"), "-o", str(tmp)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{Path(cc).name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    os.replace(tmp, target)  # atomic: a concurrent process sees the whole library or none
    return target


def load(directory: Path) -> str | None:
    """Build (if needed) and load the library for this CPU's level. Returns None when models can use it, else
    why not. Loads once per process; `reset()` forgets it (tests switch levels that way)."""
    global _lib, _level, _why_not
    if _lib is not None:
        return _why_not
    if os.environ.get("LFM2_NATIVE", "1") == "0":
        _why_not = "turned off by LFM2_NATIVE=0"
        return _why_not
    level, reason = cpu.native_level()
    if level is None:
        _why_not = reason
        return _why_not
    try:
        path = build(directory, level)
    except (OSError, subprocess.SubprocessError) as e:
        _why_not = f"could not be built: {e}"
        return _why_not
    if attach(path, level) is None:
        from lfm2cli.kernels import tuning

        tuning.apply(path, level)
    return _why_not


def _mismatch(lib: ctypes.CDLL) -> str | None:
    """Why the library's C side does not match this Python side (a missing function, another struct or format
    table), or None."""
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if missing:
        return f"lacks {', '.join(missing)}"
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _RESULTS.get(name)
    if lib.lfm2_tuning_size() != ctypes.sizeof(Tuning):
        return "has another lfm2_tuning than native.Tuning (csrc/common.h and native.py disagree)"
    if lib.lfm2_layer_size() != ctypes.sizeof(Layer):
        return (f"has a {lib.lfm2_layer_size()}-byte lfm2_layer, native.Layer is {ctypes.sizeof(Layer)} bytes "
                "(csrc/step.c and native.py disagree)")
    group = ctypes.c_int64()
    for fmt in FORMATS.values():
        if (lib.lfm2_format_bytes(fmt.id, ctypes.byref(group)), group.value) != (fmt.block_bytes, fmt.group):
            return f"lays out {fmt.name} otherwise than native.FORMATS (csrc/common.h and native.py disagree)"
    return None


def attach(path: Path, level: str) -> str | None:
    """Load the library at `path`, built for `level`, and bind its functions. Returns None when models can use
    it, else why not (also kept for `why_not`)."""
    global _lib, _level, _why_not
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _why_not = f"could not be loaded: {e}"
        return _why_not
    mismatch = _mismatch(lib)
    if mismatch is not None:
        _why_not = f"does not match this lfm2: its library {mismatch}"
        return _why_not
    _lib, _level = lib, LEVEL_IDS.get(lib.lfm2_native_isa())
    _why_not = None if _level == level else f"built without its {level} kernel"
    return _why_not


def reset() -> None:
    """Forget the loaded library, so that the next `load` picks the level again (models packed before keep
    working: every level reads the same layouts)."""
    global _lib, _level, _why_not, _tuning_source
    _lib, _level, _why_not, _tuning_source = None, None, "not loaded", "compiled defaults"


_tuning_source = "compiled defaults"  # where the setting in use came from (`tuning_info`)


def set_tuning(values: dict[str, int] | None, source: str = "compiled defaults") -> dict[str, int]:
    """Set the decode kernels' tuning (fields of `Tuning`; those not given keep the compiled defaults; None: the
    defaults) and return the setting now in use. Raises ValueError for a value out of range."""
    global _tuning_source
    _lib.lfm2_set_tuning(None)
    if values:
        want = Tuning(**{**_current().as_dict(), **values})
        if not _lib.lfm2_set_tuning(ctypes.byref(want)):
            raise ValueError(f"tuning out of range: {want.as_dict()}")
    _tuning_source = source
    return _current().as_dict()


def tuning_info() -> dict[str, object] | None:
    """The decode kernels' tuning in use and where it came from (measured, cached, LFM2_TUNING, the compiled
    defaults), or None without the native code."""
    return None if _lib is None else {**_current().as_dict(), "source": _tuning_source}


def _current() -> Tuning:
    now = Tuning()
    _lib.lfm2_get_tuning(ctypes.byref(now))
    return now


def level() -> str | None:
    """The kernel level in use ('avx512', 'avx2'; 'bf16', 'dotprod', 'neon' on ARM64), or None."""
    return _level if ready() else None


def ready() -> bool:
    """Whether models use the native code (the library is loaded and has its matrix kernel)."""
    return _lib is not None and _why_not is None


def why_not() -> str | None:
    """None when the native code is in use, else the reason it is not."""
    return _why_not


@dataclass(frozen=True)
class Format:
    """A weight format lfm2_linear takes (csrc/common.h's lfm2_format and FORMATS, checked at load): packed in
    16-row blocks, `group` inputs at a time, each block's group `block_bytes` bytes."""

    name: str
    id: int
    group: int
    block_bytes: int


FORMATS = {f.name: f for f in (Format("bf16", 0, 2, 64),  # pairs of inputs: 16 rows x 2 bf16
                               Format("int8", 1, 32, 544),  # 16 fp16 scales, then 16 rows x 32 int8
                               Format("int4", 2, 32, 288))}  # 16 bf16 scales, then 16 rows x 32 nibbles
BF16, INT8, INT4 = (FORMATS[name].id for name in ("bf16", "int8", "int4"))
GROUP = FORMATS["int8"].group  # inputs per int8 / int4 scale (lfm2cli.kernels.quantize.GROUP)
GROUP_BYTES = {f.id: f.block_bytes for f in FORMATS.values() if f.id != BF16}  # one 16-row block's group


def one_thread_here() -> None:
    """Run the parallel regions the calling thread starts from now on (torch's too: one OpenMP runtime) on this
    thread alone, leaving every other thread's count as it is (torch.set_num_threads would change them all). For
    threads whose torch work is small and runs beside the model's own threads; nothing without the library."""
    if _lib is not None:
        torch.get_num_threads()  # torch sets a thread's count once, at its first use there: before ours
        _lib.lfm2_set_thread_team(1)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight can take the native layout."""
    return (ready() and weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype == torch.bfloat16
            and weight.shape[1] % 2 == 0)


def pack(weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """[out, in] bf16 -> the pairs layout [out'/16, in/2, 16, 2], out' = out rounded up to 64 (see native.c).
    `in_place` reuses the weight's memory when no padding is needed (the weight is then gone)."""
    out, inn = weight.shape
    padded = -(-out // ROWS) * ROWS
    threads = torch.get_num_threads()
    if in_place and padded == out and weight.is_contiguous():
        _lib.lfm2_pack_inplace(weight.data_ptr(), out, inn, threads)
        return weight.view(out // 16, inn // 2, 16, 2)
    src = weight.contiguous()
    dst = torch.empty(padded // 16, inn // 2, 16, 2, dtype=weight.dtype)
    _lib.lfm2_pack(src.data_ptr(), dst.data_ptr(), out, padded, inn, threads)
    return dst


def can_pack_grouped(in_features: int) -> bool:
    return ready() and in_features % GROUP == 0


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`lfm2cli.kernels.quantize.quantize_int4` for a bf16 weight, the same bytes, ~50x faster (for loading)."""
    out, inn = weight.shape
    w = weight.contiguous()
    nib = torch.empty(out, inn // 2, dtype=torch.uint8)
    scales = torch.empty(out, inn // GROUP, dtype=torch.bfloat16)
    _lib.lfm2_quantize_int4(w.data_ptr(), out, inn, nib.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return nib, scales


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`lfm2cli.kernels.quantize.quantize_int8` for a bf16 weight: the same bytes, at memory speed (for loading)."""
    out, inn = weight.shape
    w = weight.contiguous()
    q = torch.empty(out, inn, dtype=torch.int8)
    scales = torch.empty(out, inn // GROUP, dtype=torch.float16)
    _lib.lfm2_quantize_int8(w.data_ptr(), out, inn, q.data_ptr(), scales.data_ptr(), torch.get_num_threads())
    return q, scales


def pack_grouped(q: torch.Tensor, scales: torch.Tensor, fmt: int) -> torch.Tensor:
    """int8 or int4 weights from `lfm2cli.kernels.quantize` (int8 q [out, in] with fp16 scales, or int4 nibbles
    [out, in/2] with bf16 scales; scales [out, in/32]) -> the layout of csrc/pack.c: uint8
    [out'/16, in/32, GROUP_BYTES[fmt]] with out' = out rounded up to 64 (zero scales in the padding): each 16-row
    block's groups one after another, each group's scales before its values, so a decode product reads the
    weights once, in memory order."""
    out, inn = scales.shape[0], scales.shape[1] * GROUP
    padded = -(-out // ROWS) * ROWS
    src, sc = q.contiguous(), scales.contiguous()
    dst = torch.empty(padded // 16, inn // GROUP, GROUP_BYTES[fmt], dtype=torch.uint8)
    _lib.lfm2_pack_grouped(src.data_ptr(), sc.data_ptr(), dst.data_ptr(), out, padded, inn, fmt,
                           torch.get_num_threads())
    return dst


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, fmt: int = BF16) -> torch.Tensor:
    """x [..., in] bf16 -> x W^T [..., out] bf16 with W packed by `pack` (BF16) or `pack_grouped` (INT8, INT4).
    With int8 or int4 weights each token is rounded to int8 per group of 32 (max|x| / 127 each) first."""
    inn = x.shape[-1]
    rows = x.numel() // inn
    x2 = x.reshape(rows, inn)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    _lib.lfm2_linear(packed.data_ptr(), x2.data_ptr(), y.data_ptr(), rows, out_features, inn, fmt,
                     torch.get_num_threads())
    return y


def linear_group(xs: list[torch.Tensor], packed: list[torch.Tensor], out_features: int, fmt: int = BF16
                 ) -> list[torch.Tensor]:
    """One token each, x [in] bf16 against its own packed W (a MoE layer's routed experts, as the decode step
    runs them): the same numbers as `linear` on each, in one parallel pass."""
    def ptrs(ts: list[torch.Tensor]) -> ctypes.Array:
        return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    xs = [x.contiguous() for x in xs]
    ys = [x.new_empty(out_features) for x in xs]
    _lib.lfm2_linear_group(len(xs), ptrs(packed), ptrs(xs), ptrs(ys), out_features, xs[0].numel(), fmt,
                           torch.get_num_threads())
    return ys


# ---- one decode step's small operations (see native.c); every tensor is contiguous bf16 on CPU

def add_rmsnorm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += h in place (the residual stream), then RMSNorm(x) as a new tensor."""
    y = torch.empty_like(x)
    _lib.lfm2_add_rmsnorm(x.data_ptr(), None if h is None else h.data_ptr(), weight.data_ptr(), y.data_ptr(),
                          x.numel(), eps)
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[gate | up] -> silu(gate) * up."""
    width = gate_up.numel() // 2
    out = gate_up.new_empty(width)
    _lib.lfm2_silu_mul(gate_up.data_ptr(), out.data_ptr(), width)
    return out


def conv_step(bcx: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
    """The gated short convolution for one token; `state` [1, h, width-1] is updated in place."""
    h, width = weight.shape[0], weight.shape[-1]
    out = bcx.new_empty(h)
    _lib.lfm2_conv_step(bcx.data_ptr(), state.data_ptr(), weight.data_ptr(),
                        None if bias is None else bias.data_ptr(), out.data_ptr(), h, width)
    return out


def attention_step(qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, heads: int,
                   eps: float) -> torch.Tensor:
    """Attention of one token at `pos` over caches [1, kv_heads, capacity, head_dim], which get its key and
    value. Returns [heads * head_dim]."""
    _, kv_heads, cap, d = k_cache.shape
    out = qkv.new_empty(heads * d)
    _lib.lfm2_attention_step(qkv.data_ptr(), q_norm.data_ptr(), k_norm.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                             k_cache.data_ptr(), v_cache.data_ptr(), pos, cap, heads, kv_heads, d, eps,
                             out.data_ptr(), torch.get_num_threads())
    return out


def decode_step(layers: ctypes.Array, x: torch.Tensor, final_norm: torch.Tensor, pos: int, cap: int,
                heads: int, kv_heads: int, head_dim: int, conv_width: int, cos: torch.Tensor, sin: torch.Tensor,
                eps: float) -> torch.Tensor:
    """Every layer for one token (x: its embedding [hidden], updated in place); returns the final norm's output."""
    out = torch.empty_like(x)
    _lib.lfm2_decode_step(layers, len(layers), x.data_ptr(), final_norm.data_ptr(), out.data_ptr(), x.numel(),
                          heads, kv_heads, head_dim, conv_width, pos, cap, cos.data_ptr(), sin.data_ptr(), eps,
                          torch.get_num_threads())
    return out


def decode_batch(layers: ctypes.Array, x: torch.Tensor, final_norm: torch.Tensor, pos: torch.Tensor,
                 cap: torch.Tensor, caches: ctypes.Array, heads: int, kv_heads: int, head_dim: int, conv_width: int,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """Every layer for one token of each of B sequences (x: their embeddings [B, hidden], updated in place): row r
    at position pos[r] (int64) in caches of capacity cap[r], its caches caches[r * 2 * layers ..] (per layer the
    k and v caches of an attention layer, the conv state and None of a conv layer), its RoPE cos[r], sin[r]
    [B, head_dim]. Returns the final norm's output [B, hidden]: each row the bits `decode_step` gives it."""
    out = torch.empty_like(x)
    _lib.lfm2_decode_batch(layers, len(layers), x.shape[0], x.data_ptr(), final_norm.data_ptr(), out.data_ptr(),
                           x.shape[1], heads, kv_heads, head_dim, conv_width, pos.data_ptr(), cap.data_ptr(), caches,
                           cos.data_ptr(), sin.data_ptr(), eps, torch.get_num_threads())
    return out
