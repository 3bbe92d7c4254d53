"""Schema migrations for the chat history database, in order. Append only: a released migration is never
edited or reordered, so every database can be brought forward from whatever version it is at."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from lfm2cli.errors import HistoryError

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def _migration(fn: Migration) -> Migration:
    """Register the next schema version. Append only: never edit or reorder a released migration.
    Use single execute() calls: executescript() would commit the surrounding transaction."""
    MIGRATIONS.append(fn)
    return fn


@_migration
def _m001_tables(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT,
            model TEXT NOT NULL,
            system TEXT,
            options TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL DEFAULT '',
            tokens INTEGER,
            timings TEXT,
            finish_reason TEXT,
            created_at TEXT NOT NULL
        )"""
    )


@_migration
def _m002_indexes(db: sqlite3.Connection) -> None:
    # the unique index is the last line of defence against two writers taking the same position
    db.execute("CREATE UNIQUE INDEX messages_position ON messages(conversation_id, position)")
    db.execute("CREATE INDEX conversations_updated ON conversations(updated_at)")


@_migration
def _m003_reasoning_and_tools(db: sqlite3.Connection) -> None:
    # reasoning: a thinking model's <think> block, apart from the answer in `content` (NULL: none).
    # raw_content: the reply exactly as the model wrote it, markers and their whitespace included, which the
    # template must get back to see its own text (NULL: `content` is that text).
    # tool_calls: a JSON list of OpenAI-shaped calls an assistant message made; tool_call_id and name: which
    # call a role "tool" message answers. All NULL when unused.
    for column in ("reasoning", "raw_content", "tool_calls", "tool_call_id", "name"):
        db.execute(f"ALTER TABLE messages ADD COLUMN {column} TEXT")


SCHEMA_VERSION = len(MIGRATIONS)


def apply_migrations(db: sqlite3.Connection, upto: int | None = None,
                     migrations: list[Migration] | None = None) -> int:
    """Bring the schema to version `upto` (default: the latest) in one transaction; returns the version.

    `db` must be in autocommit mode (isolation_level=None). The version is re-read after taking the write
    lock, so two processes opening a new file at once migrate it exactly once.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    target = len(migrations) if upto is None else upto

    def current() -> int:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            raise HistoryError(
                f"the history database was written by a newer lfm2 (schema version {version}, this one "
                f"knows {len(migrations)}); upgrade lfm2, or set LFM2_HOME to use another directory"
            )
        return version

    if current() >= target:  # the usual case: no write lock needed
        return current()
    db.execute("BEGIN IMMEDIATE")
    try:
        version = current()
        for number in range(version, target):
            migrations[number](db)
            # user_version is part of the database header, so it commits or rolls back with the DDL
            db.execute(f"PRAGMA user_version = {number + 1}")
        db.execute("COMMIT")
        return max(version, target)
    except BaseException:
        db.execute("ROLLBACK")
        raise
