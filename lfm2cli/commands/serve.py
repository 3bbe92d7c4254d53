"""`lfm2 serve`: the model behind an OpenAI-compatible HTTP API, for editors, agents and scripts."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

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


def _model_names(model: str | None, path: Path) -> tuple[str, list[str]]:
    """The id /v1/models lists (the hub repo id, or the directory as typed) and the other names a request may use:
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
    return model_id, sorted(names - {model_id})


def _stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def serve(
    model: str = o.MODEL,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but this machine "
                             "(127.0.0.1, ::1, localhost) needs --api-key."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port; the startup line says "
                             "which)."),
    api_key: str = typer.Option(None, "--api-key", envvar="LFM2_SERVE_API_KEY", metavar="KEY", show_default=False,
                                help="Require 'Authorization: Bearer KEY' on every request but /health (also "
                                     "LFM2_SERVE_API_KEY)."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait while one generates; more are "
                              "refused with 429."),
    max_tokens: int = typer.Option(4096, "--max-tokens", "-n", min=1,
                                   help="Reply length for requests that set no max_tokens."),
    think_budget: int = o.THINK_BUDGET,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line per request (errors are still shown)."),
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    quantize: str = o.QUANTIZE,
    compile: bool = o.COMPILE,
    force: bool = o.FORCE,
    offline: bool = o.OFFLINE,
    pull: bool = o.PULL,
) -> None:
    """Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) until Ctrl-C."""
    from lfm2cli.errors import UsageError

    if not (0 <= port <= 65535):
        raise UsageError(f"--port {port}: expected 0 to 65535")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give the key clients must send")
    if not _is_loopback(host) and api_key is None:
        raise UsageError(f"--host {host} lets other machines in; set --api-key KEY too (or keep the default "
                         "--host 127.0.0.1)")
    sock = _bind(host, port)
    try:
        _run(sock, model, host, api_key, queue, max_tokens, think_budget, quiet, device=device, dtype=dtype,
             quantize=quantize, compile=compile, force=force, offline=offline, pull=pull)
    finally:
        sock.close()


def _run(sock: socket.socket, model: str | None, host: str, api_key: str | None, queue: int, max_tokens: int,
         think_budget: int | None, quiet: bool, **load_options: object) -> None:
    path, lm = o.load_local(model, **load_options)

    import uvicorn

    from lfm2cli.serve.app import create_app
    from lfm2cli.serve.engine import Engine

    engine = Engine(lm, queue_size=queue, default_max_tokens=max_tokens, think_budget=think_budget)
    model_id, aliases = _model_names(model, path)
    app = create_app(engine, model_id, aliases=aliases, api_key=api_key,
                     on_request=None if quiet else _stderr_line, on_error=_stderr_line,
                     debug=os.environ.get("LFM2_DEBUG") == "1")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Ctrl-C: stop generating now; uvicorn would otherwise wait for every reply in flight to finish
            engine.close(timeout=0)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on")
    server = Server(config)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    _stderr_line(f"lfm2 serve · {model_id} · {lm.device.type} {str(lm.dtype).removeprefix('torch.')} · context "
                 f"{engine.context} tokens · listening on http://{shown}:{bound_port}/v1"
                 f"{' (API key required)' if api_key else ''} · Ctrl-C stops")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal it caught again once it has shut down
        pass
    _stderr_line("lfm2 serve stopped")
