"""The on-disk model cache: where pulled models live, which of them are complete, and the standard
Hugging Face cache we reuse. Pure filesystem code: no network, no huggingface_hub, no torch.

Layout under the cache directory (`lfm2cli.system.paths.cache_dir()`, or --cache-dir):

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
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from lfm2cli.errors import CheckpointError, HubError, Lfm2Error
from lfm2cli.system import paths
from lfm2cli.terminal.formatting import human_bytes

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
    commit = _read(_ref_file(model_dir(repo_id, cache_dir), revision))
    return commit if commit and COMMIT_RE.match(commit) else None


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


MAX_INDEX_BYTES = 1 << 20  # a real index lists a few dozen files: anything bigger is not one we wrote


def _index_files(meta: Path) -> tuple[dict[str, int] | None, str | None]:
    """The {file: size} an index lists, or (None, why it cannot be used); (None, None) when there is none (the
    download has not finished). Read defensively: a hand-edited or damaged index is a reason, never a crash."""
    try:
        st = meta.lstat()
    except OSError:
        return None, None
    if not stat.S_ISREG(st.st_mode):
        return None, "not a plain file"
    if st.st_size > MAX_INDEX_BYTES:
        return None, f"{st.st_size:,} bytes, not an index lfm2 wrote"
    try:
        data = json.loads(meta.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None, "not valid JSON"
    if not isinstance(data, dict):
        return None, f"{_kind(data)}, not the JSON object lfm2 writes"
    files = data.get("files")
    if not isinstance(files, dict):
        return None, f"'files' is {_kind(files)}, not an object of file names and sizes"
    for name, size in files.items():
        if not _plain_name(name):
            return None, f"'files' names {name!r}, which is not a file of the snapshot"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None, f"'files' gives {name} the size {size!r}, not a number of bytes"
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        return None, "'files' lacks config.json or the weights" if files else "'files' is empty"
    return files, None


def _kind(value: object) -> str:
    """The JSON type of a value, for messages ("'files' is null")."""
    names = {type(None): "null", list: "a list", str: "a string", bool: "a boolean", dict: "an object"}
    return names.get(type(value), "a number")


def _plain_name(name: str) -> bool:
    """A file directly in the snapshot folder (all that pull writes): no folders, no way out of it."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _first_link(*paths: Path) -> Path | None:
    """The first of `paths` that is a link, or None. lfm2 writes plain folders in its cache, and never follows a
    link out of it."""
    return next((path for path in paths if path.is_symlink()), None)


def snapshot_state(repo_id: str, commit: str, cache_dir: str | Path | None = None) -> tuple[bool, str | None]:
    """(complete, problem): complete when verified once and every file is still there with its size (catches
    files deleted by hand); `problem` is one line naming what in the cache cannot be used (a damaged index, a
    link), None for an ordinary unfinished download."""
    root = model_dir(repo_id, cache_dir)
    link = _first_link(root, root / "snapshots", root / "snapshots" / commit)
    if link is not None:
        return False, f"{link} is a link to {_target(link)}, which lfm2 does not follow"
    meta = _meta_file(repo_id, commit, cache_dir)
    files, why = _index_files(meta)
    if files is None:
        return False, f"{meta}: {why}" if why else None
    snap = snapshot_dir(repo_id, commit, cache_dir)
    for name, size in files.items():
        try:
            st = (snap / name).lstat()  # a link in the snapshot is not a file pull wrote: not complete
        except OSError:
            return False, None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False, None
    return True, None


def refuse_links(repo_id: str, commit: str, cache_dir: str | Path | None = None) -> None:
    """HubError when a folder that a pull writes into is a link: lfm2 never writes through one (a snapshot
    linked to /usr would get the model's files)."""
    root = model_dir(repo_id, cache_dir)
    link = _first_link(root, root / "refs", root / "meta", root / "snapshots", root / "snapshots" / commit)
    if link is not None:
        raise HubError(f"{link} is a link to {_target(link)}, and lfm2 writes no files through links in its "
                       f"cache; remove the link (`lfm2 rm {repo_id}` does, and leaves what it points at), then "
                       "pull again")


def _target(link: Path) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return "?"


def snapshot_bytes(repo_id: str, commit: str, cache_dir: str | Path | None = None) -> int:
    """The bytes a snapshot's index lists (0 without a usable one)."""
    files, _ = _index_files(_meta_file(repo_id, commit, cache_dir))
    return sum(files.values()) if files else 0


def is_complete(repo_id: str, commit: str, cache_dir: str | Path | None = None) -> bool:
    """Verified once, and every file still there with its size (see `snapshot_state`)."""
    return snapshot_state(repo_id, commit, cache_dir)[0]


def cache_problem(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """Why the snapshot of `revision` in our cache cannot be used although it is there (a damaged index, a link),
    or None: what resolving says instead of "not downloaded" when the cache itself is at fault."""
    commit = read_ref(repo_id, revision, cache_dir)
    if not commit or not snapshot_dir(repo_id, commit, cache_dir).exists():
        return None
    return snapshot_state(repo_id, commit, cache_dir)[1]


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
    """A ref's text (a commit hash); a few hundred bytes at most, so a ref that is a link to a device or a huge
    file costs nothing."""
    try:
        if not path.is_file():  # a FIFO would block, a device never end
            return None
        with path.open("rb") as f:
            return f.read(256).decode("utf-8", "replace").strip()
    except OSError:
        return None


# ---- the standard Hugging Face cache (read only: other tools own it) ----

def find_in_hf_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """A snapshot in the standard Hugging Face cache that has everything lfm2 needs, or None. No network."""
    from lfm2cli.loading.checkpoint import weight_files

    root = paths.hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
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
    source: str = "lfm2"  # "lfm2" (our cache) or "hf-cache" (the standard Hugging Face cache, read only)

    @property
    def revision(self) -> str:
        return ", ".join(self.revisions) if self.revisions else self.commit[:12]


MAX_ENTRIES = 10_000  # entries one walk of the cache reads before it stops: a listing never runs unbounded
MAX_CONFIG_BYTES = 1 << 20  # config.json read for the architecture column


def _entries(folder: Path, notes: list[str]) -> list[os.DirEntry[str]]:
    """The entries of one folder, sorted by name, at most MAX_ENTRIES of them (a note says when there are more)."""
    out: list[os.DirEntry[str]] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if len(out) == MAX_ENTRIES:
                    notes.append(f"{folder}: more than {MAX_ENTRIES:,} entries; only the first are listed")
                    break
                out.append(entry)
    except OSError:
        return []
    return sorted(out, key=lambda e: e.name)


def _size(path: Path, inside: Path | None = None) -> tuple[int, bool]:
    """(bytes of the files under `path`, whether the walk stopped at MAX_ENTRIES). Links are never followed,
    except, with `inside`, a file link whose target lies under `inside` (the Hugging Face cache's links into
    its blobs/): a snapshot linked to /usr costs nothing and counts nothing."""
    total = seen = 0
    todo = [path]
    while todo:
        try:
            it = os.scandir(todo.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                seen += 1
                if seen > MAX_ENTRIES:
                    return total, True
                try:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                    elif inside is not None and entry.is_symlink() and _within(Path(entry.path), inside):
                        total += os.stat(entry.path).st_size
                except OSError:
                    pass
    return total, False


def _within(link: Path, root: Path) -> bool:
    """A link whose target is a plain file under `root`."""
    try:
        target = link.resolve(strict=True)
        return target.is_relative_to(root.resolve()) and target.is_file()
    except (OSError, RuntimeError):  # a loop, a dangling link
        return False


def _architecture(config: Path, inside: Path) -> str:
    """"LFM2", "LFM2-MoE" or "?" from a snapshot's config.json, read only when it is a file of the cache itself
    (a link into `inside` for the Hugging Face cache) and of a config's size."""
    from lfm2cli.model.config import parse_config, read_json_object

    if config.is_symlink() and not _within(config, inside):
        return "?"
    try:  # read_json_object refuses what is not a regular file of at most MAX_CONFIG_BYTES
        return parse_config(read_json_object(config, MAX_CONFIG_BYTES), source=str(config)).architecture
    except (Lfm2Error, ValueError, TypeError):
        return "?"


def _refs(refs_dir: Path, notes: list[str]) -> dict[str, list[str]]:
    """commit -> the refs (branch and tag names) that point at it."""
    out: dict[str, list[str]] = {}
    for ref in _entries(refs_dir, notes):
        if ref.is_file(follow_symlinks=False):
            commit = _read(Path(ref.path))
            if commit:
                out.setdefault(commit, []).append(unquote(ref.name))
    return out


def list_cached(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Every snapshot in our cache, complete or not, sorted by repo id."""
    return scan_cache(cache_dir)[0]


def scan_cache(cache_dir: str | Path | None = None) -> tuple[list[CachedModel], list[str]]:
    """Every snapshot in our cache, complete or not, sorted by repo id, and one note per entry that was skipped
    or is damaged (a broken index, a link out of the cache, the leftovers of an interrupted `lfm2 rm`).
    Reads defensively: a bad entry is a note, the rest is still listed; nothing on disk is changed."""
    out: list[CachedModel] = []
    notes: list[str] = []
    models = cache_root(cache_dir) / "models"
    for entry in sorted(_entries(models, notes), key=lambda e: e.name.lower()):
        root = Path(entry.path)
        if entry.name.startswith(".deleting-"):
            size, _ = _size(root)
            notes.append(f"{root} is left over from an interrupted `lfm2 rm` ({human_bytes(size)}); delete it "
                         f"with: rm -rf {shlex.quote(str(root))}")
            continue
        if "--" not in entry.name or entry.name.startswith("."):
            continue
        repo_id = entry.name.replace("--", "/", 1)
        if entry.is_symlink():
            notes.append(f"{root} is a link to {_target(root)}, which lfm2 does not follow; skipped "
                         f"(`lfm2 rm {repo_id}` removes the link, not what it points at)")
            continue
        if entry.is_dir():
            out += _scan_model(root, repo_id, cache_dir, notes)
    return out, notes


def _scan_model(root: Path, repo_id: str, cache_dir: str | Path | None, notes: list[str]) -> list[CachedModel]:
    refs = _refs(root / "refs", notes)
    try:
        last_used: float | None = (root / "last_used").stat().st_mtime
    except OSError:
        last_used = None
    out = []
    for entry in _entries(root / "snapshots", notes):
        snap = Path(entry.path)
        if entry.is_symlink():
            notes.append(f"{snap} is a link to {_target(snap)}, which lfm2 does not follow; skipped "
                         f"(`lfm2 rm {repo_id}` removes the link, not what it points at)")
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        complete, problem = snapshot_state(repo_id, entry.name, cache_dir)
        if problem:
            notes.append(f"{problem}; the snapshot is listed as incomplete (`lfm2 pull {repo_id}` repairs it)")
        size, cut = _size(snap)
        if cut:
            notes.append(f"{snap}: more than {MAX_ENTRIES:,} entries, not a snapshot lfm2 wrote; its size is "
                         "counted up to there")
        names = tuple(r for r in refs.get(entry.name, []) if r != entry.name)
        out.append(CachedModel(repo_id, names, entry.name, snap, size, _architecture(snap / "config.json", snap),
                               last_used, complete))
    return out


def list_hf_cached() -> tuple[list[CachedModel], list[str]]:
    """The LFM2 snapshots in the standard Hugging Face cache (other models there are none of lfm2's business),
    each complete when lfm2 can run it from there (`find_in_hf_cache`), and notes as `scan_cache` gives them.
    Read only, and bounded the same way: links are followed only into the repository's own blobs/."""
    out: list[CachedModel] = []
    notes: list[str] = []
    for entry in _entries(paths.hf_hub_cache(), notes):
        if not entry.name.startswith("models--") or entry.is_symlink() or not entry.is_dir():
            continue
        root = Path(entry.path)
        repo_id = entry.name.removeprefix("models--").replace("--", "/", 1)
        refs = _refs(root / "refs", notes)
        for snap_entry in _entries(root / "snapshots", notes):
            snap = Path(snap_entry.path)
            if snap_entry.is_symlink() or not snap_entry.is_dir():
                continue
            arch = _architecture(snap / "config.json", root)
            if arch == "?":
                continue
            size, _ = _size(snap, inside=root)
            names = tuple(r for r in refs.get(snap.name, []) if r != snap.name)
            usable = find_in_hf_cache(repo_id, snap.name) == snap
            out.append(CachedModel(repo_id, names, snap.name, snap, size, arch, None, usable, "hf-cache"))
    return out, notes


def remove(repo_id: str, cache_dir: str | Path | None = None) -> int:
    """Delete every revision of a model from our cache; returns the bytes freed.

    All or nothing: HubError before anything is deleted when a folder of it cannot be changed, and the
    model leaves the cache in one rename before its files are deleted, so a failure never leaves half a model.
    """
    root = model_dir(repo_id, cache_dir)
    if root.is_symlink():  # not a folder lfm2 wrote: the link goes, what it points at stays
        try:
            root.unlink()
        except OSError as e:
            raise HubError(f"cannot delete the link {root}: {e.strerror or e}; nothing was deleted") from e
        return 0
    if not root.is_dir():
        return 0
    locked = _not_deletable(root)
    if locked is not None:
        fix = f"chmod -R u+w {shlex.quote(str(root))}" if locked != root.parent else \
            f"chmod u+w {shlex.quote(str(locked))}"
        raise HubError(f"cannot delete {repo_id}: {locked} {_why_locked(locked)}; nothing was deleted; make it "
                       f"writable ({fix}) or run lfm2 rm as its owner")
    freed = _size(root)[0]
    # no "--" and a leading dot: `list` shows it as a leftover (should the deletion fail), never as a model
    trash = root.with_name(f".deleting-{os.getpid()}-{time.time_ns()}")
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
