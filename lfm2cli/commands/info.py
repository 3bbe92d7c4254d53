"""`lfm2 info MODEL`: describe a checkpoint without loading its weights (never imports torch)."""

from __future__ import annotations

from typing import Any

import typer


def print_table(desc: dict[str, Any], console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from lfm2cli.describe import sections

    table = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column()
    for n, (title, rows) in enumerate(sections(desc)):
        if n:
            table.add_section()
        table.add_row(Text(title, style="bold cyan"), "")
        for label, value in rows:
            # Text(), not markup: token strings such as "[PAD]" must print as they are
            table.add_row(Text("  " + label), Text(value))
    (console or Console()).print(table)


def info(
    model: str = typer.Argument(..., help="Checkpoint directory, hub repo id or alias."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network; use the local cache."),
) -> None:
    """Describe a checkpoint: architecture, layers, parameters, tokens, files, memory (no weights loaded)."""
    import json
    import sys

    from lfm2cli.describe import describe, plain_lines
    from lfm2cli.hub import resolve_model

    desc = describe(resolve_model(model, offline=offline, interactive=False))
    if json_out:
        print(json.dumps(desc, indent=2))
    elif sys.stdout.isatty():
        print_table(desc)
    else:
        print("\n".join(plain_lines(desc)))
