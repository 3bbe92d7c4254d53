"""`lfm2 serve`: the model behind an OpenAI-compatible HTTP API, for editors, agents and scripts."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

import typer

from lfm2cli.commands import options as o


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve to a public address


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads so a taken port fails at once, in one line."""
    from lfm2cli.errors import UsageError

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not an address this machine can listen on ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "; pick another --port" if e.errno in (98, 48, 10048) else ""
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.setblocking(False)
    return sock


def _model_names(model: str | None, path: Path, given: list[str] | None = None
                 ) -> tuple[str, list[str], list[str]]:
    """The id replies carry, the ids /v1/models lists after it, and the other names a request may use. The ids are
    the --name values in order when given, else the hub repo id or the directory as typed; the other names are
    the name typed, the alias's repo id, the checkpoint's path and folder name."""
    from lfm2cli.errors import UsageError
    from lfm2cli.hub.names import repo_id_for

    if model is not None and Path(model).expanduser().is_dir():
        model_id = model
    else:
        try:
            model_id = repo_id_for(model)
        except UsageError:
            model_id = model or path.name
    names = {model_id, str(path), path.name}
    if model is not None:
        names.add(model)
    listed = list(dict.fromkeys(given or [model_id]))
    return listed[0], listed[1:], sorted(names - set(listed))


def _check_names(names: list[str] | None) -> None:
    from lfm2cli.errors import UsageError

    for name in names or []:
        if not name.strip() or name != name.strip():
            raise UsageError(f"--name {name!r}: a model id needs characters and no spaces around them")


def _size(flag: str, text: str) -> int:
    """`8000000`, `512K` or `8M` (binary units) -> bytes; UsageError otherwise."""
    from lfm2cli.errors import UsageError

    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
    digits = raw[:-1] if scale > 1 else raw
    if not digits.isdigit() or len(digits) > 12 or int(digits) * scale < 1024:
        raise UsageError(f"{flag} {text}: expected a size of at least 1K, like 2000000, 512K or 8M")
    return int(digits) * scale


def _access(origins: list[str] | None, hosts: list[str] | None, host: str) -> Any:
    """The Host and Origin allow-lists (see lfm2cli/serve/access.py); a --host name is one of the server's names."""
    from lfm2cli.errors import UsageError
    from lfm2cli.serve.access import Access, normalize_host, normalize_origin

    for flag, values, check in (("--allow-origin", origins, normalize_origin), ("--allow-host", hosts, normalize_host)):
        for value in values or []:
            try:
                check(value)
            except ValueError as e:
                raise UsageError(f"{flag}: {e}") from None
    try:
        ipaddress.ip_address(host.strip("[]"))
        own = []
    except ValueError:
        own = [host]  # a name (or "" for every address): requests may use it
    return Access.build(origins or [], [*(hosts or []), *(h for h in own if h.strip())])


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _quiet_cancellations() -> None:
    """Requests still running when the shutdown's grace period ends are cancelled by uvicorn, which logs each
    with a traceback: one plain line says it instead."""
    import asyncio
    import logging

    class Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Cancel ") and "graceful shutdown" in record.getMessage():
                _stderr_line(f"lfm2 serve: {record.args[0] if record.args else 'some'} requests still running "
                             "were cancelled")
                return False
            return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))

    logging.getLogger("uvicorn.error").addFilter(Filter())


def _leave_if_stuck(grace_s: float = 1.0) -> None:
    """A thread still inside work nothing can interrupt would keep the process alive after Ctrl-C, and there is
    nothing left to save: leave without it."""
    import threading
    import time

    end = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, end - time.monotonic()))
    if any(t.is_alive() and not t.daemon and t is not threading.current_thread() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def serve(
    model: str = o.MODEL,
    names: list[str] = typer.Option(None, "--name", metavar="NAME", show_default=False,
                                    help="A model id clients may send (repeatable). /v1/models lists them and replies "
                                         "carry the first (default: the model as typed, or its hub repo id)."),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS",
                             help="Address to listen on. Anything but this machine (127.0.0.1, ::1, localhost) needs "
                                  "--api-key."),
    port: int = typer.Option(8080, "--port", metavar="PORT",
                             help="Port to listen on (0: any free port; the startup line says which)."),
    api_key: str = typer.Option(None, "--api-key", envvar="LFM2_SERVE_API_KEY", metavar="KEY", show_default=False,
                                help="Require 'Authorization: Bearer KEY' on every request but /health (also "
                                     "LFM2_SERVE_API_KEY)."),
    allow_origin: list[str] = typer.Option(None, "--allow-origin", metavar="ORIGIN", show_default=False,
                                           help="A web site (https://app.example.com) whose pages may use the server "
                                                "from a browser (repeatable; * for any). Pages on this machine "
                                                "(localhost) always may; others are refused with 403."),
    allow_host: list[str] = typer.Option(None, "--allow-host", metavar="NAME", show_default=False,
                                         help="A host name clients may reach the server by (repeatable; * for any), "
                                              "e.g. behind a proxy. IP addresses, localhost and this machine's name "
                                              "always work; others are refused with 403 (DNS rebinding)."),
    max_body: str = typer.Option(None, "--max-body", metavar="SIZE", show_default=False,
                                 help="Largest request body in bytes (K and M suffixes work); larger ones get 413. "
                                      "Default: 64 bytes per context token, 1M to 64M."),
    queue: int = typer.Option(16, "--queue", min=0, metavar="N",
                              help="Requests that may wait while --parallel ones generate; more are refused with 429."),
    parallel: int = typer.Option(None, "--parallel", min=1, max=64, metavar="N", show_default=False,
                                 help="Requests that generate at once, decoded together in one batch each step (1: "
                                      "one at a time). Default: as many as half the memory left after loading holds "
                                      "at 8192 tokens of cache each, at most 8."),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", min=1, metavar="N", rich_help_panel=o.SAMPLING_PANEL,
                                   help="Reply length for requests that set no max_tokens."),
    think_budget: int = o.THINK_BUDGET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line per request (errors are still shown)."),
    offline: bool = o.OFFLINE,
    pull: bool = o.PULL,
    force: bool = o.FORCE,
    device: o.Device = o.DEVICE,
    dtype: o.Dtype = o.DTYPE,
    quantize: o.Quantize = o.QUANTIZE,
    compile: bool = o.COMPILE,
) -> None:
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) until Ctrl-C.

    Examples:

    lfm2 serve lfm2-1.2b
    lfm2 serve lfm2-1.2b --name lfm2 --port 8000 --quantize int8
    LFM2_SERVE_API_KEY=secret lfm2 serve lfm2-1.2b --host 0.0.0.0
    """
    from lfm2cli.errors import UsageError

    _check_options(port, names, api_key)
    body_limit = None if max_body is None else _size("--max-body", max_body)
    access = _access(allow_origin, allow_host, host)
    if not _is_loopback(host) and api_key is None:
        raise UsageError(f"--host {host} lets other machines in; set --api-key KEY too (or keep the default "
                         "--host 127.0.0.1)")
    sock = _bind(host, port)
    try:
        _run(sock, model, names, host, api_key, queue, max_tokens, think_budget, quiet, device=device, dtype=dtype,
             quantize=quantize, compile=compile, force=force, offline=offline, pull=pull, max_body=body_limit,
             access=access, parallel=parallel)
    finally:
        sock.close()


def _check_options(port: int, names: list[str] | None, api_key: str | None) -> None:
    """UsageError for a port out of range, a bad --name, or an API key a client could not send as typed."""
    from lfm2cli.errors import UsageError

    if not (0 <= port <= 65535):
        raise UsageError(f"--port {port}: expected 0 to 65535")
    _check_names(names)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give the key clients must send")
    if api_key is not None and (api_key != api_key.strip() or not all(" " <= c <= "~" for c in api_key)):
        raise UsageError("--api-key: use printable ASCII only (letters, digits, punctuation) and no spaces around "
                         "it; clients send the key in an HTTP header, where other characters do not arrive intact")


def _run(sock: socket.socket, model: str | None, names: list[str] | None, host: str, api_key: str | None,
         queue: int, max_tokens: int, think_budget: int | None, quiet: bool, *, max_body: int | None = None,
         access: Any = None, parallel: int | None = None, **load_options: object) -> None:
    path, lm = o.load_local(model, **load_options)

    import uvicorn

    from lfm2cli.serve.app import create_app, default_max_body
    from lfm2cli.serve.engine import Engine, default_parallel
    from lfm2cli.system.memory import available_memory
    from lfm2cli.text import template_worker

    if parallel is None:
        parallel = default_parallel(lm, available_memory(lm.device))
    engine = Engine(lm, queue_size=queue, default_max_tokens=max_tokens, think_budget=think_budget,
                    parallel=parallel)
    model_id, listed, aliases = _model_names(model, path, names)
    app = create_app(engine, model_id, aliases=aliases, listed=listed, api_key=api_key, access=access,
                     max_body=max_body or default_max_body(engine.context),
                     on_request=None if quiet else _stderr_line, on_error=_stderr_line,
                     debug=os.environ.get("LFM2_DEBUG") == "1")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Ctrl-C: stop generating and rendering now; uvicorn would otherwise wait for every reply in flight
            engine.close(timeout=0)
            template_worker.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = Server(config)
    _quiet_cancellations()
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    _stderr_line(f"lfm2 serve · {model_id} · {lm.device.type} {str(lm.dtype).removeprefix('torch.')} · context "
                 f"{engine.context} tokens · {parallel} at once · listening on http://{shown}:{bound_port}/v1"
                 f"{' (API key required)' if api_key else ''} · Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal it caught again once it has shut down
        pass
    _stderr_line("lfm2 serve stopped")
    _leave_if_stuck()
