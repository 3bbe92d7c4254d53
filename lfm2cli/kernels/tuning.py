"""The native decode kernels' CPU-dependent choices (csrc/common.h's lfm2_tuning), measured once per CPU model,
level, library and thread count on the user's machine, in a fraction of a second, and cached as JSON next to the
compiled library.

What is tuned: `streams`, how many 16-row blocks of a bf16 tile a thread reads side by side (1, 2 or 4: more keep
more memory requests in flight, fewer suit CPUs whose hardware prefetchers track few streams); `ahead`, how far
ahead (bytes) the bf16 decode kernel prefetches each stream (0: none); `part_kb`, the weights per part the threads
take in turn in the int8 / int4 decode kernels. None of them changes a result's bits.

`LFM2_TUNING` overrides: `off` (or `0`, `defaults`) keeps the compiled defaults without measuring;
`streams=2,ahead=1024,part_kb=256` sets those fields (the rest stay at the defaults), also without measuring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from lfm2cli.kernels import native
from lfm2cli.system import cpu

ENV = "LFM2_TUNING"
OFF = ("off", "0", "defaults", "none")
FIELDS = ("streams", "ahead", "part_kb")
STREAMS = (1, 2, 4)
AHEADS = (0, 1024)
PARTS_KB = (128, 512, 2048, 8192)
REPEATS = 6  # timed passes per candidate, taken in turns so that a noisy moment hurts them all alike
BUDGET_S = 0.5  # past this, each format's measurement stops after its current pass (at least two of each)
KEEP_DEFAULT = 0.02  # the compiled default stays unless a candidate beats it by more than this fraction
IN_FEATURES = 1024  # inputs of the synthetic matrices (LFM2-350M's hidden size)
MATRIX_BYTES = 16 << 20  # weights of one synthetic matrix: a large projection of LFM2-350M (1-14 MB)
VERSION = 1  # of the cache file's layout and the candidates: another value is measured again


def _llc_bytes() -> int:
    """The last-level cache's size (Linux sysfs), or 32 MB where it cannot be read."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        with contextlib.suppress(OSError, ValueError):
            text = size.read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * scale)
    return best or 32 << 20


def matrix_bytes() -> int:
    """Bytes of the synthetic weights: twice the last-level cache (so they stream from memory as a model's do),
    between 32 and 256 MB."""
    return min(max(2 * _llc_bytes(), 32 << 20), 256 << 20)


def cache_path(library: Path, level: str, threads: int) -> Path:
    """The tuning file of `library` (already keyed by sources, compiler and level) on this CPU model and thread
    count: beside the library, so that clearing the kernels folder clears both."""
    key = hashlib.sha256(f"{cpu.model_name()}\0{level}\0{threads}".encode()).hexdigest()[:12]
    return library.with_name(f"{library.stem}-{key}.tuning.json")


def parse(text: str) -> dict[str, int] | None:
    """LFM2_TUNING's value: None for the compiled defaults, else the fields it sets. Raises ValueError."""
    text = text.strip().lower()
    if text in OFF:
        return None
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in FIELDS:
            raise ValueError(f"{item!r}: expected off or name=value with a name among {', '.join(FIELDS)}")
        try:
            values[name] = int(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value.strip()!r} is not a whole number") from None
    return values


class _Bench:
    """One-token products y = W x through the library, as a model's decode calls them: weights of format `fmt`,
    about `nbytes` in all (more than the caches hold, so they stream from memory), cut in matrices of about
    MATRIX_BYTES (a layer's projection), one call each."""

    def __init__(self, fmt_name: str, nbytes: int) -> None:
        fmt = native.FORMATS[fmt_name].id
        block = native.FORMATS["bf16"].block_bytes if fmt == native.BF16 else native.GROUP_BYTES[fmt]
        group = 2 if fmt == native.BF16 else native.GROUP
        row_bytes = IN_FEATURES // group * block // 16
        self.fmt, self.fmt_name = fmt, fmt_name
        self.out = max(native.ROWS, min(nbytes, MATRIX_BYTES) // row_bytes // native.ROWS * native.ROWS)
        self.count = max(1, nbytes // (self.out * row_bytes))
        self.stride = self.out * row_bytes
        # any bytes do for timing; filled, so that every page is really there (untouched pages all read one page)
        self.w = torch.full((self.count * self.stride,), 1, dtype=torch.uint8)
        if fmt != native.BF16:  # finite scales: fp16 / bf16 1.0 (0x3C00, 0x3F80) in every 2-byte word
            self.w.view(torch.int16).fill_(0x3C00 if fmt == native.INT8 else 0x3F80)
        self.x = torch.full((IN_FEATURES,), 0.5, dtype=torch.bfloat16)
        self.y = torch.empty(self.out, dtype=torch.bfloat16)
        self.threads = torch.get_num_threads()

    def time(self) -> float:
        w, x, y, linear = self.w.data_ptr(), self.x.data_ptr(), self.y.data_ptr(), native._lib.lfm2_linear
        start = time.perf_counter()
        for i in range(self.count):
            linear(w + i * self.stride, x, y, 1, self.out, IN_FEATURES, self.fmt, self.threads)
        return time.perf_counter() - start


def _best(bench: _Bench, candidates: list[dict[str, int]], default: dict[str, int], results: dict[str, float],
          deadline: float = float("inf")) -> dict[str, int]:
    """The fastest of `candidates` by its best pass (REPEATS passes each, taken in turns, in two rounds; fewer
    once past `deadline`, at least one a round); the default unless the winner beats it by more than KEEP_DEFAULT
    in both rounds, so that a pass slowed by other work on a busy machine does not decide. Each candidate's GB/s
    (best pass) goes to `results`."""
    if default not in candidates:
        candidates = [default, *candidates]
    rounds = [[float("inf")] * len(candidates) for _ in range(2)]
    native.set_tuning(default)
    bench.time()  # warm: the weights' pages, the thread pool
    for r in range(REPEATS):
        if r >= 2 and time.perf_counter() > deadline:  # a busy machine: what was measured decides
            break
        times = rounds[r % 2]
        for i, candidate in enumerate(candidates):
            native.set_tuning(candidate)
            times[i] = min(times[i], bench.time())
    best_times = [min(a, b) for a, b in zip(*rounds, strict=True)]
    for candidate, t in zip(candidates, best_times, strict=True):
        name = ",".join(f"{k}={v}" for k, v in candidate.items())
        results[f"{bench.fmt_name} {name}"] = round(bench.w.numel() / t / 1e9, 2)
    best, base = min(range(len(candidates)), key=best_times.__getitem__), candidates.index(default)
    beats = all(times[best] < times[base] * (1 - KEEP_DEFAULT) for times in rounds)
    return candidates[best] if beats else default


def measure() -> tuple[dict[str, int], dict[str, float]]:
    """Time the candidates on this machine with the loaded library: bf16's streams and prefetch distance
    together, then the int8 parts with those. Returns the choice and each candidate's GB/s."""
    defaults = native.set_tuning(None)
    start, results = time.perf_counter(), {}
    nbytes = matrix_bytes()
    bf16 = _Bench("bf16", nbytes)
    grid = [{**defaults, "streams": s, "ahead": a} for s in STREAMS for a in AHEADS]
    choice = _best(bf16, grid, defaults, results, start + 0.6 * BUDGET_S)
    del bf16
    int8 = _Bench("int8", nbytes)
    choice = _best(int8, [{**choice, "part_kb": p} for p in PARTS_KB], choice, results, start + BUDGET_S)
    return choice, results


def _read(path: Path, level: str, library: Path) -> dict[str, int] | None:
    """The cached choice, or None when the file is missing, unreadable, for another library or CPU, or out of
    range (then it is measured again and rewritten)."""
    try:
        data = json.loads(path.read_text())
        if (data.get("version"), data.get("cpu"), data.get("level"), data.get("library")) != (
                VERSION, cpu.model_name(), level, library.name):
            return None
        values = {name: int(data["tuning"][name]) for name in FIELDS}
        native.set_tuning(values)  # raises ValueError out of range
        return values
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}-{os.getpid()}")
    with contextlib.suppress(OSError):  # a read-only cache: measured again next time, no harm
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent process reads the whole file or none


def apply(library: Path, level: str) -> dict[str, object]:
    """Set the loaded library's tuning: LFM2_TUNING's, else the cached choice for this CPU, level, library and
    thread count, else a new measurement, which is cached. Returns `native.tuning_info()`."""
    asked = os.environ.get(ENV)
    if asked is not None and asked.strip():
        try:
            values = parse(asked)
            native.set_tuning(values, f"{ENV}={asked.strip()}" if values is not None else f"compiled defaults ({ENV})")
        except ValueError as e:
            print(f"lfm2: {ENV} ignored ({e}); the compiled defaults are used", file=sys.stderr)
            native.set_tuning(None, f"compiled defaults ({ENV} ignored)")
        return native.tuning_info()
    threads = torch.get_num_threads()
    path = cache_path(library, level, threads)
    cached = _read(path, level, library)
    if cached is not None:
        native.set_tuning(cached, f"cached ({path.name})")
        return native.tuning_info()
    start = time.perf_counter()
    choice, results = measure()
    seconds = time.perf_counter() - start
    native.set_tuning(choice, f"measured at load in {seconds:.2f} s")
    _write(path, {"version": VERSION, "cpu": cpu.model_name(), "level": level, "library": library.name,
                  "threads": threads, "tuning": choice, "measured_s": round(seconds, 3), "gbs": results})
    return native.tuning_info()


def describe(info: dict[str, object] | None) -> str:
    """One line for `lfm2 bench`: the setting and where it came from."""
    if not info:
        return "none (no native code)"
    fields = ", ".join(f"{name}={info[name]}" for name in FIELDS if name in info)
    return f"{fields} ({info.get('source', '?')})"

