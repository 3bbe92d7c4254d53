"""The process chat templates render in. A template is code from the checkpoint, run on every chat turn and every
served request. The sandbox (`template_sandbox`) counts what a template asks for, but work inside one filter or
method (C code, or jinja's own Python) runs between its counts. So rendering happens in a small worker process,
started once and reused: the caller kills it when a rendering runs past its time, and the kernel limits its
address space and CPU time, so memory is refused before it is used and nothing can spin on.

A worker costs one Python start (~50 ms, once per process) and a fraction of a millisecond per rendering of a
usual chat (the variables pickled one way, the text the other; ~2 ms for 400 KB of conversation). Where no
worker can start, rendering falls back to this process, under the sandbox's own budget.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any

from lfm2cli.errors import CheckpointError, GenerationError, Lfm2Error, TemplateError, UsageError
from lfm2cli.text.chat_template import _ADVICE, _where, render_here
from lfm2cli.text.template_sandbox import TIME_LIMIT_S, environment

GRACE_S = 1.0  # past the sandbox's TIME_LIMIT_S before the worker is killed: its own message is clearer
START_TIMEOUT_S = 60.0  # a worker's start (a loaded machine can be slow)
MEMORY_LIMIT = 256 << 20  # address space one rendering may add to the worker's own...
MEMORY_PER_INPUT_BYTE = 16  # ...plus this much per byte of its (pickled) variables: a long chat needs more
MAX_WORKERS = 4  # renderings at once; more wait for one to end...
SLOT_WAIT_S = 10.0  # ...this long at most: a flood of slow renderings fails instead of holding every thread
RECYCLE_RSS = 128 << 20  # a worker that holds more after a rendering is replaced, so idle ones stay small
_LENGTH = struct.Struct("<I")
_REPLY = struct.Struct("<ccI")  # kind (T text, E error), retire (Y/N), payload length
_ERRORS: dict[str, type[Lfm2Error]] = {cls.__name__: cls for cls in
                                       (CheckpointError, GenerationError, TemplateError, UsageError)}


class RendererStopped(Lfm2Error):
    """Rendering was stopped from outside (the server is shutting down), not by the template."""


class _Worker:
    """One worker process and the pipes to it; used by one rendering at a time."""

    def __init__(self) -> None:
        if not sys.executable:
            raise OSError("no Python interpreter to start")
        paths = [p or os.getcwd() for p in sys.path]  # the modules this process imports, and no others
        code = f"import sys; sys.path[:] = {paths!r}; from lfm2cli.text.template_worker import main; main()"
        debug = os.environ.get("LFM2_DEBUG") == "1"
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None if debug else subprocess.DEVNULL)
        self.ready = False
        self.expired = False  # killed by its watchdog

    def _expire(self) -> None:
        self.expired = True
        self.kill()

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def exit_code(self) -> int | None:
        try:
            return self.proc.wait(2)
        except subprocess.TimeoutExpired:
            return None

    def alive(self) -> bool:
        return not self.expired and self.proc.poll() is None

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def start(self) -> None:
        """Wait for the worker's hello, killing it if it does not come."""
        timer = threading.Timer(START_TIMEOUT_S, self._expire)
        timer.daemon = True
        timer.start()
        try:
            if self._read(1) != b"R":
                raise EOFError
        finally:
            timer.cancel()
        self.ready = True

    def call(self, payload: bytes, seconds: float) -> tuple[bytes, bool, bytes]:
        """Send one rendering, wait for its reply at most `seconds`: (kind, retire, body). EOFError when the
        worker died or was killed first."""
        timer = threading.Timer(seconds, self._expire)
        timer.daemon = True
        timer.start()
        try:
            try:
                self.proc.stdin.write(_LENGTH.pack(len(payload)))
                self.proc.stdin.write(payload)
                self.proc.stdin.flush()
            except OSError:
                raise EOFError from None
            kind, retire, n = _REPLY.unpack(self._read(_REPLY.size))
            return kind, retire == b"Y", self._read(n)
        finally:
            timer.cancel()


class _Pool:
    """Idle workers to reuse, and every worker started, so that all can be stopped at once."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_WORKERS)
        self.idle: list[_Worker] = []
        self.busy: set[_Worker] = set()
        self.stopped = False

    def acquire(self, where: str) -> _Worker:
        if not self.slots.acquire(timeout=SLOT_WAIT_S):
            raise TemplateError(f"{where} is too slow: {MAX_WORKERS} renderings of it were still running after "
                                f"{SLOT_WAIT_S:g} s; {_ADVICE}")
        try:
            worker = self._take()
        except BaseException:
            self.slots.release()
            raise
        try:
            if not worker.ready:
                worker.start()
        except BaseException:
            self.release(worker, reuse=False)
            raise
        return worker

    def _take(self) -> _Worker:
        with self.lock:
            if self.stopped:
                raise RendererStopped("chat templates are no longer rendered: lfm2 is shutting down")
            while self.idle:
                worker = self.idle.pop()
                if worker.alive():
                    break
                worker.close()
            else:
                worker = _Worker()
            self.busy.add(worker)
            return worker

    def release(self, worker: _Worker, reuse: bool) -> None:
        with self.lock:
            self.busy.discard(worker)
            keep = reuse and worker.alive() and not self.stopped and len(self.idle) < MAX_WORKERS
            if keep:
                self.idle.append(worker)
        if not keep:
            worker.close()
        self.slots.release()

    def stop(self) -> None:
        """Kill every worker: renderings in progress fail with RendererStopped, and no new one starts."""
        with self.lock:
            self.stopped = True
            workers, self.idle = [*self.idle, *self.busy], []
        for worker in workers:
            worker.kill()


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # a forked child starts its own
            _pool = _Pool()
        return _pool


def stop() -> None:
    """Stop rendering in this process (lfm2 serve on Ctrl-C): renderings in progress end now, new ones fail."""
    if _pool is not None:
        _pool.stop()


@atexit.register
def _kill_workers() -> None:
    if _pool is not None and _pool.pid == os.getpid():
        with _pool.lock:
            workers, _pool.idle = [*_pool.idle, *_pool.busy], []
        for worker in workers:
            worker.close()


def render(template: str, source: str | None, variables: dict[str, Any]) -> str:
    """`template` rendered with `variables` (plain data) in a worker process; the errors of
    `chat_template.render_here`, and TemplateError when the worker runs past its time or memory."""
    where = _where(source)
    try:
        payload = pickle.dumps((template, source, variables), protocol=pickle.HIGHEST_PROTOCOL)
    except RecursionError:
        raise UsageError("the conversation is nested too deeply to give to a chat template") from None
    pool = _get_pool()
    try:
        worker = pool.acquire(where)
    except OSError:  # no interpreter to start (an embedded Python): the sandbox's budget alone
        return render_here(template, source, variables)
    except EOFError:
        raise Lfm2Error("cannot start the process chat templates render in; run with LFM2_DEBUG=1 to see "
                        "why") from None
    limit = TIME_LIMIT_S
    reuse = False
    try:
        kind, retire, body = worker.call(payload, limit + GRACE_S + len(payload) / 50e6)
        reuse = not retire
    except EOFError:
        if pool.stopped:
            raise RendererStopped("chat template rendering stopped: lfm2 is shutting down") from None
        if worker.expired:
            raise TemplateError(f"{where} ran longer than {limit:g} s; {_ADVICE}") from None
        raise TemplateError(f"{where} made its renderer stop (exit code {worker.exit_code()}): it needed more "
                            f"memory or time than a chat template may use; {_ADVICE}") from None
    finally:
        pool.release(worker, reuse)
    text = body.decode("utf-8", "surrogatepass")
    if kind == b"T":
        return text
    name, _, message = text.partition("\0")
    raise _ERRORS.get(name, TemplateError)(message)


# ---------------------------------------------------------------- the worker's side


def _memory() -> tuple[int, int] | None:
    """This process's address space and resident size in bytes, where /proc tells them (ru_maxrss would not do:
    Linux carries the parent's peak over into a child it starts)."""
    try:
        with open("/proc/self/statm") as f:
            size, resident = f.read().split()[:2]
        page = os.sysconf("SC_PAGE_SIZE")
        return int(size) * page, int(resident) * page
    except (OSError, ValueError, AttributeError):
        return None


def _limit(resource: Any, which: int, soft: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError):
        pass


def _bounded(base: int | None, payload: int) -> None:
    """Before one rendering: the address space and CPU time it may use."""
    try:
        import resource
    except ImportError:  # Windows: only the caller's watchdog
        return
    if base is not None:
        _limit(resource, resource.RLIMIT_AS, base + MEMORY_LIMIT + MEMORY_PER_INPUT_BYTE * payload)
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = used.ru_utime + used.ru_stime
    _limit(resource, resource.RLIMIT_CPU, int(cpu + TIME_LIMIT_S + GRACE_S) + 2)  # SIGXCPU if the caller is gone


def _unbounded() -> bool:
    """After one rendering: limits lifted (the reply needs memory too); True when the worker grew too big."""
    try:
        import resource
    except ImportError:
        return False
    for which in (resource.RLIMIT_AS, resource.RLIMIT_CPU):
        _limit(resource, which, resource.RLIM_INFINITY)
    memory = _memory()
    return memory is not None and memory[1] > RECYCLE_RSS


def _reply(source: str | None, template: str, variables: dict[str, Any]) -> tuple[bytes, str]:
    try:
        return b"T", render_here(template, source, variables)
    except Lfm2Error as e:
        return b"E", f"{type(e).__name__}\0{e}"
    except MemoryError:
        return b"E", f"TemplateError\0{_where(source)} needed more memory than a chat template may use; {_ADVICE}"
    except Exception as e:  # noqa: BLE001 - whatever a template does wrong is one line, not a dead worker
        message = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        return b"E", f"GenerationError\0{_where(source)} failed on this conversation: {message}"


def main() -> None:
    """The worker: renderings in, replies out, until its input closes."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a worker killed for CPU time leaves no core file
    except (ImportError, ValueError, OSError):
        pass
    environment()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # the pipe carries replies only
    memory = _memory()
    base = memory[0] if memory is not None else None
    out.write(b"R")
    out.flush()
    while True:
        head = inp.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return
        (n,) = _LENGTH.unpack(head)
        template, source, variables = pickle.loads(inp.read(n))
        _bounded(base, n)
        try:
            kind, text = _reply(source, template, variables)
        finally:
            retire = _unbounded()
        del template, variables
        body = text.encode("utf-8", "surrogatepass")
        out.write(_REPLY.pack(kind, b"Y" if retire else b"N", len(body)))
        out.write(body)
        out.flush()
        if retire:
            return


if __name__ == "__main__":
    main()
