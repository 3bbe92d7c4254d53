"""What can run here (`lfm2 list --available`): the published models whose shape lfm2 knows (`hub/known.py`),
what each takes to run at bf16, int8 and int4 by the memory guard's own estimate (`loading.fit.memory_needed`),
whether that fits the memory available now, and whether the model is downloaded. No network, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lfm2cli.hub import local
from lfm2cli.hub.known import KNOWN_CONFIGS
from lfm2cli.hub.names import PUBLISHED
from lfm2cli.loading.checkpoint import parameter_counts
from lfm2cli.loading.fit import memory_needed

PRECISIONS = ("bf16", "int8", "int4")  # largest first: `fits` names the first that fits
_QUANTIZE = {"bf16": None, "int8": "int8", "int4": "int4"}  # bf16: the model unquantized, two bytes a weight


@dataclass(frozen=True)
class Entry:
    alias: str  # what to type: `lfm2 pull lfm2-1.2b`
    repo_id: str
    parameters: int
    needs: dict[str, int]  # precision -> bytes to run it (weights, a KV cache of CONTEXT_TOKENS, the runtime)
    fits: str | None  # the largest precision that fits the memory available, None when none does
    downloaded: str  # "yes" (lfm2's cache), "hf-cache", "partial" (an interrupted pull) or "no"


def catalog(available: int, cache_dir: str | Path | None = None) -> list[Entry]:
    """One entry per published model of known shape, in the order of `names.PUBLISHED` (by family, then size)."""
    from lfm2cli.model.config import parse_config

    sized: dict[int, tuple[int, dict[str, int]]] = {}  # variants share one config dict: size it once
    out = []
    for name in PUBLISHED:
        repo_id = f"LiquidAI/{name}"
        raw = KNOWN_CONFIGS.get(repo_id)
        if raw is None:
            continue
        if id(raw) not in sized:
            cfg = parse_config(raw, source=f"known config of {repo_id}")
            sized[id(raw)] = (parameter_counts(cfg)[0], {p: memory_needed(cfg, _QUANTIZE[p]) for p in PRECISIONS})
        parameters, needs = sized[id(raw)]
        fits = next((p for p in PRECISIONS if needs[p] <= available), None)
        out.append(Entry(name.lower(), repo_id, parameters, needs, fits, _downloaded(repo_id, cache_dir)))
    return out


def _downloaded(repo_id: str, cache_dir: str | Path | None) -> str:
    if local.find_cached(repo_id, None, cache_dir) is not None:
        return "yes"
    if local.find_in_hf_cache(repo_id) is not None:
        return "hf-cache"
    snapshots = local.model_dir(repo_id, cache_dir) / "snapshots"
    try:
        return "partial" if snapshots.is_dir() and next(snapshots.iterdir(), None) is not None else "no"
    except OSError:
        return "no"
