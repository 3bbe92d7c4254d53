"""Persistent chat history: one SQLite file (`data_dir()/history.db`) shared by every lfm2 process.

Several chats may run at once, so the store uses WAL (readers never block the writer), a busy timeout,
and short `BEGIN IMMEDIATE` write transactions; a message's position is computed inside the transaction
that inserts it, so concurrent appends never collide. The schema is versioned with `PRAGMA user_version`
and upgraded at open by an ordered list of migrations, all applied in one transaction.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lfm2cli.errors import HistoryError
from lfm2cli.store.migrations import MIGRATIONS, SCHEMA_VERSION, apply_migrations
from lfm2cli.system.paths import data_dir

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "HistoryError", "HistoryStore", "apply_migrations", "call_label",
           "finish_label", "thought_label", "thought_summary", "to_json", "to_markdown"]

ROLES = ("system", "user", "assistant", "tool")
FINISH_REASONS = ("stop", "length", "interrupted", "error", "tool_calls")
_TABLES = ("conversations", "messages")
# message columns beyond the first schema, in Message's order (tool_calls is JSON, the others text)
_EXTRA = ("reasoning", "raw_content", "tool_calls", "tool_call_id", "name")
TITLE_CHARS = 60


@dataclass
class Message:
    id: int
    conversation_id: str
    position: int
    role: str
    content: str
    tokens: int | None = None
    timings: dict[str, Any] | None = None
    finish_reason: str | None = None
    created_at: str = ""
    reasoning: str | None = None  # a thinking model's reasoning, apart from the answer in `content`
    raw_content: str | None = None  # the reply as the model wrote it (`<think>` block included) when not `content`
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI-shaped calls this assistant message made
    tool_call_id: str | None = None  # for role "tool": the call this result answers
    name: str | None = None  # for role "tool": the function's name

    @property
    def thinking_only(self) -> bool:
        """A reply that reasoned but never reached its answer."""
        return bool(self.reasoning) and not self.content.strip()


@dataclass
class Conversation:
    id: str
    model: str
    title: str | None = None
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    messages: list[Message] = field(default_factory=list)
    message_count: int = 0

    @property
    def display_title(self) -> str:
        return self.title or "(untitled)"


@dataclass
class SearchHit:
    """One match: a message (role and position set) or the conversation's title (role "title")."""

    conversation_id: str
    title: str | None
    model: str
    updated_at: str
    role: str
    position: int | None
    snippet: str


def history_path() -> Path:
    """Where the history database lives (LFM2_HOME overrides the directory)."""
    return data_dir() / "history.db"


# ---------------------------------------------------------------- helpers

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def shorten(text: str, limit: int = TITLE_CHARS) -> str:
    """One line of at most `limit` characters, cut at a word boundary where possible."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip() + "…"


def _snippet(text: str, needle: str, width: int = 80) -> str:
    """A one-line window of `text` around the first match of `needle`."""
    flat = " ".join(text.split())
    at = flat.lower().find(needle.lower())
    if at < 0 or len(flat) <= width:
        return shorten(flat, width)
    start = max(0, at - (width - len(needle)) // 2)
    end = min(len(flat), start + width)
    start = max(0, end - width)
    return ("…" if start > 0 else "") + flat[start:end].strip() + ("…" if end < len(flat) else "")


def _contains(haystack: str | None, needle: str) -> bool:
    # casefold, unlike SQLite's LIKE, is case-insensitive beyond ASCII
    return haystack is not None and needle in haystack.casefold()


class _BadRow(ValueError):
    """A row that cannot be read as what it should hold (edited by hand, written by another program)."""


def _text(value: Any) -> str | None:
    """A text column as str: bytes (a BLOB) are decoded and numbers shown; None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _json_column(value: Any, kind: type, what: str) -> Any:
    """A JSON column holding a `kind` (dict or list), or None. Depth is bounded by json's own recursion guard,
    which raises RecursionError rather than crashing: that too is a bad row."""
    if value is None:
        return None
    try:
        loaded = json.loads(value)
    except (ValueError, TypeError, RecursionError):
        raise _BadRow(f"{what} is not JSON") from None
    if loaded is not None and not isinstance(loaded, kind):
        raise _BadRow(f"{what} is not a JSON {'object' if kind is dict else 'list'}")
    return loaded


def _int_column(value: Any, what: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _BadRow(f"{what} is not a whole number")


def _finite(value: Any) -> Any:
    """`value` with every inf and nan replaced by None: JSON has no spelling for them (Python's `Infinity` is
    not JSON), and a number that is not finite is no setting or timing anyway."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)


def finish_label(role: str, finish_reason: str | None, thinking_only: bool = False) -> str | None:
    """How a message ended, when that is worth showing: None for a complete one. A reply with no finish
    reason was never finished: its process was killed (or is still writing it). `thinking_only`: the reply
    has reasoning but no answer, which is said, since the reply then looks empty."""
    if finish_reason is None:
        label = "incomplete" if role == "assistant" else None
    else:
        # a reply that ended in tool calls shows the calls, which say more than the reason
        label = None if finish_reason in ("stop", "tool_calls") else finish_reason
    if thinking_only and role == "assistant":
        return f"{label} while thinking" if label else "no answer after thinking"
    return label


def call_label(entry: Any) -> str:
    """A stored tool call (OpenAI's shape) as LFM2 writes it, `get_weather(city="Paris")`; an entry that cannot be
    read back that way (written by another client) is shown as its name and raw arguments."""
    from lfm2cli.reply.toolcalls import ToolCall

    try:
        return ToolCall.from_openai(entry).to_pythonic()
    except (ValueError, TypeError, KeyError, AttributeError):
        fn = entry.get("function", entry) if isinstance(entry, dict) else {}
        fn = fn if isinstance(fn, dict) else {}
        return f"{fn.get('name', '?')}({fn.get('arguments', '')})"


def _fenced(text: str) -> list[str]:
    """`text` in a fenced block longer than any run of backticks inside it, so nothing in it can end the block."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text.rstrip("\n"), fence]


def _code(text: str) -> str:
    """Inline code that survives backticks in `text` (Markdown: a longer fence, padded with spaces)."""
    if "`" not in text:
        return f"`{text}`"
    return f"`` {text} ``"


def _check(role: str | None, finish_reason: str | None) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, not {finish_reason!r}")


def _check_path(path: Path) -> None:
    """One line for a history path that is no file SQLite can use, instead of SQLite's "unable to open": a
    directory, a FIFO or device (SQLite would block or write into it), or a symlink loop."""
    import stat

    fix = "move it aside or set LFM2_HOME to another directory"
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():  # a dangling link: SQLite would create its target wherever it points
            raise HistoryError(f"the history database {path} is a symlink to nothing; {fix}") from None
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HistoryError(f"the history database {path} is a symlink loop; {fix}") from None
        raise HistoryError(f"cannot open the history database {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(info.st_mode):
        raise HistoryError(f"the history database {path} is a directory, not a file; {fix}")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise HistoryError(f"the history database {path} is {kind}, not a file; {fix}")


# ---------------------------------------------------------------- the store

class HistoryStore:
    """The conversations of every chat. One connection per object; use as a context manager or close()."""

    def __init__(self, path: Path | None = None, timeout: float = 30.0) -> None:
        self.path = Path(path) if path is not None else history_path()
        self.notes: list[str] = []  # rows that could not be read and were skipped or defaulted, for the user
        _check_path(self.path)
        # usable from any thread (a server's workers, a test's threads), one statement at a time
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HistoryError(f"cannot create {self.path.parent}: {e.strerror or e}") from e
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
            self._timeout = timeout
        except sqlite3.Error as e:
            raise HistoryError(f"cannot open the history database {self.path}: {e}{self._hint(str(e))}") from e
        try:
            with self._errors():
                self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        self._check_file()  # before the first write: a file that is refused is left exactly as it was
        self._enable_wal()
        # in WAL mode NORMAL commits without fsync yet survives a killed process: cheap streaming updates
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        db.create_function("lfm2_contains", 2, _contains, deterministic=True)
        apply_migrations(db)

    def _check_file(self) -> None:
        """Refuse a database written by a newer lfm2, another program's SQLite file, or a history whose tables
        are gone, with one line naming the file. Reads only, in one snapshot: a concurrent first open
        creates the tables and sets the version in one transaction, so both are seen or neither."""
        db = self._db
        db.execute("BEGIN")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            if db.in_transaction:
                db.execute("COMMIT")
        aside = "move it aside (lfm2 then starts a new history) or set LFM2_HOME to use another directory"
        if version < 0:
            raise HistoryError(f"the history database {self.path} is damaged (schema version {version}); {aside}")
        if version > SCHEMA_VERSION:
            raise HistoryError(f"the history database {self.path} was written by a newer lfm2 (schema version "
                               f"{version}, this one knows {SCHEMA_VERSION}); upgrade lfm2, or set LFM2_HOME "
                               "to use another directory")
        if version == 0 and tables:
            names = ", ".join(sorted(tables)[:5])
            raise HistoryError(f"{self.path} is an SQLite database but not lfm2's chat history (it holds the "
                               f"tables {names}); {aside}")
        missing = [t for t in _TABLES if t not in tables]
        if version > 0 and missing:
            raise HistoryError(f"the history database {self.path} is damaged: the {' and '.join(missing)} "
                               f"table{'s are' if len(missing) > 1 else ' is'} missing; {aside}")

    def check_writable(self) -> None:
        """Raise HistoryError, naming the file and what to do, unless messages can be saved now: no damaged
        page, and a write of each table goes through (rolled back, so nothing changes). For `lfm2 chat`,
        so that it fails before the model loads rather than after every turn."""
        with self._lock, self._errors():
            problem = " ".join(self._db.execute("PRAGMA quick_check(1)").fetchone()[0].split())
            if problem != "ok":
                raise HistoryError(f"the history database {self.path} is damaged ({problem}); move it aside "
                                   "(lfm2 then starts a new history) or set LFM2_HOME to use another directory")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # the columns add_message writes, in a row that never commits
                self._db.execute("INSERT INTO conversations (id, title, model, system, options, created_at, "
                                 "updated_at) VALUES ('lfm2-write-check', NULL, '', NULL, NULL, '', '')")
                self._db.execute(f"INSERT INTO messages (conversation_id, position, role, content, tokens, "
                                 f"timings, finish_reason, created_at, {', '.join(_EXTRA)}) "
                                 f"VALUES ('lfm2-write-check', 0, 'user', '', NULL, NULL, NULL, ''"
                                 f"{', NULL' * len(_EXTRA)})")
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")

    def _enable_wal(self) -> None:
        """Switch a new database to WAL. SQLite answers "locked" at once, without its busy handler, while
        another process is making the same switch, so retry here until the timeout."""
        deadline, delay = time.monotonic() + self._timeout, 0.005
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    # -- plumbing

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise HistoryError(f"history database {self.path}: {e}{self._hint(str(e))}") from e

    def _hint(self, message: str) -> str:
        """What to do about an SQLite error, in words a user can act on."""
        if "locked" in message:
            return "; another lfm2 may be holding it, try again"
        if "readonly" in message or "unable to open" in message or "read-only" in message:
            # the directory matters too: WAL mode keeps two files beside the database
            where = self.path if os.access(self.path.parent, os.W_OK) else self.path.parent
            return (f"; lfm2 cannot write there: check the permissions of {where} (it must be writable by you), "
                    "or set LFM2_HOME to a writable directory")
        if "malformed" in message or "not a database" in message or "no such" in message:
            return "; the file is damaged: move it aside (lfm2 then starts a new history) or set LFM2_HOME"
        return ""

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction; IMMEDIATE takes the write lock up front so reads inside it are
        current and no other writer can interleave (it waits on the busy timeout instead)."""
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot across several SELECTs."""
        with self._lock, self._errors():
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conversations

    def create_conversation(self, model: str, system: str | None = None,
                            options: dict[str, Any] | None = None, title: str | None = None) -> Conversation:
        now = _now()
        with self._write() as db:
            while True:
                conv_id = secrets.token_hex(4)
                if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conv_id,)).fetchone() is None:
                    break
            db.execute(
                "INSERT INTO conversations (id, title, model, system, options, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conv_id, title, model, system, _dumps(options), now, now),
            )
        return Conversation(id=conv_id, model=model, title=title, system=system, options=dict(options or {}),
                            created_at=now, updated_at=now)

    def update_conversation(self, conv_id: str, *, title: str | None = None, model: str | None = None,
                            system: str | None = None, options: dict[str, Any] | None = None) -> None:
        """Change the given fields (None leaves a field as it is)."""
        fields: dict[str, Any] = {"title": title, "model": model, "system": system,
                                  "options": _dumps(options)}
        sets = {k: v for k, v in fields.items() if v is not None}
        sets["updated_at"] = _now()
        with self._write() as db:
            cur = db.execute(
                f"UPDATE conversations SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                (*sets.values(), conv_id),
            )
            if cur.rowcount == 0:
                raise HistoryError(f"no conversation with id {conv_id!r}")

    def delete(self, conv_id: str) -> None:
        """Delete a conversation and its messages (exact id)."""
        with self._write() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conv_id,))
            if db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,)).rowcount == 0:
                raise HistoryError(f"no conversation with id {conv_id!r}")

    # -- messages

    def add_message(self, conv_id: str, role: str, content: str, tokens: int | None = None,
                    timings: dict[str, Any] | None = None, finish_reason: str | None = None, *,
                    reasoning: str | None = None, raw_content: str | None = None,
                    tool_calls: list[dict[str, Any]] | None = None, tool_call_id: str | None = None,
                    name: str | None = None) -> int:
        """Append a message at the end of the conversation; returns its id (for update_message).
        The first user message becomes the title of an untitled conversation."""
        _check(role, finish_reason)
        extra = (reasoning, raw_content, _dumps(tool_calls), tool_call_id, name)
        now = _now()
        with self._write() as db:
            row = db.execute("SELECT title FROM conversations WHERE id = ?", (conv_id,)).fetchone()
            if row is None:
                raise HistoryError(f"no conversation with id {conv_id!r}")
            # computed under the write lock, so concurrent appenders get distinct, gapless positions
            position = db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?", (conv_id,)
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO messages (conversation_id, position, role, content, tokens, timings, "
                f"finish_reason, created_at, {', '.join(_EXTRA)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?"
                f"{', ?' * len(_EXTRA)})",
                (conv_id, position, role, content, tokens, _dumps(timings), finish_reason, now, *extra),
            )
            title = row[0]
            if title is None and role == "user" and content.strip():
                title = shorten(content)
            db.execute("UPDATE conversations SET updated_at = ?, title = ? WHERE id = ?",
                       (now, title, conv_id))
            return int(cur.lastrowid)

    def update_message(self, msg_id: int, *, content: str | None = None, tokens: int | None = None,
                       timings: dict[str, Any] | None = None, finish_reason: str | None = None,
                       reasoning: str | None = None, raw_content: str | None = None,
                       tool_calls: list[dict[str, Any]] | None = None, tool_call_id: str | None = None,
                       name: str | None = None) -> bool:
        """Change the given fields of a message (None leaves a field as it is); returns False when the
        message no longer exists (its conversation was deleted meanwhile). Called repeatedly while a reply
        streams, so a plain update is one statement; setting finish_reason also touches the conversation."""
        _check(None, finish_reason)
        fields: dict[str, Any] = {"content": content, "tokens": tokens, "timings": _dumps(timings),
                                  "finish_reason": finish_reason, "reasoning": reasoning,
                                  "raw_content": raw_content, "tool_calls": _dumps(tool_calls),
                                  "tool_call_id": tool_call_id, "name": name}
        sets = {k: v for k, v in fields.items() if v is not None}
        if not sets:
            return True
        sql = f"UPDATE messages SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?"
        if finish_reason is None:
            with self._lock, self._errors():
                return self._db.execute(sql, (*sets.values(), msg_id)).rowcount > 0
        with self._write() as db:
            if db.execute(sql, (*sets.values(), msg_id)).rowcount == 0:
                return False
            db.execute(
                "UPDATE conversations SET updated_at = ? "
                "WHERE id = (SELECT conversation_id FROM messages WHERE id = ?)", (_now(), msg_id),
            )
            return True

    def delete_messages_from(self, conv_id: str, position: int) -> int:
        """Delete the messages at `position` and after (for /undo and /retry); returns how many."""
        with self._write() as db:
            cur = db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                             (conv_id, position))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (_now(), conv_id))
            return cur.rowcount

    # -- reading

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _conversation(self, row: sqlite3.Row | tuple, count: int = 0) -> Conversation | None:
        """A conversation row, read defensively: a damaged field falls back to its default with a note, a row
        without an id is skipped (None) with a note."""
        conv_id, title, model, system, options, created, updated = row[:7]
        if not isinstance(conv_id, str) or not conv_id:
            self._note(f"skipped a conversation row with a damaged id ({conv_id!r:.40}) in {self.path}")
            return None
        try:
            settings = _json_column(options, dict, "its settings") or {}
        except _BadRow as e:
            self._note(f"conversation {conv_id}: {e}; using the default settings")
            settings = {}
        return Conversation(id=conv_id, model=_text(model) or "?", title=_text(title),
                            system=_text(system), options=settings,
                            created_at=_text(created) or "", updated_at=_text(updated) or "",
                            message_count=count if isinstance(count, int) else 0)

    def _message(self, r: sqlite3.Row | tuple) -> Message | None:
        """A message row, or None (with a note) when it cannot be shown or replayed as a message."""
        try:
            role = _text(r[3])
            if role not in ROLES:
                raise _BadRow(f"its role {role!r:.40} is unknown")
            calls = _json_column(r[11], list, "its tool calls")
            if calls is not None and not all(isinstance(c, dict) for c in calls):
                raise _BadRow("its tool calls are not JSON objects")
            reason = _text(r[7])
            return Message(id=r[0], conversation_id=r[1], position=_int_column(r[2], "its position") or 0,
                           role=role, content=_text(r[4]) or "",
                           tokens=_int_column(r[5], "its token count"),
                           timings=_json_column(r[6], dict, "its timings"),
                           finish_reason=reason if reason in FINISH_REASONS else None,
                           created_at=_text(r[8]) or "", reasoning=_text(r[9]),
                           raw_content=_text(r[10]), tool_calls=calls,
                           tool_call_id=_text(r[12]), name=_text(r[13]))
        except _BadRow as e:
            self._note(f"conversation {r[1]}: skipped message #{r[2]}: {e}")
            return None

    _COLUMNS = "c.id, c.title, c.model, c.system, c.options, c.created_at, c.updated_at"

    def resolve(self, conv_id_or_prefix: str) -> str:
        """The full id matching an id or a unique prefix of one."""
        key = conv_id_or_prefix.strip().lower()
        if not key:
            raise HistoryError("empty conversation id; see `lfm2 history list`")
        with self._read() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM conversations WHERE substr(id, 1, ?) = ? ORDER BY id", (len(key), key))]
        if key in ids:
            return key
        if not ids:
            raise HistoryError(f"no conversation with id {conv_id_or_prefix!r}; see `lfm2 history list`")
        if len(ids) > 1:
            shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise HistoryError(f"conversation id {conv_id_or_prefix!r} is ambiguous (matches {shown}); "
                               "give more characters")
        return ids[0]

    def get(self, conv_id_or_prefix: str) -> Conversation:
        """A conversation with its messages in order, by id or unique id prefix."""
        conv_id = self.resolve(conv_id_or_prefix)
        with self._read() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM conversations c WHERE c.id = ?",
                             (conv_id,)).fetchone()
            if row is None:  # deleted between resolve and now
                raise HistoryError(f"no conversation with id {conv_id_or_prefix!r}; see `lfm2 history list`")
            rows = db.execute(
                "SELECT id, conversation_id, position, role, content, tokens, timings, finish_reason, "
                f"created_at, {', '.join(_EXTRA)} FROM messages WHERE conversation_id = ? ORDER BY position",
                (conv_id,)).fetchall()
        conv = self._conversation(row)
        if conv is None:
            raise HistoryError(f"conversation {conv_id_or_prefix!r} is damaged in {self.path}")
        conv.messages = [m for r in rows if (m := self._message(r)) is not None]
        conv.message_count = len(conv.messages)
        return conv

    def latest(self) -> Conversation | None:
        """The most recently updated conversation, with its messages."""
        found = self.list(limit=1)
        return self.get(found[0].id) if found else None

    def list(self, limit: int = 50) -> list[Conversation]:
        """Conversations without their messages (message_count set), newest updated first.
        limit <= 0 lists them all."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._COLUMNS}, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) "
                "FROM conversations c ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?",
                (limit if limit > 0 else -1,),
            ).fetchall()
        return [c for r in rows if (c := self._conversation(r, r[7])) is not None]

    def search(self, text: str, limit: int = 100) -> list[SearchHit]:
        """Case-insensitive substring search over titles and message contents, newest conversation first."""
        needle = text.casefold()
        if not needle.strip():
            raise HistoryError("search text is empty")
        with self._read() as db:
            rows = db.execute(
                "SELECT c.id, c.title, c.model, c.updated_at AS updated, c.rowid AS r, 'title' AS role, "
                "NULL AS position, c.title, 0 AS kind FROM conversations c WHERE lfm2_contains(c.title, ?1) "
                "UNION ALL "
                "SELECT c.id, c.title, c.model, c.updated_at, c.rowid, m.role, m.position, m.content, 1 "
                "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE lfm2_contains(m.content, ?1) "
                # a conversation's title match first, then its messages in order
                "ORDER BY updated DESC, r DESC, kind, position LIMIT ?2", (needle, limit),
            ).fetchall()
        return [SearchHit(r[0], r[1], r[2], r[3], r[5], r[6], _snippet(r[7], text)) for r in rows]


# ---------------------------------------------------------------- exports

def to_markdown(conv: Conversation) -> str:
    """The conversation as a Markdown document: a header with its settings, then one section a message."""
    lines = [f"# {conv.display_title}", "", f"- id: `{conv.id}`", f"- model: `{conv.model}`",
             f"- created: {conv.created_at}", f"- updated: {conv.updated_at}"]
    if conv.options:
        opts = ", ".join(f"{k}={v}" for k, v in conv.options.items())
        lines.append(f"- options: {opts}")
    lines.append("")
    if conv.system:
        lines += ["## System", "", conv.system.rstrip(), ""]
    for m in conv.messages:
        if m.role == "tool":
            # a result: kept verbatim in a block, since tools return anything (JSON, logs, Markdown)
            lines += [f"## Tool result: {m.name or 'tool'}", "", *_fenced(m.content), ""]
            continue
        lines += [f"## {m.role.capitalize()}", ""]
        if m.reasoning:
            lines += [*_folded_reasoning(m), ""]
        if m.content.strip() or not m.tool_calls:
            lines.append(m.content.rstrip())
        if m.tool_calls:
            if m.content.strip():
                lines.append("")
            lines += [f"- tool call: {_code(call_label(c))}" for c in m.tool_calls]
        if label := finish_label(m.role, m.finish_reason, m.thinking_only):
            lines += ["", f"*[{label}]*"]
        lines.append("")
    return "\n".join(lines)


def thought_label(tokens: int | None) -> str:
    """`thought for N tokens`, or `thought` when N is not known."""
    return f"thought for {tokens} token{'' if tokens == 1 else 's'}" if isinstance(tokens, int) else "thought"


def thought_summary(m: Message) -> str:
    """`thought_label` for a stored reply: its timings record N."""
    return thought_label((m.timings or {}).get("reasoning_tokens"))


def _folded_reasoning(m: Message) -> list[str]:
    """The reasoning collapsed (`<details>` on sites that render Markdown) and quoted (in plain text): it reads as
    apart from the answer either way, and no Markdown in it can spill into the answer."""
    assert m.reasoning is not None
    quoted = [f"> {line}".rstrip() for line in m.reasoning.strip().splitlines()]
    return [f"<details><summary>{thought_summary(m)}</summary>", "", *quoted, "", "</details>"]


def to_json(conv: Conversation) -> str:
    """The conversation as one JSON object (messages in order), for scripts."""
    data = {
        "id": conv.id, "title": conv.title, "model": conv.model, "system": conv.system,
        "options": conv.options, "created_at": conv.created_at, "updated_at": conv.updated_at,
        "messages": [_message_json(m) for m in conv.messages],
    }
    return json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _message_json(m: Message) -> dict[str, Any]:
    """One message for `to_json`: `reasoning` always (null: none); the tool fields only where set."""
    data = {"position": m.position, "role": m.role, "content": m.content, "reasoning": m.reasoning,
            "tokens": m.tokens, "timings": m.timings, "finish_reason": m.finish_reason, "created_at": m.created_at}
    for key in ("tool_calls", "tool_call_id", "name"):
        if getattr(m, key) is not None:
            data[key] = getattr(m, key)
    return data
