"""lfm2: run Liquid AI's LFM2 models locally. Heavy imports (torch) happen only inside functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lfm2cli.loading.loader import LoadedModel


def load(path: Any, device: str = "auto", dtype: str = "auto", **kwargs: Any) -> LoadedModel:
    """Load a checkpoint directory: returns a LoadedModel (model, config, tokenizer when present)."""
    from lfm2cli.loading.loader import load as _load

    return _load(path, device=device, dtype=dtype, **kwargs)
