"""`--help` as a newcomer reads it (panels, choices, flags, examples, wrapping), one-line usage errors, and shell
completion."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lfm2cli.cli import app

runner = CliRunner()
ROOT = typer.main.get_command(app)


def commands(cmd=ROOT, path: tuple[str, ...] = ()):
    """(path, command) for every command and group, the app itself first."""
    yield path, cmd
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        yield from commands(sub, (*path, name))


def help_of(path: tuple[str, ...], columns: int = 120) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(columns), "TERMINAL_WIDTH": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def panel(text: str, title: str) -> list[str]:
    """The rows of one `╭─ title ─╮` box, without the border."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"╭─ {re.escape(title)} ─", line))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
    return [line[2:-2] for line in lines[start + 1:end]]


def test_generate_and_chat_group_their_options_in_panels() -> None:
    for command in ("generate", "chat"):
        text = help_of((command,))
        for title in ("Options", "Sampling", "Output", "Tools", "Model", "Performance"):
            assert panel(text, title), f"{command}: no {title} panel"
        assert any("--temperature" in row for row in panel(text, "Sampling"))
        assert any("--quantize" in row for row in panel(text, "Performance"))
        assert any("--offline" in row for row in panel(text, "Model"))
        # the main panel is short: what the command is about, not 30 options
        assert len([row for row in panel(text, "Options") if row.lstrip().startswith("-")]) <= 6


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=lambda p: " ".join(p) or "lfm2")
def test_options_show_no_bool_or_str_placeholders(path: tuple[str, ...]) -> None:
    """Flags take no value, and an option's value is named (TEXT, N, FILE) or its choices listed."""
    text = help_of(path)
    options = [row for row in text.splitlines() if row.startswith("│ -")]
    assert options and not [row for row in options if "<bool>" in row or "<str>" in row]


def test_options_with_fixed_choices_list_them_and_take_any_case() -> None:
    text = help_of(("generate",))
    for choices in ("<auto|cpu|cuda|mps>", "<auto|bfloat16|float16|float32>", "<none|int8|int4>", "<show|hide>",
                    "<text|json>"):
        assert choices in text
    assert "<show|hide|fold>" in help_of(("chat",))
    assert "[default: auto]" in text and "[default: none]" in text and "[default: 1024]" in text
    # parsed, a choice is the plain string the library expects, whatever its case on the command line
    ctx = ROOT.commands["generate"].make_context("generate", ["--quantize", "INT8", "--device", "CPU"])
    assert ctx.params["quantize"] == "int8" and type(ctx.params["quantize"]) is str and ctx.params["device"] == "cpu"


def examples(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    return [line.strip() for line in lines[start + 1:] if line.strip()]


def parse_example(example: str) -> tuple[str, ...]:
    """Parse an example's lfm2 command line with the real parser (an option that does not exist, or a value that is
    not among its choices, fails here); the command it runs."""
    line = example[re.search(r"(^|[\s(])lfm2 ", example).start():].lstrip(" (")
    args = shlex.split(re.split(r"[|>)]", line)[0])[1:]
    cmd, path = ROOT, ()
    while args and args[0] in (getattr(cmd, "commands", None) or {}):
        path += (args.pop(0),)
        cmd = cmd.commands[path[-1]]
    cmd.make_context(path[-1] if path else "lfm2", args)
    return path


@pytest.mark.parametrize("path", [p for p, _ in commands() if p[:1] != ("history",) or len(p) == 1],
                         ids=lambda p: " ".join(p) or "lfm2")
def test_every_command_has_examples_that_parse(path: tuple[str, ...]) -> None:
    """Two to four examples after the options, each a command line the parser accepts. (The history group's
    examples cover its small subcommands.)"""
    found = examples(help_of(path))
    assert 2 <= len(found) <= 4, found
    for example in found:
        ran = parse_example(example)
        assert ran[:len(path)] == path, example
    assert dict(commands())[path].epilog.startswith("Examples:")


@pytest.mark.parametrize("columns", [80, 120])
def test_top_level_help_wraps_only_at_the_terminal_edge(columns: int) -> None:
    """Each command's description in `lfm2 --help` is its whole first paragraph, broken only where the next word
    would not fit (a line break taken from the source would cut a sentence short)."""
    rows = panel(help_of((), columns), "Commands")
    offset = len(re.match(r"\S+\s+", rows[0]).group(0))  # where the descriptions start
    width = len(rows[0]) - offset
    described: dict[str, list[str]] = {}
    for row in rows:
        if row[:offset].strip():
            described[row[:offset].strip()] = []
        described[list(described)[-1]].append(row[offset:].rstrip())
    assert set(described) == set(ROOT.commands)
    for name, lines in described.items():
        expected = ROOT.commands[name].help.split("\n\n")[0]
        assert " ".join(lines) == expected, name
        for line, following in zip(lines, lines[1:], strict=False):
            assert len(line) + 1 + len(following.split()[0]) > width, f"{name}: broken early at {line!r}"


def test_root_help_offers_completion_and_examples() -> None:
    text = help_of(())
    assert "--install-completion" in text and "--show-completion" in text
    assert len(examples(text)) >= 2


def test_usage_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers import run_main

    for args, message in [(["generate", "--bogus"], "No such option: --bogus"),
                          (["generate", "--quantize", "int3"], "'int3' is not one of 'none', 'int8', 'int4'"),
                          (["chat", "--think", "loud"], "'loud' is not one of 'show', 'hide', 'fold'"),
                          (["nonsense"], "No such command 'nonsense'")]:
        code, out, err = run_main(args, monkeypatch, capsys)
        assert code == 2 and out == "", args
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert "--help`" in err and "Value error" not in err


def _lfm2(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm2cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.mark.slow
def test_shell_completion(tmp_path: Path) -> None:
    # the shell named outright: typer otherwise detects it from the parent processes, and a suite run in the
    # background (its shell gone) has none
    script = _lfm2("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "_LFM2_COMPLETE=complete_bash" in script.stdout

    def complete(words: str) -> list[str]:
        env = {"_LFM2_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1
                                                                                         + words.endswith(" "))}
        result = _lfm2(env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("lfm2 gen") == ["generate"]
    assert complete("lfm2 generate --quantize ") == ["none", "int8", "int4"]
    assert "--temperature" in complete("lfm2 chat --temp")
    assert complete("lfm2 generate lfm2-1.") == ["lfm2-1.2b"]
    (tmp_path / "my-ckpt").mkdir()
    assert complete("lfm2 chat my") == ["my-ckpt/"]
