"""Downloads from the Hugging Face hub into our cache (see `lfm2cli.hub.local` for the layout).

huggingface_hub does the API calls (repo info, file listing), authentication (HF_TOKEN, `hf auth login`) and
error classification; the file transfer itself is ours so that a partial file survives an interrupted run and
the next pull asks only for the rest with a Range request. Heavy imports (huggingface_hub) happen inside
functions, so resolving a local directory or a cached model costs nothing.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from lfm2cli import __version__
from lfm2cli.errors import HubError, Lfm2Error
from lfm2cli.hub import local
from lfm2cli.hub.progress import Progress, make_progress
from lfm2cli.terminal.formatting import human_bytes

# Everything lfm2 reads from a checkpoint repo; READMEs, GGUF/ONNX exports and images are skipped.
ALLOW_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
)
_TRUE = {"1", "ON", "YES", "TRUE"}
MAX_STALLS = 5  # consecutive attempts that bring no new byte before a file download gives up
RETRY_DELAY = 1.0  # seconds between those attempts


def is_offline(offline: bool = False) -> bool:
    """--offline, or HF_HUB_OFFLINE=1 (read now: huggingface_hub reads it once, at import)."""
    return offline or any(os.environ.get(v, "").strip().upper() in _TRUE
                          for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    """The hub, or a mirror named by HF_ENDPOINT (read now, for the same reason)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")



class HubUnreachable(HubError):
    """The hub could not be asked at all (offline mode, no network): a copy already in a cache may still do.
    `reason` is the short why, for a message that goes on ("offline mode is on (HF_HUB_OFFLINE=1)")."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


OFFLINE_REASON = "offline mode is on (HF_HUB_OFFLINE=1)"


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int


@dataclass(frozen=True)
class Plan:
    """What `pull` will fetch: the commit a revision points at now, and the files lfm2 needs from it."""

    repo_id: str
    revision: str | None
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PullResult:
    path: Path
    commit: str
    downloaded: int  # bytes transferred by this pull
    total: int  # bytes of the checkpoint
    source: str  # "downloaded", "up to date", "cached" (in our cache, not checked) or "hf cache"
    unchecked_because: str | None = None  # the hub could not be asked (offline, no network): why; the result is
    # then the copy a cache already held


def _wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatchcase(name, p) for p in ALLOW_PATTERNS)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection/timeout/protocol errors (huggingface_hub 2.x uses httpx2)."""
    try:
        import httpx2

        return (httpx2.TransportError,)
    except ImportError:  # older huggingface_hub releases use httpx
        import httpx

        return (httpx.TransportError,)


@contextmanager
def _explained(repo_id: str, revision: str | None, resumable: bool = False,
               cache_dir: str | Path | None = None) -> Iterator[None]:
    """Turn huggingface_hub and OS errors into one line that says what to do. A hint names `--cache-dir` only
    when the user gave it (only `pull` has it), else LFM2_CACHE, which every command reads."""
    from huggingface_hub import errors as hf

    hub = endpoint()
    try:
        yield
    except Lfm2Error:
        raise
    except hf.GatedRepoError as e:
        from huggingface_hub import get_token

        if get_token():
            raise HubError(f"{repo_id} is gated and your token has no access yet: accept its terms at "
                           f"{hub}/{repo_id}") from e
        raise HubError(f"{repo_id} is gated: accept its terms at {hub}/{repo_id}, then log in with "
                       "`hf auth login` or set HF_TOKEN") from e
    except hf.RevisionNotFoundError as e:
        if revision is None:  # only `pull` takes a revision; other commands ask for the default branch
            raise HubError(f"{repo_id} has no default branch on {hub}; name a branch, tag or commit: "
                           f"lfm2 pull {repo_id} --revision REV") from e
        raise HubError(f"{repo_id} has no revision '{revision}'; pass an existing branch, tag or commit to "
                       "--revision") from e
    except hf.RepositoryNotFoundError as e:
        raise HubError(f"{repo_id} was not found on {hub}; check the name (a private repository needs "
                       "HF_TOKEN or `hf auth login`)") from e
    except hf.OfflineModeIsEnabled as e:
        raise HubUnreachable(f"{OFFLINE_REASON}; unset it to download models", OFFLINE_REASON) from e
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise HubError(f"{hub} refused access to {repo_id} (HTTP {status}); check HF_TOKEN or "
                           "`hf auth login`") from e
        again = "run the same command again to resume" if resumable else "try again later"
        raise HubError(f"{hub} answered HTTP {status} for {repo_id}; {again}") from e
    except hf.EntryNotFoundError as e:
        raise HubError(f"{repo_id}: a file the hub listed is missing on the server; try again later") from e
    except _transport_errors() as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120] or type(e).__name__
        check = "your network" + (f" and HF_ENDPOINT={hub}" if os.environ.get("HF_ENDPOINT") else "")
        tail = "; run the same command again to resume" if resumable else ""
        raise HubUnreachable(f"cannot reach {hub} ({reason}); check {check}{tail}",
                             f"cannot reach {hub} ({reason})") from e
    except OSError as e:
        elsewhere = _elsewhere(cache_dir)
        if e.errno == errno.ENOSPC:
            raise HubError(f"disk full while downloading {repo_id}; free some space or {elsewhere} (the "
                           "download resumes where it stopped)") from e
        raise HubError(f"cannot write the model cache: {e.strerror or e} ({e.filename}); {elsewhere}") from e


def _elsewhere(cache_dir: str | Path | None) -> str:
    """How to put the cache on another disk, in the words of the command that runs: `--cache-dir` was given (so
    the command has it), else the environment variable every command reads."""
    return "pass another folder to --cache-dir" if cache_dir else "set LFM2_CACHE to a folder on another disk"


def fetch_plan(repo_id: str, revision: str | None = None) -> Plan:
    """Ask the hub which commit `revision` (default branch when None) is and which files we need."""
    if is_offline():
        raise HubUnreachable(f"{OFFLINE_REASON}; unset it to download models", OFFLINE_REASON)
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint(), library_name="lfm2", library_version=__version__)
    with _explained(repo_id, revision):
        info = api.model_info(repo_id, revision=revision)
        commit = info.sha
        if not commit:
            raise HubError(f"{endpoint()} did not say which commit {repo_id} is at; try again later")
        entries = [e for e in api.list_repo_tree(repo_id, revision=commit) if isinstance(e, RepoFile)]
    files = [RemoteFile(e.path, int(e.size)) for e in entries if _wanted(e.path)]
    names = {f.name for f in files}
    if "config.json" not in names:
        raise HubError(f"{repo_id} has no config.json; it is not a transformers checkpoint that lfm2 can run")
    if not any(n.endswith(".safetensors") for n in names):
        raise HubError(f"{repo_id} has no safetensors weights; lfm2 runs LFM2 safetensors checkpoints "
                       "(not GGUF, ONNX or MLX exports)")
    if "model.safetensors" in names and "model.safetensors.index.json" not in names:
        # a single-file checkpoint: any other .safetensors (adapters, duplicates) is not ours to load
        files = [f for f in files if not f.name.endswith(".safetensors") or f.name == "model.safetensors"]
    # config.json first, so a repository of another architecture is refused before its weights come
    files.sort(key=lambda f: (f.name != "config.json", f.name.endswith(".safetensors"), f.name))
    return Plan(repo_id, revision, commit, tuple(files))


def pull_model(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
               progress: Progress | None = None, plan: Plan | None = None) -> PullResult:
    """Download what lfm2 needs from a hub repository into the cache, verify it, and return where it is.

    Files already complete are not fetched again; a partial file is continued with a Range request.
    A commit that is already in the standard Hugging Face cache is used from there instead.
    """
    if plan is None:
        try:
            plan = fetch_plan(repo_id, revision)
        except HubUnreachable as e:
            cached = cached_copy(repo_id, revision, cache_dir)
            if cached is None:
                raise
            path, size, source = cached
            return PullResult(path, path.name, 0, size, source, e.reason)
    ref = revision or local.DEFAULT_REVISION
    local.refuse_links(repo_id, plan.commit, cache_dir)
    snap = local.snapshot_dir(repo_id, plan.commit, cache_dir)
    if local.is_complete(repo_id, plan.commit, cache_dir):
        with _explained(repo_id, revision, cache_dir=cache_dir):  # a read-only cache: one line, not PermissionError
            local.write_ref(repo_id, ref, plan.commit, cache_dir)
        local.prune(repo_id, cache_dir)
        return PullResult(snap, plan.commit, 0, plan.total, "up to date")
    in_hf = local.find_in_hf_cache(repo_id, plan.commit)
    if in_hf is not None:
        return PullResult(in_hf, plan.commit, 0, plan.total, "hf cache")

    with _explained(repo_id, revision, resumable=True, cache_dir=cache_dir):
        needed = _fetch_files(repo_id, plan, snap, cache_dir, progress or make_progress())

    _verify(repo_id, snap)
    with _explained(repo_id, revision, resumable=True, cache_dir=cache_dir):
        local.mark_complete(repo_id, plan.commit, {f.name: f.size for f in plan.files}, cache_dir)
        local.write_ref(repo_id, ref, plan.commit, cache_dir)
    local.prune(repo_id, cache_dir)
    return PullResult(snap, plan.commit, needed, plan.total, "downloaded")


def _fetch_files(repo_id: str, plan: Plan, snap: Path, cache_dir: str | Path | None, progress: Progress) -> int:
    """Download `plan`'s files that `snap` lacks or holds in part; returns the bytes there were to download."""
    snap.mkdir(parents=True, exist_ok=True)
    have = {f.name: _on_disk(snap / f.name) for f in plan.files}
    needed = plan.total - sum(have.values())
    free = shutil.disk_usage(snap).free
    if needed > free:
        raise HubError(f"not enough disk space for {repo_id}: {human_bytes(needed)} to download, "
                       f"{human_bytes(free)} free in {snap.parent}; free some space or "
                       f"{_elsewhere(cache_dir)}")
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(library_name="lfm2", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # sizes must match the listing byte for byte
    progress.start(repo_id, plan.total, sum(have.values()))
    ok = False
    try:
        for f in plan.files:
            dest = snap / f.name
            if not (dest.is_file() and dest.stat().st_size == f.size):
                progress.file(f.name, f.size)
                url = f"{endpoint()}/{repo_id}/resolve/{plan.commit}/{quote(f.name)}"
                _download(url, dest, f.size, headers, progress)
            if f.name == "config.json":
                _check_architecture(repo_id, dest)
        ok = True
    finally:
        progress.finish(ok)
    return needed


def cached_copy(repo_id: str, revision: str | None = None,
                cache_dir: str | Path | None = None) -> tuple[Path, int, str] | None:
    """(snapshot, bytes, "cached" or "hf cache") of `revision` complete in our cache or else in the Hugging Face
    cache; None when neither has it. No network: what a pull stands on when the hub cannot be asked."""
    found = local.find_cached(repo_id, revision, cache_dir)
    if found is not None:
        return found, local.snapshot_bytes(repo_id, found.name, cache_dir), "cached"
    found = local.find_in_hf_cache(repo_id, revision)
    if found is not None:
        return found, sum(p.stat().st_size for p in found.iterdir() if p.is_file()), "hf cache"
    return None


def _on_disk(path: Path) -> int:
    """Bytes of a file already here: the finished file, else its partial download."""
    for p in (path, path.with_name(path.name + local.PARTIAL_SUFFIX)):
        if p.is_file():
            return p.stat().st_size
    return 0


def _download(url: str, dest: Path, size: int, headers: dict[str, str], progress: Progress) -> None:
    """Fetch one file into `<dest>.incomplete`, continuing what is there, then move it into place."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    part = dest.with_name(dest.name + local.PARTIAL_SUFFIX)
    stalls = 0
    while True:
        have = part.stat().st_size if part.is_file() else 0
        if have > size:  # not ours to continue: start over
            part.unlink()
            progress.advance(-have)
            have = 0
        if have == size:
            break
        request = dict(headers)
        if have:
            request["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=request, follow_redirects=True,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                hf_raise_for_status(r)
                if have and not (r.status_code == 206
                                 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                    progress.advance(-have)  # the server sent the whole file: take it from the start
                    have = 0
                with part.open("ab" if have else "wb") as out:
                    # no chunk size: a buffering iterator would lose what arrived before a dropped connection
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                        progress.advance(len(chunk))
        except _transport_errors():
            # a dropped connection: try again from where it stopped while attempts keep bringing bytes
            stalls = 0 if part.is_file() and part.stat().st_size > have else stalls + 1
            if stalls >= MAX_STALLS:
                raise
            time.sleep(RETRY_DELAY)
            continue
        break
    got = part.stat().st_size
    if got != size:
        if got > size:
            part.unlink()
        raise HubError(f"{dest.name}: the hub sent {got} bytes where {size} were listed; "
                       "run the same command again")
    os.replace(part, dest)


def _check_architecture(repo_id: str, config_path: Path) -> None:
    from lfm2cli.model.config import SUPPORTED_MODEL_TYPES

    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError):
        model_type = None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HubError(f"{repo_id} is not an LFM2 checkpoint (model_type {model_type!r}); lfm2 runs LFM2 "
                       "('lfm2') and LFM2-MoE ('lfm2_moe') text models")


def _verify(repo_id: str, snap: Path) -> None:
    """Loadable in principle: config parses and every tensor it needs is in the safetensors headers."""
    from lfm2cli.loading.checkpoint import check_tensors, read_all_headers
    from lfm2cli.model.config import load_config

    cfg = load_config(snap)
    check_tensors(cfg, read_all_headers(snap, cfg), repo_id)
