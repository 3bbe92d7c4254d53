"""The CLI reference in docs/cli.md covers every command and option the app really has."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from lfm2cli.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def walk(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    # typer may carry its own copy of click, so a group is known by its commands, not by click's class
    if isinstance(getattr(cmd, "commands", None), dict):
        for name, sub in cmd.commands.items():
            yield from walk(sub, (*path, name))


def test_cli_reference_lists_every_command_and_option() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = []
    paths = []
    for path, cmd in walk(typer.main.get_command(app)):
        paths.append(path)
        if path and f"lfm2 {' '.join(path)}" not in text:
            missing.append("command " + " ".join(path))
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and f"`{opt}" not in text and f" {opt}" not in text:
                    missing.append(f"{' '.join(path) or 'lfm2'} {opt}")
    assert {"generate", "chat", "history"} <= {p[0] for p in paths if p}  # the walk reached the commands
    assert not missing, f"docs/cli.md is out of date (run python docs/gen_cli.py): {missing}"


def _generator():
    """docs/gen_cli.py, the script that writes docs/cli.md, loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli", DOC.parent / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current() -> None:
    gen = _generator()
    assert gen.main(["--check"]) == 0, "docs/cli.md is stale: run python docs/gen_cli.py"


def test_cli_reference_is_regenerated_below_its_header(tmp_path: Path) -> None:
    gen = _generator()
    doc = tmp_path / "cli.md"
    doc.write_text(f"# Title\n\nHand-written.\n\n{gen.MARKER}\n\n## `lfm2 gone`\n\nOld text.\n", encoding="utf-8")
    assert gen.main(["--check", "--file", str(doc)]) == 1
    assert gen.main(["--file", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(f"# Title\n\nHand-written.\n\n{gen.MARKER}\n\n## `lfm2`\n")
    assert "## `lfm2 generate`" in text and "`--quantize none|int8|int4`" in text and "Old text" not in text
    assert gen.main(["--check", "--file", str(doc)]) == 0
    doc.write_text("# No marker\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no marker line"):
        gen.main(["--file", str(doc)])
    assert doc.read_text(encoding="utf-8") == "# No marker\n"  # never emptied


MAP = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
PACKAGE = Path(__file__).resolve().parents[1] / "lfm2cli"


def test_module_map_matches_the_tree() -> None:
    """Every module in docs/architecture.md's map exists, and every module with code is in the map once."""
    import ast
    import re

    text = MAP.read_text(encoding="utf-8")
    table = text[text.index("## Module map"):]
    table = table[:table.index("\n## ", 4)]
    listed: list[str] = []
    for line in table.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            listed += re.findall(r"`([\w/]+(?:\.py|/))`", first)
    assert len(listed) == len(set(listed)), "a module is listed twice"
    missing = [m for m in listed if not (PACKAGE / m).exists()]
    assert not missing, f"listed in the map but not in the tree: {missing}"
    unlisted = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "__main__.py" or any(rel.startswith(d) for d in listed if d.endswith("/")):
            continue
        body = ast.parse(path.read_text(encoding="utf-8")).body
        only_docstring = path.name == "__init__.py" and all(isinstance(n, ast.Expr) for n in body)
        if rel not in listed and not only_docstring:
            unlisted.append(rel)
    assert not unlisted, f"modules missing from docs/architecture.md's map: {unlisted}"


def test_packages_import_only_the_layers_below() -> None:
    """docs/architecture.md lists the packages from the bottom up; a module may import from its own package and
    those listed before it (and `errors.py`), never from a later one: the data flow reads top to bottom."""
    import ast
    import re

    text = MAP.read_text(encoding="utf-8")
    table = text[text.index("Packages, from the bottom up"):text.index("## Module map")]
    order: list[str] = []
    for line in table.splitlines():
        if line.startswith("| `"):
            order += re.findall(r"`(\w+)/`", line.split("|")[1])
    rank = {name: i for i, name in enumerate(order)}
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} <= set(rank), "a package is unlisted"
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue  # top-level modules (cli, benchmark, errors) sit outside the layers
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "lfm2cli":
                names = [f"lfm2cli.{a.name}" for a in node.names]
            for name in names:
                target = name.split(".")
                if target[0] != "lfm2cli" or len(target) < 2 or target[1] == parts[0]:
                    continue
                if target[1] in rank and rank[target[1]] > rank[parts[0]]:
                    upward.append(f"{'/'.join(parts)}:{node.lineno} imports {name}")
    assert not upward, upward
