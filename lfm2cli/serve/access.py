"""Which web pages and which Host names may reach the server: the defence against cross-site requests and DNS
rebinding.

A browser lets any page send a "simple" POST (`text/plain` body, no custom header) to a server on this machine,
and a page on a domain the attacker re-points at 127.0.0.1 reaches it as if it were its own. What the browser
always sends says who is asking: `Origin` (the page's origin, on every cross-origin request and every POST) and
`Host` (the name the page used to reach the server). A request is answered only when

- its Host is an IP address (no DNS name, so no rebinding), `localhost` (or a `*.localhost` name), the machine's
  own host name, or a name allowed with `--allow-host`; and
- it has no Origin (not a browser), or the Origin is the server itself (same origin), a page on this machine
  (`http://localhost:3000`, `http://127.0.0.1:5173`), or one allowed with `--allow-origin`.

`Access.origin_allowed` is the one rule; CORS headers, when they come, answer from it too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

ANY = "*"


def _hostname(netloc: str) -> str | None:
    """The host part of `host[:port]` or `[v6]:port`, lowercased and without a trailing dot; None if malformed."""
    try:
        parts = urlsplit("//" + netloc)
        name = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    if not name or any(c in netloc for c in "/?#@\\ \t"):
        return None
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_local(name: str) -> bool:
    """`localhost`, a `*.localhost` name (browsers resolve both to this machine themselves), or a loopback IP."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normalize_origin(text: str) -> str:
    """An `--allow-origin` value as browsers send it: `scheme://host[:port]`, lowercased, the default port dropped;
    `*` (any page) and `null` (sandboxed frames, local files) are kept. ValueError says what is wrong."""
    text = text.strip()
    if text in (ANY, "null"):
        return text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin like https://app.example.com or http://localhost:3000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r} is not an origin like https://app.example.com or http://localhost:3000 "
                         "(a scheme and a host, no path)")
    host = parts.hostname.rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def normalize_host(text: str) -> str:
    """An `--allow-host` value: a host name (a port, if given, is dropped; `*` allows any). ValueError if it is
    not one."""
    text = text.strip()
    if text == ANY:
        return text
    name = _hostname(text)
    if name is None:
        raise ValueError(f"{text!r} is not a host name like lfm2.example.com")
    return name


@dataclass(frozen=True)
class Access:
    """The allow-lists (normalized with `normalize_origin` and `normalize_host`) and the rules above."""

    origins: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def build(cls, origins: Iterable[str] = (), hosts: Iterable[str] = ()) -> Access:
        """From option values, with the machine's own host name allowed; ValueError naming a value that is not an
        origin or a host name."""
        own = socket.gethostname().lower().rstrip(".")
        return cls(frozenset(normalize_origin(o) for o in origins),
                   frozenset({own, *(normalize_host(h) for h in hosts)} - {""}))

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this Host header may be answered (None: no Host, so no browser sent it)."""
        if host is None:
            return True
        name = _hostname(host.lower())
        if name is None:
            return False
        return _is_ip(name) or _is_local(name) or name in self.hosts or ANY in self.hosts

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """Whether a page with this Origin may use the server reached under `host` (its Host header)."""
        if origin is None or ANY in self.origins:
            return True
        origin = origin.strip().lower()
        if origin in self.origins:
            return True
        if origin == "null":
            return False
        try:
            normalized = normalize_origin(origin)
        except ValueError:
            return False
        netloc = normalized.split("://", 1)[1]
        if normalized in self.origins or (host is not None and netloc == host.strip().lower().rstrip(".")):
            return True  # listed, or the page is the server itself
        name = _hostname(netloc)
        return name is not None and _is_local(name)
