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
from lfm2cli.streams import ReaderGone, StdoutFailed, guard_stdout

app = typer.Typer(
    name="lfm2",
    help="Run Liquid AI's LFM2 language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
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
    """Run Liquid AI's LFM2 language models on your own machine."""


register(app)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def _run_app() -> None:
    """Run the app, flushing stdout inside the boundary: a failure there must not wait for Python's exit."""
    try:
        app()
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
        _fail("out of memory; try a smaller model, --dtype bfloat16 or --quantize int8", 1)
    except Exception as e:  # the last line of defence: one line, never a traceback by default
        if debug:
            raise
        _fail(f"{type(e).__name__}: {e} (run with LFM2_DEBUG=1 for the traceback)", 1)
    finally:
        restore()


if __name__ == "__main__":
    main()
