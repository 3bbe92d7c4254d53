"""`lfm2 generate`: one-shot generation that works in shell pipes."""

from __future__ import annotations

from typing import Any

import typer

from lfm2cli.commands import options as o


def _local_run(model: str | None, text: str, system: str | None, raw: bool, params: Any, max_tokens: int,
               stop: list[str] | None, tools: list | None, grammar: Any, think_budget: int | None,
               **load_options: Any) -> tuple[Any, str]:
    """A TextRun on the model loaded here, and the label --json names it by."""
    from lfm2cli.runs.local import TextRun
    from lfm2cli.runs.prompt import one_shot_prompt

    path, lm = o.load_local(model, **load_options)
    prompt = one_shot_prompt(lm, text, system, raw, tools=tools)
    # Every reply goes through the reasoning/answer split: one without a leading <think> block is all answer.
    run = TextRun(lm, prompt.ids, params, max_tokens, stops=stop or (), think=True, opened=prompt.opened,
                  tools=tools, think_budget=think_budget, grammar=grammar)
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


def _tool_list(tools: str | None, raw: bool) -> list | None:
    """The --tools file's schemas, read before the model loads so that a bad file fails fast."""
    if tools is None:
        return None
    from lfm2cli.errors import UsageError
    from lfm2cli.reply.tool_specs import read_tools

    if raw:
        raise UsageError("--tools needs the chat template, which lists the tools for the model; --raw sends the "
                         "prompt without it")
    return read_tools(tools)


def _exit_status(run: Any, interrupted: bool, grammar: Any, max_tokens: int) -> None:
    """130 after Ctrl-C; a GenerationError when output promised to parse (--schema, --format json) was cut."""
    if interrupted:
        raise typer.Exit(130)
    if run.incomplete:
        from lfm2cli.errors import GenerationError
        from lfm2cli.runs.local import length_stop_note

        cut = length_stop_note(run.stats, max_tokens) or "stopped early"
        raise GenerationError(f"the reply {cut} before its {grammar.label} output was complete; raise --max-tokens")


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
    o.local_only(endpoint, think_budget=think_budget is not None, quantize=quantize != "none", compile=compile,
                 device=device != "auto", dtype=dtype != "auto", offline=offline, pull=pull, force=force)
    tool_list = _tool_list(tools, raw)
    grammar = o.output_grammar(schema, fmt, tool_list, tool_choice)
    # after the usage checks (exit 2 whatever the model), before anything imports torch: a model that is nowhere
    # is said at once
    located = o.find_local(model, offline=offline, pull=pull) if endpoint is None else None
    from lfm2cli.terminal.input_text import read_prompt

    text, system = read_prompt(prompt, system)
    if endpoint is not None:
        run, label = _remote_run(endpoint, api_key, remote_model or model, text, system, raw, params, max_tokens,
                                 stop, tool_list, tool_choice, schema, fmt)
    else:
        run, label = _local_run(model, text, system, raw, params, max_tokens, stop, tool_list, grammar,
                                think_budget, device=device, dtype=dtype, quantize=quantize, compile=compile,
                                force=force, offline=offline, pull=pull, path=located)
    from lfm2cli.commands.generate_output import report_reply, stream_reply

    interrupted = stream_reply(run, show_reasoning=think == "show", json_out=json_out)
    report_reply(run, label, json_out=json_out, tools=tool_list is not None, max_tokens=max_tokens, verbose=verbose)
    _exit_status(run, interrupted, grammar, max_tokens)
