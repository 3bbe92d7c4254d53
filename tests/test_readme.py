"""Every shell and Python example in README.md runs, as written, and succeeds.

A tiny chat checkpoint (tests/tiny.py) stands in for every model: tests/hub_server.py's local hub publishes it
under each LiquidAI repo id and alias the README names (HF_ENDPOINT points there), and it is pulled into a model
cache of the test's own, so `lfm2 pull lfm2-1.2b` and `lfm2 chat lfm2-8b-a1b` run literally. Local names the
README uses (`MODEL`, `tiny`, `./g1`, `path/to/checkpoint`, ...) are copies of it in the working directory, next to
the files the examples read (notes.txt, letter.txt, person.json, tools.json, weather.py) in a git repository with
a change (for `git diff | ...`). Saved conversations exist under the ids the README uses (`3f2a`).

Each code block runs in a fresh copy of that world, one command line at a time: `bash` blocks line by line,
`console`/`text` transcripts by their `$ ` lines (their `> ` lines are the typed input), `python` blocks whole.
Interactive commands read a scripted stdin; `lfm2 serve` starts in the background, answers /health and one chat
request (with the example's API key), serves the block's later lines, and stops on Ctrl-C. The blocks this test
cannot run are in NOT_RUN, with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console"}  # console/text blocks are transcripts: only `$ ` lines are commands
TRANSCRIPT = {"console", "text"}
PYTHON = {"python", "py"}
TIMEOUT_S = 300

# A phrase that marks a block -> why this test does not run it.
NOT_RUN = {
    "pip install torch==": "the install itself: .ci/run runs it, exactly as written, in a new venv",
    "python3 -m pytest": "the test suite itself: .ci/run runs it after the install block",
    "pipx install": "installs into the user's own tools from PyPI and PyTorch's index, which tests never reach",
}
# Names the README gives to local checkpoint directories; `./NAME` paths in commands are added to these.
LOCAL_MODELS = ("MODEL", "tiny", "path/to/checkpoint")
SERVER_KEY = "sk-readme-test"  # what "$KEY" holds

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
WEATHER_PY = '''from typing import Literal


def get_weather(city: Literal["Paris", "Oslo", "Lima"], unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """The current weather in a city.

    Args:
        city: The city.
        unit: The temperature unit.
    """
    return {"city": city, "temperature": 18 if unit == "celsius" else 64, "unit": unit, "sky": "sunny"}
'''


# ---- the README's examples

@dataclass
class Command:
    text: str  # one shell command line, continuations joined
    lineno: int
    stdin: str | None = None  # typed input from a transcript; None: chosen by the command (scripted_stdin)


@dataclass
class Block:
    lineno: int  # of the opening fence
    lang: str
    body: str
    heading: str
    commands: list[Command] = field(default_factory=list)

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:30]
        return f"L{self.lineno}-{self.lang}-{slug}"

    def not_run(self) -> str | None:
        return next((why for phrase, why in NOT_RUN.items() if phrase in self.body), None)


def read_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with the shell commands of the shell blocks and transcripts."""
    out: list[Block] = []
    heading, lines, i = "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^(`{3,})(\w*)\s*$", line)
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        block = Block(i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]) + "\n", heading)
        if block.lang in TRANSCRIPT:
            block.commands = transcript_commands(lines[i + 1:end], i + 2)
        elif block.lang in SHELL:
            block.commands = script_commands(lines[i + 1:end], i + 2)
        out.append(block)
        i = end + 1
    return out


def script_commands(lines: list[str], first: int) -> list[Command]:
    out: list[Command] = []
    pending, start = "", first
    for n, line in enumerate(lines, first):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append(Command(text, start))
    return out


def transcript_commands(lines: list[str], first: int) -> list[Command]:
    """`$ command` lines; the `> text` lines after one are what was typed into it (`^D` ends the input)."""
    out: list[Command] = []
    typed: list[str] | None = None
    for n, line in enumerate(lines, first):
        if line.startswith("$ "):
            typed = []
            out.append(Command(line[2:].strip(), n))
        elif line.startswith("> ") and out and typed is not None:
            if line[2:].strip() == "^D":
                typed = None
                continue
            typed.append(line[2:])
            out[-1].stdin = "".join(t + "\n" for t in typed)
    return out


BLOCKS = read_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if (b.commands or b.lang in PYTHON) and not b.not_run()]


ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def split_lfm2(command: str) -> tuple[dict[str, str], list[str], bool]:
    """The first `lfm2` of a command line: (the variables set on it, its arguments, whether a pipe or a
    redirection feeds its stdin); ({}, [], False) when the line runs no lfm2. Shell quoting is undone."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return {}, [], False
    start = 0
    for i, w in enumerate(words):
        if w in ("|", "&&", "||", ";"):
            start = i + 1
        elif w == "lfm2" and all(ASSIGNMENT.match(v) for v in words[start:i]):
            assigned = dict(v.split("=", 1) for v in words[start:i])
            fed = start > 0 and words[start - 1] == "|" or any(a == "<" or a.startswith("<") for a in words[i:])
            return assigned, words[i + 1:], fed
    return {}, [], False


def lfm2_args(command: str) -> list[str]:
    return split_lfm2(command)[1]


def scripted_stdin(command: str) -> str:
    """What a user would type into a command that reads its stdin: a message for chat."""
    _, args, fed = split_lfm2(command)
    return "Hello\n" if args[:1] == ["chat"] and not fed else ""


def asks_first(command: str) -> bool:
    """A deletion without --yes asks its question only on a terminal."""
    args = lfm2_args(command)
    return (args[:1] == ["rm"] or args[:2] == ["history", "rm"]) and not {"--yes", "-y"} & set(args)


def run_on_terminal(command: str, env: dict[str, str], cwd: Path, answer: str) -> tuple[int, str]:
    """The command with a pseudo-terminal for stdin, stdout and stderr, `answer` typed into it: (exit code,
    what the terminal showed)."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=follower, stdout=follower,
                            stderr=follower, start_new_session=True)
    os.close(follower)
    os.write(leader, answer.encode())  # held by the terminal until the question reads it
    shown = b""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: every process holding the terminal has closed it
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(timeout=TIMEOUT_S), shown.decode(errors="replace")


def all_commands() -> list[Command]:
    return [c for b in BLOCKS for c in b.commands]


def named_repos() -> set[str]:
    """Every LiquidAI repo the README names, by repo id or by alias, and the default model."""
    from lfm2cli.hub.names import ALIASES, DEFAULT_MODEL

    text = README.read_text(encoding="utf-8")
    repos = {m.rstrip(".-") for m in re.findall(r"LiquidAI/[A-Za-z0-9._-]+", text)}
    for word in re.findall(r"(?<![\w/.-])(lfm2[\w.-]*)", text, flags=re.IGNORECASE):
        alias = word.lower().rstrip(".-")
        if alias in ALIASES:
            repos.add(ALIASES[alias])
    return repos | {DEFAULT_MODEL}


def conversation_ids() -> set[str]:
    """The conversation ids (or id prefixes) the README's commands pass."""
    found = set()
    for c in all_commands():
        found |= set(re.findall(r"(?:--resume|history\s+(?:show|export|rm))\s+([0-9a-f]{4,8})\b", c.text))
    return found


def local_model_names() -> set[str]:
    names = set(LOCAL_MODELS)
    for c in all_commands():
        names |= {m for m in re.findall(r"(?<![\w/.])\./([\w.-]+)", c.text) if not m.endswith((".json", ".py"))}
    return names


# ---- the world the examples run in

@dataclass
class World:
    base: Path  # work/, cache/, home/: copied for each block
    env: dict[str, str]


def fresh_copy(world: World, dest: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the world for one block: its own working directory, model cache, history and HOME."""
    shutil.copytree(world.base, dest, symlinks=True)
    env = dict(world.env)
    env.update(LFM2_CACHE=str(dest / "cache"), LFM2_HOME=str(dest / "home"), HF_HOME=str(dest / "hf"),
               HOME=str(dest / "user"))
    (dest / "hf").mkdir()
    (dest / "user").mkdir()
    return dest / "work", env


def base_env(shim: Path, hub_url: str) -> dict[str, str]:
    """The user's environment less anything that would change what the examples do."""
    dropped = ("HF_", "HUGGING", "XDG_", "LFM2_CACHE", "LFM2_HOME", "LFM2_API_KEY", "LFM2_SERVE_API_KEY",
               "OPENAI_", "TRANSFORMERS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(PATH=f"{shim}{os.pathsep}{env.get('PATH', '')}", HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", KEY=SERVER_KEY, COLUMNS="120",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    return env


def write_inputs(work: Path, ckpt: Path) -> None:
    for name in local_model_names():
        shutil.copytree(ckpt, work / name)
    (work / "notes.txt").write_text("Meeting notes. Ada sends the draft on Monday. Bob books the room for the "
                                    "review. Everyone reads the RoPE paper before Friday.\n")
    (work / "letter.txt").write_text("Dear Ada,\nThank you for the draft. See you on Friday.\nBob\n")
    (work / "person.json").write_text(json.dumps(PERSON_SCHEMA, indent=2))
    (work / "tools.json").write_text(json.dumps([WEATHER_TOOL], indent=2))
    (work / "weather.py").write_text(WEATHER_PY)
    if shutil.which("git"):  # `git diff | lfm2 generate MODEL -p -` needs a change to show
        (work / "sea.py").write_text("def wave():\n    return 1\n")
        who = ["-c", "user.name=readme", "-c", "user.email=readme@example.com"]
        for args in (["init", "-q"], ["add", "sea.py"], ["commit", "-q", "-m", "sea"]):
            subprocess.run(["git", *who, *args], cwd=work, check=True, capture_output=True)
        (work / "sea.py").write_text("def wave(height: int = 2):\n    return height\n")


def seed_history(home: Path, ids: set[str]) -> None:
    """A saved conversation under each id the README passes (the id, padded to the 8 hex digits of a real one)."""
    from lfm2cli.hub.names import DEFAULT_MODEL
    from lfm2cli.store import conversations
    from lfm2cli.store.conversations import HistoryStore

    with pytest.MonkeyPatch.context() as mp, HistoryStore(home / "history.db") as store:
        for conv_id in sorted(ids):
            mp.setattr(conversations.secrets, "token_hex", lambda n, i=conv_id: i.ljust(2 * n, "0"))
            conv = store.create_conversation(DEFAULT_MODEL)
            store.add_message(conv.id, "user", "How does rope scaling work?")
            store.add_message(conv.id, "assistant", "Rope scaling stretches the rotary positions, so a model reads "
                              "past the context it was trained on.", tokens=19, finish_reason="stop")


def run(args: list[str], env: dict[str, str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def world(chat_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("readme")
    shim = root / "bin"
    shim.mkdir()
    # `lfm2` as the shell finds it: this Python's lfm2, installed or not
    (shim / "lfm2").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m lfm2cli \"$@\"\n")
    (shim / "lfm2").chmod(0o755)
    base = root / "base"
    for d in ("work", "cache", "home"):
        (base / d).mkdir(parents=True)
    with FakeHub() as hub:
        repos = sorted(named_repos())
        for repo in repos:
            hub.add_repo(repo, source=chat_ckpt)
        env = base_env(shim, hub.url)
        env.update(LFM2_CACHE=str(base / "cache"), LFM2_HOME=str(base / "home"), HF_HOME=str(root / "hf"),
                   HOME=str(root))
        pulled = run(["bash", "-c", 'for r in "$@"; do lfm2 pull "$r" || exit 1; done', "pull", *repos], env, root)
        assert pulled.returncode == 0, pulled.stderr
        # lfm2's CPU code, compiled once here (into the cache) rather than in every block's copy
        built = run([sys.executable, "-c", "from lfm2cli.kernels import native; from lfm2cli.system import paths; "
                     "native.load(paths.cache_dir() / 'kernels')"], env, root)
        assert built.returncode == 0, built.stderr
        write_inputs(base / "work", chat_ckpt)
        seed_history(base / "home", conversation_ids())
        yield World(base, env)


# ---- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is free
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def expand(word: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), word)


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def call(url: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


class Server:
    """`lfm2 serve ...` from the README, in the background, on its own port when that port is free."""

    def __init__(self, command: Command, env: dict[str, str], cwd: Path, log: Path) -> None:
        assigned, args, _ = split_lfm2(command.text)
        env = {**env, **{k: expand(v, env) for k, v in assigned.items()}}
        args = [expand(a, env) for a in args]
        self.port = int(option(args, "--port") or 8080)
        self.moved_from: int | None = None
        if not port_is_free(self.port):  # another program's port: the example's own one is not the point
            self.moved_from, self.port = self.port, free_port()
            args += ["--port", str(self.port)]
        self.key = option(args, "--api-key") or env.get("LFM2_SERVE_API_KEY")
        self.command, self.log = command, log
        self.proc = subprocess.Popen([shutil.which("lfm2", path=env["PATH"]) or "lfm2", *args], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"line {self.command.lineno}: `{self.command.text}` exited with {self.proc.returncode}:\n"
                            f"{self.log.read_text()[-3000:]}")
            try:
                if call(self.url + "/health", None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"line {self.command.lineno}: `{self.command.text}` never answered /health")

    def check_a_chat_request(self) -> None:
        status, models = call(self.url + "/v1/models", self.key)
        assert status == 200, (self.command.text, models)
        body = {"model": models["data"][0]["id"], "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 8}
        status, reply = call(self.url + "/v1/chat/completions", self.key, body)
        assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant", (self.command.text, reply)

    def rewrite(self, text: str) -> str:
        """A later line of the block, talking to this server where it really listens."""
        if self.moved_from is None:
            return text
        return re.sub(rf"(127\.0\.0\.1|localhost):{self.moved_from}\b", rf"\g<1>:{self.port}", text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"line {self.command.lineno}: `{self.command.text}` did not stop on Ctrl-C")
        assert self.proc.returncode in (0, 130, -signal.SIGINT), self.log.read_text()[-3000:]


# ---- the tests

def test_the_examples_are_found() -> None:
    """The parser sees the README's examples, and every block this test does not run is still there."""
    langs = {b.lang for b in RUNNABLE}
    assert {"bash", "python"} <= langs
    commands = [c.text for b in RUNNABLE for c in b.commands]
    assert any(c.startswith("lfm2 generate") for c in commands) and any("lfm2 serve" in c for c in commands)
    for phrase in NOT_RUN:
        assert any(phrase in b.body for b in BLOCKS), f"NOT_RUN names {phrase!r}, which no README block has"
    assert "LiquidAI/LFM2-1.2B" in named_repos()  # `lfm2 pull lfm2-1.2b` finds it on the stand-in hub


def test_transcripts_give_typed_input_to_their_command() -> None:
    cmds = transcript_commands(["$ lfm2 chat ./g1 -n 4", "lfm2 chat · ./g1", "> Hello there", "…", "> /stats",
                                "> ^D", "saved", "$ lfm2 info ./g1 | cat", "architecture: LFM2"], 10)
    assert [(c.text, c.lineno, c.stdin) for c in cmds] == [("lfm2 chat ./g1 -n 4", 10, "Hello there\n/stats\n"),
                                                            ("lfm2 info ./g1 | cat", 17, None)]
    assert scripted_stdin("lfm2 chat lfm2-1.2b   # talk") == "Hello\n"
    assert scripted_stdin("printf 'Hi!\\n/exit\\n' | lfm2 chat lfm2-350m") == ""
    assert asks_first("lfm2 rm lfm2-1.2b  # asks") and not asks_first("lfm2 history rm 3f2a --yes")
    assert scripted_stdin("lfm2 chat MODEL < letter.txt") == ""
    assert split_lfm2('KEY=1 lfm2 serve m --api-key "$KEY"  # c') == ({"KEY": "1"}, ["serve", "m", "--api-key",
                                                                                        "$KEY"], False)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_example_runs(block: Block, world: World, tmp_path: Path) -> None:
    work, env = fresh_copy(world, tmp_path / "w")
    if block.lang in PYTHON:
        r = run([sys.executable, "-c", block.body], env, work)
        assert r.returncode == 0, f"README line {block.lineno}: the Python example failed:\n{r.stderr[-3000:]}"
        return
    server: Server | None = None
    try:
        for command in block.commands:
            if lfm2_args(command.text)[:1] == ["serve"]:
                if server is not None:
                    server.stop()
                server = Server(command, env, work, tmp_path / f"serve-{command.lineno}.log")
                server.wait_ready()
                server.check_a_chat_request()
                continue
            text = server.rewrite(command.text) if server else command.text
            if asks_first(text):
                code, shown = run_on_terminal(text, env, work, "y\n")
                assert code == 0, f"README line {command.lineno}: `{command.text}` exited with {code}:\n{shown}"
                continue
            stdin = command.stdin if command.stdin is not None else scripted_stdin(text)
            r = run(["bash", "-o", "pipefail", "-c", text], env, work, stdin)
            assert r.returncode == 0, (f"README line {command.lineno}: `{command.text}` exited with {r.returncode}\n"
                                       f"stdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-3000:]}")
    finally:
        if server is not None:
            server.stop()
