"""The `lfm2` command: a thin layer that parses options and calls library code.

Command modules import only typer and the standard library at top level, so `lfm2 --help` never
imports torch. `main()` is the one error boundary: known errors become one line and an exit code.
"""

from __future__ import annotations

import os
import sys

import typer

from lfm2cli import __version__
from lfm2cli.commands import register
from lfm2cli.commands.options import Group
from lfm2cli.terminal.streams import ReaderGone, StdoutFailed, guard_stdout

app = typer.Typer(
    name="lfm2",
    cls=Group,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"lfm2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Run Liquid AI's LFM2 language models on your own machine.

    `lfm2 COMMAND --help` shows a command's options and examples; --install-completion sets up tab completion
    for your shell.

    Examples:

    lfm2 chat lfm2-1.2b
    lfm2 generate lfm2-350m -p "Write a haiku about the sea"
    lfm2 serve lfm2-1.2b --port 8080
    """


register(app)


def _fail(message: str, code: int) -> None:
    from lfm2cli.terminal.safetext import visible_line

    # messages quote names from files and servers: their control characters are shown, never acted on
    sys.stderr.write(f"error: {visible_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _run_app() -> None:
    """Run the app, flushing stdout inside the boundary: a failure there must not wait for Python's exit."""
    try:
        app(prog_name="lfm2")  # `python -m lfm2cli` is lfm2 too: its usage lines, its completion variable
    except SystemExit:  # typer ends every run, successful or not, with SystemExit
        sys.stdout.flush()
        raise
    sys.stdout.flush()


def main() -> None:
    """Entry point: run the app and map known errors to one line on stderr."""
    debug = os.environ.get("LFM2_DEBUG") == "1"
    from lfm2cli.errors import Lfm2Error

    restore = guard_stdout()
    try:
        _run_app()
    except Lfm2Error as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except (ReaderGone, BrokenPipeError):
        # the reader went away (`| head`): stop quietly, and keep Python from complaining at exit
        if sys.stdout is sys.__stdout__ and sys.stdout is not None:
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        raise SystemExit(0) from None
    except StdoutFailed as e:
        if debug:
            raise
        _fail(str(e), 1)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None
    except MemoryError:
        if debug:
            raise
        # a hint names only options the command has: those that load a model take --dtype and --quantize
        loads = sys.argv[1:2] in (["generate"], ["chat"], ["serve"], ["bench"])
        _fail("out of memory; try a smaller model" + (", --dtype bfloat16 or --quantize int8" if loads else "")
              + " (`lfm2 list --available` shows what fits here)", 1)
    except Exception as e:  # the last line of defence: one line, never a traceback by default
        if debug:
            raise
        _fail(f"{type(e).__name__}: {e} (run with LFM2_DEBUG=1 for the traceback)", 1)
    finally:
        restore()


if __name__ == "__main__":
    main()
