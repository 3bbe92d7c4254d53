"""Memory as the process and the machine see it: this process's high-water mark (what `bench` and generation
stats report), read the same way everywhere, and the guard that refuses a load that cannot fit."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lfm2cli.errors import MemoryLimitError
from lfm2cli.loading.checkpoint import memory_needed
from lfm2cli.model.config import Lfm2Config
from lfm2cli.terminal.formatting import human_bytes

if TYPE_CHECKING:  # torch is imported where it is used, so `lfm2 list --available` asks psutil alone
    import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh high-water mark (Linux: VmHWM via clear_refs), so that what came before does not count."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    """Bytes: the most this process has held since the last reset (CUDA: the most allocated on the device)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never reset: since the process started
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def available_memory(device: torch.device) -> int:
    """Bytes a new model can take now: free device memory (CUDA), else the system's available memory
    (psutil: free plus reclaimable page cache), capped by a cgroup limit when the process runs under one."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return system_available_memory()


def system_available_memory() -> int:
    """Bytes of system memory a new model can take now (psutil: free plus reclaimable page cache), capped by a
    cgroup limit when the process runs under one. No torch."""
    import psutil

    free = int(psutil.virtual_memory().available)
    try:  # containers: the cgroup's limit, not the host's memory, is what the OOM killer enforces
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def fits_advice(cfg: Lfm2Config, quantize: str | None, dtype_bytes: int, available: int) -> str | None:
    """None when the model fits in `available` bytes; else one line saying what it needs and which precision
    would fit (the largest one that does)."""
    needed = memory_needed(cfg, quantize, dtype_bytes)
    if needed <= available:
        return None
    what = quantize or {4: "float32", 2: "bf16"}.get(dtype_bytes, f"{dtype_bytes * 8}-bit")
    line = f"this model needs ~{human_bytes(needed)} in {what} and ~{human_bytes(available)} is available"
    options = [(q, memory_needed(cfg, q, 2)) for q in (None, "int8", "int4")]
    fitting = [(q, n) for q, n in options if n <= available and n < needed]
    if fitting:
        q, n = fitting[0]
        hint = "--dtype bfloat16" if q is None else f"--quantize {q}"
        return f"{line}; {hint} needs ~{human_bytes(n)} (or pass --force to load it anyway)"
    smallest = "" if quantize == "int4" else f"; even --quantize int4 needs ~{human_bytes(options[-1][1])}"
    return f"{line}{smallest}: close other programs or pick a smaller model (or pass --force to load it anyway)"


def check_fits(cfg: Lfm2Config, quantize: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before anything is read, a load that the system could only answer by killing the process."""
    if device.type not in ("cpu", "cuda"):
        return  # MPS shares memory with the system in ways psutil does not show: leave it to the OS
    advice = fits_advice(cfg, quantize, dtype.itemsize, available_memory(device))
    if advice is not None:
        raise MemoryLimitError(advice)
