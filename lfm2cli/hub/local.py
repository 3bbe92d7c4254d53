"""The on-disk model cache: where pulled models live, which of them are complete, and the standard
Hugging Face cache we reuse. Pure filesystem code: no network, no huggingface_hub, no torch.

Layout under the cache directory (`lfm2cli.paths.cache_dir()`, or --cache-dir):

    models/<owner>--<name>/
        refs/<revision>        commit hash a branch or tag pointed at when it was pulled
        snapshots/<commit>/    the checkpoint files, plain files; a partial one ends in `.incomplete`
        meta/<commit>.json     written once a snapshot is downloaded and verified: {file: size}
        last_used              touched whenever a command resolves the model (its mtime is the time)
    kernels/                   lfm2's native CPU code, compiled once per machine and level (lfm2cli/kernels/native.py)

Plain files instead of huggingface_hub's blob/symlink layout because a download cut off in one run has
to resume in the next (huggingface_hub deletes its partial files), and because plain files need no
symlink support and are simple to measure and delete.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from lfm2cli import paths
from lfm2cli.errors import CheckpointError, HubError, Lfm2Error

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_REVISION = "main"
PARTIAL_SUFFIX = ".incomplete"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory: `cache_dir` (--cache-dir), else LFM2_CACHE, else the user cache directory.

    HubError when it, or a folder above it, is a file: otherwise `list` would show an empty cache and
    `pull` fail deep inside, neither saying that the setting is wrong.
    """
    root = Path(cache_dir).expanduser() if cache_dir else paths.cache_dir()
    for path in (root, *root.parents):
        try:
            if path.is_dir():
                break
            if not path.exists():
                continue
        except OSError:
            break  # cannot tell (no permission): the operation itself will say what is wrong
        if cache_dir:
            setting, fix = f"--cache-dir {cache_dir}", "pass a directory to --cache-dir"
        elif os.environ.get("LFM2_CACHE"):
            setting, fix = f"LFM2_CACHE={os.environ['LFM2_CACHE']}", "point LFM2_CACHE at a directory, or unset it"
        else:
            setting, fix = f"the model cache {root}", "move that file away, or set LFM2_CACHE to a directory"
        what = "is a file, not a directory" if path == root else f"is inside {path}, which is a file"
        raise HubError(f"{setting} {what}; {fix}")
    return root


def model_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    # hub repo ids never contain "--", so the folder name maps back to the id unambiguously
    return cache_root(cache_dir) / "models" / repo_id.replace("/", "--")


def _ref_file(root: Path, revision: str) -> Path:
    return root / "refs" / quote(revision, safe="")  # branch names may contain "/"


def read_ref(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """The commit a revision resolved to when it was last pulled (a commit hash is its own answer)."""
    revision = revision or DEFAULT_REVISION
    if COMMIT_RE.match(revision):
        return revision
    try:
        commit = _ref_file(model_dir(repo_id, cache_dir), revision).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if COMMIT_RE.match(commit) else None


def write_ref(repo_id: str, revision: str, commit: str, cache_dir: str | Path | None = None) -> None:
    ref = _ref_file(model_dir(repo_id, cache_dir), revision)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(ref.name + ".tmp")
    tmp.write_text(commit, encoding="utf-8")
    os.replace(tmp, ref)


def snapshot_dir(repo_id: str, commit: str, cache_dir: str | Path | None = None) -> Path:
    return model_dir(repo_id, cache_dir) / "snapshots" / commit


def _meta_file(repo_id: str, commit: str, cache_dir: str | Path | None) -> Path:
    return model_dir(repo_id, cache_dir) / "meta" / f"{commit}.json"


def mark_complete(repo_id: str, commit: str, files: dict[str, int], cache_dir: str | Path | None = None) -> None:
    """Record that every file of a snapshot is on disk and verified; only then is it used."""
    meta = _meta_file(repo_id, commit, cache_dir)
    meta.parent.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps({"files": files, "pulled_at": time.time()}, indent=1), encoding="utf-8")
    os.replace(tmp, meta)


def is_complete(repo_id: str, commit: str, cache_dir: str | Path | None = None) -> bool:
    """Verified once, and every file still there with its size (catches files deleted by hand)."""
    try:
        files = json.loads(_meta_file(repo_id, commit, cache_dir).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    snap = snapshot_dir(repo_id, commit, cache_dir)
    for name, size in files.items():
        try:
            if (snap / name).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def find_cached(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The complete snapshot for `revision` (default: main) in our cache, or None. No network."""
    commit = read_ref(repo_id, revision, cache_dir)
    if commit and is_complete(repo_id, commit, cache_dir):
        return snapshot_dir(repo_id, commit, cache_dir)
    return None


def mark_used(repo_id: str, cache_dir: str | Path | None = None) -> None:
    stamp = model_dir(repo_id, cache_dir) / "last_used"
    try:
        stamp.touch()
    except OSError:
        pass  # a read-only cache still works; only `lfm2 list` loses the time


def prune(repo_id: str, cache_dir: str | Path | None = None) -> None:
    """Delete snapshots no ref points at any more (an older commit of a branch that was pulled again)."""
    root = model_dir(repo_id, cache_dir)
    wanted = {c for c in (_read(f) for f in (root / "refs").glob("*")) if c}
    for snap in (root / "snapshots").glob("*"):
        if snap.name not in wanted:
            shutil.rmtree(snap, ignore_errors=True)
            try:
                (root / "meta" / f"{snap.name}.json").unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: the old snapshot stays, listed, until `lfm2 rm`


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


# ---- the standard Hugging Face cache (read only: other tools own it) ----

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


def find_in_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """A snapshot in the standard Hugging Face cache that has everything lfm2 needs, or None. No network."""
    from lfm2cli.checkpoint import weight_files

    root = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or DEFAULT_REVISION
    commit = revision if COMMIT_RE.match(revision) else _read(root / "refs" / revision)
    if not commit:
        return None
    snap = root / "snapshots" / commit
    # transformers may have fetched only the config, or only the weights: then it is not usable as is
    if not ((snap / "config.json").is_file() and (snap / "tokenizer.json").is_file()):
        return None
    try:
        files = weight_files(snap)
    except CheckpointError:
        return None
    return snap if all(f.is_file() for f in files) else None


# ---- listing and removal ----

@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    revisions: tuple[str, ...]  # refs that point at this commit
    commit: str
    path: Path
    size: int  # bytes on disk, partial files included
    architecture: str  # "LFM2", "LFM2-MoE" or "?" when config.json is missing or unreadable
    last_used: float | None  # seconds since the epoch
    complete: bool

    @property
    def revision(self) -> str:
        return ", ".join(self.revisions) if self.revisions else self.commit[:12]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _architecture(snap: Path) -> str:
    from lfm2cli.config import load_config

    try:
        return load_config(snap).architecture
    except Lfm2Error:
        return "?"


def list_cached(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Every snapshot in our cache, complete or not, sorted by repo id."""
    out: list[CachedModel] = []
    models = cache_root(cache_dir) / "models"
    for root in sorted(models.glob("*"), key=lambda p: p.name.lower()):
        if not root.is_dir() or "--" not in root.name:
            continue
        repo_id = root.name.replace("--", "/", 1)
        refs: dict[str, list[str]] = {}
        for ref in sorted((root / "refs").glob("*")):
            commit = _read(ref)
            if commit:
                refs.setdefault(commit, []).append(unquote(ref.name))
        try:
            last_used: float | None = (root / "last_used").stat().st_mtime
        except OSError:
            last_used = None
        for snap in sorted((root / "snapshots").glob("*")):
            if not snap.is_dir():
                continue
            names = tuple(r for r in refs.get(snap.name, []) if r != snap.name)
            out.append(CachedModel(repo_id, names, snap.name, snap, _size(snap), _architecture(snap),
                                   last_used, is_complete(repo_id, snap.name, cache_dir)))
    return out


def remove(repo_id: str, cache_dir: str | Path | None = None) -> int:
    """Delete every revision of a model from our cache; returns the bytes freed.

    All or nothing: HubError before anything is deleted when a folder of it cannot be changed, and the
    model leaves the cache in one rename before its files are deleted, so a failure never leaves half a model.
    """
    root = model_dir(repo_id, cache_dir)
    if not root.is_dir():
        return 0
    locked = _not_deletable(root)
    if locked is not None:
        fix = f"chmod -R u+w {shlex.quote(str(root))}" if locked != root.parent else \
            f"chmod u+w {shlex.quote(str(locked))}"
        raise HubError(f"cannot delete {repo_id}: {locked} {_why_locked(locked)}; nothing was deleted; make it "
                       f"writable ({fix}) or run lfm2 rm as its owner")
    freed = _size(root)
    trash = root.with_name(f".deleting-{os.getpid()}-{time.time_ns()}")  # no "--": list_cached skips it
    try:
        os.rename(root, trash)
    except OSError as e:
        raise HubError(f"cannot delete {repo_id} from {root.parent}: {e.strerror or e}; nothing was deleted") from e
    try:
        shutil.rmtree(trash)
    except OSError as e:
        raise HubError(f"{repo_id} is out of the cache, but its files in {trash} could not all be deleted "
                       f"({e.strerror or e}); delete that folder by hand") from e
    return freed


def _not_deletable(root: Path) -> Path | None:
    """The first folder whose entries this user cannot remove (the one holding `root`, `root` or a folder
    inside it), or None. Checked up front because rmtree stops at the first one, halfway through."""
    if not os.access(root.parent, os.W_OK | os.X_OK):
        return root.parent
    unreadable: list[OSError] = []
    for top, _, _ in os.walk(root, onerror=unreadable.append):
        if not os.access(top, os.R_OK | os.W_OK | os.X_OK):
            return Path(top)
    return Path(unreadable[0].filename or root) if unreadable else None


def _why_locked(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "is on a read-only file system"
    except (OSError, AttributeError):  # no statvfs on Windows
        pass
    return "is not writable by this user"
