"""`lfm2 generate`: one-shot generation that works in shell pipes."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

import typer

from lfm2cli.commands import options as o


def _read_prompt(prompt: str | None, system: str | None) -> tuple[str, str | None]:
    """Piped stdin comes before the instruction (`cat notes | lfm2 generate -p "Summarise"`);
    `--prompt -` reads the whole prompt from stdin. Invalid UTF-8 anywhere becomes U+FFFD, with one note."""
    from lfm2cli.errors import UsageError
    from lfm2cli.runs.local import as_text, read_stdin_text, replaced_note

    bad: list[str] = []
    piped = None
    if sys.stdin is not None and not sys.stdin.isatty():
        piped, replaced = read_stdin_text(sys.stdin)
        bad += ["stdin"] if replaced else []
    if prompt is not None and prompt != "-":
        prompt, replaced = as_text(prompt)
        bad += ["--prompt"] if replaced else []
    if system is not None:
        system, replaced = as_text(system)
        bad += ["--system"] if replaced else []
    if bad:
        sys.stderr.write(replaced_note(bad) + "\n")
    if prompt == "-":
        if piped is None:
            raise UsageError("--prompt - reads the prompt from stdin, but stdin is a terminal; pipe text in")
        return piped, system
    if piped and piped.strip():
        return piped.rstrip("\n") + ("\n\n" + prompt if prompt else ""), system
    if prompt is None:
        raise UsageError("no prompt: pass --prompt TEXT or pipe text on stdin")
    return prompt, system


class _ReasoningOut:
    """The reasoning of a thinking model on stderr (`--think show`): dimmed on a terminal, plain when piped, and
    ended with a newline once the answer starts, so the two never share a line."""

    def __init__(self) -> None:
        self._console = None
        if sys.stderr.isatty():
            from rich.console import Console

            self._console = Console(stderr=True)
        self._open = False

    def feed(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stderr.write(text)
        sys.stderr.flush()
        self._open = True

    def end(self) -> None:
        if self._open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._open = False


def _local_run(model: str | None, text: str, system: str | None, raw: bool, params: Any, max_tokens: int,
               stop: list[str] | None, tools: list | None, grammar: Any, think_budget: int | None,
               **load_options: Any) -> tuple[Any, str]:
    """A TextRun on the model loaded here, and the label --json names it by."""
    from lfm2cli.reply.thinking import opened_by_prompt
    from lfm2cli.runs.local import TextRun, encode_prompt, prompt_text

    path, lm = o.load_local(model, **load_options)
    rendered = prompt_text(lm, text, system, raw, tools=tools)
    # Every reply goes through the reasoning/answer split: one without a leading <think> block is all answer.
    run = TextRun(lm, encode_prompt(lm, rendered, raw), params, max_tokens, stops=stop or (), think=True,
                  opened=opened_by_prompt(rendered), tools=tools, think_budget=think_budget, grammar=grammar)
    return run, str(path)


def _remote_run(url: str, api_key: str | None, model: str | None, text: str, system: str | None, raw: bool,
                params: Any, max_tokens: int, stop: list[str] | None, tools: list | None, tool_choice: str,
                schema: str | None, fmt: str) -> tuple[Any, str]:
    """A RemoteRun on the --endpoint server: the same messages, tools and constraints, in OpenAI's terms."""
    from lfm2cli.decoding.constraints import read_schema
    from lfm2cli.runs.remote import Endpoint, RemoteRun, response_format

    endpoint = Endpoint(url, api_key, model)
    common = dict(params=params, max_tokens=max_tokens, stops=stop or ())
    if raw:
        return RemoteRun(endpoint, prompt=text, **common), endpoint.model
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    fmt_request = response_format(read_schema(schema) if schema is not None else None, fmt)
    run = RemoteRun(endpoint, messages=messages, tools=tools, tool_choice=tool_choice, response_format=fmt_request,
                    **common)
    return run, endpoint.model


def generate(
    model: str = o.MODEL,
    prompt: str = typer.Option(None, "--prompt", "-p", metavar="TEXT", help="The prompt; '-' reads it from stdin."),
    system: str = o.SYSTEM,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
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
    stop: list[str] = typer.Option(None, "--stop", metavar="TEXT", rich_help_panel=o.SAMPLING_PANEL,
                                   help="Stop at this text (repeatable); it is not printed."),
    think_budget: int = o.THINK_BUDGET,
    json_out: bool = typer.Option(False, "--json", rich_help_panel=o.OUTPUT_PANEL,
                                  help="Print one JSON object: text, reasoning, tool calls (with --tools), finish "
                                       "reason, stats."),
    think: o.ThinkShown = o.choice("hide", "--think", rich_help_panel=o.OUTPUT_PANEL,
                                   help="Show a thinking model's reasoning (on stderr) or hide it; stdout gets only "
                                        "the answer either way."),
    fmt: o.Format = o.FORMAT,
    schema: str = o.SCHEMA,
    verbose: bool = typer.Option(False, "--verbose", "-v", rich_help_panel=o.OUTPUT_PANEL,
                                 help="Print speed and memory stats on stderr."),
    tools: str = typer.Option(None, "--tools", metavar="FILE", show_default=False, rich_help_panel=o.TOOLS_PANEL,
                              help="A JSON file of function tools (OpenAI schemas) the model may call. Calls are "
                                   "not run: each is one 'tool call:' line on stderr, and --json lists them in "
                                   "tool_calls with finish_reason tool_calls."),
    tool_choice: str = o.TOOL_CHOICE,
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
    """Generate a reply to one prompt. Piped stdin is added before the prompt.

    Examples:

    lfm2 generate lfm2-350m -p "Write a haiku about the sea"
    git diff | lfm2 generate lfm2-1.2b -p "Write a commit message for this change"
    lfm2 generate ./my-checkpoint -p "Name three colours" --schema colours.json --json
    """
    params = o.sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, seed, presence_penalty,
                               frequency_penalty, logit_bias)
    from lfm2cli.errors import UsageError

    o.local_only(endpoint, think_budget=think_budget is not None, quantize=quantize != "none", compile=compile,
                 device=device != "auto", dtype=dtype != "auto", offline=offline, pull=pull, force=force)
    if tools is not None and raw:
        raise UsageError("--tools needs the chat template, which lists the tools for the model; --raw sends the "
                         "prompt without it")
    tool_list = None
    if tools is not None:
        from lfm2cli.runs.local import read_tools

        tool_list = read_tools(tools)  # before the model loads, so a bad file fails fast
    grammar = o.output_grammar(schema, fmt, tool_list, tool_choice)
    # after the usage checks (exit 2 whatever the model), before anything imports torch: a model that is nowhere
    # is said at once
    located = o.find_local(model, offline=offline, pull=pull) if endpoint is None else None
    text, system = _read_prompt(prompt, system)
    if not text.strip():
        raise UsageError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    from lfm2cli.reply.thinking import Reasoning
    from lfm2cli.runs.local import length_stop_note

    if endpoint is not None:
        run, label = _remote_run(endpoint, api_key, remote_model or model, text, system, raw, params, max_tokens,
                                 stop, tool_list, tool_choice, schema, fmt)
    else:
        run, label = _local_run(model, text, system, raw, params, max_tokens, stop, tool_list, grammar,
                                think_budget, device=device, dtype=dtype, quantize=quantize, compile=compile,
                                force=force, offline=offline, pull=pull, path=located)
    thoughts = _ReasoningOut() if think == "show" and not json_out else None

    def answer(pieces: Iterable[str]) -> Iterator[str]:
        """The answer pieces; the reasoning goes to stderr (show) or nowhere (hide)."""
        for piece in pieces:
            if isinstance(piece, Reasoning):
                if thoughts is not None:
                    thoughts.feed(piece)
                continue
            if thoughts is not None:
                thoughts.end()
            yield piece
        if thoughts is not None:
            thoughts.end()

    tty = sys.stdout.isatty() and not json_out
    interrupted = False
    try:
        if json_out:
            run.run()
        elif tty:
            from rich.console import Console

            from lfm2cli.terminal.render import make_stream

            out = make_stream(Console(), plain=False)
            try:
                for piece in answer(run.pieces()):
                    out.feed(piece)
            except KeyboardInterrupt:
                out.abort(None)
                raise
            out.finish()
        else:
            for piece in answer(run.pieces()):
                sys.stdout.write(piece)
                sys.stdout.flush()
            if run.text and not run.text.endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        run.stats.finish_reason = "interrupted"
        if thoughts is not None:
            thoughts.end()
        if not tty and not json_out:
            sys.stdout.write("\n")
            sys.stdout.flush()
    if tool_list is not None and not json_out:
        # stdout stays the answer text alone, so a pipe never mistakes a call for the reply
        for call in run.tool_calls:
            sys.stderr.write(f"tool call: {call.to_pythonic()}\n")
    if run.tool_errors:
        first = run.tool_errors[0].error
        more = f" (and {len(run.tool_errors) - 1} more)" if len(run.tool_errors) > 1 else ""
        sys.stderr.write(f"note: a tool-call block did not parse ({first}){more}; it is shown as text\n")
    if json_out:
        import json

        data = {"text": run.text, "reasoning": run.reasoning}
        if tool_list is not None:
            data["tool_calls"] = [call.to_openai() for call in run.tool_calls]
        data.update(finish_reason=run.stats.finish_reason, model=label, stats=run.stats.to_dict())
        print(json.dumps(data, ensure_ascii=False))
    if run.stats.length_limit == "context":
        # a cut the user did not ask for: say so, and that --max-tokens cannot help
        sys.stderr.write(f"note: the reply {length_stop_note(run.stats, max_tokens)}; a shorter prompt leaves more "
                         "room\n")
    if verbose:
        from lfm2cli.terminal.formatting import rate

        s = run.stats
        sys.stderr.write(
            f"{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated ({s.finish_reason}); "
            f"prefill {rate(s.prefill_tps)} tok/s, decode {rate(s.decode_tps)} tok/s, first token {s.ttft_s:.2f} s, "
            f"peak memory {s.peak_memory_bytes / 1e9:.2f} GB\n"
        )
    if interrupted:
        raise typer.Exit(130)
    if run.incomplete:
        # --schema/--format json promise output that parses; a cut reply breaks that, so the exit code says so
        from lfm2cli.errors import GenerationError

        cut = length_stop_note(run.stats, max_tokens) or "stopped early"
        raise GenerationError(f"the reply {cut} before its {grammar.label} output was complete; raise --max-tokens")
