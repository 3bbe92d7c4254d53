"""Where lfm2 keeps things: model cache (LFM2_CACHE) and user data such as chat history (LFM2_HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Downloaded models. Override with LFM2_CACHE."""
    if os.environ.get("LFM2_CACHE"):
        return Path(os.environ["LFM2_CACHE"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lfm2", appauthor=False))


def data_dir() -> Path:
    """Chat history database and input history. Override with LFM2_HOME."""
    if os.environ.get("LFM2_HOME"):
        return Path(os.environ["LFM2_HOME"]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("lfm2", appauthor=False))
