"""Memory as the process and the machine see it: this process's high-water mark (what `bench` and generation
stats report), read the same way everywhere, and what a new model could take now (`loading.fit` weighs a
model against it)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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
