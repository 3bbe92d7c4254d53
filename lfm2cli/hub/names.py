"""What the user types to name a model (a directory, a hub repo id, an alias) and where that model is on disk.

`resolve_model` is what every command calls with that name. It looks in our cache and in the standard Hugging
Face cache without any network call, and downloads (`lfm2cli.hub.download`) only when asked to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from lfm2cli.errors import CheckpointError, HubError, UsageError
from lfm2cli.hub import download, local
from lfm2cli.hub.progress import Progress
from lfm2cli.terminal.formatting import human_bytes

DEFAULT_MODEL = "LiquidAI/LFM2-350M"  # the smallest LFM2: used when no model is named

# Published text models that lfm2 runs; the alias is the repo name in lower case (`lfm2-1.2b`).
PUBLISHED = (
    "LFM2-350M", "LFM2-700M", "LFM2-1.2B", "LFM2-2.6B", "LFM2-8B-A1B", "LFM2-24B-A2B",
    "LFM2.5-230M", "LFM2.5-230M-Base", "LFM2.5-350M", "LFM2.5-350M-Base", "LFM2.5-1.2B-Base",
    "LFM2.5-1.2B-Instruct", "LFM2.5-1.2B-Thinking", "LFM2.5-1.2B-JP", "LFM2.5-2.6B", "LFM2.5-2.6B-Base",
    "LFM2.5-8B-A1B", "LFM2.5-8B-A1B-Base",
)
ALIASES: dict[str, str] = {name.lower(): f"LiquidAI/{name}" for name in PUBLISHED}
ALIASES["lfm2.5-1.2b"] = "LiquidAI/LFM2.5-1.2B-Instruct"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def repo_id_for(name: str | None) -> str:
    """An alias or repo id as typed -> the repo id; None -> the default model."""
    if name is None:
        return DEFAULT_MODEL
    key = name.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    for repo in ALIASES.values():  # the hub ignores case in ids, but our cache folders do not
        if repo.lower() == key.lower():
            return repo
    if _REPO_ID.match(key) and "--" not in key and ".." not in key:
        return key
    examples = ", ".join(list(ALIASES)[:3])
    raise UsageError(f"'{name}' is not a local directory, a hub repo id (owner/name) or an alias "
                     f"({examples}, ...; see docs/models.md)")


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a path: it is on disk, or it is no hub repo id's shape (ids are exactly
    `owner/name`, each part starting with a letter or digit): it starts with `.`, `/` or `~`, has a
    backslash or more than one `/`, or ends with `/`."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or Path(name).expanduser().exists())


def _check_length(name: str) -> None:
    """A name with a part longer than any file name (255 bytes) or path (4,096) can be neither a directory nor a
    repo id (the hub allows 96 characters a part): refused by its length, before the file system says
    "File name too long" in the middle of a lookup."""
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in name.split("/")), default=0)
    if longest > 255 or len(name.encode("utf-8", "surrogateescape")) > 4096:
        raise UsageError(f"'{name[:40]}...' ({len(name):,} characters) is not a local directory, a hub repo id "
                         "(owner/name) or an alias: a file name has at most 255 bytes, and a hub name 96 "
                         "characters a part")


def _local_parent(name: str) -> Path | None:
    """For an `owner/name` that could be either: the local folder `owner` when there is one, else None.
    `some/typo` typed where `some/` is a folder is a mistyped path, not a hub id."""
    owner, sep, _ = name.partition("/")
    if not sep or not owner:
        return None
    folder = Path(owner).expanduser()
    return folder if folder.is_dir() else None


def _missing_path(name: str) -> CheckpointError:
    path = Path(name).expanduser()
    if path.exists():
        return CheckpointError(f"{name} is a file, not a checkpoint directory; pass the folder that holds "
                               "config.json and the .safetensors files")
    where = f" ({path.parent}/ has no {path.name})" if path.parent != Path(".") and path.parent.is_dir() else ""
    return CheckpointError(f"{name}: no such checkpoint directory{where}; check the path")


def find_model(name: str | None, *, offline: bool = False, may_download: bool = True, pull: bool = False,
               revision: str | None = None, cache_dir: str | Path | None = None,
               pull_option: bool = True) -> Path | None:
    """What `resolve_model` can tell without the network (and without torch, so a wrong name is reported at
    once): the checkpoint directory when it is on disk, None when the model must be downloaded first. Raises for
    a name that is nowhere: a missing directory (CheckpointError), a name that is no repo id or alias
    (UsageError), a model not downloaded while offline or while no download may happen (HubError;
    `may_download`: --pull was given, or the user can be asked; `pull_option`: the command has --pull, so the
    message may name it). A snapshot our cache cannot use (a damaged index, a link) is named in that HubError."""
    if name is not None:
        _check_length(name)
        path = Path(name).expanduser()
        if path.is_dir():
            return path
        if _looks_like_path(name):
            raise _missing_path(name)
    repo_id = repo_id_for(name)
    found = local.find_cached(repo_id, revision, cache_dir)
    if found is not None:
        local.mark_used(repo_id, cache_dir)
        return found
    found = local.find_in_hf_cache(repo_id, revision)
    if found is not None:
        return found

    how = _pull_command(repo_id, revision)
    folder = _local_parent(name) if name is not None and not pull else None
    if folder is not None:
        # checked after both caches, so a downloaded model whose owner is also a local folder still resolves
        raise CheckpointError(f"{name}: no such checkpoint directory ({folder}/ has no {Path(name).name}); "
                              f"check the path, or run `{how}` if you meant the hub repo")
    offline = download.is_offline(offline)
    if offline or not (pull or may_download):
        problem = local.cache_problem(repo_id, revision, cache_dir)
        if problem is not None:  # a download would repair it; without one, say what is wrong, not "not there"
            raise HubError(f"{problem}; {repo_id} cannot be used from the cache until `{how}` repairs it")
    if offline:
        raise HubError(f"{repo_id} is not downloaded and offline mode is on; run `{how}` while online")
    if not (pull or may_download):
        raise HubError(f"{repo_id} is not downloaded yet; run: {how}" + (" (or pass --pull)" if pull_option else ""))
    return None


def _pull_command(repo_id: str, revision: str | None) -> str:
    return f"lfm2 pull {repo_id}" + (f" --revision {revision}" if revision else "")


def resolve_model(name: str | None, *, offline: bool = False, pull: bool = False,
                  confirm: Callable[[str], bool] | None = None, revision: str | None = None,
                  cache_dir: str | Path | None = None, progress: Progress | None = None,
                  pull_option: bool = True) -> Path:
    """Turn what the user typed (a directory, a repo id, an alias or None) into a local checkpoint directory.

    A directory is used as is; a name that can only be a path, or an `owner/name` whose `owner` is a local
    folder and that no cache holds, is a missing directory (CheckpointError). A repo id is taken from our
    cache, else from the standard Hugging Face cache, without any network call (`find_model`). When it is in
    neither: offline -> HubError; `pull` -> download;
    `confirm` given -> download if it answers yes to the question it is asked; otherwise HubError that says
    how to download it.
    """
    found = find_model(name, offline=offline, may_download=confirm is not None, pull=pull, revision=revision,
                       cache_dir=cache_dir, pull_option=pull_option)
    if found is not None:
        return found
    repo_id = repo_id_for(name)
    how = _pull_command(repo_id, revision)
    plan = download.fetch_plan(repo_id, revision)
    if not pull and confirm is not None and not confirm(f"Download {repo_id} ({human_bytes(plan.total)})?"):
        raise HubError(f"{repo_id} was not downloaded; run `{how}` when you want it")
    result = download.pull_model(repo_id, revision=revision, cache_dir=cache_dir, progress=progress, plan=plan)
    local.mark_used(repo_id, cache_dir)
    return result.path
