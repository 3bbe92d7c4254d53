"""`lfm2 chat`: the session (cache reuse across turns, snapshots, store), the slash commands and the loop,
driven through piped stdin, CliRunner and prompt-toolkit's pipe input."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from typer.testing import CliRunner

from lfm2cli.chat.input import ChatInput
from lfm2cli.chat.repl import ChatLoop, ChatUI, completions
from lfm2cli.chat.session import ChatSession, ContextFullError, common_prefix
from lfm2cli.cli import app
from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.errors import UsageError
from lfm2cli.loading.loader import LoadedModel, load
from lfm2cli.store.conversations import HistoryStore
from tests.helpers import LONG, assert_cache_holds

runner = CliRunner()
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
GREEDY_ARGS = ["-t", "0", "--repetition-penalty", "1", "--device", "cpu", "--dtype", "float32"]
@pytest.fixture(scope="module")
def moe_lm(chat_moe_ckpt: Path) -> LoadedModel:
    return load(chat_moe_ckpt, device="cpu", dtype="float32")


def session(lm: LoadedModel, store: HistoryStore, max_tokens: int = 6, **kw) -> ChatSession:
    return ChatSession(lm, store, "tiny", kw.pop("params", GREEDY), max_tokens, **kw)


def only_conversation(store: HistoryStore):
    convs = store.list()
    assert len(convs) == 1
    return store.get(convs[0].id)


def chat_cli(ckpt: Path, *args: str, input: str):
    return runner.invoke(app, ["chat", str(ckpt), *GREEDY_ARGS, *args], input=input)


# ---------------------------------------------------------------- cache reuse


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lm", "moe_lm"])
def test_next_turn_runs_only_new_tokens_and_matches_a_fresh_run(which: str, request: pytest.FixtureRequest,
                                                                store: HistoryStore) -> None:
    model = request.getfixturevalue(which)
    s = session(model, store)
    s.send(LONG)
    questions = ["What is the capital of France?", "How many legs does a spider have?"]
    for q in questions:
        before = list(s.cached_ids)
        first_prompt = s.prompt_ids(s.messages[:-1])  # the previous turn's prompt
        r = s.send(q)
        full = s.prompt_ids(s.messages[:-1])
        assert s.cache.pos == len(s.cached_ids)
        # Reused: everything cached when it is a prefix of the new prompt; else (a sampled reply that is not
        # the canonical encoding of its text) the snapshot taken just before that reply.
        reused = len(before) if full[:len(before)] == before else len(first_prompt) - 1
        assert common_prefix(full, before) >= reused
        assert s.last_prefill_tokens == r.stats.prompt_tokens == len(full) - reused
        assert s.last_prefill_tokens < len(full) // 3
        assert_cache_holds(s)

        # a fresh session over the same conversation (resumed from the store) reads all of it, and agrees
        fresh = session(model, store)
        fresh.load(s.conversation_id)
        again = fresh.retry()
        assert fresh.last_prefill_tokens == len(full)
        assert again.text == r.text and again.stats.finish_reason == r.stats.finish_reason
        # retry stored a new reply in place of the old one: give the original session its row back
        s.messages[-1].id = fresh.messages[-1].id


@pytest.mark.slow
def test_template_that_rewrites_past_turns(lm: LoadedModel, store: HistoryStore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Like LFM2.5, drop `<think>` blocks from all but the last reply: the rendered conversation of a turn
    then no longer extends the previous one, and the cache goes back to the snapshot before the change."""
    template = (
        "{{ bos_token }}{% set ns = namespace(last=-1) %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set ns.last = loop.index0 %}{% endif %}"
        "{% endfor %}{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and loop.index0 != ns.last and '</think>' in c %}"
        "{% set c = c.split('</think>')[-1] | trim %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    monkeypatch.setitem(lm.tokenizer.templates, "default", template)
    s = session(lm, store)
    s.send(LONG)
    ids1 = s.prompt_ids(s.messages[:-1])
    # as if the model had thought aloud: the full reply (with its thinking) is what is stored
    thought = "<think>The user talks about language models.</think>" + s.messages[-1].content
    s.messages[-1].content = thought
    store.update_message(s.messages[-1].id, content=thought)
    s.send("What is the capital of France?")
    r = s.send("How many legs does a spider have?")
    full = s.prompt_ids(s.messages[:-1])
    assert "<think>" not in lm.tokenizer.decode(full, skip_special_tokens=False)
    # back to the snapshot taken before the thinking reply, not to the start
    assert s.last_prefill_tokens == len(full) - (len(ids1) - 1)
    assert only_conversation(store).messages[1].content == thought
    fresh = session(lm, store)
    fresh.load(s.conversation_id)
    assert fresh.retry().text == r.text and fresh.last_prefill_tokens == len(full)


def test_retry_and_undo_restore_snapshots(lm: LoadedModel, store: HistoryStore) -> None:
    s = session(lm, store)
    s.send(LONG)
    r2 = s.send("What is the capital of France?")
    prompt2 = s.prompt_ids(s.messages[:-1])
    again = s.retry()
    # regenerated from the snapshot before the reply: only the last prompt token runs again
    assert s.last_prefill_tokens == 1 and again.text == r2.text
    conv = only_conversation(store)
    assert [m.role for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[-1].position == 3 and conv.messages[-1].content == r2.text

    assert s.undo() == 2
    assert [m.content for m in only_conversation(store).messages][:1] == [LONG]
    assert len(only_conversation(store).messages) == 2 and len(s.messages) == 2
    assert s.cache.pos == len(s.cached_ids) <= len(prompt2)
    assert_cache_holds(s)
    again = s.send("What is the capital of France?")
    assert again.text == r2.text and s.last_prefill_tokens < len(prompt2) // 3
    assert s.undo() == 2 and s.undo() == 2 and s.messages == []
    with pytest.raises(UsageError, match="nothing to undo"):
        s.undo()
    assert only_conversation(store).messages == []


@pytest.mark.slow
def test_interrupted_forward_pass_restores_the_cache(lm: LoadedModel, store: HistoryStore) -> None:
    """Ctrl-C inside a forward pass leaves conv states half updated: the reply is kept as interrupted and
    the next turn still matches a fresh run."""
    s = session(lm, store, max_tokens=12)
    s.send(LONG)
    calls = 0

    def stop_in_the_middle(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 12:  # several decode steps in, after the first layer but before the others
            raise KeyboardInterrupt

    hook = lm.model.model.layers[0].register_forward_hook(stop_in_the_middle)
    try:
        cut = s.send("What is the capital of France?")
    finally:
        hook.remove()
    prompt = s.prompt_ids(s.messages[:-1])
    assert cut.interrupted and cut.stats.generated_tokens > 0
    assert s.cache.pos == len(s.cached_ids) == len(prompt) - 1
    assert_cache_holds(s)
    stored = only_conversation(store).messages[-1]
    assert stored.finish_reason == "interrupted" and stored.content == cut.text
    assert stored.tokens == cut.stats.generated_tokens > 0

    r = s.send("How many legs does a spider have?")
    assert s.last_prefill_tokens == len(s.prompt_ids(s.messages[:-1])) - (len(prompt) - 1)
    fresh = session(lm, store, max_tokens=12)
    fresh.load(s.conversation_id)
    assert fresh.messages[-3].finish_reason == "interrupted"  # the cut reply stays in the conversation
    assert fresh.retry().text == r.text


def words(lm: LoadedModel, tokens: int) -> str:
    """About `tokens` tokens of text."""
    per_word = len(lm.tokenizer.encode("word " * 100)) / 100
    return "word " * int(tokens / per_word)


@pytest.mark.slow
def test_context_full_is_refused_before_anything_is_stored(lm: LoadedModel, store: HistoryStore) -> None:
    s = session(lm, store, max_tokens=200)
    notices: list[str] = []
    s.on_notice = notices.append
    with pytest.raises(ContextFullError, match="does not fit.*/new"):
        s.send(words(lm, 2100))
    assert s.messages == [] and store.list() == []
    s.send(words(lm, 1900))  # fits, but leaves less room than max_tokens: warned first
    assert notices and "context tokens" in notices[0] and "/new" in notices[0]
    assert len(only_conversation(store).messages) == 2
    with pytest.raises(ContextFullError):
        s.send(words(lm, 200))
    assert len(s.messages) == 2 and len(only_conversation(store).messages) == 2


# ---------------------------------------------------------------- settings and store


@pytest.mark.slow
def test_set_and_system_are_saved_with_the_conversation(lm: LoadedModel, store: HistoryStore) -> None:
    s = session(lm, store)
    s.set_option("max-tokens", "3")  # before the first message: saved when the conversation is created
    s.set_system("Be brief.")
    s.send("Hello")
    conv = only_conversation(store)
    assert conv.system == "Be brief." and conv.options["max_tokens"] == 3 and conv.options["temperature"] == 0
    assert only_conversation(store).messages[-1].tokens <= 3
    for bad in (("temperature", "hot"), ("top_p", "2"), ("top_k", "1.5"), ("max_tokens", "0"), ("nope", "1")):
        with pytest.raises(UsageError):
            s.set_option(*bad)
    s.set_option("temperature", "0.7")
    s.set_option("seed", "5")
    assert only_conversation(store).options["temperature"] == 0.7
    assert only_conversation(store).options["seed"] == 5
    # a new system prompt changes the start of the conversation: the cache starts over
    s.set_system("Answer in French.")
    assert s.cache.pos == 0 and only_conversation(store).system == "Answer in French."
    s.set_option("temperature", "0")
    s.send("Again")
    assert s.last_prefill_tokens == len(s.prompt_ids(s.messages[:-1]))
    s.set_system(None)
    assert only_conversation(store).system in (None, "")


@pytest.mark.slow
def test_streaming_reply_is_written_while_it_grows(lm: LoadedModel, store: HistoryStore) -> None:
    s = session(lm, store, max_tokens=8)
    seen: list[str] = []

    def look(piece: str) -> None:
        # the placeholder exists from the start of the reply, under the user's message
        seen.append(only_conversation(store).messages[-1].role)

    s.send("Hello", look)
    assert seen and set(seen) == {"assistant"}
    m = only_conversation(store).messages[-1]
    assert m.finish_reason in ("stop", "length") and m.timings["ttft_s"] > 0


# ---------------------------------------------------------------- the command, scripted


def test_scripted_chat_through_stdin(chat_ckpt: Path, home: Path, tmp_path: Path) -> None:
    script = "Hello there\n/nonsense\n/set top_p 7\nWhat is the capital of France?\n/save {}\n/save {}\n/exit\n"
    md, js = tmp_path / "chat.md", tmp_path / "chat.json"
    result = chat_cli(chat_ckpt, "-n", "6", input=script.format(md, js))
    assert result.exit_code == 0, result.output
    with HistoryStore() as st:
        conv = only_conversation(st)
    assert [m.role for m in conv.messages] == ["user", "assistant"] * 2
    assert [m.content for m in conv.messages[::2]] == ["Hello there", "What is the capital of France?"]
    assert conv.title == "Hello there" and conv.model == str(chat_ckpt.resolve())
    # replies, each on its own line(s), are all that reaches stdout
    replies = [m.content for m in conv.messages[1::2]]
    assert result.stdout == "".join(r if r.endswith("\n") else r + "\n" for r in replies)
    assert "unknown command /nonsense" in result.stderr and "/help" in result.stderr
    assert "top_p must be a number in (0, 1] (1 disables it), got 7.0" in result.stderr
    assert "tokens" in result.stderr and "first token" in result.stderr  # the stats footer
    data = json.loads(js.read_text())
    assert [m["content"] for m in data["messages"]] == [m.content for m in conv.messages]
    assert "## User" in md.read_text() and "What is the capital of France?" in md.read_text()


def test_commands_help_history_stats_info_system(chat_ckpt: Path, home: Path) -> None:
    script = "/help\n/stats\n/system\n/system Be brief.\n/system\nHello\n/stats\n/history\n/info\n/undo\n/undo\n"
    result = chat_cli(chat_ckpt, "-n", "3", input=script)
    assert result.exit_code == 0, result.output
    err = result.stderr
    for name in completions():
        assert f"/{name}" in err
    assert "no reply yet" in err and "(no system prompt)" in err and "Be brief." in err
    assert "session: 1 reply" in err and "context:" in err
    assert "vocab size: 512" in err  # /info
    with HistoryStore() as st:
        conv = only_conversation(st)
    assert f"* {conv.id}" in err  # /history marks the current conversation
    assert conv.system == "Be brief." and conv.messages == []  # undone
    assert "nothing to undo" in err


def test_continue_and_resume(chat_ckpt: Path, chat_moe_ckpt: Path, home: Path) -> None:
    first = chat_cli(chat_ckpt, "-n", "6", "--system", "Be brief.", input="/set max_tokens 2\nHello\n")
    assert first.exit_code == 0, first.output
    # no model and no sampling options this time: the saved ones (greedy, max_tokens 2) come back
    again = runner.invoke(app, ["chat", "--device", "cpu", "--dtype", "float32", "-c"], input="Again\n")
    assert again.exit_code == 0, again.output
    with HistoryStore() as st:
        conv = only_conversation(st)
    assert conv.id in again.stderr and "Hello" in again.stderr  # the recap
    assert str(chat_ckpt.resolve()) in again.stderr  # the banner: the conversation's own model
    assert [m.content for m in conv.messages[::2]] == ["Hello", "Again"]
    assert conv.system == "Be brief." and conv.options["temperature"] == 0 and conv.options["max_tokens"] == 2
    assert all(m.tokens <= 2 for m in conv.messages[1::2])
    # --resume with another model, and an option given on the command line, which wins and is saved
    other = runner.invoke(app, ["chat", str(chat_moe_ckpt), "--device", "cpu", "--dtype", "float32",
                                "--resume", conv.id[:4], "-n", "4"], input="Third\n")
    assert other.exit_code == 0, other.output
    with HistoryStore() as st:
        conv = only_conversation(st)
    assert conv.model == str(chat_moe_ckpt.resolve()) and conv.options["max_tokens"] == 4
    assert len(conv.messages) == 6 and conv.options["temperature"] == 0
    missing = runner.invoke(app, ["chat", str(chat_ckpt), "--resume", "zzzz"], input="")
    assert "no conversation" in str(missing.exception)


def test_load_switches_conversation(lm: LoadedModel, store: HistoryStore) -> None:
    s = session(lm, store)
    s.send("Hello")
    first = s.conversation_id
    s.new_conversation()
    s.set_option("max_tokens", "2")
    s.send("Something else")
    assert len(store.list()) == 2
    s.load(first[:3])
    assert s.conversation_id == first and [m.content for m in s.messages][0] == "Hello"
    assert s.max_tokens == 6  # the settings saved with it
    s.send("More")
    assert len(store.get(first).messages) == 4


def test_refused_message_keeps_the_chat_going(chat_ckpt: Path, home: Path) -> None:
    result = chat_cli(chat_ckpt, "-n", "3", input="word " * 3000 + "\nHello\n")
    # the chat goes on, but a script learns from the exit status that a message got no reply
    assert result.exit_code == 1, result.output
    assert "does not fit" in result.stderr
    assert str(result.exception) == "1 of 2 messages failed; see the errors above"
    with HistoryStore() as st:
        assert [m.content for m in only_conversation(st).messages[::2]] == ["Hello"]


# ---------------------------------------------------------------- the prompt-toolkit session


@pytest.mark.slow
def test_prompt_toolkit_session(lm: LoadedModel, store: HistoryStore, home: Path) -> None:
    s = session(lm, store)
    out, err = io.StringIO(), io.StringIO()
    ui = ChatUI(Console(file=out, width=100), Console(file=err, width=100), plain=False)
    with create_pipe_input() as pipe:
        # a message, Ctrl-C on an empty prompt (must not leave), a completed command, an Alt-Enter message,
        # Ctrl-C on a half-typed line (dropped quietly), then Ctrl-D
        pipe.send_text("Hello\r\x03/sta\t\rfirst\x1b\rsecond\rhalf typed\x03\x04")
        reader = ChatInput(home / "input_history", completions(), input=pipe, output=DummyOutput())
        ChatLoop(s, reader, ui).run()
    conv = only_conversation(store)
    assert [m.content for m in conv.messages[::2]] == ["Hello", "first\nsecond"]
    assert err.getvalue().count("Ctrl-D or /exit") == 1
    assert "session: 1 reply" in err.getvalue()  # /stats, completed from /sta
    assert out.getvalue().strip()  # the replies were rendered
    assert "Hello" in (home / "input_history").read_text()


# ---------------------------------------------------------------- signals, in a real process


def start_chat(ckpt: Path, home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lfm2cli", "chat", str(ckpt), *GREEDY_ARGS, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "LFM2_HOME": str(home), "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_ctrl_c_stops_only_the_reply(endless_ckpt: Path, home: Path) -> None:
    proc = start_chat(endless_ckpt, home, "-n", "50000")
    proc.stdin.write(b"hi\n")
    proc.stdin.flush()
    first = os.read(proc.stdout.fileno(), 1)  # unbuffered: communicate() reads the pipe itself
    assert first  # the reply is streaming
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(b"/set max_tokens 5\nsecond\n/exit\n", timeout=120)
    out = first + out
    assert proc.returncode == 0, err
    assert b"[interrupted]" in err and b"Traceback" not in err
    with HistoryStore(home / "history.db") as st:
        conv = only_conversation(st)
    roles = [(m.role, m.finish_reason) for m in conv.messages]
    assert roles == [("user", None), ("assistant", "interrupted"), ("user", None), ("assistant", "length")]
    cut = conv.messages[1]
    assert cut.content and cut.tokens > 0 and conv.messages[3].tokens == 5
    # what was shown is what was kept (the signal may land between storing a piece and printing it)
    assert cut.content[: max(1, len(cut.content) - 16)].encode() in out


@pytest.mark.slow
def test_killed_process_keeps_the_streamed_reply(endless_ckpt: Path, home: Path) -> None:
    proc = start_chat(endless_ckpt, home, "-n", "50000")
    proc.stdin.write(b"hi\n")
    proc.stdin.flush()
    assert os.read(proc.stdout.fileno(), 1)
    time.sleep(1.5)  # several periodic saves
    proc.kill()
    proc.communicate(timeout=60)
    with HistoryStore(home / "history.db") as st:
        conv = only_conversation(st)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[1].content and conv.messages[1].finish_reason is None
    # kept, but not shown as a complete reply
    shown = subprocess.run([sys.executable, "-m", "lfm2cli", "history", "show", conv.id], capture_output=True,
                           text=True, env={**os.environ, "LFM2_HOME": str(home)}, timeout=60)
    assert shown.returncode == 0 and shown.stdout.rstrip().endswith("*[incomplete]*"), shown.stderr


# ---------------------------------------------------------------- damaged history, bad settings, bad bytes


def run_chat(ckpt: Path, home: Path, *args: str, stdin: bytes, greedy: bool = True,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`lfm2 chat` in its own process, through main(): what a script sees (stderr as text)."""
    env = {**os.environ, "LFM2_HOME": str(home)}
    env.pop("LFM2_DEBUG", None)
    options = GREEDY_ARGS if greedy else ["--device", "cpu", "--dtype", "float32"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "lfm2cli", "chat", str(ckpt), *options, *args],
                          input=stdin, capture_output=True, env=env, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr.decode())


def saved_history(home: Path, messages: int = 40) -> Path:
    """A history with one conversation of `messages` messages, closed (checkpointed into the file)."""
    with HistoryStore(home / "history.db") as st:
        conv = st.create_conversation("tiny")
        for i in range(messages):
            st.add_message(conv.id, "user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 300,
                           finish_reason=None if i % 2 == 0 else "stop")
    return home / "history.db"


def drop_messages_table(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TABLE messages")
    conn.close()  # the last connection to close moves the change from the WAL into the file


def damage_a_page(db: Path) -> None:
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) >= 6 * page
    data[3 * page:5 * page] = b"\xa5" * (2 * page)  # two pages of the tables' b-trees, not the schema page
    db.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("damage, culprit", [(drop_messages_table, "the messages table is missing"),
                                             (damage_a_page, "is damaged")])
def test_chat_refuses_a_history_it_cannot_write_before_loading(chat_ckpt: Path, home: Path, damage,
                                                               culprit: str) -> None:
    db = saved_history(home)
    damage(db)
    before = db.read_bytes()
    result = run_chat(chat_ckpt, home, stdin=b"Hello\n")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert str(db) in result.stderr and culprit in result.stderr
    assert "LFM2_HOME" in result.stderr and "move it aside" in result.stderr
    assert "saved" not in result.stderr and result.stdout == b""  # refused before the model loaded
    assert db.read_bytes() == before


def bound_by_permissions(tmp_path: Path) -> tuple[str, ...]:
    """A command prefix under which file permissions apply: none needed for a user; for root (CI containers),
    setpriv without the capability to override them. Skips the test where neither works."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    probe = tmp_path / "read-only"
    probe.write_text("")
    probe.chmod(0o444)
    try:
        denied = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r}, 'a')"],
                                capture_output=True).returncode != 0
    except OSError:
        denied = False
    if not denied:
        pytest.skip("running as root, and setpriv cannot drop the right to write read-only files")
    return prefix


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "directory", "empty directory"])
def test_chat_refuses_a_read_only_history(chat_ckpt: Path, home: Path, tmp_path: Path, what: str) -> None:
    prefix = bound_by_permissions(tmp_path)
    db = saved_history(home) if what != "empty directory" else home / "history.db"
    home.mkdir(exist_ok=True)
    before = db.read_bytes() if db.exists() else None
    target = db if what == "file" else home
    mode = target.stat().st_mode
    target.chmod(0o444 if what == "file" else 0o555)
    try:
        result = run_chat(chat_ckpt, home, stdin=b"Hello\n", prefix=prefix)
    finally:
        target.chmod(mode)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert str(db) in result.stderr and "permissions" in result.stderr and "LFM2_HOME" in result.stderr
    assert f"permissions of {target} " in result.stderr  # the file, or the directory that must be writable
    assert (db.read_bytes() if db.exists() else None) == before


def test_chat_never_says_saved_when_the_history_failed(chat_ckpt: Path, home: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lfm2cli.errors import HistoryError

    def fail(*args, **kwargs):
        raise HistoryError(f"history database {home / 'history.db'}: disk I/O error")

    monkeypatch.setattr(HistoryStore, "add_message", fail)
    result = chat_cli(chat_ckpt, "-n", "3", input="Hello\nAgain\n")
    assert result.exit_code == 1
    assert str(result.exception) == "2 of 2 messages failed; see the errors above"
    assert result.stderr.count("disk I/O error") == 2
    assert "saved;" not in result.stderr and "not completely saved" in result.stderr


def options_of(db: Path, conv_id: str) -> str:
    return sqlite3.connect(db).execute("SELECT options FROM conversations WHERE id = ?", (conv_id,)).fetchone()[0]


@pytest.mark.slow
def test_set_refuses_what_the_command_line_refuses(chat_ckpt: Path, home: Path) -> None:
    script = "Hello\n/set seed 99999999999999999999999\n/set temperature inf\n/set top_p nan\n"
    result = chat_cli(chat_ckpt, "-n", "3", input=script)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: seed must be a whole number from 0 to 9223372036854775807 (2**63-1), got 99999999999999999999999",
        "error: temperature must be 0 (greedy) or a number from 0.001 to 1000, got inf",
        "error: top_p must be a number in (0, 1] (1 disables it), got nan"]
    with HistoryStore() as st:
        conv = only_conversation(st)
    assert conv.options["seed"] is None and conv.options["temperature"] == 0 and conv.options["top_p"] == 1
    # the same values on the command line: exit 2, one line naming the option and the value
    for option, value in (("--seed", "99999999999999999999999"), ("--temperature", "inf"), ("--seed", "-1")):
        proc = run_chat(chat_ckpt, home, option, value, stdin=b"Hello\n")
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"error: {option} must be ") and proc.stderr.count("\n") == 1
        assert proc.stderr.rstrip().endswith(f"got {float(value) if value == 'inf' else value}")
    with HistoryStore() as st:
        assert only_conversation(st).messages == conv.messages  # nothing added by the refused runs


@pytest.mark.slow
@pytest.mark.parametrize("bad", [{"seed": 99999999999999999999999}, {"temperature": float("inf")},
                                 {"top_k": -4, "max_tokens": 0}])
def test_resume_skips_a_bad_saved_setting(chat_ckpt: Path, home: Path, bad: dict) -> None:
    first = run_chat(chat_ckpt, home, "-n", "3", stdin=b"Hello\n")
    assert first.returncode == 0, first.stderr
    db = home / "history.db"
    with HistoryStore(db) as st:
        conv = only_conversation(st)
    # as an older lfm2 (or a hand edit) could have saved it; Python's json writes inf as Infinity
    stored = json.dumps({**conv.options, **bad})
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE conversations SET options = ? WHERE id = ?", (stored, conv.id))
    conn.close()
    # no sampling options on the command line: the saved ones are all there is
    again = run_chat(chat_ckpt, home, "--resume", conv.id, stdin=b"Again\n", greedy=False)
    assert again.returncode == 0, again.stderr
    notes = [line for line in again.stderr.splitlines() if "ignored a saved setting" in line]
    assert len(notes) == 1 and conv.id in notes[0]
    for key, value in bad.items():
        assert f"{key} must be" in notes[0] and f"got {value!r}" in notes[0]
    with HistoryStore(db) as st:
        after = only_conversation(st)
    # the earlier messages are as they were, and the new turn got a real reply, not an error
    assert after.messages[:2] == conv.messages
    assert [m.role for m in after.messages[2:]] == ["user", "assistant"]
    assert after.messages[3].finish_reason in ("stop", "length") and after.messages[3].tokens > 0
    assert options_of(db, conv.id) == stored  # nothing was rewritten behind the user's back


@pytest.mark.slow
def test_piped_invalid_utf8_is_replaced_not_fatal(chat_ckpt: Path, home: Path) -> None:
    result = run_chat(chat_ckpt, home, "-n", "3", stdin=b"hello \xff\xfe world\nsecond \xc3\n/exit\n")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "not valid UTF-8" in line]
    assert len(notes) == 1 and "\ufffd" in notes[0]
    with HistoryStore(home / "history.db") as st:
        conv = only_conversation(st)
    assert [m.content for m in conv.messages[::2]] == ["hello \ufffd\ufffd world", "second \ufffd"]
    assert all(m.finish_reason == "length" for m in conv.messages[1::2])
