"""One module per command. Each imports only typer and the standard library at top level."""

from __future__ import annotations

import importlib

import typer

# (command name, module, function) in the order `lfm2 --help` lists them
COMMANDS = [
    ("chat", "chat", "chat"),
    ("generate", "generate", "generate"),
    ("pull", "pull", "pull"),
    ("list", "pull", "list_models"),
    ("rm", "pull", "rm"),
    ("info", "info", "info"),
    ("bench", "bench", "bench"),
    ("serve", "serve", "serve"),
]
GROUPS = [("history", "history", "history_app")]


def register(app: typer.Typer) -> None:
    """Attach every command to the app. A module that fails to import is an error, not a missing command."""
    from lfm2cli.commands.options import Command

    for name, module, func in COMMANDS:
        app.command(name, cls=Command)(getattr(importlib.import_module(f"lfm2cli.commands.{module}"), func))
    for name, module, attr in GROUPS:
        app.add_typer(getattr(importlib.import_module(f"lfm2cli.commands.{module}"), attr), name=name)
