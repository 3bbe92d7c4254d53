"""Numbers and times as people read them, the same in every command: sizes, counts, local times."""

from __future__ import annotations

import time
from datetime import datetime


def _scaled(n: int | float, units: tuple[tuple[float, str], ...]) -> str | None:
    """n in the largest unit it reaches, to three significant digits; None below the smallest."""
    for div, unit in units:
        if abs(n) >= div:
            value = n / div
            digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
            return f"{value:.{digits}f}{unit}"
    return None


def human_bytes(n: int | float) -> str:
    """Decimal units, as the hub shows file sizes: 2_340_000_000 -> '2.34 GB'."""
    return _scaled(n, ((1e12, " TB"), (1e9, " GB"), (1e6, " MB"), (1e3, " kB"))) or f"{int(n)} B"


def human_count(n: int | float) -> str:
    """1_170_340_608 -> '1.17B'; small numbers stay exact."""
    return _scaled(n, ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))) or f"{n:g}"


def rate(per_second: float | None, digits: int = 1) -> str:
    """A speed (tokens/s) to `digits` decimals, or '-' where nothing was measured (no tokens, or no time): a
    rate over zero tokens is not a rate, and 0.0 would read as a very slow machine."""
    if per_second is None or not per_second > 0:
        return "-"
    return f"{per_second:.{digits}f}"


def local_time(stamp: str) -> str:
    """A stored ISO 8601 time (UTC) in the user's time zone, to the minute; anything else as it is."""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


def ago(t: float | None) -> str:
    """Seconds since the epoch as '3 hours ago'; None as 'never'."""
    if t is None:
        return "never"
    s = max(0, int(time.time() - t))
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= span:
            n = s // span
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
