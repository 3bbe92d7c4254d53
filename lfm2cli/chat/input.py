"""Reading the user's chat messages: a prompt-toolkit prompt on a terminal, plain lines otherwise.

Enter sends the message. Multi-line messages: paste them (bracketed paste keeps the newlines), press
Alt-Enter (or Escape then Enter) for a newline, or type a line that is exactly three double quotes, the
message, and another such line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import has_focus
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

BLOCK_DELIMITER = '"""'


def _block_lines(text: str) -> list[str] | None:
    """The lines inside a `\"\"\"` block if `text` is a complete one, else None."""
    lines = text.split("\n")
    if len(lines) >= 2 and lines[0].strip() == BLOCK_DELIMITER and lines[-1].strip() == BLOCK_DELIMITER:
        return lines[1:-1]
    return None


def _in_open_block(text: str) -> bool:
    """True while the buffer holds a `\"\"\"` block whose closing line has not been typed yet."""
    lines = text.split("\n")
    return lines[0].strip() == BLOCK_DELIMITER and (len(lines) == 1 or lines[-1].strip() != BLOCK_DELIMITER)


def _message(text: str) -> str:
    inner = _block_lines(text)
    return "\n".join(inner) if inner is not None else text


class SlashCompleter(Completer):
    """Completes `/command` names, with each command's help as the menu's meta text."""

    def __init__(self, commands: dict[str, str]) -> None:
        self.commands = {"/" + name.lstrip("/"): help_text for name, help_text in commands.items()}

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        word = document.text_before_cursor
        # only the command word itself: the first word of a message that starts with "/"
        if not word.startswith("/") or any(ch.isspace() for ch in word):
            return
        for name, help_text in sorted(self.commands.items()):
            if name.startswith(word):
                yield Completion(name, start_position=-len(word), display_meta=help_text)


def _key_bindings(completer: Completer) -> KeyBindings:
    bindings = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER)

    @bindings.add("tab", filter=editing)
    def _complete(event: KeyPressEvent) -> None:
        # Completing synchronously: the default waits for the background completer, so a Tab typed
        # right after the text (or sent with it) would be lost.
        buffer = event.current_buffer
        if buffer.complete_state:
            buffer.complete_next()
            return
        found = list(completer.get_completions(buffer.document, CompleteEvent(completion_requested=True)))
        if len(found) == 1:
            buffer.apply_completion(found[0])
        elif found:
            buffer.start_completion(insert_common_part=True)

    @bindings.add("enter", filter=editing)
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if _in_open_block(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter", filter=editing)
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


def _history(history_file: Path) -> History:
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history_file.touch(exist_ok=True)
    except OSError:
        return InMemoryHistory()  # an unwritable data dir should not stop the chat, only the recall
    return FileHistory(str(history_file))


class ChatInput:
    """The interactive prompt. `read()` returns one message; Ctrl-D raises EOFError, Ctrl-C KeyboardInterrupt."""

    def __init__(
        self,
        history_file: Path,
        commands: dict[str, str],
        input=None,
        output=None,
        *,
        message: str = "> ",
    ) -> None:
        self.completer = SlashCompleter(commands)
        self.session: PromptSession[str] = PromptSession(
            message=message,
            multiline=True,  # Enter is rebound above; multiline gives continuation lines and up/down editing
            prompt_continuation=lambda width, line_number, wrap_count: "." * (width - 1) + " ",
            history=_history(Path(history_file)),
            completer=self.completer,
            complete_while_typing=True,
            key_bindings=_key_bindings(self.completer),
            enable_open_in_editor=False,
            input=input,
            output=output,
        )

    def read(self) -> str:
        """Wait for the next message; a `\"\"\"` block comes back without its delimiter lines."""
        return _message(self.session.prompt())


def replace_undecodable(text: str) -> str:
    """`text` with the bytes that were not UTF-8 as U+FFFD. Python keeps such bytes in command-line arguments
    (and in stdin, in the C locale) as lone surrogates, which neither the tokenizer nor SQLite accepts."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that was never a byte
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


class LineInput:
    """The same `read()` for a stdin that is not a terminal: one line per message, or a `\"\"\"` block.

    Bytes that are not UTF-8 become U+FFFD, so a stray byte costs a character, never the session; `on_note`
    hears about it once."""

    def __init__(self, stream: TextIO | BinaryIO, on_note: Callable[[str], None] | None = None) -> None:
        self.stream = stream
        self.on_note = on_note
        self._noted = False

    def _line(self) -> str | None:
        line = self.stream.readline()
        if not line:
            return None
        if isinstance(line, bytes):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("utf-8", "replace")
                self._note()
        else:
            text = replace_undecodable(line)
            if text != line:
                self._note()
        return text.rstrip("\r\n")

    def _note(self) -> None:
        if not self._noted and self.on_note is not None:
            self.on_note("note: the input is not valid UTF-8; its undecodable bytes were replaced with \ufffd")
        self._noted = True

    def read(self) -> str:
        line = self._line()
        if line is None:
            raise EOFError
        if line.strip() != BLOCK_DELIMITER:
            return line
        lines: list[str] = []
        # an unterminated block at end of input is still sent: the input simply ended
        while (line := self._line()) is not None and line.strip() != BLOCK_DELIMITER:
            lines.append(line)
        return "\n".join(lines)
