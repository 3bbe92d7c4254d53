"""A small stand-in for the Hugging Face hub on 127.0.0.1, speaking the part of its HTTP API that
huggingface_hub and lfm2 use: model info, the file tree, and `resolve/` downloads (HEAD and GET, with
ETag, X-Repo-Commit, Content-Length and Range). Large files are redirected to a `/cdn/` URL as the real
hub does for LFS/xet files. It records every request and the file bytes it sends, can cut a transfer
after N bytes (to test resume) and answers RepoNotFound, RevisionNotFound, EntryNotFound and GatedRepo
the way the hub does (404/401 with an X-Error-Code header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class Logged:
    method: str
    path: str  # decoded, without the query
    headers: dict[str, str]  # names in lower case


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class FakeHub:
    """Use as a context manager; `url` is what HF_ENDPOINT should be set to."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.token: str | None = None  # the one token that opens gated repos
        self.log: list[Logged] = []
        self.file_bytes: dict[str, int] = {}  # repo path -> content bytes sent (bodies of GETs only)
        self.cut: dict[str, int] = {}  # repo path -> drop the connection after this many bytes (once)
        self.after_cut: int | None = None  # when set, a cut file then answers this HTTP status
        self.fail: dict[str, int] = {}  # repo path -> HTTP status for its downloads, until removed
        self._lfs: dict[str, tuple[str, str, bytes]] = {}  # sha256 -> (repo id, commit, path)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- content ----

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, source: Path | None = None,
                 branch: str = "main", gated: bool = False) -> str:
        """Add a commit to `repo_id` (creating it) from a directory's files plus `files`; returns the commit."""
        content: dict[str, bytes] = {}
        if source is not None:
            content.update({p.name: p.read_bytes() for p in sorted(Path(source).iterdir()) if p.is_file()})
        content.update(files or {})
        digest = hashlib.sha1()
        for name in sorted(content):
            digest.update(name.encode() + b"\0" + _git_oid(content[name]).encode())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        repo.commits[commit] = content
        repo.refs[branch] = commit
        for path, data in content.items():
            if _is_lfs(path):
                self._lfs[_sha256(data)] = (repo_id, commit, path)
        return commit

    # ---- what happened ----

    def requests(self, method: str | None = None, file: str | None = None) -> list[Logged]:
        """Logged requests, optionally only one method and only downloads of one repo file."""
        out = []
        for r in self.log:
            if method and r.method != method:
                continue
            if file is not None and self._file_of(r.path) != file:
                continue
            out.append(r)
        return out

    def downloads(self) -> list[Logged]:
        """GETs of file content (resolve/ and the CDN): what a no-op pull must not do."""
        return [r for r in self.log if r.method == "GET" and self._file_of(r.path) is not None]

    def _file_of(self, path: str) -> str | None:
        m = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", path)
        if m and not path.startswith("/api/"):
            return m.group(1)
        m = re.match(r"^/cdn/([0-9a-f]{64})$", path)
        if m and m.group(1) in self._lfs:
            return self._lfs[m.group(1)][2]
        return None

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()
            self.file_bytes.clear()

    # ---- server ----

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- lookups used by the handler ----

    def resolve(self, repo_id: str, revision: str) -> tuple[Repo | None, str | None]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        if revision in repo.refs:
            return repo, repo.refs[revision]
        return repo, revision if revision in repo.commits else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ---- plumbing ----

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any) -> None:
        self._reply(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._reply(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                   "X-Error-Message": message})

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.log.append(Logged(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
        if m:
            return self._model_info(m.group(1), m.group(2) or "main")
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
        if m:
            return self._tree(m.group(1), m.group(2))
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(m.group(1), m.group(2), m.group(3))
        m = re.match(r"^/cdn/([0-9a-f]{64})$", path)
        if m and m.group(1) in self.hub._lfs:
            repo_id, commit, name = self.hub._lfs[m.group(1)]
            return self._content(self.hub.repos[repo_id].commits[commit][name], name, commit)
        self._error(404, "NotFound", "no such endpoint")

    # ---- endpoints ----

    def _lookup(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        repo, commit = self.hub.resolve(repo_id, revision)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        self._json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "sha": commit, "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
            "tags": ["lfm2"], "siblings": [{"rfilename": n} for n in sorted(files)],
            "lastModified": "2025-07-10T00:00:00.000Z", "createdAt": "2025-07-01T00:00:00.000Z",
        })

    def _tree(self, repo_id: str, revision: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        entries = []
        for name, data in sorted(repo.commits[commit].items()):
            entry: dict[str, Any] = {"type": "file", "oid": _git_oid(data), "size": len(data), "path": name}
            if _is_lfs(name):
                entry["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, name: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return
        data = repo.commits[commit].get(name)
        if data is None:
            self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
            return
        if _is_lfs(name):
            # like the hub: the file's identity on the redirect itself, the bytes elsewhere
            sha = _sha256(data)
            self._reply(302, b"", {"Location": f"{self.hub.url}/cdn/{sha}", "X-Repo-Commit": commit,
                                   "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                   "ETag": f'"{_git_oid(data)}"'})
            return
        self._content(data, name, commit)

    def _content(self, data: bytes, name: str, commit: str) -> None:
        hub = self.hub
        if self.command == "GET" and name in hub.fail:
            self._error(hub.fail[name], "Unavailable", "try again later")
            return
        etag = _sha256(data) if _is_lfs(name) else _git_oid(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, end, status = 0, len(data), 200
        m = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub._lock:
            limit = hub.cut.pop(name, None) if self.command == "GET" else None
            if limit is not None and hub.after_cut is not None:
                hub.fail[name] = hub.after_cut
        if limit is not None and limit < len(body):
            body = body[:limit]
            self.close_connection = True  # the client sees the connection drop mid-body
        with hub._lock:  # counted before sending: the client may be done before this thread runs again
            hub.file_bytes[name] = hub.file_bytes.get(name, 0) + len(body)
        self.wfile.write(body)
        self.wfile.flush()
