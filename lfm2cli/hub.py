"""Model names to checkpoint directories (placeholder: local paths only until the pull issue lands)."""

from __future__ import annotations

from pathlib import Path

from lfm2cli.errors import CheckpointError


def resolve_model(name: str | None, *, offline: bool = False, pull: bool = False,
                  interactive: bool = False) -> Path:
    """Turn what the user typed (a directory, a repo id or an alias) into a local checkpoint directory."""
    if name is None:
        raise CheckpointError("no model given")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise CheckpointError(f"{name}: no such checkpoint directory")
