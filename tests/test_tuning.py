"""The native decode kernels' tuning (lfm2cli/kernels/tuning.py): measured at first load and cached beside the
library, reused, overridden by LFM2_TUNING, re-measured over a corrupt file, and never a change of bits."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lfm2cli.kernels import native, tuning
from lfm2cli.system import cpu
from tests.helpers import native_at_level

LEVELS = cpu.native_levels()
# the tuner tunes the native library: nothing to test where it is not loaded (no level, or LFM2_NATIVE=0)
needs_native = pytest.mark.skipif(not LEVELS or os.environ.get("LFM2_NATIVE", "1") == "0",
                                  reason="no native code here (no level on this CPU, or LFM2_NATIVE=0)")
SETTINGS = [{"streams": s, "ahead": a, "part_kb": p} for s in tuning.STREAMS for a in (0, 64, 4096)
            for p in (16, 512)]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's builds (each level's library is built once)."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture
def tuner(monkeypatch: pytest.MonkeyPatch, kernels: Path) -> Iterator[dict[str, int]]:
    """The tuner on (LFM2_TUNING unset) with no tuning file yet, a small synthetic matrix and few passes (the test
    checks the caching, not the choice); counts the measurements. Afterwards the process reloads as it would
    itself, with the compiled defaults."""
    for path in tuning_files(kernels):
        path.unlink()
    monkeypatch.delenv("LFM2_TUNING", raising=False)
    monkeypatch.setattr(tuning, "matrix_bytes", lambda: 1 << 20)
    monkeypatch.setattr(tuning, "REPEATS", 2)
    calls = {"measure": 0}
    measure = tuning.measure

    def counted() -> tuple[dict[str, int], dict[str, float]]:
        calls["measure"] += 1
        return measure()

    monkeypatch.setattr(tuning, "measure", counted)
    native.reset()
    yield calls
    native.reset()


def load(directory: Path) -> dict[str, object]:
    native.reset()
    assert native.load(directory) is None
    info = native.tuning_info()
    assert info is not None
    return info


def tuning_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.tuning.json"))


def test_parse() -> None:
    assert tuning.parse("off") is None and tuning.parse(" Defaults ") is None and tuning.parse("0") is None
    assert tuning.parse("streams=2, ahead=1024") == {"streams": 2, "ahead": 1024}
    assert tuning.parse("part_kb=256") == {"part_kb": 256}
    for bad in ("streams", "threads=2", "streams=two"):
        with pytest.raises(ValueError):
            tuning.parse(bad)


def test_describe() -> None:
    line = tuning.describe({"streams": 2, "ahead": 0, "part_kb": 512, "source": "cached (x.tuning.json)"})
    assert line == "streams=2, ahead=0, part_kb=512 (cached (x.tuning.json))"


@needs_native
def test_first_load_measures_and_caches_then_reuses(tuner: dict[str, int], kernels: Path) -> None:
    first = load(kernels)
    assert tuner["measure"] == 1 and str(first["source"]).startswith("measured at load")
    (path,) = tuning_files(kernels)
    data = json.loads(path.read_text())
    assert data["cpu"] == cpu.model_name() and data["level"] == native.level()
    assert (kernels / data["library"]).exists() and path.name.startswith(Path(data["library"]).stem)
    assert data["tuning"] == {k: first[k] for k in tuning.FIELDS} and data["gbs"]
    again = load(kernels)
    assert tuner["measure"] == 1 and again["source"] == f"cached ({path.name})"
    assert {k: again[k] for k in tuning.FIELDS} == data["tuning"]


@needs_native
def test_a_cached_choice_is_used_as_it_is(tuner: dict[str, int], kernels: Path) -> None:
    load(kernels)
    (path,) = tuning_files(kernels)
    data = json.loads(path.read_text())
    data["tuning"] = {"streams": 1, "ahead": 128, "part_kb": 64}
    path.write_text(json.dumps(data))
    info = load(kernels)
    assert tuner["measure"] == 1 and {k: info[k] for k in tuning.FIELDS} == data["tuning"]


@needs_native
@pytest.mark.parametrize("corrupt", ["{", '{"version": 1}', "[]", "out of range"])
def test_a_corrupt_file_is_measured_again(tuner: dict[str, int], kernels: Path, corrupt: str) -> None:
    load(kernels)
    (path,) = tuning_files(kernels)
    if corrupt == "out of range":
        data = json.loads(path.read_text())
        data["tuning"]["streams"] = 3
        corrupt = json.dumps(data)
    path.write_text(corrupt)
    info = load(kernels)
    assert tuner["measure"] == 2 and str(info["source"]).startswith("measured")
    assert json.loads(path.read_text())["tuning"] == {k: info[k] for k in tuning.FIELDS}


@needs_native
def test_the_variable_wins(tuner: dict[str, int], kernels: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture) -> None:
    load(kernels)  # a cached choice is there, and not read
    monkeypatch.setenv("LFM2_TUNING", "streams=2,ahead=1024")
    info = load(kernels)
    assert (info["streams"], info["ahead"], info["source"]) == (2, 1024, "LFM2_TUNING=streams=2,ahead=1024")
    monkeypatch.setenv("LFM2_TUNING", "off")
    defaults = load(kernels)
    assert defaults["source"] == "compiled defaults (LFM2_TUNING)"
    monkeypatch.setenv("LFM2_TUNING", "streams=3")  # out of range: said, and the compiled defaults
    bad = load(kernels)
    assert "LFM2_TUNING ignored" in capsys.readouterr().err
    assert {k: bad[k] for k in tuning.FIELDS} == {k: defaults[k] for k in tuning.FIELDS}
    assert tuner["measure"] == 1


@needs_native
def test_set_tuning_refuses_values_out_of_range(tuner: dict[str, int], kernels: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LFM2_TUNING", "off")
    load(kernels)
    defaults = native.set_tuning(None)
    for bad in ({"streams": 8}, {"ahead": 100}, {"ahead": -64}, {"part_kb": 1}):
        with pytest.raises(ValueError):
            native.set_tuning(bad)
    assert native.set_tuning({"streams": 2}) == {**defaults, "streams": 2}
    native.set_tuning(None)


def _products(fmt: int) -> list[torch.Tensor]:
    """One token and one product of several matrices (a MoE layer's experts) in format `fmt`, as bits: an odd
    row count (a partial last block and tile) and inputs that bf16's chunks of the sum cut (avx2: 768)."""
    torch.manual_seed(fmt)
    out, inn = 200, 1600
    ws = [torch.randn(out, inn, dtype=torch.bfloat16) for _ in range(3)]
    if fmt == native.BF16:
        packed = [native.pack(w) for w in ws]
    elif fmt == native.INT8:
        packed = [native.pack_grouped(*native.quantize_int8(w), fmt) for w in ws]
    else:
        packed = [native.pack_grouped(*native.quantize_int4(w), fmt) for w in ws]
    x = torch.randn(inn, dtype=torch.bfloat16)
    xs = [x, torch.randn(inn, dtype=torch.bfloat16), x]
    return [native.linear(x, packed[0], out, fmt).view(torch.int16),
            *(y.view(torch.int16) for y in native.linear_group(xs, packed, out, fmt))]


@needs_native
@pytest.mark.parametrize("level", LEVELS)
def test_the_bits_do_not_depend_on_the_tuning(level: str, kernels: Path) -> None:
    with native_at_level(level, kernels):
        assert native.ready(), native.why_not()
        try:
            for fmt in (native.BF16, native.INT8, native.INT4):
                native.set_tuning(None)
                expected = _products(fmt)
                for setting in SETTINGS:
                    native.set_tuning(setting)
                    got = _products(fmt)
                    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), (fmt, setting)
        finally:
            native.set_tuning(None)
