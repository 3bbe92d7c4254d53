"""`lfm2 info MODEL`: describe a checkpoint without loading its weights (never imports torch)."""

from __future__ import annotations

import typer


def info(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint directory, hub repo id or alias."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network; use the local cache."),
) -> None:
    """Describe a checkpoint without loading its weights: architecture, layers, parameters, tokens, files, memory.

    Exits 1 when the checkpoint fails the check that loading runs.

    Examples:

    lfm2 info lfm2-1.2b
    lfm2 info ./my-checkpoint --json
    """
    import json
    import sys

    from lfm2cli.hub.names import resolve_model
    from lfm2cli.loading.describe import describe, plain_lines

    desc = describe(resolve_model(model, offline=offline, pull_option=False))  # info has no --pull
    if json_out:
        print(json.dumps(desc, indent=2))
    elif sys.stdout.isatty():
        from lfm2cli.loading.describe import sections
        from lfm2cli.terminal.render import print_sections

        print_sections(sections(desc))
    else:
        from lfm2cli.terminal.safetext import visible

        print(visible("\n".join(plain_lines(desc))))  # token strings from the files, shown, never acted on
    if desc["problems"]:
        # described as far as it can be, but a checkpoint that would not load fails the check: exit 1 for scripts
        from lfm2cli.errors import CheckpointError

        sys.stdout.flush()
        raise CheckpointError("; ".join(desc["problems"]))
