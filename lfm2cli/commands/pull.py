"""`lfm2 pull`, `lfm2 list` and `lfm2 rm`: download models into the cache, show it, clean it up."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

CACHE_HELP = "Model cache directory (default: $LFM2_CACHE, else the user cache directory)."


def pull(
    model: str = typer.Argument(..., metavar="MODEL", help="Hub repo id (LiquidAI/LFM2-1.2B) or alias (lfm2-1.2b)."),
    revision: str | None = typer.Option(None, "--revision", metavar="REF",
                                        help="Branch, tag or commit (default: main)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Download a model from the Hugging Face hub (only the files lfm2 needs) and check it is complete.

    An interrupted download continues where it stopped; a finished one is not fetched again.

    Prints the checkpoint directory on stdout.

    Examples:

    lfm2 pull lfm2-1.2b
    lfm2 pull LiquidAI/LFM2-8B-A1B --revision main
    cd "$(lfm2 pull lfm2-350m)"
    """
    from lfm2cli.hub.download import pull_model
    from lfm2cli.hub.names import repo_id_for
    from lfm2cli.terminal.formatting import human_bytes

    repo_id = repo_id_for(model)
    result = pull_model(repo_id, revision=revision, cache_dir=cache_dir)
    what = f"{repo_id} ({revision or 'main'} = {result.commit[:12]}, {human_bytes(result.total)})"
    if result.source == "up to date":
        sys.stderr.write(f"{what} is already downloaded and up to date\n")
    elif result.unchecked_because:  # offline or no network, but the model is here: nothing to do
        where = "in the Hugging Face cache" if result.source == "hf cache" else "downloaded"
        sys.stderr.write(f"{what} is already {where}; not checked for a newer commit: "
                         f"{result.unchecked_because}\n")
    elif result.source == "hf cache":
        sys.stderr.write(f"{what} is already in the Hugging Face cache; lfm2 uses it from there\n")
    else:
        sys.stderr.write(f"{what} is ready: lfm2 chat {repo_id}\n")
    print(result.path)


def list_models(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", metavar="DIR", help=CACHE_HELP),
    available: bool = typer.Option(False, "--available", help="List the published models lfm2 knows instead: "
                                   "what each needs at bf16, int8 and int4, whether it fits this machine's "
                                   "memory now, and whether it is downloaded."),
) -> None:
    """List downloaded models: id, revision, size on disk, architecture, last used, and where they are.

    Where: `lfm2` is lfm2's cache; `hf-cache` the Hugging Face cache, which lfm2 runs models from but never
    changes.

    Piped, it prints one tab-separated line per model: size in bytes, last use in ISO 8601, "never", or "-" where
    it is not known (the Hugging Face cache). A damaged cache entry is skipped with a note on stderr.

    Examples:

    lfm2 list
    lfm2 list --available
    lfm2 list | cut -f1
    """
    if available:
        _list_available(cache_dir)
        return
    from lfm2cli.hub.local import cache_root, list_hf_cached, scan_cache
    from lfm2cli.terminal.safetext import visible_line

    models, notes = scan_cache(cache_dir)
    hf_models, hf_notes = list_hf_cached()
    for note in notes + hf_notes:
        sys.stderr.write(f"note: {visible_line(note)}\n")
    models = sorted(models + hf_models, key=lambda m: (m.repo_id.lower(), m.source != "lfm2", m.commit))
    if not models:
        sys.stderr.write(f"no models in {visible_line(str(cache_root(cache_dir)))} or the Hugging Face cache; "
                         "download one with: lfm2 pull lfm2-350m\n")
        return
    if sys.stdout.isatty():
        _models_table(models)
        return
    from datetime import datetime

    for m in models:
        used = datetime.fromtimestamp(m.last_used).isoformat(timespec="seconds") if m.last_used else "never"
        revision = m.revision + ("" if m.complete else " (incomplete)")
        fields = (m.repo_id, revision, str(m.size), m.architecture, "-" if m.source != "lfm2" else used, m.source)
        print("\t".join(visible_line(f) for f in fields))


def _models_table(models: list) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from lfm2cli.terminal.formatting import ago, human_bytes
    from lfm2cli.terminal.safetext import visible_line

    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "REVISION", "SIZE", "ARCHITECTURE", "LAST USED", "SOURCE"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for m in models:
        revision = Text(visible_line(m.revision))
        if not m.complete:
            revision.append(" (incomplete)", style="yellow")
        used = "-" if m.source != "lfm2" else ago(m.last_used)
        table.add_row(Text(visible_line(m.repo_id)), revision, human_bytes(m.size), m.architecture, used,
                      Text(m.source, style="dim" if m.source != "lfm2" else ""))
    Console().print(table)


def _list_available(cache_dir: Path | None) -> None:
    """`lfm2 list --available`: what can run here, from the known shapes (no download, no torch)."""
    from lfm2cli.hub.catalog import PRECISIONS, catalog
    from lfm2cli.system.memory import system_available_memory
    from lfm2cli.terminal.formatting import human_bytes

    free = system_available_memory()
    entries = catalog(free, cache_dir)
    sys.stderr.write(f"{human_bytes(free)} of memory available now; sizes are what running takes (weights, a "
                     "4,096-token KV cache and the runtime)\n")
    if not sys.stdout.isatty():
        for e in entries:
            print("\t".join((e.alias, e.repo_id, str(e.parameters), *(str(e.needs[p]) for p in PRECISIONS),
                             e.fits or "no", e.downloaded)))
        return
    from rich.console import Console
    from rich.table import Table

    from lfm2cli.terminal.formatting import human_count

    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "PARAMETERS", *(p.upper() for p in PRECISIONS), "FITS NOW", "DOWNLOADED"):
        table.add_column(column, justify="right" if column == "PARAMETERS" or column.startswith(("BF", "INT"))
                         else "left")
    style = {"bf16": "green", "int8": "yellow", "int4": "yellow"}
    for e in entries:
        fits = f"[{style[e.fits]}]{e.fits}[/]" if e.fits else "[red]no[/red]"
        table.add_row(e.alias, human_count(e.parameters), *(f"~{human_bytes(e.needs[p])}" for p in PRECISIONS),
                      fits, e.downloaded)
    Console().print(table)


def rm(
    model: str = typer.Argument(..., metavar="MODEL", help="Repo id or alias of a downloaded model."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Delete a downloaded model (every revision of it) from the cache.

    Examples:

    lfm2 rm lfm2-1.2b
    lfm2 rm LiquidAI/LFM2-8B-A1B --yes
    """
    from lfm2cli.commands.confirm import ask_yes_no
    from lfm2cli.errors import HubError, UsageError
    from lfm2cli.hub.local import find_in_hf_cache, list_cached, model_dir, remove
    from lfm2cli.hub.names import repo_id_for
    from lfm2cli.terminal.formatting import human_bytes

    repo_id = repo_id_for(model)
    found = [m for m in list_cached(cache_dir) if m.repo_id == repo_id]
    root = model_dir(repo_id, cache_dir)
    if not found and not (root.is_symlink() or root.is_dir()):  # a link or no snapshot is not listed, yet here
        hint = ""
        if find_in_hf_cache(repo_id) is not None:
            hint = "; it is in the Hugging Face cache, which lfm2 only reads (use `hf cache rm`)"
        raise HubError(f"{repo_id} is not in the lfm2 cache{hint}")
    size = sum(m.size for m in found)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not deleting {repo_id} without confirmation; pass --yes")
        if not ask_yes_no(f"Delete {repo_id} ({human_bytes(size)}) from {root}?",
                          default=False):
            sys.stderr.write("nothing deleted\n")
            return
    freed = remove(repo_id, cache_dir)
    sys.stderr.write(f"deleted {repo_id} ({human_bytes(freed)} freed)\n")
