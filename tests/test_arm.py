"""The ARM64 kernels (csrc/arch/arm/) without ARM hardware: tests/arm/harness.c, built
with Debian's aarch64 cross compiler at each level's flags (native.LEVEL_FLAGS) and run under qemu-user on the
weakest CPU model that has the level's features, checks every kernel against plain-C references (bf16 products
within float tolerance, int8 / int4 bit-exact, the small ops and whole decode steps); the same harness built for
this x86 CPU checks the x86 kernels against the same references, and the exact outputs' digest is one value on
every level of both families. A level's build faults on a CPU model without its features (it uses them). The
ARM64 feature detection is checked on the flag sets of real machines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lfm2cli.kernels import native
from lfm2cli.system import cpu

HARNESS = Path(__file__).with_name("arm") / "harness.c"
CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
# Each level runs on the weakest CPU model (qemu-aarch64 -cpu help) with its features; the next weaker one lacks them.
MODELS = {"neon": ("cortex-a53", "cortex-a57", "cortex-a72"), "dotprod": ("cortex-a76", "neoverse-n1"),
          "bf16": ("max",)}
WEAKER = {"dotprod": "neon", "bf16": "dotprod"}
needs_arm_tools = pytest.mark.skipif(CROSS is None or QEMU is None,
                                     reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                                            "(apt-get install gcc-aarch64-linux-gnu qemu-user)")


def compile_harness(cc: str, flags: list[str], out: Path, static: bool) -> Path:
    cmd = [cc, "-O3", "-fopenmp", *(["-static"] if static else []), *flags, f"-I{native.SOURCES}", str(HARNESS),
           "-o", str(out), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def result(done: subprocess.CompletedProcess) -> dict[str, str]:
    """The harness's report: its level, its digest, and the whole text."""
    lines = done.stdout.splitlines()
    level = lines[0].split()[1] if lines else ""
    digest = next((line.split()[1] for line in lines if line.startswith("digest ")), "")
    return {"level": level, "digest": digest, "text": done.stdout + done.stderr}


@pytest.fixture(scope="module")
def qemu_models() -> dict[str, str]:
    listing = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True, timeout=30).stdout.split()
    return {level: next((m for m in names if m in listing), "") for level, names in MODELS.items()}


@pytest.fixture(scope="module")
def arm_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The harness built (static, with the cross libgomp) for every ARM64 level, the builds side by side."""
    out = tmp_path_factory.mktemp("arm")
    jobs = {level: subprocess.Popen(
        [CROSS, "-O3", "-fopenmp", "-static", *native.LEVEL_FLAGS[level], f"-I{native.SOURCES}", str(HARNESS),
         "-o", str(out / f"harness-{level}"), "-lm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for level in cpu.ARM_LEVELS}
    for level, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, f"{level}: {err[-2000:]}"
    return {level: out / f"harness-{level}" for level in cpu.ARM_LEVELS}


@pytest.fixture(scope="module")
def arm_runs(arm_builds: dict[str, Path], qemu_models: dict[str, str]) -> dict[str, dict[str, str]]:
    runs = {}
    for level, binary in arm_builds.items():
        if not qemu_models[level]:
            pytest.skip(f"this qemu has no CPU model for the {level} level (wanted one of {MODELS[level]})")
        done = subprocess.run([QEMU, "-cpu", qemu_models[level], str(binary), "3"], capture_output=True, text=True,
                              timeout=120)
        runs[level] = result(done) | {"rc": str(done.returncode)}
    return runs


@pytest.mark.slow
@needs_arm_tools
@pytest.mark.parametrize("level", list(cpu.ARM_LEVELS))
def test_every_kernel_passes_at_every_arm_level(arm_runs: dict[str, dict[str, str]], level: str) -> None:
    run = arm_runs[level]
    print(run["text"])
    assert run["rc"] == "0" and "PASS" in run["text"], run["text"]
    assert run["level"] == level  # the level's flags select its kernel file (LFM2_LEVEL_SOURCE in native.c)
    isa = int(run["text"].split("LFM2_LEVEL ")[1].split(")")[0])
    assert native.LEVEL_IDS[isa] == level  # and the library would report it so


@pytest.mark.slow
@needs_arm_tools
def test_exact_outputs_are_the_same_bits_on_every_arm_level(arm_runs: dict[str, dict[str, str]]) -> None:
    digests = {level: run["digest"] for level, run in arm_runs.items()}
    assert len(set(digests.values())) == 1 and all(digests.values()), digests


@pytest.mark.slow
@needs_arm_tools
@pytest.mark.parametrize("level", list(WEAKER))
def test_a_level_uses_its_features(arm_builds: dict[str, Path], qemu_models: dict[str, str], level: str) -> None:
    """On a CPU model without the level's features (dotprod's SDOT, bf16's BFDOT) the build faults."""
    weaker = qemu_models[WEAKER[level]]
    if not weaker:
        pytest.skip(f"this qemu has no CPU model for the {WEAKER[level]} level")
    done = subprocess.run([QEMU, "-cpu", weaker, str(arm_builds[level]), "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "Illegal instruction" in done.stderr, done.stdout[-500:] + done.stderr[-500:]


@pytest.mark.slow
@needs_arm_tools
def test_without_openmp_every_kernel_still_passes(tmp_path: Path, qemu_models: dict[str, str]) -> None:
    """macOS without a libomp builds without OpenMP (the pragmas ignored): the kernels then run whole on one
    thread, with the same results."""
    binary = tmp_path / "harness-serial"
    done = subprocess.run([CROSS, "-O3", "-static", "-Wno-unknown-pragmas", *native.LEVEL_FLAGS["dotprod"],
                           f"-I{native.SOURCES}", str(HARNESS), "-o", str(binary), "-lm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = subprocess.run([QEMU, "-cpu", qemu_models["dotprod"] or "max", str(binary), "3"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "PASS" in run.stdout, run.stdout + run.stderr


@pytest.mark.slow
@needs_arm_tools
@pytest.mark.parametrize("level", list(cpu.ARM_LEVELS))
def test_the_library_builds_for_arm_with_every_function_python_binds(tmp_path: Path, level: str) -> None:
    """native.build's flags for the level (less -mtune=native, which only a compiler running on ARM knows) make
    a shared library that exports every function `native.load` binds."""
    flags = [f for f in native.compile_flags(level) if f != "-mtune=native"]
    lib = tmp_path / f"lfm2-{level}.so"
    done = subprocess.run([CROSS, *flags, f"-I{native.SOURCES}", str(native.SOURCES / "native.c"), "-o", str(lib)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    nm = shutil.which("aarch64-linux-gnu-nm") or "nm"
    symbols = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout.split()
    assert set(native._SIGNATURES) | {"lfm2_native_isa"} <= set(symbols)


@pytest.fixture(scope="module")
def x86_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The same harness built for this CPU at each x86 level it executes, and without a level (the scalar
    reference kernels, csrc/reference.c)."""
    cc = native._compiler()
    levels = [level for level in cpu.native_levels() if level in cpu.LEVELS]
    if cc is None or not levels:
        pytest.skip("needs a C compiler and an x86-64 CPU with AVX2")
    out = tmp_path_factory.mktemp("x86")
    runs = {}
    for level in [*levels, "none"]:
        binary = compile_harness(cc, native.LEVEL_FLAGS.get(level, []), out / f"harness-{level}", static=False)
        done = subprocess.run([str(binary), "2"], capture_output=True, text=True, timeout=120)
        runs[level] = result(done) | {"rc": str(done.returncode)}
    return runs


@pytest.mark.slow
def test_the_reference_agrees_with_the_x86_kernels(x86_runs: dict[str, dict[str, str]]) -> None:
    for level, run in x86_runs.items():
        assert run["rc"] == "0" and "PASS" in run["text"], run["text"]
        assert run["level"] == level


@pytest.mark.slow
@needs_arm_tools
def test_arm_and_x86_grouped_kernels_give_the_same_bits(arm_runs: dict[str, dict[str, str]],
                                                        x86_runs: dict[str, dict[str, str]]) -> None:
    digests = {level: run["digest"] for level, run in (arm_runs | x86_runs).items()}
    assert len(set(digests.values())) == 1, digests


# ---- ARM64 feature detection, on the flags real machines report

PI5 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
PI4 = "fp asimd evtstrm crc32 cpuid"
GRAVITON3 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
             "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 "
             "i8mm bf16 dgh rng")


@pytest.mark.parametrize(("features", "levels"), [
    (PI5, ["dotprod", "neon"]),  # Cortex-A76
    (PI4, ["neon"]),  # Cortex-A72: ARMv8.0
    (GRAVITON3, ["bf16", "dotprod", "neon"]),
    ("", []),
])
def test_arm_levels_follow_the_features(features: str, levels: list[str]) -> None:
    assert cpu.levels_for("aarch64", set(features.split())) == levels
    assert cpu.levels_for("arm64", set(features.split())) == levels  # macOS's name for the architecture
    assert cpu.levels_for("x86_64", set(features.split())) == []


def test_macos_reports_every_feature_a_level_needs() -> None:
    """sysctl's hw.optional names cover every flag of every ARM64 level, so an M-series Mac reaches them all."""
    assert {x for need in cpu.ARM_LEVELS.values() for x in need} <= set(cpu.SYSCTL_FEATURES.values())
    m2 = set(cpu.SYSCTL_FEATURES.values())  # M2 and later report all four as 1
    assert cpu.levels_for("arm64", m2)[0] == "bf16"
    m1 = m2 - {"bf16", "i8mm"}
    assert cpu.levels_for("arm64", m1)[0] == "dotprod"


def test_every_level_has_flags_and_an_id() -> None:
    for level in [*cpu.LEVELS, *cpu.ARM_LEVELS]:
        assert native.LEVEL_FLAGS[level] and level in native.LEVEL_IDS.values()
    assert not set(cpu.LEVELS) & set(cpu.ARM_LEVELS)  # one name, one architecture
