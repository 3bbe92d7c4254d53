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
]
GROUPS = [("history", "history", "history_app")]


def _load(module: str):
    """The command module, or None while a command does not exist in this build."""
    try:
        return importlib.import_module(f"lfm2cli.commands.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"lfm2cli.commands.{module}":
            raise
        return None


def register(app: typer.Typer) -> None:
    """Attach every command that exists to the app."""
    for name, module, func in COMMANDS:
        mod = _load(module)
        if mod is not None and hasattr(mod, func):
            app.command(name)(getattr(mod, func))
    for name, module, attr in GROUPS:
        mod = _load(module)
        if mod is not None:
            app.add_typer(getattr(mod, attr), name=name)
