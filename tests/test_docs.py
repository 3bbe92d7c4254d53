"""The CLI reference in docs/cli.md covers every command and option the app really has."""

from __future__ import annotations

from pathlib import Path

import click
import typer

from lfm2cli.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from walk(sub, (*path, name))


def test_cli_reference_lists_every_command_and_option() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = []
    for path, cmd in walk(typer.main.get_command(app)):
        if path and f"lfm2 {' '.join(path)}" not in text:
            missing.append("command " + " ".join(path))
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and f"`{opt}" not in text and f" {opt}" not in text:
                    missing.append(f"{' '.join(path) or 'lfm2'} {opt}")
    assert not missing, f"docs/cli.md is out of date (regenerate it, see its header): {missing}"
