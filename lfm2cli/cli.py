"""The `lfm2` command: a thin layer that parses options and calls library code.

Command modules import only typer and the standard library at top level, so `lfm2 --help` never
imports torch. `main()` is the one error boundary: known errors become one line and an exit code.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Callable

import typer

from lfm2cli import __version__
from lfm2cli.commands import register

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


class _ReaderGone(Exception):
    """The reader of stdout went away (`| head`). Not an OSError, so that neither click's nor rich's own
    broken-pipe handling (both exit 1) catches it before main() does."""


class _StdoutFailed(Exception):
    """Writing to stdout failed (closed, disk full): main() says so in one line, naming stdout."""


class _GuardedStdout(io.RawIOBase):
    """fd 1 under sys.stdout, so that main() can tell a failed write to stdout from any other OSError. After the
    first failure it drops what is left: Python's own flush at exit must not fail a second time."""

    name = "<stdout>"

    def __init__(self, fd: int | None) -> None:
        super().__init__()
        self._fd = fd  # None: stdout was closed (`>&-`)
        self.failed = False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._fd is not None and os.isatty(self._fd)

    def fileno(self) -> int:
        if self._fd is None:
            raise io.UnsupportedOperation("stdout is closed")
        return self._fd

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.failed:
            return len(data)
        if self._fd is None:
            self.failed = True
            raise _StdoutFailed("stdout is closed; run lfm2 with stdout open (without `>&-`) or redirect it to a file")
        try:
            return os.write(self._fd, data)
        except BrokenPipeError:
            self.failed = True
            raise _ReaderGone() from None
        except OSError as e:
            self.failed = True
            code = errno.errorcode.get(e.errno or 0, "")
            raise _StdoutFailed(f"writing to stdout failed: {e.strerror or e}" + (f" ({code})" if code else "")
                                ) from None


def _guard_stdout() -> Callable[[], None]:
    """Put sys.stdout on a _GuardedStdout; returns the function that puts the original back. Leaves a stdout that
    someone else replaced (pytest's capture) alone."""
    original = sys.stdout
    if original is not None and original is not sys.__stdout__:
        return lambda: None
    fd: int | None = None
    if original is not None:
        try:
            original.flush()
            fd = original.fileno()
        except (OSError, ValueError):
            return lambda: None
    else:
        # fd 1 is closed: hold it with /dev/null, or the next file opened (a history database) would get it and
        # receive whatever is written to "stdout"
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != 1:
                os.dup2(null, 1)
                os.close(null)
        except OSError:
            pass
    raw = _GuardedStdout(fd)
    # unbuffered like the original where it was (python -u, PYTHONUNBUFFERED)
    unbuffered = isinstance(getattr(original, "buffer", None), io.RawIOBase)
    sys.stdout = io.TextIOWrapper(
        raw if unbuffered else io.BufferedWriter(raw), encoding=getattr(original, "encoding", None) or "utf-8",
        errors=getattr(original, "errors", None) or "strict",
        line_buffering=getattr(original, "line_buffering", False),
        write_through=getattr(original, "write_through", False),
    )

    def restore() -> None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError, _ReaderGone, _StdoutFailed):
            pass
        sys.stdout = original

    return restore


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

    restore = _guard_stdout()
    try:
        _run_app()
    except Lfm2Error as e:
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except (_ReaderGone, BrokenPipeError):
        # the reader went away (`| head`): stop quietly, and keep Python from complaining at exit
        if sys.stdout is sys.__stdout__ and sys.stdout is not None:
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        raise SystemExit(0) from None
    except _StdoutFailed as e:
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
