"""`lfm2 pull`, `lfm2 list` and `lfm2 rm`: download models into the cache, show it, clean it up."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

CACHE_HELP = "Model cache directory (default: $LFM2_CACHE, else the user cache directory)."


def pull(
    model: str = typer.Argument(..., help="Hub repo id (LiquidAI/LFM2-1.2B) or alias (lfm2-1.2b)."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Download a model from the Hugging Face hub (only the files lfm2 needs) and check it is complete.

    An interrupted download continues where it stopped; a finished one is not fetched again.

    Prints the checkpoint directory on stdout.
    """
    from lfm2cli.formatting import human_bytes
    from lfm2cli.hub.download import pull_model
    from lfm2cli.hub.names import repo_id_for

    repo_id = repo_id_for(model)
    result = pull_model(repo_id, revision=revision, cache_dir=cache_dir)
    what = f"{repo_id} ({revision or 'main'} = {result.commit[:12]}, {human_bytes(result.total)})"
    if result.source == "up to date":
        sys.stderr.write(f"{what} is already downloaded and up to date\n")
    elif result.source == "hf cache":
        sys.stderr.write(f"{what} is already in the Hugging Face cache; lfm2 uses it from there\n")
    else:
        sys.stderr.write(f"{what} is ready: lfm2 chat {repo_id}\n")
    print(result.path)


def list_models(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """List downloaded models: id, revision, size on disk, architecture, last used.

    Piped, it prints one tab-separated line per model: size in bytes, last use in ISO 8601 or "never".
    """
    from datetime import datetime

    from lfm2cli.formatting import ago, human_bytes
    from lfm2cli.hub.local import cache_root, list_cached

    models = list_cached(cache_dir)
    if not models:
        sys.stderr.write(f"no models in {cache_root(cache_dir)}; download one with: lfm2 pull lfm2-350m\n")
        return
    if not sys.stdout.isatty():
        for m in models:
            used = datetime.fromtimestamp(m.last_used).isoformat(timespec="seconds") if m.last_used else "never"
            revision = m.revision + ("" if m.complete else " (incomplete)")
            print("\t".join((m.repo_id, revision, str(m.size), m.architecture, used)))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "REVISION", "SIZE", "ARCHITECTURE", "LAST USED"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for m in models:
        revision = m.revision + ("" if m.complete else " [yellow](incomplete)[/yellow]")
        table.add_row(m.repo_id, revision, human_bytes(m.size), m.architecture, ago(m.last_used))
    Console().print(table)


def rm(
    model: str = typer.Argument(..., help="Repo id or alias of a downloaded model."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Delete a downloaded model (every revision of it) from the cache."""
    from lfm2cli.commands.confirm import ask_yes_no
    from lfm2cli.errors import HubError, UsageError
    from lfm2cli.formatting import human_bytes
    from lfm2cli.hub.local import find_in_hf_cache, list_cached, model_dir, remove
    from lfm2cli.hub.names import repo_id_for

    repo_id = repo_id_for(model)
    found = [m for m in list_cached(cache_dir) if m.repo_id == repo_id]
    if not found:
        hint = ""
        if find_in_hf_cache(repo_id) is not None:
            hint = "; it is in the Hugging Face cache, which lfm2 only reads (use `hf cache rm`)"
        raise HubError(f"{repo_id} is not in the lfm2 cache{hint}")
    size = sum(m.size for m in found)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not deleting {repo_id} without confirmation; pass --yes")
        if not ask_yes_no(f"Delete {repo_id} ({human_bytes(size)}) from {model_dir(repo_id, cache_dir)}?",
                          default=False):
            sys.stderr.write("nothing deleted\n")
            return
    freed = remove(repo_id, cache_dir)
    sys.stderr.write(f"deleted {repo_id} ({human_bytes(freed)} freed)\n")
