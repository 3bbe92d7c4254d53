"""`lfm2 chat`: an interactive conversation, saved as it goes (see docs/chat.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from lfm2cli.commands import options as o

MAX_TOOL_ROUNDS = 8  # lfm2cli.chat.repl.MAX_TOOL_ROUNDS, repeated for the help text: the repl imports rich

# options restored from a resumed conversation unless given on the command line
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_tokens",
             "presence_penalty", "frequency_penalty", "logit_bias")


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the user typed the option (not its default)."""
    # by name: typer may carry its own copy of click, with its own ParameterSource enum
    return getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _model_label(name: str | None) -> str:
    """What the store records as the model: a directory's absolute path, else the hub repo id."""
    from pathlib import Path

    from lfm2cli.hub.names import repo_id_for

    if name is not None and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return repo_id_for(name)


def chat(
    ctx: typer.Context,
    model: str = o.MODEL,
    system: str = o.SYSTEM,
    cont: bool = typer.Option(False, "--continue", "-c", help="Continue the most recent conversation."),
    resume: str = typer.Option(None, "--resume", metavar="ID", help="Continue a saved conversation (id or prefix)."),
    keep_thinking: bool = typer.Option(False, "--keep-thinking",
                                       help="Show the model the reasoning of all its past replies (the template's "
                                            "keep_past_thinking), not only of the last one."),
    max_tokens: int = o.MAX_TOKENS,
    temperature: float = o.TEMPERATURE,
    top_k: int = o.TOP_K,
    top_p: float = o.TOP_P,
    min_p: float = o.MIN_P,
    repetition_penalty: float = o.REPETITION_PENALTY,
    presence_penalty: float = o.PRESENCE_PENALTY,
    frequency_penalty: float = o.FREQUENCY_PENALTY,
    logit_bias: list[str] = o.LOGIT_BIAS,
    seed: int = o.SEED,
    think_budget: int = o.THINK_BUDGET,
    plain: bool = typer.Option(False, "--plain", rich_help_panel=o.OUTPUT_PANEL,
                               help="Print replies as plain text (no markdown rendering)."),
    think: o.Think = o.choice("fold", "--think", rich_help_panel=o.OUTPUT_PANEL,
                              help="How a thinking model's reasoning is shown: show (dimmed, kept), hide, or fold "
                                   "(dimmed while it streams, then one 'thought for N tokens' line). Piped, it "
                                   "never reaches stdout: show writes it to stderr, fold the one line. /think "
                                   "changes it."),
    fmt: o.Format = o.FORMAT,
    schema: str = o.SCHEMA,
    functions: str = typer.Option(None, "--functions", metavar="FILE.py", show_default=False,
                                  rich_help_panel=o.TOOLS_PANEL,
                                  help="Offer the functions of this Python file to the model as tools. Each call "
                                       "is shown and runs once you confirm it (y, n, or a: yes to all); its "
                                       f"result goes back to the model, for up to {MAX_TOOL_ROUNDS} rounds a "
                                       "message. /tools lists them."),
    yes_tools: bool = typer.Option(False, "--yes-tools", rich_help_panel=o.TOOLS_PANEL,
                                   help="Run tool calls without asking (piped chat declines them otherwise)."),
    tool_choice: str = typer.Option("auto", "--tool-choice", metavar="auto|required|NAME",
                                    rich_help_panel=o.TOOLS_PANEL,
                                    help="With --functions: auto lets the model choose; required makes the first "
                                         "reply to each message a tool call, NAME a call of that tool. Replies "
                                         "to tool results are always auto, so the loop can end."),
    offline: bool = o.OFFLINE,
    pull: bool = o.PULL,
    force: bool = o.FORCE,
    endpoint: str = o.ENDPOINT,
    api_key: str = o.API_KEY,
    remote_model: str = o.REMOTE_MODEL,
    device: o.Device = o.DEVICE,
    dtype: o.Dtype = o.DTYPE,
    quantize: o.Quantize = o.QUANTIZE,
    compile: bool = o.COMPILE,
) -> None:
    """Chat with a model. Conversations are saved; /help lists the commands, Ctrl-D or /exit leaves.

    Examples:

    lfm2 chat lfm2-1.2b
    lfm2 chat -c
    lfm2 chat lfm2-1.2b --functions tools.py
    """
    from rich.console import Console

    from lfm2cli.chat.input import replace_undecodable
    from lfm2cli.store.conversations import HistoryStore

    params = o.sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed, presence_penalty,
                               frequency_penalty, logit_bias)
    o.local_only(endpoint, think_budget=think_budget is not None, quantize=quantize != "none", compile=compile,
                 device=device != "auto", dtype=dtype != "auto", offline=offline, pull=pull, force=force,
                 keep_thinking=keep_thinking)
    function_set, grammar, call_grammar = _tools_and_grammars(cont, resume, yes_tools, functions, schema, fmt,
                                                              tool_choice)
    # arguments that were not UTF-8: replacement characters, as for piped input
    system = replace_undecodable(system) if system is not None else None
    resume = replace_undecodable(resume) if resume is not None else None
    tty_in = sys.stdin is not None and sys.stdin.isatty()
    err = Console(stderr=True)
    with HistoryStore() as store:
        # before the model loads: a history that cannot take a message would fail every turn
        store.check_writable()
        saved = store.get(resume) if resume else store.latest() if cont else None
        if cont and saved is None:
            err.print("no saved conversation to continue; starting a new one", style="dim", markup=False)
        if model is None and saved is not None:
            model = saved.model  # continue with the model it was held with unless told otherwise
        # before anything imports torch: a model that is nowhere is said at once
        located = o.find_local(model, offline=offline, pull=pull) if endpoint is None else None

        from lfm2cli.chat.repl import ChatUI

        ui = ChatUI(Console(), err, plain=plain or not (tty_in and sys.stdout.isatty()))
        tools = function_set.tools if function_set is not None else None
        if endpoint is not None:
            session = _remote_session(endpoint, api_key, remote_model or model, store, params, max_tokens, system,
                                      tools, tool_choice, schema, fmt, grammar)
        else:
            session = _local_session(model, store, params, max_tokens, system, tools, grammar, call_grammar,
                                     think_budget, keep_thinking, device=device, dtype=dtype, quantize=quantize,
                                     compile=compile, force=force, offline=offline, pull=pull, path=located)
        session.on_notice = ui.warn  # a saved setting that is skipped on resume is said before the banner
        if saved is not None:
            _resume(ctx, session, saved.id, params, system, function_set is not None, ui.warn)
        _converse(session, ui, tty_in, saved is not None, think, function_set, yes_tools, store.path)


def _tools_and_grammars(cont: bool, resume: str | None, yes_tools: bool, functions: str | None,
                        schema: str | None, fmt: str, tool_choice: str) -> tuple[Any, Any, Any]:
    """The checks on the command line that need no model: the --functions file loaded, and the grammars of every
    reply (`grammar`) and of the first reply to a message (`call_grammar`, a forced tool call)."""
    from lfm2cli.errors import UsageError

    if cont and resume:
        raise UsageError("use either --continue or --resume ID, not both")
    if yes_tools and functions is None:
        raise UsageError("--yes-tools runs the calls of --functions FILE.py; give the file too")
    function_set = None
    if functions is not None:
        from lfm2cli.reply.functions import load_functions

        function_set = load_functions(functions)  # before the model loads: a bad file fails fast
    tools = function_set.tools if function_set is not None else None
    if tools is not None and tool_choice == "auto" and (schema is not None or fmt == "json"):
        # a JSON answer can never hold a call block: the tools would be offered and never called
        raise UsageError("--functions offers tools, but --schema/--format json makes every answer JSON, so the "
                         "model could never call one: drop one")
    # the first reply to a message may be forced to call; every other reply is only held to --schema/--format
    chosen = o.output_grammar(schema, fmt, tools, tool_choice)
    if tool_choice == "auto":
        return function_set, chosen, None
    return function_set, None, chosen


def _resume(ctx: typer.Context, session: Any, conv_id: str, params: Any, system: str | None, functions: bool,
            warn: Callable[[str], None]) -> None:
    """Continue a saved conversation: what was typed on this command line wins over what was saved, and is saved
    in turn."""
    session.load(conv_id)
    given = {name: ctx.params[name] for name in _SAMPLING if _given(ctx, name)}
    if "logit_bias" in given:
        given["logit_bias"] = params.logit_bias  # the option's values merged into one
    if given:
        session.apply_options(given)
        session.store.update_conversation(conv_id, options=session.options())
    if _given(ctx, "system"):
        session.set_system(system)
    used = sorted({m.name for m in session.messages if m.role == "tool" and m.name})
    if used and not functions:
        warn(f"note: this conversation called tools ({', '.join(used)}); without --functions the model is offered "
             "none now, and sees its past calls without their list")


def _converse(session: Any, ui: Any, tty_in: bool, resumed: bool, think: str, function_set: Any,
              yes_tools: bool, store_path: Any) -> None:
    """The conversation itself, until Ctrl-D or /exit; a script learns from the exit status that a message got
    no reply or was not saved."""
    from lfm2cli.chat.repl import ChatLoop
    from lfm2cli.errors import GenerationError, HistoryError

    confirm = _ask if tty_in else None
    loop = ChatLoop(session, _reader(tty_in, ui.note), ui, think=think, functions=function_set, confirm=confirm,
                    yes_tools=yes_tools)
    ui.note(banner(session))
    if resumed:
        loop.recap()
    loop.run()
    if not tty_in and loop.failed_turns:
        n = loop.failed_turns
        raise GenerationError(f"{n} of {loop.turns} message{'s' if loop.turns != 1 else ''} failed; "
                              "see the errors above")
    if not tty_in and loop.unsaved:
        raise HistoryError(f"the conversation was not completely saved to {store_path}; see the errors above")


def _local_session(model: str | None, store: Any, params: Any, max_tokens: int, system: str | None,
                   tools: list | None, grammar: Any, call_grammar: Any, think_budget: int | None,
                   keep_thinking: bool, **load_options: Any) -> Any:
    """A ChatSession on the model loaded here (a progress bar while it loads, on a terminal)."""
    from lfm2cli.chat.session import ChatSession

    _, lm = o.load_local(model, **load_options)
    return ChatSession(lm, store, _model_label(model), params, max_tokens, system,
                       keep_thinking=True if keep_thinking else None, tools=tools, grammar=grammar,
                       call_grammar=call_grammar, think_budget=think_budget)


def _remote_session(url: str, api_key: str | None, model: str | None, store: Any, params: Any, max_tokens: int,
                    system: str | None, tools: list | None, tool_choice: str, schema: str | None, fmt: str,
                    grammar: Any) -> Any:
    """A chat generated by the --endpoint server; the history records the server's model name."""
    from lfm2cli.chat.remote_session import RemoteChatSession
    from lfm2cli.decoding.constraints import read_schema
    from lfm2cli.runs.remote import Endpoint, response_format

    endpoint = Endpoint(url, api_key, model)
    fmt_request = response_format(read_schema(schema) if schema is not None else None, fmt)
    return RemoteChatSession(endpoint, store, endpoint.model, params, max_tokens, system, tools=tools,
                             response_format=fmt_request, tool_choice=tool_choice, grammar=grammar)


def _ask(question: str) -> str | None:
    """A tool call's confirmation, on the terminal: the question on stderr, the answer line from stdin."""
    sys.stderr.write(question)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def _reader(tty_in: bool, note: Callable[[str], None]) -> Any:
    """prompt-toolkit on a terminal; plain lines from anything else, so the chat can be scripted."""
    if not tty_in:
        import io

        from lfm2cli.chat.input import LineInput

        # bytes, decoded by LineInput: a byte that is not UTF-8 costs one character, not the session
        stream = io.BytesIO() if sys.stdin is None else getattr(sys.stdin, "buffer", sys.stdin)
        return LineInput(stream, on_note=note)
    from prompt_toolkit.output import create_output

    from lfm2cli.chat.input import ChatInput
    from lfm2cli.chat.repl import completions
    from lfm2cli.system.paths import data_dir

    # with stdout redirected, the prompt is drawn on stderr so that only replies reach the file
    output = None if sys.stdout.isatty() else create_output(stdout=sys.stderr)
    return ChatInput(data_dir() / "input_history", completions(), output=output)


def banner(session: Any) -> str:
    lm = session.lm
    if lm is None:
        return (f"lfm2 chat · {session.model_name} at {session.endpoint.url} · /help for commands, Ctrl-D or "
                "/exit to leave")
    return (f"lfm2 chat · {session.model_name} · {lm.device.type} {str(lm.dtype).removeprefix('torch.')}"
            f"{' int8' if lm.quantize else ''} · "
            f"context {session.context_limit} tokens · /help for commands, Ctrl-D or /exit to leave")
