"""The chat loop and its slash commands, over a `ChatSession`, a reader and a `ChatUI`.

Tools (`--functions`): a reply that calls tools starts a loop here. Each call is shown, confirmed by the user (or
not, with --yes-tools; piped, it is declined), run, and its result stored; then the model answers the results,
for at most MAX_TOOL_ROUNDS rounds per message.

The reader is `ChatInput` (prompt-toolkit, on a terminal) or `LineInput` (anything else); both raise
EOFError at the end and KeyboardInterrupt on Ctrl-C. Replies go to the UI's reply console; everything
else (banner, notes, command output, stats) goes to its second console, stderr in the real command.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from lfm2cli.chat.session import ChatMessage, ChatSession, TurnResult
from lfm2cli.errors import HistoryError, Lfm2Error, UsageError
from lfm2cli.reply.functions import FunctionSet, ToolResult, describe
from lfm2cli.reply.thinking import Reasoning
from lfm2cli.reply.toolcalls import ToolCall
from lfm2cli.store.conversations import call_label, finish_label, shorten, thought_label
from lfm2cli.terminal.formatting import local_time
from lfm2cli.terminal.render import THOUGHT_MODES, PlainStream, ThoughtStream, make_stream, print_sections, stats_footer
from lfm2cli.terminal.safetext import visible
from lfm2cli.terminal.streams import ReaderGone, StdoutFailed

# name -> (arguments, help); the completer shows the help next to each name
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "show the commands"),
    "exit": ("", "leave the chat (also /quit or Ctrl-D)"),
    "quit": ("", "leave the chat"),
    "new": ("", "start a new conversation"),
    "system": ("[TEXT|-]", "show the system prompt, set it, or remove it with -"),
    "set": ("[NAME VALUE]", "show the settings, or change one (e.g. /set temperature 0.5)"),
    "retry": ("", "regenerate the last reply"),
    "undo": ("", "drop the last exchange"),
    "history": ("", "list saved conversations"),
    "load": ("ID", "switch to a saved conversation (an id prefix is enough)"),
    "save": ("FILE", "export this conversation: FILE.json as JSON, anything else as Markdown"),
    "info": ("", "describe the model"),
    "stats": ("", "statistics of the last reply and of this session"),
    "think": ("[show|hide|fold]", "how a thinking model's reasoning is shown (no argument: the current way)"),
    "tools": ("", "list the tools the model may call (chat --functions FILE.py)"),
}
EXIT_HINT = "(Ctrl-D or /exit to leave)"
RECAP_MESSAGES = 2  # messages shown when a saved conversation is resumed
# Rounds of tool calls (a reply's calls run, then the reply to their results) for one message of the user: a model
# that keeps calling is stopped, not looped forever.
MAX_TOOL_ROUNDS = 8
RESULT_CHARS = 100  # a tool result as shown on screen (the model gets it whole)


def completions() -> dict[str, str]:
    """Command names and help, as `ChatInput` wants them."""
    return {name: help_text for name, (_, help_text) in COMMANDS.items()}


class ChatUI:
    """Where the chat writes. `console` gets the replies; `err` everything else. `plain` prints replies
    as they are generated instead of rendering markdown."""

    def __init__(self, console: Console, err: Console, plain: bool) -> None:
        self.console = console
        self.err = err
        self.plain = plain

    def stream(self, plain: bool = False) -> Any:
        """The answer's stream: markdown on a terminal; plain text with --plain, when piped, or when asked
        (`plain`: answers that are JSON, which markdown would mangle)."""
        if self.plain or plain:
            return PlainStream(self.console.file, err=self.err.file)
        return make_stream(self.console, plain=False)

    def thoughts(self, mode: str) -> ThoughtStream:
        """Where a reply's reasoning goes: on the reply console when it is a terminal; with plain output on the
        second console (stderr), so that piped stdout only ever holds answers."""
        if self.plain:
            return ThoughtStream(self.err, mode, live=False)
        return ThoughtStream(self.console, mode)

    def say(self, text: str, style: str | None = None) -> None:
        # Text, not markup: user content such as "[x]" prints as typed; soft_wrap keeps lines whole
        # visible(): names and errors may come from the model or a server, and must not drive the terminal
        self.err.print(Text(visible(text), style=style or ""), soft_wrap=True)

    def note(self, text: str) -> None:
        self.say(text, "dim")

    def warn(self, text: str) -> None:
        self.say(text, "yellow")

    def error(self, text: str) -> None:
        self.say(f"error: {text}", "red")


class ReplyView:
    """One reply on screen: reasoning pieces to a `ThoughtStream`, answer pieces to the answer stream. The
    reasoning ends (folds) when the first answer piece comes, or with the reply."""

    def __init__(self, ui: ChatUI, think: str, thought_tokens: Callable[[], int], plain: bool = False) -> None:
        self.answer = ui.stream(plain)
        self.thoughts = ui.thoughts(think)
        self._tokens = thought_tokens
        self._thinking = False

    def feed(self, piece: str) -> None:
        if isinstance(piece, Reasoning):
            self._thinking = True
            self.thoughts.feed(piece)
            return
        self._end_thoughts()
        self.answer.feed(piece)

    def _end_thoughts(self) -> None:
        if self._thinking:
            self._thinking = False
            self.thoughts.end(thought_label(self._tokens()))

    def finish(self) -> None:
        self._end_thoughts()
        self.answer.finish()

    def abort(self, note: str | None = None) -> None:
        self._end_thoughts()
        self.answer.abort(note)


class ChatLoop:
    """Reads messages and commands until EOF or /exit. `think`: how reasoning is shown (show, hide or fold).

    `functions` run the tool calls (the session offers their schemas). `confirm(question)` asks the user and returns
    the line typed (None at end of input); None: nobody can answer, so calls are declined unless `yes_tools`."""

    def __init__(self, session: ChatSession, reader: Any, ui: ChatUI, think: str = "fold",
                 functions: FunctionSet | None = None, confirm: Callable[[str], str | None] | None = None,
                 yes_tools: bool = False) -> None:
        if think not in THOUGHT_MODES:
            raise UsageError(f"--think must be one of {', '.join(THOUGHT_MODES)}, not {think!r}")
        self.session = session
        self.reader = reader
        self.ui = ui
        self.think = think
        self.functions = functions
        self.confirm = confirm
        self.allow_all = yes_tools  # "a" at a confirmation sets it for the rest of the session
        self._declined_note = False
        session.on_notice = ui.warn
        self.turns = 0  # messages sent and /retry, for a script's exit status
        self.failed_turns = 0
        self.unsaved = False  # a write to the history failed: "saved" would be a lie

    def run(self) -> None:
        while True:
            try:
                line = self.reader.read()
            except EOFError:
                self.farewell()
                return
            except KeyboardInterrupt:
                # Ctrl-C on a half-typed line just clears it; on an empty prompt, say how to leave
                if not self._pending_input():
                    self.ui.note(EXIT_HINT)
                continue
            if not line.strip():
                continue
            try:
                if line.startswith("/") and not line.startswith("//"):
                    if self.command(line) == "exit":
                        self.farewell()
                        return
                else:
                    self.send(line)
            except HistoryError as e:
                self.unsaved = True
                self.ui.error(str(e))
            except Lfm2Error as e:
                self.ui.error(str(e))
            except KeyboardInterrupt:
                self.ui.note("interrupted")
            except (ReaderGone, StdoutFailed, BrokenPipeError):
                raise  # the output is gone: no later turn could be shown either
            except Exception as e:  # model output is untrusted: whatever it breaks ends this turn only
                self._turn_failed(e)

    def _turn_failed(self, e: Exception) -> None:
        """An unexpected error in one message or command: one line, and the chat goes on with the conversation as
        it was stored (a reply cut by the error is kept with finish reason "error")."""
        if os.environ.get("LFM2_DEBUG") == "1":
            self.ui.err.print(traceback.format_exc(), markup=False, highlight=False)
        message = " ".join(str(e).split())[:300]
        self.ui.error(f"this message failed ({type(e).__name__}{': ' + message if message else ''}); the "
                      "conversation is kept and the chat goes on (LFM2_DEBUG=1 shows the traceback)")

    def farewell(self) -> None:
        """Leaving: say where the conversation went, so it is easy to find again."""
        conv_id = self.session.conversation_id
        if conv_id is not None and self.unsaved:
            self.ui.warn(f"conversation {conv_id} is not completely saved: writing the history failed (see above)")
        elif conv_id is not None:
            self.ui.note(f"conversation {conv_id} saved; lfm2 chat --resume {conv_id} picks it up again")

    def send(self, line: str) -> None:
        # a leading "//" sends a message that starts with a slash
        text = line[1:] if line.startswith("//") else line
        self._exchange(lambda feed: self.session.send(text, feed))

    def _exchange(self, produce: Callable[[Callable[[str], None]], TurnResult]) -> None:
        """One message's replies: the first, then the tool loop. A failure anywhere in it fails the message."""
        self.turns += 1
        try:
            failed = not self._tool_loop(self._show_reply(produce))
        except BaseException as e:
            if not isinstance(e, KeyboardInterrupt):
                self.failed_turns += 1
            raise
        if failed:
            self.failed_turns += 1

    def _tool_loop(self, result: TurnResult) -> bool:
        """Run the calls of `result`, let the model answer them, and repeat while it calls. Returns False when
        a reply broke its grammar's promise (cut before its output was complete)."""
        ok = result.incomplete is None
        rounds = 0
        while result.tool_calls and not result.interrupted:
            if self.functions is None:  # calls are only read when tools were offered
                return ok
            if rounds == MAX_TOOL_ROUNDS:
                self.ui.warn(f"stopped after {MAX_TOOL_ROUNDS} rounds of tool calls for this message; the last "
                             "calls were not run (send another message to go on)")
                return ok
            rounds += 1
            try:
                for call_id, call in result.tool_calls:
                    self._run_call(call_id, call)
            except KeyboardInterrupt:
                # what was stored stays: the calls, and the results of those that ran
                self.ui.note("tool calls cancelled; the model was not asked to go on")
                return ok
            result = self._show_reply(self.session.follow_up)
            ok = ok and result.incomplete is None
        return ok

    def _run_call(self, call_id: str, call: ToolCall) -> None:
        assert self.functions is not None
        self.ui.say(f"tool call: {describe(call)}", "cyan")
        if self._allowed(call):
            result = self.functions.call(call)
        else:
            # the model reads this, so it can tell the user or try something else
            result = ToolResult(call.name, f"error: the user declined to run {call.name}", error=True)
        self.session.add_tool_result(call_id, result.name, result.content)
        self.ui.note(f"  → {shorten(result.content, RESULT_CHARS)}")

    def _allowed(self, call: ToolCall) -> bool:
        if self.allow_all:
            return True
        if self.confirm is None:
            if not self._declined_note:
                self._declined_note = True
                self.ui.warn("note: tool calls are declined: there is no terminal to confirm them on; pass "
                             "--yes-tools to run them")
            return False
        while True:
            answer = self.confirm(f"run {call.name}? [y]es, [n]o, [a]ll for this session: ")
            if answer is None:
                return False
            word = answer.strip().lower()
            if word in ("y", "yes"):
                return True
            if word in ("", "n", "no"):
                return False
            if word in ("a", "all"):
                self.allow_all = True
                return True
            self.ui.note("answer y, n or a")

    def _pending_input(self) -> str:
        buffer = getattr(getattr(self.reader, "session", None), "default_buffer", None)
        return getattr(buffer, "text", "") or ""

    def _show_reply(self, produce: Callable[[Callable[[str], None]], TurnResult]) -> TurnResult:
        # JSON answers stream as the text they are
        stream = ReplyView(self.ui, self.think, lambda: self.session.thought_tokens,
                           plain=self.session.grammar is not None)
        try:
            result = produce(stream.feed)
        except BaseException:
            stream.abort(None)
            raise
        if result.interrupted:
            stream.abort("[interrupted]")
        else:
            stream.finish()
            if result.stats.finish_reason == "length":
                if result.stats.length_limit == "context":
                    self.ui.note(f"[stopped: the model's context is full ({result.stats.context_tokens} tokens); "
                                 "/new starts an empty conversation]")
                else:
                    limit = self.session.max_tokens
                    self.ui.note(f"[stopped at the length limit ({limit} tokens); /set max_tokens N allows more]")
        if result.tool_errors:
            more = f" (and {len(result.tool_errors) - 1} more)" if len(result.tool_errors) > 1 else ""
            self.ui.warn(f"note: a tool-call block did not parse ({result.tool_errors[0]}){more}; it is shown as "
                         "text and nothing was run")
        if result.incomplete is not None:
            self.ui.error(f"the reply stopped before its {result.incomplete} output was complete; /set max_tokens N "
                          "allows more")
        line = stats_footer(result.stats.to_dict())
        if line:
            self.ui.note(line)
        return result

    # ------------------------------------------------------------------ commands

    def command(self, line: str) -> str | None:
        """Run one `/command`; returns "exit" when the chat should end."""
        # the name ends at any whitespace, so a multi-line block can start with `/system`
        found = re.match(r"/(\S*)\s*(.*)", line, re.S)
        assert found is not None
        name, arg = found.group(1).lower(), found.group(2).strip()
        handler = getattr(self, f"_cmd_{name}", None)
        if name not in COMMANDS or handler is None:
            self.ui.warn(f"unknown command /{name}; /help lists the commands")
            return None
        return handler(arg)

    def _cmd_help(self, arg: str) -> None:
        width = max(len(f"/{n} {a}".strip()) for n, (a, _) in COMMANDS.items())
        for name, (args, help_text) in COMMANDS.items():
            self.ui.say(f"{f'/{name} {args}'.strip():<{width}}  {help_text}")
        self.ui.note('Alt-Enter or a """ block for several lines; start a message with // to send a leading /.')

    def _cmd_exit(self, arg: str) -> str:
        return "exit"

    _cmd_quit = _cmd_exit

    def _cmd_new(self, arg: str) -> None:
        self.session.new_conversation()
        self.ui.note("new conversation (saved with your first message)")

    def _cmd_system(self, arg: str) -> None:
        if not arg:
            self.ui.say(self.session.system if self.session.system else "(no system prompt)")
            return
        self.session.set_system(None if arg == "-" else arg)
        self.ui.note("system prompt removed" if arg == "-" else "system prompt set")

    def _cmd_set(self, arg: str) -> None:
        if not arg:
            self.ui.say("  ".join(f"{k} {'none' if v is None else v}" for k, v in self.session.options().items()))
            return
        name, _, value = arg.partition(" ")
        if not value.strip():
            raise UsageError(f"/set {name} needs a value, e.g. /set temperature 0.5")
        self.session.set_option(name, value)
        key = name.lower().replace("-", "_")
        self.ui.note(f"{key} = {self.session.options()[key]}")

    def _cmd_think(self, arg: str) -> None:
        # a way of looking at replies, like --plain: not saved with the conversation
        mode = arg.lower()
        if not mode:
            self.ui.say(f"think {self.think}  (show: keep the reasoning on screen; hide: none of it; fold: one "
                        "line once the answer starts)")
            return
        if mode not in THOUGHT_MODES:
            raise UsageError(f"/think takes {', '.join(THOUGHT_MODES)}, not {arg!r}")
        self.think = mode
        self.ui.note(f"think = {mode}")

    def _cmd_retry(self, arg: str) -> None:
        self._exchange(self.session.retry)

    def _cmd_tools(self, arg: str) -> None:
        if self.functions is None:
            self.ui.note("no tools: start the chat with --functions FILE.py to offer a file's functions")
            return
        for tool in self.functions.tools:
            self.ui.say(tool_line(tool))
        how = ("run without asking (--yes-tools or 'a')" if self.allow_all else
               "declined (no terminal to confirm on)" if self.confirm is None else "run after you confirm each")
        self.ui.note(f"from {self.functions.path}; calls are {how}")

    def _cmd_undo(self, arg: str) -> None:
        n = self.session.undo()
        self.ui.note(f"dropped the last {'exchange' if n > 1 else 'message'}")

    def _cmd_history(self, arg: str) -> None:
        convs = self.session.store.list(limit=20)
        if not convs:
            self.ui.note("no saved conversations yet")
            return
        for c in convs:
            mark = "*" if c.id == self.session.conversation_id else " "
            when = local_time(c.updated_at)
            self.ui.say(f"{mark} {c.id}  {when}  {c.message_count:>3} msgs  {shorten(c.display_title, 50)}")

    def _cmd_load(self, arg: str) -> None:
        if not arg:
            raise UsageError("/load needs a conversation id; /history lists them")
        self.session.load(arg)
        self.recap()

    def _cmd_save(self, arg: str) -> None:
        if not arg:
            raise UsageError("/save needs a file name, e.g. /save chat.md or /save chat.json")
        path = self.session.export(arg)
        kind = "JSON" if path.suffix.lower() == ".json" else "Markdown"
        self.ui.note(f"saved {len(self.session.messages)} messages to {path} ({kind})")

    def _cmd_info(self, arg: str) -> None:
        from lfm2cli.loading.describe import describe, plain_lines, sections

        s = self.session
        if s.lm is None:
            self.ui.say(f"model {s.model_name} on {s.endpoint.url}: the server describes it (GET /v1/models)")
            return
        desc = describe(s.lm.path)
        if self.ui.plain:
            for line in plain_lines(desc):
                self.ui.say(line)
        else:
            print_sections(sections(desc), self.ui.err)
        self.ui.say(f"device: {s.lm.device}  dtype: {str(s.lm.dtype).removeprefix('torch.')}  "
                    f"context: {s.context_used()} of {s.context_limit} tokens used")

    def _cmd_stats(self, arg: str) -> None:
        s = self.session
        if s.last_stats is None:
            self.ui.say("no reply yet")
        else:
            st = s.last_stats
            self.ui.say(f"last reply: {stats_footer(st.to_dict())} · {s.last_prefill_tokens} prompt tokens "
                        f"run ({st.finish_reason})")
        t = s.totals
        self.ui.say(f"session: {t.replies} repl{'y' if t.replies == 1 else 'ies'}, {t.prefilled} prompt tokens "
                    f"run, {t.generated} generated, {t.seconds:.1f} s")
        if s.lm is None:
            # the server renders and caches the conversation; only what it reports is counted here
            self.ui.say(f"generation by {s.endpoint.url}: prompt tokens are as the server counts them, and cache "
                        "reuse across turns is the server's (lfm2's own cache does not apply)")
        else:
            self.ui.say(f"context: {s.context_used()} of {s.context_limit} tokens")

    # ------------------------------------------------------------------ display helpers

    def recap(self) -> None:
        """Say which conversation is loaded and show its last messages."""
        s = self.session
        conv_id = s.conversation_id
        self.ui.note(f"conversation {conv_id}: {len(s.messages)} messages"
                     + (f", system prompt: {shorten(s.system, 40)}" if s.system else ""))
        for m in s.messages[-RECAP_MESSAGES:]:
            self.ui.note(_recap_line(m))


def tool_line(tool: dict[str, Any]) -> str:
    """One tool as `/tools` lists it: `name(a, b?)  description` (? marks an optional parameter)."""
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {}
    required = set(params.get("required") or [])
    args = ", ".join(p if p in required else f"{p}?" for p in params.get("properties") or {})
    description = shorten(fn.get("description") or "", 80)
    return f"{fn['name']}({args})" + (f"  {description}" if description else "")


def _recap_line(m: ChatMessage) -> str:
    if m.role == "tool":
        return f"  tool {m.name or ''}: ".replace(" :", ":") + shorten(m.content, 100)
    who = "you" if m.role == "user" else m.role
    thinking_only = bool(m.reasoning) and not m.content.strip()
    label = finish_label(m.role, m.finish_reason, thinking_only)
    calls = "tool call: " + ", ".join(call_label(c) for c in m.tool_calls) if m.tool_calls else ""
    # the answer is what the recap is for; the reasoning is only said to be there
    parts = ["(thought)" if m.reasoning else "", shorten(m.content, 100), shorten(calls, 100),
             f"[{label}]" if label else ""]
    return f"  {who}: " + " ".join(p for p in parts if p)
