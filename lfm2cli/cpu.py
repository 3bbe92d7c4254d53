"""What this CPU can do, decided in one place: which native kernel level it runs, whether it computes bf16 (and so
whether torch's oneDNN bf16 paths may be used at all), and how many physical cores it has. Pure Python, no torch.

`LFM2_CPU_HIDE` hides feature flags from every decision made here (comma-separated; `avx512*` hides every flag
starting with `avx512`), so that an AVX512-BF16 machine can run the AVX2 and the torch-fallback paths as a CPU
without those features would. `LFM2_NATIVE_ISA` picks the native kernel level (`avx512`, `avx2` or `none`)
instead of the best one the CPU has.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The native kernel levels, best first, with the flags each needs (as /proc/cpuinfo spells them).
LEVELS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"),
    "avx2": ("avx2", "fma", "f16c"),
}
# torch's oneDNN bf16 linear (and its weight prepacking) refuses CPUs without one of these sets.
_ONEDNN_BF16 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))


@functools.lru_cache(maxsize=1)
def cpuinfo() -> str:
    """/proc/cpuinfo's text ('' where there is none: macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(name: str) -> str:
    for line in cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def hidden() -> list[str]:
    """The patterns of LFM2_CPU_HIDE."""
    return [p.strip().lower() for p in os.environ.get("LFM2_CPU_HIDE", "").replace(" ", ",").split(",") if p.strip()]


def flags() -> frozenset[str]:
    """The CPU's feature flags, less those LFM2_CPU_HIDE hides."""
    found = set(_field("flags").split())
    for pattern in hidden():
        if pattern.endswith("*"):
            found = {f for f in found if not f.startswith(pattern[:-1])}
        else:
            found.discard(pattern)
    return frozenset(found)


def model_name() -> str:
    return _field("model name") or platform.processor() or platform.machine()


def is_arm() -> bool:
    return platform.machine().lower() in ("arm64", "aarch64")


def bf16_compute() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX; Apple silicon and recent Arm cores): only
    then are torch's bf16 matrix products fast, or on x86 even possible through oneDNN's prepacked path."""
    if is_arm():
        return True
    f = flags()
    return "avx512_bf16" in f or "amx_bf16" in f


def onednn_bf16() -> bool:
    """Whether torch's oneDNN may prepack and run bf16 weights here: it needs bf16 compute (else it is slow) and
    AVX512BW/VL/DQ or AVX-NE-CONVERT (else it raises)."""
    f = flags()
    return bf16_compute() and not is_arm() and any(all(x in f for x in need) for need in _ONEDNN_BF16)


def native_levels() -> list[str]:
    """The native kernel levels this CPU can execute, best first ([] off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    f = flags()
    return [level for level, need in LEVELS.items() if all(x in f for x in need)]


def native_level() -> tuple[str | None, str | None]:
    """(level, None) for the native kernel level to build and use, or (None, why not)."""
    levels = native_levels()
    asked = os.environ.get("LFM2_NATIVE_ISA", "").strip().lower()
    if asked in ("", "auto"):
        return (levels[0], None) if levels else (None, "no kernel for this CPU (it needs AVX2, FMA and F16C)")
    if asked == "none":
        return None, "turned off by LFM2_NATIVE_ISA=none"
    if asked not in LEVELS:
        return None, f"LFM2_NATIVE_ISA={asked} is not a level (use {', '.join(LEVELS)} or none)"
    if asked not in levels:
        missing = [x for x in LEVELS[asked] if x not in flags()]
        return None, f"LFM2_NATIVE_ISA={asked}, but this CPU lacks {', '.join(missing)}"
    return asked, None


def describe() -> str:
    """The CPU kind in a few words, for benchmarks: 'AVX512-BF16', 'AVX2', ..."""
    f = flags()
    if "avx512_bf16" in f:
        return "AVX512-BF16"
    if "avx512f" in f:
        return "AVX512"
    if "avx2" in f:
        return "AVX2" + (" + AVX-VNNI" if "avx_vnni" in f else "")
    return platform.machine()


def physical_cores() -> int:
    """Physical cores this process may use: a second hyperthread per core only adds contention at batch 1."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        allowed = os.cpu_count() or 1
    cores, phys = set(), "0"
    for line in cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            phys = value.strip()
        elif key.strip() == "core id":
            cores.add((phys, value.strip()))
    return max(1, min(allowed, len(cores))) if cores else max(1, allowed)
