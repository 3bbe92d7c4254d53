"""Thinking models in `lfm2 chat`: the reply split into reasoning and answer, how each is shown (--think, /think),
what the history keeps, what the template gets back, and the cache reuse across turns after a thinking reply.

A tiny checkpoint never thinks by itself, so the sampler is replaced by a script of token ids (the model still runs
every forward pass, so the cache is real); the scripts use LFM2.5's layout: `<think>`, the reasoning, `</think>`,
a blank line, the answer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lfm2cli.chat.input import LineInput
from lfm2cli.chat.repl import ChatLoop, ChatUI
from lfm2cli.chat.session import ChatSession
from lfm2cli.cli import app
from lfm2cli.decoding.sampling import SamplingParams
from lfm2cli.loading.loader import LoadedModel, load
from lfm2cli.store.conversations import HistoryStore, to_json, to_markdown
from lfm2cli.text.tokenizer import load_tokenizer
from tests.helpers import LONG, Script, assert_cache_holds, screen, thinking_copy
from tests.tiny_tokenizer import SHARED_TEMPLATES

runner = CliRunner()
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
LFM25_TEMPLATE = SHARED_TEMPLATES / "chat_template_lfm2.5.jinja"

REASONING = "The user says hello. I should greet them back."
ANSWER = "Hello! How can I help?"
RAW = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"


# ---------------------------------------------------------------- fixtures and the scripted model

@pytest.fixture(scope="module")
def lfm25_ckpt(chat_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real LFM2.5 template (it drops the blocks of all but the last reply unless keep_past_thinking)."""
    if not LFM25_TEMPLATE.is_file():
        pytest.skip(f"{LFM25_TEMPLATE} is not checked out")
    return thinking_copy(chat_ckpt, tmp_path_factory.mktemp("lfm25") / "ckpt",
                          template=LFM25_TEMPLATE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def think_lm(think_ckpt: Path) -> LoadedModel:
    return load(think_ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lfm25_lm(lfm25_ckpt: Path) -> LoadedModel:
    return load(lfm25_ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def opening_lm(opening_ckpt: Path) -> LoadedModel:
    return load(opening_ckpt, device="cpu", dtype="float32")


def session(lm: LoadedModel, store: HistoryStore, max_tokens: int = 64, **kw) -> ChatSession:
    return ChatSession(lm, store, "tiny", GREEDY, max_tokens, **kw)


def ids_of(path: Path, text: str) -> list[int]:
    return load_tokenizer(path).encode(text)


# ---------------------------------------------------------------- the split and the store

def test_reply_is_split_and_the_store_keeps_reasoning_apart(think_lm: LoadedModel, think_ckpt: Path,
                                                            store: HistoryStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW)
    s = session(think_lm, store)
    pieces: list[str] = []
    r = s.send("Hello", pieces.append)
    assert (r.text, r.reasoning) == (ANSWER, REASONING)
    assert "".join(p for p in pieces if type(p).__name__ == "Reasoning") == REASONING
    assert "".join(p for p in pieces if type(p).__name__ == "Answer") == ANSWER
    # every generated token up to the blank line after </think> went to the reasoning
    assert r.thought_tokens == s.thought_tokens == len(ids_of(think_ckpt, f"<think>\n{REASONING}\n</think>\n\n"))
    reply = store.get(s.conversation_id).messages[1]
    assert (reply.content, reply.reasoning, reply.raw_content) == (ANSWER, REASONING, RAW)
    assert reply.timings["reasoning_tokens"] == r.thought_tokens and reply.finish_reason == "stop"
    # a reply without a block stays as it always was: no reasoning, no second copy of its text
    Script(monkeypatch, think_ckpt, "Just an answer.")
    r = s.send("Again")
    assert (r.text, r.reasoning, r.thought_tokens) == ("Just an answer.", "", 0)
    plain = store.get(s.conversation_id).messages[3]
    assert (plain.content, plain.reasoning, plain.raw_content) == ("Just an answer.", None, None)
    assert "reasoning_tokens" not in plain.timings


def test_a_reply_cut_inside_its_block_is_all_reasoning(think_lm: LoadedModel, think_ckpt: Path,
                                                       store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW)
    s = session(think_lm, store, max_tokens=5)
    r = s.send("Hello")
    assert r.text == "" and r.reasoning and REASONING.startswith(r.reasoning)
    assert r.stats.finish_reason == "length" and r.thought_tokens == 5
    reply = store.get(s.conversation_id).messages[1]
    assert (reply.content, reply.finish_reason, reply.thinking_only) == ("", "length", True)
    assert "length while thinking" in to_markdown(store.get(s.conversation_id))


# ---------------------------------------------------------------- what the template gets back; the cache

@pytest.mark.slow
def test_lfm25_next_turn_prefills_only_new_tokens_then_rewinds_when_the_block_is_dropped(
        lfm25_lm: LoadedModel, lfm25_ckpt: Path, store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = f"<think>\nThe user talks about language models.\n</think>\n\n{ANSWER}"
    Script(monkeypatch, lfm25_ckpt, first, "<think>\nParis, of course.\n</think>\n\nParis.", "Eight.")
    s = session(lfm25_lm, store)
    s.send(LONG)
    ids1 = s.prompt_ids(s.messages[:-1])
    before = list(s.cached_ids)

    # turn 2: the thinking reply is the last one, which LFM2.5 keeps as written: the cache is a prefix
    r = s.send("What is the capital of France?")
    full = s.prompt_ids(s.messages[:-1])
    assert first in s.prompt_text(s.messages[:-1])
    assert full[:len(before)] == before
    assert s.last_prefill_tokens == r.stats.prompt_tokens == len(full) - len(before) < len(full) // 3
    assert_cache_holds(s)

    # turn 3: the first reply is no longer the last, so the template drops its block: back to the snapshot
    # taken before that reply, not to the start, and the cache still holds exactly the new prompt
    s.send("How many legs does a spider have?")
    full3 = s.prompt_ids(s.messages[:-1])
    text3 = s.prompt_text(s.messages[:-1])
    assert "language models." not in text3 and f"<|im_start|>assistant\n{ANSWER}<|im_end|>" in text3
    assert "Paris, of course." in text3  # the last reply keeps its reasoning
    assert s.last_prefill_tokens == len(full3) - (len(ids1) - 1)
    assert_cache_holds(s)

    # the store gives the same prompt back to a resumed session: each reply exactly as it was generated
    fresh = session(lfm25_lm, store)
    fresh.load(s.conversation_id)
    assert fresh.prompt_text() == s.prompt_text()


@pytest.mark.slow
def test_keep_thinking_shows_past_blocks_and_keeps_the_cache(lfm25_lm: LoadedModel, lfm25_ckpt: Path,
                                                             store: HistoryStore,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, lfm25_ckpt, f"<think>\nFirst thoughts.\n</think>\n\n{ANSWER}",
           "<think>\nParis.\n</think>\n\nParis.", "Eight.")
    s = session(lfm25_lm, store, keep_thinking=True)
    s.send(LONG)
    s.send("What is the capital of France?")
    before = list(s.cached_ids)
    s.send("How many legs does a spider have?")
    full = s.prompt_ids(s.messages[:-1])
    assert "First thoughts." in s.prompt_text()
    assert full[:len(before)] == before and s.last_prefill_tokens == len(full) - len(before)
    assert_cache_holds(s)


@pytest.mark.slow
def test_a_template_that_keeps_replies_as_they_are_never_rewinds(think_lm: LoadedModel, think_ckpt: Path,
                                                                  store: HistoryStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW, "<think>\nParis.\n</think>\n\nParis.", RAW)
    s = session(think_lm, store)
    s.send(LONG)
    for q in ["What is the capital of France?", "How many legs does a spider have?"]:
        before = list(s.cached_ids)
        s.send(q)
        full = s.prompt_ids(s.messages[:-1])
        assert full[:len(before)] == before and s.last_prefill_tokens == len(full) - len(before)
        assert_cache_holds(s)


@pytest.mark.slow
def test_a_prompt_that_opens_the_block(opening_lm: LoadedModel, opening_ckpt: Path, store: HistoryStore,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # the template wrote `<think>\n`; the model only continues and closes the block
    Script(monkeypatch, opening_ckpt, f"{REASONING}\n</think>\n\n{ANSWER}", "Paris.\n</think>\n\nParis.")
    s = session(opening_lm, store)
    r = s.send(LONG)
    assert (r.text, r.reasoning) == (ANSWER, REASONING)
    reply = store.get(s.conversation_id).messages[1]
    assert reply.raw_content == RAW  # the reply as the template must get it back: the block opened
    before = list(s.cached_ids)
    s.send("What is the capital of France?")
    full = s.prompt_ids(s.messages[:-1])
    assert full[:len(before)] == before and s.last_prefill_tokens == len(full) - len(before)
    assert_cache_holds(s)


# ---------------------------------------------------------------- display



def run_loop(lm: LoadedModel, store: HistoryStore, lines: str, *, plain: bool, think: str = "fold",
             terminal: bool = False) -> tuple[str, str, ChatSession]:
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=out, width=60, height=20, force_terminal=terminal, color_system="standard")
    ui = ChatUI(console, Console(file=err, width=200), plain=plain)
    s = session(lm, store)
    ChatLoop(s, LineInput(io.StringIO(lines)), ui, think=think).run()
    return out.getvalue(), err.getvalue(), s


@pytest.mark.slow
@pytest.mark.parametrize("think", ["show", "hide", "fold"])
def test_plain_output_never_gets_the_reasoning(think: str, think_lm: LoadedModel, think_ckpt: Path,
                                               store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW)
    out, err, s = run_loop(think_lm, store, "Hello\n", plain=True, think=think)
    assert out == ANSWER + "\n"
    n = s.thought_tokens
    assert n > 0
    if think == "show":
        assert f"{REASONING}\n" in err and "thought for" not in err
    elif think == "fold":
        assert REASONING not in err and f"thought for {n} tokens\n" in err
    else:
        assert REASONING not in err and "thought for" not in err


@pytest.mark.slow
@pytest.mark.parametrize("think", ["show", "hide", "fold"])
def test_terminal_reasoning_is_dimmed_then_kept_hidden_or_folded(think: str, think_lm: LoadedModel,
                                                                  think_ckpt: Path, store: HistoryStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW)
    raw, err, s = run_loop(think_lm, store, "Hello\n", plain=False, think=think, terminal=True)
    shown = "\n".join(screen(raw))
    assert ANSWER in shown
    fold = f"thought for {s.thought_tokens} tokens"
    if think == "show":
        assert "\x1b[2m" in raw  # dimmed
        assert shown.index("The user says hello.") < shown.index(ANSWER) and fold not in shown
    elif think == "fold":
        assert "\x1b[2mThe" in raw  # it streamed, dimmed (the first draw; later ones are throttled) ...
        assert "The user" not in shown and shown.index(fold) < shown.index(ANSWER)  # ... then folded
    else:
        assert "thinking…" in raw  # a status while it ran, gone after
        assert "The user" not in shown and "thought for" not in shown and "thinking" not in shown
    assert REASONING not in err


def test_a_reply_without_reasoning_shows_no_fold_line(think_lm: LoadedModel, think_ckpt: Path, store: HistoryStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, "Plain answer.")
    out, err, _ = run_loop(think_lm, store, "Hello\n", plain=True)
    assert out == "Plain answer.\n" and "thought" not in err


@pytest.mark.slow
def test_think_command(think_lm: LoadedModel, think_ckpt: Path, store: HistoryStore,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW, RAW)
    out, err, s = run_loop(think_lm, store, "/think\n/think SHOW\n/think\nHello\n/think bogus\n/think hide\nAgain\n",
                           plain=True)
    assert "think fold" in err and "think = show" in err and "think show" in err
    assert "/think takes show, hide, fold, not 'bogus'" in err
    assert err.count(REASONING) == 1  # shown for the first reply, hidden for the second
    assert out == f"{ANSWER}\n{ANSWER}\n"
    # a way of looking, not a setting of the conversation
    assert "think" not in store.get(s.conversation_id).options


# ---------------------------------------------------------------- the command

def chat(ckpt: Path, *args: str, input: str):
    return runner.invoke(app, ["chat", str(ckpt), "-t", "0", "--device", "cpu", "--dtype", "float32", *args],
                         input=input)


@pytest.mark.slow
def test_cli_think_keep_thinking_resume_and_exports(lfm25_ckpt: Path, home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    replies = [f"<think>\nFirst thoughts.\n</think>\n\n{ANSWER}", "<think>\nParis.\n</think>\n\nParis.", "Eight."]
    messages = "Hello\nWhat is the capital of France?\nHow many legs?\n"
    for keep in (False, True):
        script = Script(monkeypatch, lfm25_ckpt, *replies)
        result = chat(lfm25_ckpt, *(["--keep-thinking"] if keep else []), "--think", "show", input=messages)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{ANSWER}\nParis.\nEight.\n"  # answers only
        assert "First thoughts." in result.stderr and "Paris." in result.stderr
        third = load_tokenizer(lfm25_ckpt).decode(script.seen[2], skip_special_tokens=False)
        assert ("First thoughts." in third) is keep  # the template got keep_past_thinking
        assert "Paris." in third  # the last reply's block is always there
    with HistoryStore() as st:
        conv = st.get(st.list()[0].id)
    reply = conv.messages[1]
    assert (reply.content, reply.reasoning) == (ANSWER, "First thoughts.")
    data = json.loads(to_json(conv))
    assert [m["reasoning"] for m in data["messages"]] == [None, "First thoughts.", None, "Paris.", None, None]

    # --continue: the recap says a reply thought, and shows its answer, not its reasoning
    Script(monkeypatch, lfm25_ckpt)
    again = runner.invoke(app, ["chat", "--device", "cpu", "--dtype", "float32", "-c"], input="")
    assert again.exit_code == 0, again.output
    assert "assistant: Eight." in again.stderr and "First thoughts" not in again.stderr
    bad = chat(lfm25_ckpt, "--think", "loud", input="")
    assert bad.exit_code == 2 and "'loud' is not one of 'show', 'hide', 'fold'" in bad.output


@pytest.mark.slow
def test_cli_piped_fold_writes_one_line_to_stderr(think_ckpt: Path, home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, think_ckpt, RAW)
    result = chat(think_ckpt, input="Hello\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    n = len(ids_of(think_ckpt, f"<think>\n{REASONING}\n</think>\n\n"))
    assert f"thought for {n} tokens\n" in result.stderr and REASONING not in result.stderr
    with HistoryStore() as st:
        conv = st.get(st.list()[0].id)
    assert "(thought)" in chat_recap(conv)


def chat_recap(conv) -> str:
    from lfm2cli.chat.repl import _recap_line
    from lfm2cli.chat.session import ChatMessage

    return "\n".join(_recap_line(ChatMessage(m.role, m.content, m.id, m.finish_reason, m.reasoning))
                     for m in conv.messages)


def test_history_show_and_markdown_keep_the_reasoning_apart(home: Path) -> None:
    from lfm2cli.commands.history import render_conversation

    with HistoryStore() as st:
        conv = st.create_conversation("m")
        st.add_message(conv.id, "user", "Hello")
        st.add_message(conv.id, "assistant", "It is **4**.", tokens=20, finish_reason="stop",
                       timings={"reasoning_tokens": 12}, reasoning="Two and two.\n\nThat is 4.", raw_content="x")
        got = st.get(conv.id)
    md = to_markdown(got)
    assert ("## Assistant\n\n<details><summary>thought for 12 tokens</summary>\n\n> Two and two.\n>\n"
            "> That is 4.\n\n</details>\n\nIt is **4**.") in md
    buf = io.StringIO()
    render_conversation(Console(file=buf, width=100, force_terminal=True, color_system="standard"), got)
    shown = buf.getvalue()
    assert "\x1b[2mTwo and two." in shown and "thought for 12 tokens" in shown
    assert shown.index("That is 4.") < shown.index("It is")
    piped = runner.invoke(app, ["history", "show", conv.id])
    assert piped.exit_code == 0 and "> Two and two." in piped.stdout
