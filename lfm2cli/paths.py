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


def _hf_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME, ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on the way
        return False


def check_output_path(file: str | Path, protect: tuple[Path, ...] = ()) -> Path:
    """`file` as a path lfm2 may write an export to; else Lfm2Error. Never lfm2's own history database (or its
    WAL files), input history or model caches, nor a folder in `protect` (the model being run): overwriting
    one of those with an export would destroy what the export was meant to keep."""
    from lfm2cli.errors import Lfm2Error

    path = Path(file).expanduser()
    try:
        target = path.resolve()  # follows symlinks, so a link to the database is seen for what it is
    except (OSError, RuntimeError) as e:
        raise Lfm2Error(f"cannot write {path}: {getattr(e, 'strerror', None) or 'a symlink loop'}") from None
    home = data_dir()
    own_files = [home / name for name in ("history.db", "history.db-wal", "history.db-shm", "input_history")]
    for own in own_files:
        same = target == own.resolve() if not own.exists() else (target.exists() and os.path.samefile(target, own))
        if same:
            raise Lfm2Error(f"refusing to write over {own}, lfm2's own {own.name.split('.')[0].replace('_', ' ')} "
                            "file; choose another file name")
    for folder in (cache_dir(), _hf_cache(), *protect):
        if _inside(target, folder):
            raise Lfm2Error(f"refusing to write {path} inside {folder}, where lfm2 keeps models; "
                            "choose a file elsewhere")
    if target.is_dir():
        raise Lfm2Error(f"cannot write {path}: it is a directory; give a file name")
    return path
