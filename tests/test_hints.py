"""Every hint names an option that exists on the command that prints it.

Two nets: every `--flag` written anywhere in lfm2cli/ is an option of some command (of the one named, where the
text says `lfm2 CMD ... --flag`); and the hints each command really prints, collected by running it into the
usual failures (a model not downloaded, offline, a damaged cache, too little memory, no network, ...), name only
that command's own options.
"""

from __future__ import annotations

import ast
import io
import re
import socket
import sys
from pathlib import Path

import pytest
import typer

from lfm2cli.cli import app
from tests.helpers import run_main
from tests.hub_server import FakeHub

PACKAGE = Path(__file__).resolve().parents[1] / "lfm2cli"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# `lfm2 CMD [SUB] ...`: the flags up to a backtick, a semicolon, a bracket or the line's end belong to CMD
COMMAND_LINE = re.compile(r"\blfm2 ([a-z]+)(?: ([a-z]+))?[^`;()\n]*")


def _options() -> dict[str, set[str]]:
    """Command path ("generate", "history export", "" for lfm2 itself) -> its long options."""
    out: dict[str, set[str]] = {}

    def walk(cmd, path: str) -> None:
        out[path] = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return out


OPTIONS = _options()


def attributed(text: str, printer: str | None) -> list[tuple[str | None, str]]:
    """(command, flag) for every flag in `text`: the command a `lfm2 CMD` before it names, else `printer`."""
    out: list[tuple[str | None, str]] = []
    rest = text
    for m in COMMAND_LINE.finditer(text):
        path = m.group(1)
        if m.group(2) and f"{path} {m.group(2)}" in OPTIONS:
            path = f"{path} {m.group(2)}"
        out += [(path, f) for f in FLAG.findall(m.group(0))]
        rest = rest.replace(m.group(0), " ", 1)
    return out + [(printer, f) for f in FLAG.findall(rest)]


def test_the_attribution_rule() -> None:
    assert attributed("x is not downloaded yet; run: lfm2 pull x --revision v1 (or pass --pull)", "info") == [
        ("pull", "--revision"), ("info", "--pull")]
    assert attributed("fix it (`lfm2 generate --raw` sends no template); or --force", "chat") == [
        ("generate", "--raw"), ("chat", "--force")]
    assert attributed("use lfm2 history export 3 --format json", None) == [("history export", "--format")]


def _texts(tree: ast.AST) -> list[str]:
    """Every string literal of a module, an f-string whole (its fields as `X`), so `lfm2 pull {x} --revision`
    keeps its command."""
    out, inside = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "X" for v in node.values]
            out.append("".join(str(p) for p in parts))
            inside.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
            out.append(node.value)
    return out


@pytest.mark.slow
def test_every_flag_written_in_the_package_exists() -> None:
    """A flag in a message, a help text or a docstring is an option of the command it names, or of some command."""
    every = set().union(*OPTIONS.values())
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for text in _texts(ast.parse(path.read_text(encoding="utf-8"))):
            for command, flag in attributed(text, None):
                if command is not None and command in OPTIONS:
                    ok = flag in OPTIONS[command]
                else:
                    ok = flag in every
                if not ok:
                    wrong.append(f"{path.relative_to(PACKAGE)}: {flag} ({command or 'any command'}): {text[:80]!r}")
    assert not wrong, "\n".join(wrong)


# ---- what the commands really print ----

MODEL_COMMANDS = {"info": [], "generate": ["-p", "hi"], "chat": [], "serve": [], "bench": []}


@pytest.fixture()
def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and Hugging Face cache of the test's own, and a hub that cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LFM2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # piped and empty: nothing to ask, nothing to read
    return tmp_path


def _damaged(cache: Path, src: Path) -> None:
    from lfm2cli.hub import local

    commit = "d" * 40
    snap = local.snapshot_dir("test-org/bad", commit, cache)
    snap.mkdir(parents=True)
    (snap / "config.json").write_bytes((src / "config.json").read_bytes())
    local.write_ref("test-org/bad", "main", commit, cache)
    meta = cache / "models" / "test-org--bad" / "meta" / f"{commit}.json"
    meta.parent.mkdir()
    meta.write_text('{"files": null}')


@pytest.mark.slow
def test_the_hints_each_command_prints_name_its_own_options(setting, dense_ckpt, monkeypatch, capsys):
    import lfm2cli.hub.local
    import lfm2cli.system.memory

    cache = setting / "cache"
    cases: list[tuple[str, list[str]]] = []
    for command, extra in MODEL_COMMANDS.items():
        cases += [(command, [command, "test-org/absent", *extra]),  # not downloaded
                  (command, [command, "test-org/absent", "--offline", *extra]),
                  (command, [command, "test-org/bad", *extra])]  # a damaged cache index
        if command != "info":
            cases += [(command, [command, "test-org/absent", "--pull", *extra])]  # no network
    cases += [("pull", ["pull", "test-org/absent"]), ("pull", ["pull", "test-org/bad"]),
              ("rm", ["rm", "test-org/bad"]), ("rm", ["rm", "test-org/absent", "--yes"]), ("list", ["list"])]
    _damaged(cache, dense_ckpt)

    seen: dict[str, set[str]] = {}
    wrong = []

    def run(command: str, args: list[str]) -> None:
        code, out, err = run_main(args, monkeypatch, capsys)
        for owner, flag in attributed(out + err, command):
            seen.setdefault(owner, set()).add(flag)
            if flag not in OPTIONS.get(owner, set()):
                wrong.append(f"lfm2 {' '.join(args)} (exit {code}): {flag} is no option of {owner}: {err.strip()}")

    for command, args in cases:
        run(command, args)
    with FakeHub() as hub:  # a hub that answers: a revision it lacks
        hub.add_repo("test-org/tiny", {"tokenizer.json": b"{}"}, source=dense_ckpt)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        run("pull", ["pull", "test-org/tiny", "--revision", "v9"])
    # too little memory: the guard's advice, for each command that loads a model
    with monkeypatch.context() as m:
        m.setattr(lfm2cli.system.memory, "available_memory", lambda device: 1)
        for command, extra in MODEL_COMMANDS.items():
            if command != "info":
                run(command, [command, str(dense_ckpt), *extra])
    # out of memory anywhere: the last line of defence
    with monkeypatch.context() as m:
        def exhausted(*args, **kwargs):
            raise MemoryError

        m.setattr(lfm2cli.hub.local, "find_cached", exhausted)
        for command, extra in MODEL_COMMANDS.items():
            run(command, [command, "test-org/absent", *extra])
    # a cache setting that is a file
    blocker = setting / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LFM2_CACHE", str(blocker))
    for command, extra in [*MODEL_COMMANDS.items(), ("pull", []), ("list", [])]:
        run(command, [command, *(["test-org/absent"] if command != "list" else []), *extra])

    assert not wrong, "\n".join(wrong)
    # the net caught something: the hints these failures give where the options exist
    assert {"--pull", "--quantize", "--force"} <= seen["generate"] and "--quantize" in seen["bench"]
    assert "--dtype" in seen["chat"] and "--yes" in seen["rm"] and "--revision" in seen["pull"]
    assert "--pull" not in seen.get("info", set())
