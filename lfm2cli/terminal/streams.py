"""stdout for the `lfm2` command: fd 1 behind a guard, so that `main()` can tell a reader that went away
(`| head`: exit 0, quietly) and a failed write (a closed stdout, a full disk: one line) from any other error.
Standard library only: `lfm2 --help` stays instant."""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Callable


class ReaderGone(Exception):
    """The reader of stdout went away (`| head`). Not an OSError, so that neither click's nor rich's own
    broken-pipe handling (both exit 1) catches it before main() does."""


class StdoutFailed(Exception):
    """Writing to stdout failed (closed, disk full): main() says so in one line, naming stdout."""


class GuardedStdout(io.RawIOBase):
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
            raise StdoutFailed("stdout is closed; run lfm2 with stdout open (without `>&-`) or redirect it to a file")
        try:
            return os.write(self._fd, data)
        except BrokenPipeError:
            self.failed = True
            raise ReaderGone() from None
        except OSError as e:
            self.failed = True
            code = errno.errorcode.get(e.errno or 0, "")
            raise StdoutFailed(f"writing to stdout failed: {e.strerror or e}" + (f" ({code})" if code else "")
                                ) from None


def guard_stdout() -> Callable[[], None]:
    """Put sys.stdout on a GuardedStdout; returns the function that puts the original back. Leaves a stdout that
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
    raw = GuardedStdout(fd)
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
        except (OSError, ValueError, ReaderGone, StdoutFailed):
            pass
        sys.stdout = original

    return restore
