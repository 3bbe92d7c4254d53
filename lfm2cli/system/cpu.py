"""What this CPU can do, decided in one place: which native kernel level it runs, whether it computes bf16 (and so
whether torch's oneDNN bf16 paths may be used at all), and how many physical cores it has. Pure Python, no torch.

`LFM2_CPU_HIDE` hides feature flags from every decision made here (comma-separated; `avx512*` hides every flag
starting with `avx512`), so that an AVX512-BF16 machine can run the AVX2 and the torch-fallback paths as a CPU
without those features would. `LFM2_NATIVE_ISA` picks the native kernel level (`avx512`, `avx2`; on ARM64 `bf16`,
`dotprod`, `neon`; or `none`) instead of the best one the CPU has.

ARM64 features are named as Linux's /proc/cpuinfo `Features` line names them (`asimd`, `asimddp`, `bf16`, `i8mm`);
on macOS they come from sysctl's `hw.optional.arm.FEAT_*` and are given the same names.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Level:
    """A native kernel level: the CPU flags it needs (as /proc/cpuinfo spells them), the compiler flags that build
    it, and its kernel file under lfm2cli/kernels/csrc (the C side's LFM2_LEVEL_SOURCE). Its C id is its place in
    NATIVE_LEVELS, counted from 1 (0: a build without a level)."""

    name: str
    machine: str  # platform.machine()'s name of its architecture
    needs: tuple[str, ...]
    march: tuple[str, ...]
    source: str

    @property
    def id(self) -> int:
        return NATIVE_LEVELS.index(self) + 1


_X86_BASE = ("avx2", "fma", "f16c")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")
# Every native kernel level, each architecture's best first: adding one is a row here and its kernel file.
# ARM64: `bf16` BFDOT for bf16 weights and SDOT for int8 / int4, `dotprod` SDOT with NEON FMAs for bf16, `neon` plain
# ARMv8.0 (NEON is part of every ARM64 CPU); the three share arch/arm/neon.c, which follows the -march features.
NATIVE_LEVELS: tuple[Level, ...] = (
    Level("avx512", "x86_64", (*_X86_BASE, *_AVX512), ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"),
          "arch/x86/avx512.c"),
    Level("avx2", "x86_64", _X86_BASE, ("-march=x86-64-v3",), "arch/x86/avx2.c"),
    Level("bf16", "aarch64", ("asimd", "asimddp", "bf16"), ("-march=armv8.2-a+dotprod+bf16",), "arch/arm/neon.c"),
    Level("dotprod", "aarch64", ("asimd", "asimddp"), ("-march=armv8.2-a+dotprod",), "arch/arm/neon.c"),
    Level("neon", "aarch64", ("asimd",), ("-march=armv8-a",), "arch/arm/neon.c"),
)
# Each architecture's levels, best first, with the flags each needs.
LEVELS: dict[str, tuple[str, ...]] = {lv.name: lv.needs for lv in NATIVE_LEVELS if lv.machine == "x86_64"}
ARM_LEVELS: dict[str, tuple[str, ...]] = {lv.name: lv.needs for lv in NATIVE_LEVELS if lv.machine == "aarch64"}


def level_flags(name: str) -> list[str]:
    """The compiler flags that build level `name`: its -march flags and the defines that give the C side its id,
    name and kernel file."""
    level = next(lv for lv in NATIVE_LEVELS if lv.name == name)
    return [*level.march, f"-DLFM2_LEVEL={level.id}", f'-DLFM2_LEVEL_NAME="{level.name}"',
            f'-DLFM2_LEVEL_SOURCE="{level.source}"']


# macOS's names for the same features (sysctl hw.optional.*), as Linux names them.
SYSCTL_FEATURES = {"hw.optional.AdvSIMD": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
                   "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_I8MM": "i8mm"}
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


@functools.lru_cache(maxsize=1)
def _sysctl_features() -> frozenset[str]:
    """macOS: the features sysctl reports as present, under their Linux names."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return frozenset()
    found = set()
    for name, flag in SYSCTL_FEATURES.items():
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        if libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0:
            if value.value:
                found.add(flag)
    return frozenset(found)


def raw_flags() -> frozenset[str]:
    """The CPU's feature flags as the system reports them: x86's `flags`, ARM64's `Features` (Linux) or sysctl
    (macOS)."""
    if not is_arm():
        return frozenset(_field("flags").split())
    if sys.platform == "darwin":
        return _sysctl_features()
    return frozenset(_field("Features").split())


def flags() -> frozenset[str]:
    """The CPU's feature flags, less those LFM2_CPU_HIDE hides."""
    found = set(raw_flags())
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


def level_table(machine: str | None = None) -> dict[str, tuple[str, ...]]:
    """The native kernel levels of an architecture (platform.machine()'s name; this one by default), best first,
    each with the flags it needs ({} where there are no kernels)."""
    m = (machine or platform.machine()).lower()
    m = {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)
    return {lv.name: lv.needs for lv in NATIVE_LEVELS if lv.machine == m}


def levels_for(machine: str, found: frozenset[str] | set[str]) -> list[str]:
    """The levels a CPU of `machine` with these feature flags can execute, best first."""
    return [level for level, need in level_table(machine).items() if all(x in found for x in need)]


def native_levels() -> list[str]:
    """The native kernel levels this CPU can execute, best first ([] off x86-64 and ARM64)."""
    return levels_for(platform.machine(), flags())


ARCHITECTURES = (("x86-64", "x86_64"), ("ARM64", "aarch64"))  # each kind of CPU with native kernels, as named


def asked_level() -> str:
    """LFM2_NATIVE_ISA, checked: '' (or auto) for the best level, `none`, or a level of this architecture.
    Anything else is a UsageError that lists the values each architecture accepts: a typo must not quietly turn
    the native kernels off."""
    raw = os.environ.get("LFM2_NATIVE_ISA", "").strip()
    asked = raw.lower()
    if asked in ("", "auto", "none") or asked in level_table():
        return asked
    from lfm2cli.errors import UsageError

    here = next((name for name, machine in ARCHITECTURES if level_table(machine) == level_table()), None)
    if here is None:
        use = f"none or auto (there are no native kernels for {platform.machine() or 'this architecture'})"
    else:
        use = ", ".join([*level_table(), "none"]) + " or auto"
    others = "; ".join(f"{name}: {', '.join(level_table(machine))}" for name, machine in ARCHITECTURES
                       if name != here)
    raise UsageError(f"LFM2_NATIVE_ISA={raw} is not a native kernel level{' on ' + here if here else ''}; use "
                     f"{use}, or unset it ({others})")


def native_level() -> tuple[str | None, str | None]:
    """(level, None) for the native kernel level to build and use, or (None, why not). An LFM2_NATIVE_ISA that is
    no level of this architecture is a UsageError (`asked_level`)."""
    levels, table = native_levels(), level_table()
    asked = asked_level()
    if asked in ("", "auto"):
        if levels:
            return levels[0], None
        if not table:
            return None, f"no native kernels for {platform.machine() or 'this architecture'}"
        return None, "no kernel for this CPU (it needs " + ("NEON" if is_arm() else "AVX2, FMA and F16C") + ")"
    if asked == "none":
        return None, "turned off by LFM2_NATIVE_ISA=none"
    if asked not in levels:
        missing = [x for x in table[asked] if x not in flags()]
        return None, f"LFM2_NATIVE_ISA={asked}, but this CPU lacks {', '.join(missing)}"
    return asked, None


def describe() -> str:
    """The CPU kind in a few words, for benchmarks: 'AVX512-BF16', 'AVX2', ..."""
    f = flags()
    if is_arm():
        names = {"asimddp": "dotprod", "bf16": "BF16", "i8mm": "I8MM"}
        return " + ".join(["ARM64 NEON" if "asimd" in f else "ARM64"] + [n for k, n in names.items() if k in f])
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
