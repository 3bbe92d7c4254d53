"""What `lfm2 generate` prints of one reply: the answer on stdout (rendered on a terminal, plain in a pipe), the
reasoning on stderr or nowhere, then the tool calls, notes, `--json` object and `--verbose` stats."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

from lfm2cli.runs.base import Run


class ReasoningOut:
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


def _answer(pieces: Iterable[str], thoughts: ReasoningOut | None) -> Iterator[str]:
    """The answer pieces; the reasoning goes to `thoughts` (shown) or nowhere (hidden)."""
    from lfm2cli.reply.thinking import Reasoning

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


def stream_reply(run: Run, show_reasoning: bool, json_out: bool) -> bool:
    """Run the reply, printing its answer as it streams (nothing with `json_out`: the object comes after).
    Returns whether Ctrl-C cut it short (its finish reason is "interrupted" then)."""
    thoughts = ReasoningOut() if show_reasoning and not json_out else None
    tty = sys.stdout.isatty() and not json_out
    try:
        if json_out:
            run.run()
        elif tty:
            _to_terminal(run, thoughts)
        else:
            for piece in _answer(run.pieces(), thoughts):
                sys.stdout.write(piece)
                sys.stdout.flush()
            if run.text and not run.text.endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        run.stats.finish_reason = "interrupted"
        if thoughts is not None:
            thoughts.end()
        if not tty and not json_out:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return True
    return False


def _to_terminal(run: Run, thoughts: ReasoningOut | None) -> None:
    from rich.console import Console

    from lfm2cli.terminal.render import make_stream

    out = make_stream(Console(), plain=False)
    try:
        for piece in _answer(run.pieces(), thoughts):
            out.feed(piece)
    except KeyboardInterrupt:
        out.abort(None)
        raise
    out.finish()


def report_reply(run: Run, label: str, *, json_out: bool, tools: bool, max_tokens: int, verbose: bool) -> None:
    """After the answer: the tool calls (`tools`: some were offered), a note on blocks that did not parse, the
    `--json` object (`label` names the model), a note on a full context and the `--verbose` stats, on stderr
    unless they are the JSON."""
    if tools and not json_out:
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
        if tools:
            data["tool_calls"] = [call.to_openai() for call in run.tool_calls]
        data.update(finish_reason=run.stats.finish_reason, model=label, stats=run.stats.to_dict())
        print(json.dumps(data, ensure_ascii=False))
    if run.stats.length_limit == "context":
        from lfm2cli.runs.local import length_stop_note

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
