"""`lfm2 history`: list, show, export, delete and search the conversations saved by `lfm2 chat`.

Tables and rendered Markdown on a terminal; plain text (tab-separated lists) when piped, so the output
can be fed to cut, grep and friends. Ids may be shortened to any unique prefix.
"""

from __future__ import annotations

import sys
from enum import Enum
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from lfm2cli.store.conversations import Conversation, HistoryStore, SearchHit

from lfm2cli.commands.options import Command, Group, choice

history_app = typer.Typer(
    cls=Group,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
LIST_LIMIT = 50  # what `history list` shows by default, and `history` alone


class ExportFormat(str, Enum):
    md = "md"
    markdown = "markdown"
    json = "json"


@history_app.callback()
def history(ctx: typer.Context) -> None:
    """Browse, export and delete saved chat conversations. Alone, it lists them (as `lfm2 history list`).

    Examples:

    lfm2 history
    lfm2 history show 3f2a
    lfm2 history search "capital of France"
    lfm2 history export 3f2a --format json -o chat.json
    """
    if ctx.invoked_subcommand is None:
        list_conversations(limit=LIST_LIMIT)


def _open(must_exist: bool) -> HistoryStore | None:
    """The store, or None when nothing was ever saved (reading should not create an empty database)."""
    from lfm2cli.store.conversations import HistoryError, HistoryStore, history_path

    path = history_path()
    if not path.exists() and not path.is_symlink():  # a dangling link or a loop is for the store to name
        if must_exist:
            raise HistoryError("no saved conversations yet; `lfm2 chat` saves them")
        return None
    return HistoryStore(path)


def _get(conv_id: str) -> Conversation:
    store = _open(must_exist=True)
    assert store is not None
    with store:
        conv = store.get(_text(conv_id))
    _notes(store)
    return conv


def _notes(store: HistoryStore) -> None:
    """Rows the store could not read were skipped or defaulted: say so, on stderr, once each."""
    for note in store.notes:
        sys.stderr.write(f"note: {note}\n")


def _text(arg: str) -> str:
    """A command-line argument with the bytes that were not UTF-8 as U+FFFD: Python keeps them as lone
    surrogates, which SQLite refuses (and a conversation never holds)."""
    try:
        raw = arg.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = arg.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")



def _plain(text: str) -> str:
    """One tab-free line, safe in tab-separated output."""
    return " ".join(text.split())


def _tty() -> bool:
    return sys.stdout.isatty()


def _console() -> Console:
    from rich.console import Console

    return Console()


# ---------------------------------------------------------------- renderers (console passed in for tests)

def render_list(console: Console, convs: list[Conversation]) -> None:
    from rich.table import Table

    from lfm2cli.terminal.formatting import local_time

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("id", style="cyan", no_wrap=True)
    table.add_column("updated", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("msgs", justify="right")
    table.add_column("title", overflow="ellipsis", no_wrap=True)
    for c in convs:
        table.add_row(c.id, local_time(c.updated_at), c.model, str(c.message_count), c.display_title)
    console.print(table)


def render_conversation(console: Console, conv: Conversation) -> None:
    from rich.markdown import Markdown
    from rich.text import Text

    from lfm2cli.store.conversations import call_label, finish_label, thought_summary
    from lfm2cli.terminal.formatting import local_time

    console.print(Text(conv.display_title, style="bold"))
    details = [conv.id, conv.model, local_time(conv.updated_at)]
    details += [f"{k}={v}" for k, v in conv.options.items()]
    console.print(Text("  ·  ".join(details), style="dim"))
    if conv.system:
        console.print()
        console.print(Text("system", style="bold magenta"))
        console.print(Text(conv.system))
    labels = {"user": ("you", "bold cyan"), "assistant": ("assistant", "bold green")}
    for m in conv.messages:
        label, style = labels.get(m.role, (m.role, "bold magenta"))
        console.print()
        if m.role == "tool":
            # a result as the tool gave it, dimmed: the replies around it are what is read
            console.print(Text(f"tool result: {m.name or 'tool'}", style="bold magenta"))
            console.print(Text(m.content, style="dim"))
            continue
        console.print(Text(label, style=style))
        if m.reasoning:
            # the reasoning in full but dimmed, as chat's --think show has it: history is read at leisure
            console.print(Text(thought_summary(m), style="dim italic"))
            console.print(Text(m.reasoning, style="dim"))
            if m.content.strip():
                console.print()
        # user text is shown as typed; replies are Markdown, which LFM2 writes a lot of
        if m.content.strip() or not (m.reasoning or m.tool_calls):
            console.print(Markdown(m.content) if m.role == "assistant" else Text(m.content))
        for call in m.tool_calls or []:
            console.print(Text(f"tool call: {call_label(call)}", style="cyan"))
        if label := finish_label(m.role, m.finish_reason, m.thinking_only):
            console.print(Text(f"[{label}]", style="dim italic"))


def render_hits(console: Console, hits: list[SearchHit], text: str) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("id", style="cyan", no_wrap=True)
    table.add_column("in", no_wrap=True)
    table.add_column("match")
    for h in hits:
        snippet = Text(h.snippet)
        snippet.highlight_words([text], style="bold yellow", case_sensitive=False)
        where = h.role if h.position is None else f"{h.role} #{h.position}"
        table.add_row(h.conversation_id, where, snippet)
    console.print(table)


# ---------------------------------------------------------------- commands

@history_app.command("list", cls=Command)
def list_conversations(
    limit: int = typer.Option(LIST_LIMIT, "--limit", "-n", metavar="N", help="Show at most this many (0: all)."),
) -> None:
    """List saved conversations, most recently updated first."""
    store = _open(must_exist=False)
    convs: list[Any] = []
    if store is not None:
        with store:
            convs = store.list(limit=limit)
        _notes(store)
    if not convs:
        sys.stderr.write("no saved conversations yet; `lfm2 chat` saves them\n")
        return
    if _tty():
        render_list(_console(), convs)
        return
    for c in convs:
        print("\t".join([c.id, c.updated_at, _plain(c.model), str(c.message_count), _plain(c.display_title)]))


@history_app.command("show", cls=Command)
def show(
    conv_id: str = typer.Argument(..., metavar="ID", help="Conversation id or a unique prefix."),
) -> None:
    """Show a conversation: rendered on a terminal, Markdown text when piped."""
    from lfm2cli.store.conversations import to_markdown

    conv = _get(conv_id)
    if _tty():
        render_conversation(_console(), conv)
    else:
        sys.stdout.write(to_markdown(conv))


@history_app.command("export", cls=Command)
def export(
    conv_id: str = typer.Argument(..., metavar="ID", help="Conversation id or a unique prefix."),
    fmt: ExportFormat = choice("md", "--format", "-f", help="md (or markdown): Markdown; json: every field."),
    output: str = typer.Option(None, "--output", "-o", metavar="FILE", help="Write to this file instead of stdout."),
) -> None:
    """Export a conversation as Markdown or JSON."""
    from pathlib import Path

    from lfm2cli.errors import Lfm2Error, UsageError
    from lfm2cli.store.conversations import to_json, to_markdown
    from lfm2cli.system.paths import check_output_path

    fmt = fmt.lower()
    if fmt not in ("md", "markdown", "json"):
        raise UsageError(f"unknown export format {fmt!r}; use --format md or --format json")
    if output is not None and output != "-":
        check_output_path(output)  # before reading: a refused path leaves everything as it was
    conv = _get(conv_id)
    text = to_json(conv) if fmt == "json" else to_markdown(conv)
    if output is None or output == "-":
        sys.stdout.write(text)
        return
    try:
        Path(output).expanduser().write_text(text, encoding="utf-8")
    except OSError as e:
        raise Lfm2Error(f"cannot write {output}: {e.strerror or e}") from e
    sys.stderr.write(f"wrote {output}\n")


@history_app.command("rm", cls=Command)
def rm(
    conv_id: str = typer.Argument(..., metavar="ID", help="Conversation id or a unique prefix."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
) -> None:
    """Delete a conversation and all its messages."""
    from lfm2cli.errors import UsageError

    store = _open(must_exist=True)
    assert store is not None
    with store:
        conv = store.get(_text(conv_id))
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError("refusing to delete without confirmation (stdin is not a terminal); "
                                 "pass --yes")
            question = (f"Delete conversation {conv.id} ({conv.display_title!r}, "
                        f"{conv.message_count} message{'' if conv.message_count == 1 else 's'})?")
            if not typer.confirm(question, default=False, err=True):
                sys.stderr.write("nothing deleted\n")
                raise typer.Exit(1)
        store.delete(conv.id)
    sys.stderr.write(f"deleted {conv.id}\n")


@history_app.command("search", cls=Command)
def search(
    text: str = typer.Argument(..., metavar="TEXT", help="Text to look for (case-insensitive) in titles and messages."),
    limit: int = typer.Option(100, "--limit", "-n", metavar="N", help="Show at most this many matches."),
) -> None:
    """Find conversations whose title or messages contain TEXT."""
    from lfm2cli.errors import UsageError

    text = _text(text)
    if not text.strip():
        raise UsageError("give some text to search for")
    store = _open(must_exist=False)
    hits: list[Any] = []
    if store is not None:
        with store:
            hits = store.search(text, limit=limit)
    if not hits:
        sys.stderr.write(f"no conversation contains {text!r}\n")
        return
    if _tty():
        render_hits(_console(), hits, text)
        return
    for h in hits:
        print("\t".join([h.conversation_id, h.role if h.position is None else f"{h.role}#{h.position}",
                         _plain(h.snippet)]))
