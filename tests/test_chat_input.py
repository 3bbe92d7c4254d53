"""The chat prompt, driven with prompt-toolkit's pipe input as if keys were typed."""

from __future__ import annotations

import io

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from lfm2cli.chat.input import ChatInput, LineInput, SlashCompleter, replace_undecodable

COMMANDS = {"/help": "show the commands", "/exit": "leave the chat", "history": "past chats", "/reset": "new"}
ENTER = "\r"
ALT_ENTER = "\x1b\r"
UP = "\x1b[A"


def typed(keys: str, history_file, commands=COMMANDS) -> str:
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        return ChatInput(history_file, commands, input=pipe, output=DummyOutput()).read()


@pytest.fixture
def history_file(tmp_path):
    return tmp_path / "data" / "input_history"


def test_enter_returns_the_typed_line(history_file):
    assert typed("hello there" + ENTER, history_file) == "hello there"


def test_line_editing_keys_work(history_file):
    # Left arrow twice, then insert: the cursor moved inside the line
    assert typed("helo\x1b[D\x1b[Dl" + ENTER, history_file) == "hello"


def test_escape_enter_inserts_a_newline(history_file):
    assert typed("first" + ALT_ENTER + "second" + ENTER, history_file) == "first\nsecond"


def test_bracketed_paste_keeps_newlines(history_file):
    pasted = "\x1b[200~line1\nline2\r\nline3\x1b[201~"
    assert typed(pasted + ENTER, history_file) == "line1\nline2\nline3"


def test_triple_quote_block_is_one_message(history_file):
    keys = '"""' + ENTER + "one" + ENTER + ENTER + "  three" + ENTER + '"""' + ENTER
    assert typed(keys, history_file) == "one\n\n  three"


def test_triple_quotes_inside_a_line_do_not_start_a_block(history_file):
    assert typed('say """hi"""' + ENTER, history_file) == 'say """hi"""'


def test_history_is_recalled_in_a_later_session(history_file):
    assert typed("the first question" + ENTER, history_file) == "the first question"
    assert typed("second" + ALT_ENTER + "question" + ENTER, history_file) == "second\nquestion"
    assert history_file.exists()
    assert typed(UP + ENTER, history_file) == "second\nquestion"
    assert typed(UP + UP + UP + ENTER, history_file) == "the first question"


def test_a_recalled_block_is_sent_as_a_block(history_file):
    assert typed('"""' + ENTER + "a" + ENTER + "b" + ENTER + '"""' + ENTER, history_file) == "a\nb"
    assert typed(UP + ENTER, history_file) == "a\nb"


def test_ctrl_d_raises_eof(history_file):
    with pytest.raises(EOFError):
        typed("\x04", history_file)


def test_ctrl_c_raises_keyboard_interrupt(history_file):
    with pytest.raises(KeyboardInterrupt):
        typed("half a message\x03", history_file)


def test_tab_completes_a_slash_command(history_file):
    assert typed("/he\t" + ENTER, history_file) == "/help"
    assert typed("/hi\t" + ENTER, history_file) == "/history"  # names without the slash get one
    assert typed("/zz\t" + ENTER, history_file) == "/zz"
    assert typed("ask /he\t" + ENTER, history_file) == "ask /he"  # only at the start of a message


def test_completer_offers_matching_commands_with_help():
    completer = SlashCompleter(COMMANDS)

    def complete(text: str):
        return list(completer.get_completions(Document(text), CompleteEvent(completion_requested=True)))

    found = complete("/h")
    assert [c.text for c in found] == ["/help", "/history"]
    assert [c.display_meta_text for c in found] == ["show the commands", "past chats"]
    assert all(c.start_position == -2 for c in found)
    assert len(complete("/")) == 4
    assert complete("hello") == []
    assert complete("/help me") == []


def test_unwritable_history_location_still_reads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert typed("fine" + ENTER, blocker / "input_history") == "fine"


def test_line_input_reads_lines_and_blocks():
    stream = io.StringIO('first line\r\n"""\nblock one\n\nblock three\n"""\nlast\n"""\nunterminated\n')
    reader = LineInput(stream)
    assert reader.read() == "first line"
    assert reader.read() == "block one\n\nblock three"
    assert reader.read() == "last"
    assert reader.read() == "unterminated"
    with pytest.raises(EOFError):
        reader.read()


def test_line_input_keeps_an_empty_line_and_a_last_line_without_newline():
    reader = LineInput(io.StringIO("\nno newline"))
    assert reader.read() == ""
    assert reader.read() == "no newline"
    with pytest.raises(EOFError):
        reader.read()


def test_line_input_replaces_bytes_that_are_not_utf8_and_says_so_once():
    notes = []
    reader = LineInput(io.BytesIO(b"hello \xff\xfe world\r\n\xc3\n\"\"\"\nblock \xe9\n\"\"\"\nfine \xc3\xa9\n"),
                       on_note=notes.append)
    assert reader.read() == "hello \ufffd\ufffd world"
    assert reader.read() == "\ufffd"
    assert reader.read() == "block \ufffd"
    assert reader.read() == "fine \u00e9"
    with pytest.raises(EOFError):
        reader.read()
    assert len(notes) == 1 and "not valid UTF-8" in notes[0]


def test_line_input_replaces_escaped_bytes_of_a_text_stream():
    # Python's stdin in the C locale keeps a bad byte as a lone surrogate (surrogateescape)
    notes = []
    reader = LineInput(io.StringIO("caf\udce9\nplain\n\ud800x\n"), on_note=notes.append)
    assert reader.read() == "caf\ufffd"
    assert reader.read() == "plain"
    assert reader.read() == "?x"  # a surrogate that was never a byte
    assert len(notes) == 1
    assert replace_undecodable("ok") == "ok"
