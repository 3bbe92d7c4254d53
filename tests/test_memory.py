"""The memory guard: what a model needs per precision, and a refusal in one line before anything is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lfm2cli.hub.known import known_config
from lfm2cli.loading.checkpoint import parameter_counts
from lfm2cli.loading.fit import fits_advice, memory_needed, weight_bytes
from lfm2cli.system.memory import available_memory


def test_weight_bytes_follow_the_formats() -> None:
    """bf16: two bytes a weight; int8 8.5 bits, int4 4.5 bits, plus bf16 embeddings (and int4's int8 head)."""
    cfg = known_config("lfm2-8b-a1b")
    total, _ = parameter_counts(cfg)
    bf16, int8, int4 = (weight_bytes(cfg, q) for q in (None, "int8", "int4"))
    table = cfg.vocab_size * cfg.hidden_size
    assert bf16 == pytest.approx((total + table) * 2, rel=1e-3)  # + the head's own copy of the table
    assert int8 < 0.56 * bf16 and int4 < 0.31 * bf16
    # (total - table) weights and the head at 8.5 bits + the bf16 table
    assert int8 == pytest.approx(total * 8.5 / 8 + table * 2, rel=0.01)
    # (total - table) weights at 4.5 bits + the bf16 table + an int8 head
    assert int4 == pytest.approx((total - table) * 4.5 / 8 + table * 2 + table * 8.5 / 8, rel=0.01)
    assert memory_needed(cfg, "int4") < 6e9 and memory_needed(cfg, "int8") < 10e9


def test_advice_names_the_largest_precision_that_fits() -> None:
    cfg = known_config("lfm2-24b-a2b")
    need = {q: memory_needed(cfg, q) for q in (None, "int8", "int4")}
    assert fits_advice(cfg, None, 2, need[None]) is None
    line = fits_advice(cfg, None, 2, need["int8"] + 1)
    assert line is not None and "--quantize int8 needs" in line and "--force" in line and "\n" not in line
    assert "--quantize int4 needs" in fits_advice(cfg, None, 2, need["int4"] + 1)
    assert "--dtype bfloat16 needs" in fits_advice(cfg, None, 4, need[None] + 1)  # float32 asked, bf16 fits
    assert "smaller model" in fits_advice(cfg, "int4", 2, need["int4"] - 1)


@pytest.mark.slow
def test_an_impossible_load_is_refused_in_one_line() -> None:
    """The real command on this machine: LFM2-24B-A2B in bf16 (~48 GB) is refused before anything is built."""
    import torch

    cfg = known_config("lfm2-24b-a2b")
    if available_memory(torch.device("cpu")) >= memory_needed(cfg):
        pytest.skip("this machine has room for LFM2-24B-A2B in bf16")
    r = subprocess.run([sys.executable, "-m", "lfm2cli", "bench", "--random", "lfm2-24b-a2b", "--device", "cpu",
                        "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LFM2_DEBUG": ""})
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--quantize int" in lines[0], r.stderr


@pytest.mark.slow
def test_available_memory_is_read_without_torch() -> None:
    """`lfm2 list --available` asks the memory guard's own reading, and that costs no torch import."""
    code = ("import sys, psutil\n"
            "from lfm2cli.system.memory import system_available_memory\nfree = system_available_memory()\n"
            "assert 0 < free <= psutil.virtual_memory().total, free\nassert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
