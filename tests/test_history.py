"""The chat history store (lfm2cli.store.conversations) and the `lfm2 history` commands."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lfm2cli.cli import app
from lfm2cli.errors import UsageError
from lfm2cli.store.conversations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    HistoryError,
    HistoryStore,
    apply_migrations,
    to_json,
    to_markdown,
)
from tests.helpers import memory_capped


@pytest.fixture
def store(tmp_path: Path):
    with HistoryStore(tmp_path / "history.db") as s:
        yield s


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# ---------------------------------------------------------------- store basics

def test_roundtrip_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with HistoryStore(path) as s:
        conv = s.create_conversation("LiquidAI/LFM2-350M", system="Be brief.",
                                     options={"temperature": 0.3, "top_p": 0.9})
        s.add_message(conv.id, "user", "What is the capital of France?")
        s.add_message(conv.id, "assistant", "Paris.", tokens=3, timings={"ttft": 0.05, "decode_tps": 41.5},
                      finish_reason="stop")
    with HistoryStore(path) as s:
        got = s.get(conv.id)
    assert (got.id, got.model, got.system) == (conv.id, "LiquidAI/LFM2-350M", "Be brief.")
    assert got.options == {"temperature": 0.3, "top_p": 0.9}
    assert got.title == "What is the capital of France?"  # first user message
    assert [(m.position, m.role, m.content) for m in got.messages] == [
        (0, "user", "What is the capital of France?"), (1, "assistant", "Paris.")]
    reply = got.messages[1]
    assert (reply.tokens, reply.timings, reply.finish_reason) == (3, {"ttft": 0.05, "decode_tps": 41.5}, "stop")
    assert got.messages[0].finish_reason is None and got.message_count == 2
    assert len(conv.id) == 8 and int(conv.id, 16) >= 0


def test_titles_shortened_and_explicit_titles_kept(store: HistoryStore) -> None:
    long = "please   explain\nin detail " + "why the sky is blue and sunsets are red " * 5
    a = store.create_conversation("m")
    store.add_message(a.id, "assistant", "a greeting that is not a title")
    store.add_message(a.id, "user", long)
    store.add_message(a.id, "user", "second question")
    title = store.get(a.id).title
    assert title is not None and len(title) <= 60 and title.endswith("…")
    assert title.startswith("please explain in detail why")  # whitespace collapsed, one line
    b = store.create_conversation("m", title="My title")
    store.add_message(b.id, "user", "hello")
    assert store.get(b.id).title == "My title"
    store.update_conversation(b.id, title="Renamed", model="other", options={"seed": 1})
    got = store.get(b.id)
    assert (got.title, got.model, got.options, got.system) == ("Renamed", "other", {"seed": 1}, None)


def test_streaming_updates_are_visible_to_other_connections(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with HistoryStore(path) as writer, HistoryStore(path) as reader:
        conv = writer.create_conversation("m")
        writer.add_message(conv.id, "user", "count")
        msg = writer.add_message(conv.id, "assistant", "")
        before = reader.get(conv.id).updated_at
        text = ""
        for word in ["one", " two", " three"]:
            text += word
            assert writer.update_message(msg, content=text) is True
            seen = reader.get(conv.id).messages[-1]
            assert (seen.content, seen.finish_reason) == (text, None)
        time.sleep(0.002)  # timestamps are in milliseconds: make the next one differ
        writer.update_message(msg, tokens=3, timings={"ttft": 0.1}, finish_reason="interrupted")
        got = reader.get(conv.id)
        last = got.messages[-1]
        assert (last.content, last.tokens, last.timings, last.finish_reason) == (
            "one two three", 3, {"ttft": 0.1}, "interrupted")
        assert got.updated_at > before
        assert writer.update_message(10_000, content="gone") is False
        with pytest.raises(ValueError):
            writer.update_message(msg, finish_reason="finished")


def test_update_from_another_thread(store: HistoryStore) -> None:
    # a store may be shared by threads (a server's workers): each statement runs under its lock
    conv = store.create_conversation("m")
    msg = store.add_message(conv.id, "assistant", "")
    worker = threading.Thread(target=lambda: store.update_message(msg, content="from a thread"))
    worker.start()
    worker.join()
    assert store.get(conv.id).messages[0].content == "from a thread"


_STREAM_AND_WAIT = """
import sys, time
from pathlib import Path
from lfm2cli.store.conversations import HistoryStore
s = HistoryStore(Path(sys.argv[1]))
conv = s.create_conversation("m")
msg = s.add_message(conv.id, "assistant", "")
text = ""
for i in range(50):
    text += f"w{i} "
    s.update_message(msg, content=text)
print(conv.id, flush=True)
time.sleep(60)
"""


def test_killed_process_keeps_what_was_streamed(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    proc = subprocess.Popen([sys.executable, "-c", _STREAM_AND_WAIT, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        conv_id = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert conv_id
    with HistoryStore(path) as s:
        reply = s.get(conv_id).messages[0]
    assert reply.content == "".join(f"w{i} " for i in range(50))
    assert reply.finish_reason is None  # it never finished


def test_delete_messages_from_for_undo(store: HistoryStore) -> None:
    conv = store.create_conversation("m")
    for i in range(4):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
    assert store.delete_messages_from(conv.id, 2) == 2
    assert [m.content for m in store.get(conv.id).messages] == ["m0", "m1"]
    store.add_message(conv.id, "user", "again")
    assert [(m.position, m.content) for m in store.get(conv.id).messages][-1] == (2, "again")


def test_list_latest_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with HistoryStore(path) as s:
        assert s.latest() is None and s.list() == []
        a = s.create_conversation("m", title="a")
        b = s.create_conversation("m", title="b")
        assert [c.id for c in s.list()] == [b.id, a.id]
        time.sleep(0.002)
        s.add_message(a.id, "user", "x")
        s.add_message(a.id, "assistant", "y")
        listed = s.list()
        assert [(c.id, c.message_count) for c in listed] == [(a.id, 2), (b.id, 0)]
        assert listed[0].messages == []  # list does not load messages
        assert [c.id for c in s.list(limit=1)] == [a.id]
        latest = s.latest()
        assert latest is not None and latest.id == a.id and [m.content for m in latest.messages] == ["x", "y"]
        s.delete(a.id)
        assert [c.id for c in s.list()] == [b.id]
        with pytest.raises(HistoryError):
            s.get(a.id)
        with pytest.raises(HistoryError):
            s.delete(a.id)
        with pytest.raises(HistoryError):
            s.add_message(a.id, "user", "into a deleted conversation")
    # the messages went with the conversation
    assert _raw(path).execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_prefix_ids_unique_and_ambiguous(store: HistoryStore) -> None:
    ids = [store.create_conversation("m").id for _ in range(20)]
    # 20 ids over 16 first hex digits: some first digit is shared
    firsts = [i[0] for i in ids]
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(HistoryError, match="ambiguous"):
        store.get(shared)
    for full in ids:
        shortest = next(full[:n] for n in range(1, 9) if sum(i.startswith(full[:n]) for i in ids) == 1)
        assert store.get(shortest).id == full
        assert store.get(full.upper()).id == full
    with pytest.raises(HistoryError, match="no conversation"):
        store.get("zzzz")
    with pytest.raises(HistoryError):
        store.get("  ")


def test_search_titles_and_messages_case_insensitively(store: HistoryStore) -> None:
    a = store.create_conversation("m", title="Trip to Paris")
    store.add_message(a.id, "user", "Where should I eat in PARIS?")
    b = store.create_conversation("m")
    filler = "lorem ipsum dolor sit amet " * 20
    store.add_message(b.id, "user", "Tell me about the Straße")
    store.add_message(b.id, "assistant", filler + "the needle is here " + filler)
    c = store.create_conversation("m")
    store.add_message(c.id, "user", "nothing relevant")

    hits = store.search("paris")
    assert [(h.conversation_id, h.role, h.position) for h in hits] == [(a.id, "title", None), (a.id, "user", 0)]
    assert "PARIS" in hits[1].snippet
    # casefold is case-insensitive beyond ASCII; the first user message is also the title
    assert [(h.conversation_id, h.role) for h in store.search("STRASSE")] == [(b.id, "title"), (b.id, "user")]
    (needle,) = store.search("NEEDLE IS")
    assert needle.role == "assistant" and "needle is here" in needle.snippet
    assert len(needle.snippet) <= 90 and needle.snippet.startswith("…") and needle.snippet.endswith("…")
    assert store.search("100%") == [] and store.search("absent") == []
    assert len(store.search("e", limit=2)) == 2


def test_exports(store: HistoryStore) -> None:
    conv = store.create_conversation("LiquidAI/LFM2-350M", system="Be brief.", options={"temperature": 0.3})
    store.add_message(conv.id, "user", "Hi there")
    store.add_message(conv.id, "assistant", "Hello! **Welcome.**", tokens=4, timings={"ttft": 0.2},
                      finish_reason="length")
    got = store.get(conv.id[:5])

    md = to_markdown(got)
    assert md.startswith("# Hi there\n")
    assert f"`{conv.id}`" in md and "`LiquidAI/LFM2-350M`" in md and "temperature=0.3" in md
    assert md.index("## System\n\nBe brief.") < md.index("## User\n\nHi there") < md.index(
        "## Assistant\n\nHello! **Welcome.**")
    assert "*[length]*" in md

    data = json.loads(to_json(got))
    assert (data["id"], data["title"], data["model"], data["system"]) == (
        conv.id, "Hi there", "LiquidAI/LFM2-350M", "Be brief.")
    assert data["options"] == {"temperature": 0.3}
    assert [(m["position"], m["role"], m["content"]) for m in data["messages"]] == [
        (0, "user", "Hi there"), (1, "assistant", "Hello! **Welcome.**")]
    assert data["messages"][1]["timings"] == {"ttft": 0.2} and data["messages"][1]["finish_reason"] == "length"


def test_reasoning_and_tool_fields_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]
    with HistoryStore(path) as s:
        conv = s.create_conversation("m")
        s.add_message(conv.id, "user", "Weather in Paris?")
        s.add_message(conv.id, "assistant", "", reasoning="I need the tool.",
                      raw_content="<think>I need the tool.</think>", tool_calls=calls)
        s.add_message(conv.id, "tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather")
        thinking = s.add_message(conv.id, "assistant", "")
        # streamed: the reasoning and raw text arrive by update; None leaves a field as it is
        assert s.update_message(thinking, reasoning="It is 21.", raw_content="<think>It is 21.</think>\n21 °C")
        assert s.update_message(thinking, content="21 °C", finish_reason="stop")
    with HistoryStore(path) as s:
        got = s.get(conv.id)
    user, call, result, answer = got.messages
    assert (user.reasoning, user.raw_content, user.tool_calls, user.tool_call_id, user.name) == (None,) * 5
    assert (call.content, call.reasoning, call.raw_content, call.tool_calls) == (
        "", "I need the tool.", "<think>I need the tool.</think>", calls)
    assert (result.role, result.tool_call_id, result.name, result.tool_calls) == ("tool", "call_1", "get_weather",
                                                                                   None)
    assert (answer.content, answer.reasoning, answer.raw_content) == ("21 °C", "It is 21.",
                                                                     "<think>It is 21.</think>\n21 °C")
    data = json.loads(to_json(got))
    assert [m["reasoning"] for m in data["messages"]] == [None, "I need the tool.", None, "It is 21."]
    # the tool fields only where a message has them
    assert data["messages"][1]["tool_calls"] == calls and "tool_calls" not in data["messages"][0]
    assert (data["messages"][2]["tool_call_id"], data["messages"][2]["name"]) == ("call_1", "get_weather")
    assert "raw_content" not in data["messages"][1]  # the template's copy is not part of the export
    md = to_markdown(got)
    assert "> I need the tool." in md and md.index("> It is 21.") < md.index("21 °C")


def test_finish_labels_of_replies_that_only_thought() -> None:
    from lfm2cli.store.conversations import finish_label

    assert finish_label("assistant", "stop") is None
    assert finish_label("assistant", "stop", thinking_only=True) == "no answer after thinking"
    assert finish_label("assistant", "length", thinking_only=True) == "length while thinking"
    assert finish_label("assistant", "interrupted", thinking_only=True) == "interrupted while thinking"
    assert finish_label("assistant", None, thinking_only=True) == "incomplete while thinking"
    assert finish_label("user", None, thinking_only=True) is None


# ---------------------------------------------------------------- migrations and damaged files

def test_empty_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"")
    with HistoryStore(path) as s:
        s.add_message(s.create_conversation("m").id, "user", "works")
    db = _raw(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_previous_schema_version_is_upgraded_keeping_data(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    db = _raw(path)
    assert apply_migrations(db, upto=SCHEMA_VERSION - 1) == SCHEMA_VERSION - 1
    db.execute("INSERT INTO conversations (id, title, model, created_at, updated_at) "
               "VALUES ('abcd1234', 'old', 'm', '2024-01-01T00:00:00+00:00', '2024-01-01T00:00:00+00:00')")
    for pos, role in enumerate(["user", "assistant"]):
        db.execute("INSERT INTO messages (conversation_id, position, role, content, created_at) "
                   "VALUES ('abcd1234', ?, ?, ?, '2024-01-01T00:00:00+00:00')", (pos, role, f"old {role}"))
    db.close()

    with HistoryStore(path) as s:
        got = s.get("abcd")
        assert [m.content for m in got.messages] == ["old user", "old assistant"]
        # rows from before the reasoning and tool columns read as having none
        assert [(m.reasoning, m.raw_content, m.tool_calls, m.tool_call_id, m.name) for m in got.messages] == [
            (None,) * 5] * 2
        s.add_message("abcd1234", "user", "new")
        assert [m.position for m in s.get("abcd").messages] == [0, 1, 2]
    db = _raw(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    columns = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
    assert {"reasoning", "raw_content", "tool_calls", "tool_call_id", "name"} <= columns
    # the latest schema refuses two messages at one position
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO messages (conversation_id, position, role, content, created_at) "
                   "VALUES ('abcd1234', 0, 'user', 'dup', 'now')")


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    db = _raw(tmp_path / "h.db")
    apply_migrations(db)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError):
        apply_migrations(db, migrations=[*MIGRATIONS, broken])
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    HistoryStore(path).close()
    _raw(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(HistoryError, match="newer lfm2"):
        HistoryStore(path)


def test_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not sqlite at all\n" * 100)
    with pytest.raises(HistoryError, match="not a database"):
        HistoryStore(path)


# ---------------------------------------------------------------- concurrency

_APPEND = """
import sys, time
from pathlib import Path
from lfm2cli.store.conversations import HistoryStore
db, shared, tag, ready, go = sys.argv[1:6]
with HistoryStore(Path(db)) as s:
    own = s.create_conversation("m", title=tag)
    Path(ready).write_text(own.id)
    while not Path(go).exists():  # start both writers together
        time.sleep(0.001)
    for i in range(200):
        s.add_message(shared, "user", f"{tag}-shared-{i}")
        s.add_message(own.id, "assistant", f"{tag}-own-{i}")
"""

_OPEN_FRESH = """
import sys, time
from pathlib import Path
from lfm2cli.store.conversations import HistoryStore
db, tag, ready, go = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
with HistoryStore(Path(db)) as s:
    s.add_message(s.create_conversation("m").id, "user", tag)
"""


def _run_together(script: str, args: list[list[str]], tmp_path: Path) -> None:
    """Start one process per argument list, release them at once, and require that all succeed."""
    go = tmp_path / "go"
    readies = [tmp_path / f"ready{i}" for i in range(len(args))]
    procs = [subprocess.Popen([sys.executable, "-c", script, *a], stderr=subprocess.PIPE, text=True)
             for a in args]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in readies):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer died early"
            time.sleep(0.01)
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_processes_appending_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with HistoryStore(path) as s:
        shared = s.create_conversation("m", title="shared").id
    _run_together(_APPEND, [[str(path), shared, tag, str(tmp_path / f"ready{i}"), str(tmp_path / "go")]
                            for i, tag in enumerate(["A", "B"])], tmp_path)

    with HistoryStore(path) as s:
        got = s.get(shared)
        assert [m.position for m in got.messages] == list(range(400))
        contents = [m.content for m in got.messages]
        for tag in "AB":
            # all 200 of each writer, in the order it wrote them
            assert [c for c in contents if c.startswith(tag)] == [f"{tag}-shared-{i}" for i in range(200)]
        for tag, i in (("A", 0), ("B", 1)):
            own = s.get((tmp_path / f"ready{i}").read_text())
            assert own.title == tag
            assert [(m.position, m.content) for m in own.messages] == [(i, f"{tag}-own-{i}") for i in range(200)]
    db = _raw(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 800


def test_processes_opening_a_new_database_at_once(tmp_path: Path) -> None:
    path = tmp_path / "new" / "h.db"
    tags = ["p0", "p1", "p2"]
    _run_together(_OPEN_FRESH, [[str(path), t, str(tmp_path / f"ready{i}"), str(tmp_path / "go")]
                                for i, t in enumerate(tags)], tmp_path)
    with HistoryStore(path) as s:
        assert sorted(c.title for c in s.list()) == tags
    db = _raw(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------- the CLI

runner = CliRunner()


def _cli(home: Path, *args: str, stdin: str | None = None):
    return runner.invoke(app, ["history", *args], env={"LFM2_HOME": str(home)}, input=stdin)


@pytest.fixture
def home(tmp_path: Path) -> tuple[Path, list[str]]:
    """A data directory with two conversations: ids newest first."""
    with HistoryStore(tmp_path / "history.db") as s:
        a = s.create_conversation("LiquidAI/LFM2-350M", system="Be brief.")
        s.add_message(a.id, "user", "What is the capital of France?")
        s.add_message(a.id, "assistant", "It is **Paris**.", finish_reason="stop")
        time.sleep(0.002)
        b = s.create_conversation("LiquidAI/LFM2-8B-A1B", title="Tabs\tand\nnewlines")
        s.add_message(b.id, "user", "Tell me a joke")
    return tmp_path, [b.id, a.id]


def test_cli_list_piped(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    result = _cli(path, "list")
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        (ids[0], "LiquidAI/LFM2-8B-A1B", "1", "Tabs and newlines"),
        (ids[1], "LiquidAI/LFM2-350M", "2", "What is the capital of France?")]
    assert all(len(r) == 5 for r in rows)
    assert [line.split("\t")[0] for line in _cli(path, "list", "-n", "1").stdout.splitlines()] == ids[:1]


def test_history_alone_lists_the_conversations(home: tuple[Path, list[str]], tmp_path_factory) -> None:
    path, ids = home
    alone = _cli(path)
    assert alone.exit_code == 0, alone.output
    assert alone.stdout == _cli(path, "list").stdout and alone.stdout.split("\t")[0] == ids[0]
    empty = _cli(tmp_path_factory.mktemp("empty"))  # nothing saved: said on stderr, and still a success
    assert empty.exit_code == 0 and empty.stdout == "" and "no saved conversations" in empty.stderr


def test_cli_list_without_history_creates_nothing(tmp_path: Path) -> None:
    result = _cli(tmp_path, "list")
    assert result.exit_code == 0 and result.stdout == "" and "no saved conversations" in result.stderr
    assert not (tmp_path / "history.db").exists()
    assert isinstance(_cli(tmp_path, "show", "abc").exception, HistoryError)


def test_cli_show_and_unknown_ids(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    result = _cli(path, "show", ids[1][:6])
    assert result.exit_code == 0
    assert result.stdout.startswith("# What is the capital of France?")
    assert "## System\n\nBe brief." in result.stdout and "## Assistant\n\nIt is **Paris**." in result.stdout
    missing = _cli(path, "show", "zzzzzz")
    assert missing.exit_code == 1 and isinstance(missing.exception, HistoryError)


def test_cli_export(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    as_json = json.loads(_cli(path, "export", ids[1], "--format", "json").stdout)
    assert [m["content"] for m in as_json["messages"]] == ["What is the capital of France?", "It is **Paris**."]
    out = path / "conv.md"
    result = _cli(path, "export", ids[1][:4], "-o", str(out))
    assert result.exit_code == 0 and result.stdout == "" and str(out) in result.stderr
    assert out.read_text(encoding="utf-8").startswith("# What is the capital of France?")
    pdf = _cli(path, "export", ids[1], "--format", "pdf")
    assert pdf.exit_code == 2 and "'pdf' is not one of 'md', 'markdown', 'json'" in pdf.output
    assert _cli(path, "export", ids[1], "--format", "JSON").stdout == _cli(path, "export", ids[1], "-f", "json").stdout


def test_cli_rm(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    # stdin is not a terminal: refuse even if it says yes
    refused = _cli(path, "rm", ids[0], stdin="y\n")
    assert isinstance(refused.exception, UsageError) and "--yes" in str(refused.exception)
    assert len(_cli(path, "list").stdout.splitlines()) == 2
    done = _cli(path, "rm", ids[0][:5], "--yes")
    assert done.exit_code == 0 and f"deleted {ids[0]}" in done.stderr
    assert [line.split("\t")[0] for line in _cli(path, "list").stdout.splitlines()] == [ids[1]]


def test_cli_search(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    rows = [line.split("\t") for line in _cli(path, "search", "PARIS").stdout.splitlines()]
    assert rows == [[ids[1], "assistant#1", "It is **Paris**."]]
    assert [r.split("\t")[:2] for r in _cli(path, "search", "newlines").stdout.splitlines()] == [
        [ids[0], "title"]]
    none = _cli(path, "search", "xylophone")
    assert none.exit_code == 0 and none.stdout == "" and "xylophone" in none.stderr


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_codes(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    env = {**os.environ, "LFM2_HOME": str(path)}
    env.pop("LFM2_DEBUG", None)
    for args, code in ((["show", "nope"], 1), (["rm", ids[0]], 2)):
        proc = subprocess.run([sys.executable, "-m", "lfm2cli", "history", *args], env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == code
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_terminal_rendering(home: tuple[Path, list[str]]) -> None:
    from rich.console import Console

    from lfm2cli.commands.history import render_conversation, render_hits, render_list

    path, ids = home
    with HistoryStore(path / "history.db") as s:
        convs, conv, hits = s.list(), s.get(ids[1]), s.search("paris")
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None)
    render_list(console, convs)
    listing = buf.getvalue()
    assert ids[0] in listing and ids[1] in listing and "What is the capital of France?" in listing
    buf.seek(0), buf.truncate()
    render_conversation(console, conv)
    shown = buf.getvalue()
    assert "It is Paris." in shown and "**" not in shown  # the reply's Markdown was rendered
    assert "Be brief." in shown and "What is the capital of France?" in shown
    buf.seek(0), buf.truncate()
    render_hits(console, hits, "paris")
    assert ids[1] in buf.getvalue() and "assistant #1" in buf.getvalue()


# ---------------------------------------------------------------- files that are refused are left as they were

def _lfm2(home: Path, *args: str | bytes) -> subprocess.CompletedProcess:
    """The real command, through main(): exit status and stderr as a script sees them."""
    env = {**os.environ, "LFM2_HOME": str(home)}
    env.pop("LFM2_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def _future_schema(path: Path) -> None:
    with HistoryStore(path) as s:
        s.add_message(s.create_conversation("m").id, "user", "kept")
    db = _raw(path)
    db.execute("PRAGMA journal_mode = DELETE")  # as a newer lfm2 might keep it: a switch to WAL would show
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()


def _foreign(path: Path) -> None:
    db = _raw(path)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.execute("INSERT INTO notes (body) VALUES ('not a chat')")
    db.close()


@pytest.mark.slow
@pytest.mark.parametrize("make, culprit", [(_future_schema, "newer lfm2"), (_foreign, "not lfm2's chat history")])
@pytest.mark.parametrize("command", [["history", "list"], ["history", "search", "kept"], ["chat", "/no/model"]])
def test_refused_history_file_is_not_changed(tmp_path: Path, make, culprit: str, command: list[str]) -> None:
    path = tmp_path / "history.db"
    make(path)
    before = path.read_bytes()
    result = _lfm2(tmp_path, *command)
    assert result.returncode == 1, result.stderr
    err = result.stderr.decode()
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(path) in err and culprit in err and "LFM2_HOME" in err
    assert result.stdout == b""
    # not switched to WAL, no lfm2 tables added: byte for byte what it was, and no WAL beside it
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.db"]


def test_damaged_history_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with HistoryStore(path) as s:
        s.add_message(s.create_conversation("m").id, "user", "kept")
    db = _raw(path)
    db.execute("DROP TABLE messages")
    db.close()
    before = path.read_bytes()
    result = _lfm2(tmp_path, "history", "list")
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1
    assert f"the history database {path} is damaged: the messages table is missing; move it aside" in err
    assert path.read_bytes() == before


def test_store_says_why_a_read_only_file_cannot_be_written(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with HistoryStore(path) as s:
        s.add_message(s.create_conversation("m").id, "user", "kept")
    with HistoryStore(path) as s:
        # SQLite's own words for a file it opened read-only, as the store turns them into one line
        hint = s._hint("attempt to write a readonly database")
    assert str(path) in hint and "permissions" in hint and "LFM2_HOME" in hint


# ---------------------------------------------------------------- strict JSON, bad bytes, unfinished replies

def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def test_export_json_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with HistoryStore(path) as s:
        conv = s.create_conversation("m", options={"temperature": 0.3})
        s.add_message(conv.id, "user", "hi")
        s.add_message(conv.id, "assistant", "yo", timings={"decode_tps": float("inf")}, finish_reason="stop")
    # what an older lfm2 saved for `/set temperature inf` and `/set top_p nan`
    db = _raw(path)
    db.execute("UPDATE conversations SET options = ? WHERE id = ?",
               ('{"temperature": Infinity, "top_p": NaN, "seed": 5}', conv.id))
    db.close()
    before = path.read_bytes()
    result = _lfm2(tmp_path, "history", "export", conv.id, "-f", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout, parse_constant=_no_constants)
    assert data["options"] == {"temperature": None, "top_p": None, "seed": 5}
    assert data["messages"][1]["timings"] == {"decode_tps": None}
    assert path.read_bytes() == before
    # nothing that is not finite is written in the first place
    with HistoryStore(path) as s:
        s.update_conversation(conv.id, options={"temperature": float("nan")})
    assert json.loads(_raw(path).execute("SELECT options FROM conversations").fetchone()[0],
                      parse_constant=_no_constants) == {"temperature": None}


@pytest.mark.slow
def test_search_and_show_with_arguments_that_are_not_utf8(home: tuple[Path, list[str]]) -> None:
    path, ids = home
    with HistoryStore(path / "history.db") as s:
        s.add_message(ids[0], "user", "caf\ufffd au lait")  # what a byte that was not UTF-8 became
        before = [(c.id, c.message_count) for c in s.list()]
    found = _lfm2(path, "history", "search", b"caf\xe9")
    assert found.returncode == 0, found.stderr
    assert found.stdout.decode().split("\t")[:2] == [ids[0], "user#1"]
    none = _lfm2(path, "history", "search", b"tea\xff")
    assert none.returncode == 0 and none.stdout == b""
    assert none.stderr.decode() == "no conversation contains 'tea\ufffd'\n"
    missing = _lfm2(path, "history", "show", b"\xff\xfe")
    assert missing.returncode == 1 and missing.stderr.decode().count("\n") == 1
    assert "no conversation with id '\ufffd\ufffd'" in missing.stderr.decode()
    with HistoryStore(path / "history.db") as s:
        assert [(c.id, c.message_count) for c in s.list()] == before


def test_reply_without_a_finish_reason_is_shown_as_incomplete(tmp_path: Path) -> None:
    """A process killed while it streamed a reply leaves the reply without a finish reason."""
    path = tmp_path / "history.db"
    with HistoryStore(path) as s:
        conv = s.create_conversation("m")
        s.add_message(conv.id, "user", "hi")
        s.add_message(conv.id, "assistant", "Half a sent")
        got = s.get(conv.id)
    assert to_markdown(got).rstrip().endswith("Half a sent\n\n*[incomplete]*")
    shown = _lfm2(tmp_path, "history", "show", conv.id)
    assert shown.returncode == 0 and shown.stdout.decode().rstrip().endswith("*[incomplete]*")
    assert "[incomplete]" not in to_markdown(got).split("## Assistant")[0]  # the user's message is whole

    from rich.console import Console

    from lfm2cli.commands.history import render_conversation

    buf = io.StringIO()
    render_conversation(Console(file=buf, width=100, color_system=None), got)
    assert buf.getvalue().rstrip().endswith("[incomplete]")
    with HistoryStore(path) as s:
        assert s.get(conv.id).messages[1].finish_reason is None  # shown so, not rewritten


# ---------------------------------------------------------------- hostile rows and paths (issue 24)

def _run_lfm2(home: Path, *args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "LFM2_HOME": str(home), "LFM2_CACHE": str(home / "cache")}
    env.pop("LFM2_DEBUG", None)
    # bounded: a history command never needs torch, a chat turn on the tiny model well under 3 GB of address space
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=memory_capped(3 if args[0] == "chat" else 1))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _two_conversations(home: Path) -> tuple[str, str]:
    with HistoryStore(home / "history.db") as s:
        good = s.create_conversation("m", title="good one")
        s.add_message(good.id, "user", "hello")
        s.add_message(good.id, "assistant", "hi there", finish_reason="stop")
        bad = s.create_conversation("m", title="bad one")
        for i, text in enumerate(["first", "second", "third", "fourth", "fifth"]):
            s.add_message(bad.id, "user" if i % 2 == 0 else "assistant", text)
    return good.id, bad.id


@pytest.mark.slow
def test_damaged_rows_are_skipped_with_a_note_and_the_rest_still_works(tmp_path: Path) -> None:
    good, bad = _two_conversations(tmp_path)
    db = _raw(tmp_path / "history.db")
    db.execute("UPDATE conversations SET options = '[1, 2]', title = X'ff00fe' WHERE id = ?", (bad,))
    db.execute("UPDATE messages SET tool_calls = '5' WHERE conversation_id = ? AND position = 1", (bad,))
    db.execute("UPDATE messages SET role = 'hacker' WHERE conversation_id = ? AND position = 2", (bad,))
    db.execute("UPDATE messages SET content = X'00ff', timings = '{bad json' WHERE conversation_id = ? "
               "AND position = 3", (bad,))
    db.close()
    before = _files(tmp_path)
    listed = _run_lfm2(tmp_path, "history", "list")
    assert listed.returncode == 0, listed.stderr
    assert good in listed.stdout and bad in listed.stdout
    assert "settings" in listed.stderr and bad in listed.stderr
    shown = _run_lfm2(tmp_path, "history", "show", bad)
    assert shown.returncode == 0, shown.stderr
    assert "first" in shown.stdout and "fifth" in shown.stdout and "third" not in shown.stdout
    notes = [line for line in shown.stderr.splitlines() if line.startswith("note:")]
    assert any("#1" in n and "tool calls" in n for n in notes) and any("#2" in n and "role" in n for n in notes)
    assert "Traceback" not in shown.stderr
    assert _run_lfm2(tmp_path, "history", "show", good).stdout.count("hi there") == 1
    assert _files(tmp_path) == before  # reading repaired nothing behind the user's back


@pytest.mark.slow
def test_a_negative_schema_version_is_refused_in_one_line(tmp_path: Path) -> None:
    _two_conversations(tmp_path)
    db = _raw(tmp_path / "history.db")
    db.execute("PRAGMA user_version = -1")
    db.close()
    before = _files(tmp_path)
    proc = _run_lfm2(tmp_path, "history", "list")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "schema version -1" in proc.stderr and "history.db" in proc.stderr
    assert _files(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["directory", "fifo", "devnull", "loop", "dangling"])
def test_a_history_path_that_is_no_file_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "history.db"
    expected = {"directory": "a directory", "fifo": "a FIFO", "devnull": "a device", "loop": "symlink loop",
                "dangling": "symlink to nothing"}[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devnull":
        path.symlink_to("/dev/null")
    elif kind == "loop":
        path.symlink_to(tmp_path / "other.db")
        (tmp_path / "other.db").symlink_to(path)
    else:
        path.symlink_to(tmp_path / "gone" / "history.db")
    proc = _run_lfm2(tmp_path, "history", "show", "abc", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr and str(path) in proc.stderr
    assert not (tmp_path / "gone").exists()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["db", "link", "wal", "cache"])
def test_export_never_writes_over_lfm2s_own_files(tmp_path: Path, target: str) -> None:
    good, _ = _two_conversations(tmp_path)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    out = {"db": tmp_path / "history.db", "link": tmp_path / "innocent.md", "wal": tmp_path / "history.db-wal",
           "cache": tmp_path / "cache" / "models" / "x.md"}[target]
    if target == "link":
        out.symlink_to(tmp_path / "history.db")
    before = _files(tmp_path)
    proc = _run_lfm2(tmp_path, "history", "export", good, "-o", str(out))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "refusing to write" in proc.stderr
    assert _files(tmp_path) == before
    assert _run_lfm2(tmp_path, "history", "show", good).returncode == 0  # the history is intact


@pytest.mark.slow
def test_chat_save_refuses_the_history_database_and_keeps_the_session(chat_ckpt: Path, tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    script = f"hello\n/save {db}\n/save {tmp_path / 'fine.md'}\n"
    proc = _run_lfm2(tmp_path, "chat", str(chat_ckpt), "-n", "3", "-t", "0", stdin=script, timeout=300)
    assert "refusing to write over" in proc.stderr
    assert (tmp_path / "fine.md").read_text().startswith("# ")
    with HistoryStore(db) as s:  # still a database, holding the conversation
        assert s.latest() is not None and s.latest().messages[0].content == "hello"
