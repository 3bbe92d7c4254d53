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


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloads, read from the environment now (its own constant is fixed at
    import time): HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


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
        # samefile also catches a hard link; resolve() alone a file that does not exist yet
        if target == own.resolve() or (own.exists() and target.exists() and os.path.samefile(target, own)):
            raise Lfm2Error(f"refusing to write over {own}, lfm2's own {own.name.split('.')[0].replace('_', ' ')} "
                            "file; choose another file name")
    for folder in (cache_dir(), hf_hub_cache(), *protect):
        if _inside(target, folder):
            raise Lfm2Error(f"refusing to write {path} inside {folder}, where lfm2 keeps models; "
                            "choose a file elsewhere")
    if target.is_dir():
        raise Lfm2Error(f"cannot write {path}: it is a directory; give a file name")
    return path
