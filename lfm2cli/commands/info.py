"""`lfm2 info MODEL`: describe a checkpoint without loading its weights."""

from __future__ import annotations

import typer


def info(
    model: str = typer.Argument(..., help="Checkpoint directory."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
) -> None:
    """Describe a checkpoint: architecture, layers, parameters, files (no weights are loaded)."""
    from pathlib import Path

    from lfm2cli.checkpoint import parameter_counts
    from lfm2cli.config import load_config

    cfg = load_config(Path(model))
    total, active = parameter_counts(cfg)
    print(f"{cfg.architecture}: {total:,} parameters ({active:,} active per token)")
