"""`lfm2 info MODEL`: describe a checkpoint without loading its weights (never imports torch)."""

from __future__ import annotations

import typer


def info(
    model: str = typer.Argument(..., help="Checkpoint directory, hub repo id or alias."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network; use the local cache."),
) -> None:
    """Describe a checkpoint: architecture, layers, parameters, tokens, files, memory (no weights loaded). Exits 1
    when the checkpoint fails the check that loading runs."""
    import json
    import sys

    from lfm2cli.describe import describe, plain_lines
    from lfm2cli.hub.names import resolve_model

    desc = describe(resolve_model(model, offline=offline))
    if json_out:
        print(json.dumps(desc, indent=2))
    elif sys.stdout.isatty():
        from lfm2cli.describe import sections
        from lfm2cli.render import print_sections

        print_sections(sections(desc))
    else:
        print("\n".join(plain_lines(desc)))
    if desc["problems"]:
        # described as far as it can be, but a checkpoint that would not load fails the check: exit 1 for scripts
        from lfm2cli.errors import CheckpointError

        sys.stdout.flush()
        raise CheckpointError("; ".join(desc["problems"]))
