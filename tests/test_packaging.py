"""Every third-party module the code imports is a declared dependency: lfm2cli/ needs only the runtime
dependencies of pyproject.toml, tests/ and benchmarks/ those plus the `test` extra. A clean venv with the README's
install line then runs everything, and a missing optional piece says which `pip install` mends it."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}

# Modules lfm2cli imports that reach it through a declared dependency, whichever of them that release uses; each
# import is guarded (try/except ImportError), so the code runs with either.
CARRIED = {
    "httpx": ("huggingface_hub", "the HTTP client of huggingface_hub before 2.0 (lfm2cli/hub/download.py)"),
    "httpx2": ("huggingface_hub", "the HTTP client of huggingface_hub 2.x (lfm2cli/hub/download.py)"),
}
# Modules of tests/ or benchmarks/ that are deliberately not dependencies, with the only files (or folders, ending
# in /) that may import them.
OUTSIDE = {
    "llama_cpp": (("benchmarks/llama_cpp_worker.py", "benchmarks/peers/"),
                  "runs in the llama.cpp peer's own venv (benchmarks/peers/setup)"),
    "xgrammar": (("benchmarks/grammar.py",), "compared against only when installed (a guarded import)"),
}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r).group(1)) for r in requirements}


def declared() -> tuple[set[str], set[str]]:
    """(runtime distributions, the test extra's distributions) as pyproject.toml names them."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return requirement_names(project["dependencies"]), requirement_names(project["optional-dependencies"]["test"])


def local_modules(root: Path) -> set[str]:
    """Top-level names that are this repository's own: its packages and the modules beside them (benchmarks put
    tests/ on sys.path)."""
    names = set()
    for folder in (root, root / "tests", root / "benchmarks"):
        for p in folder.iterdir() if folder.is_dir() else ():
            if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
                names.add(p.stem)
    return names | {"lfm2cli", "tests", "benchmarks"}


class Imports(ast.NodeVisitor):
    """(top-level module, line, guarded) for every absolute import; guarded: in a `try` that catches ImportError,
    or in its handler (the alternative)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, bool]] = []
        self._guard = 0

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(h) for h in node.handlers)
        self._guard += guarded
        for child in [*node.body, *node.handlers]:
            self.visit(child)
        self._guard -= guarded
        for child in [*node.orelse, *node.finalbody]:
            self.visit(child)

    visit_TryStar = visit_Try

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name.split(".")[0], node.lineno, self._guard > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], node.lineno, self._guard > 0))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(k, ast.Name) and k.id in IMPORT_ERRORS for k in kinds)


def third_party_imports(folder: str, root: Path = ROOT) -> list[tuple[str, str, bool]]:
    """(module, 'file:line', guarded) for each import of a module that is neither stdlib nor this repository's."""
    local = local_modules(root)
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        visitor = Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        rel = path.relative_to(root).as_posix()
        for module, line, guarded in visitor.found:
            if module not in sys.stdlib_module_names and module not in local:
                out.append((module, f"{rel}:{line}", guarded))
    return out


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    return {normalise(d) for d in installed_modules().get(module, [])}


def undeclared(folders: tuple[str, ...], allowed: set[str], root: Path = ROOT) -> list[str]:
    problems = []
    for folder in folders:
        for module, where, guarded in third_party_imports(folder, root):
            if module in CARRIED and folder == "lfm2cli":
                carrier, _ = CARRIED[module]
                if not guarded:
                    problems.append(f"{where}: {module} is imported unguarded, but only {carrier} brings it")
                continue
            if module in OUTSIDE and folder != "lfm2cli":
                allowed_in = OUTSIDE[module][0]
                if not any(where.startswith(f) if f.endswith("/") else where.split(":")[0] == f for f in allowed_in):
                    problems.append(f"{where}: {module} may be imported only in {', '.join(allowed_in)}")
                continue
            # a module not installed here (one for another Python, say) counts when a distribution of that name is
            # declared
            dists = distributions_of(module) or ({normalise(module)} & allowed)
            if not dists:
                problems.append(f"{where}: {module} is not installed here, so its distribution is unknown")
            elif not dists & allowed:
                problems.append(f"{where}: {module} (distribution {'/'.join(sorted(dists))}) is not declared")
    return problems


def test_the_package_imports_only_runtime_dependencies() -> None:
    runtime, _ = declared()
    found = {m for m, _, _ in third_party_imports("lfm2cli")}
    assert {"torch", "typer", "tokenizers"} <= found  # the scan sees the real imports
    problems = undeclared(("lfm2cli",), runtime)
    assert not problems, "add these to [project] dependencies in pyproject.toml:\n" + "\n".join(problems)
    assert all(normalise(carrier) in runtime for carrier, _ in CARRIED.values())


@pytest.mark.slow
def test_tests_and_benchmarks_import_only_declared_dependencies() -> None:
    runtime, test_extra = declared()
    found = {m for m, _, _ in third_party_imports("tests")} | {m for m, _, _ in third_party_imports("benchmarks")}
    assert {"pytest", "transformers", "httpx"} <= found
    problems = undeclared(("tests", "benchmarks"), runtime | test_extra)
    assert not problems, "add these to the test extra in pyproject.toml:\n" + "\n".join(problems)


def test_numpy_is_declared_because_loading_calls_tensor_numpy() -> None:
    """torch does not depend on numpy, but `Tensor.numpy()` raises without it: lfm2cli needs it undeclared in
    any import statement."""
    users = [p for p in (ROOT / "lfm2cli").rglob("*.py") if ".numpy()" in p.read_text(encoding="utf-8")]
    runtime, _ = declared()
    assert not users or "numpy" in runtime, f"{users[0]} calls Tensor.numpy(): declare numpy"


def test_the_check_reports_what_is_not_declared(tmp_path: Path) -> None:
    """The checker itself, on a small tree: a test-only module imported by the package, an unguarded import of a
    carried module, a module nobody installed; stdlib, local and relative imports pass."""
    visitor = Imports()
    visitor.visit(ast.parse("try:\n    import a\nexcept ImportError:\n    import b\nimport c\nfrom d.e import f\n"
                            "from . import g\n"))
    assert visitor.found == [("a", 2, True), ("b", 4, True), ("c", 5, False), ("d", 6, False)]
    (tmp_path / "lfm2cli").mkdir()
    (tmp_path / "lfm2cli" / "__init__.py").write_text("")
    (tmp_path / "lfm2cli" / "x.py").write_text(
        "import json\nimport torch\nimport pytest\nimport httpx\nimport no_such_module_here\n"
        "from lfm2cli import y\nfrom . import z\n")
    problems = undeclared(("lfm2cli",), {"torch"}, tmp_path)
    assert [p.split(":", 2)[:2] for p in problems] == [["lfm2cli/x.py", "3"], ["lfm2cli/x.py", "4"],
                                                       ["lfm2cli/x.py", "5"]], problems
    assert "pytest" in problems[0] and "unguarded" in problems[1] and "not installed" in problems[2]


def run_without(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process in which `module` cannot be imported, as in an install that lacks it."""
    code = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['lfm2', *sys.argv[1:]]; "
            "from lfm2cli.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_missing_openai_names_its_pip_install() -> None:
    r = run_without("openai", ["generate", "--endpoint", "http://127.0.0.1:9/v1", "-p", "hi"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: --endpoint needs the openai package: pip install openai"]


@pytest.mark.slow
def test_a_missing_llguidance_names_its_pip_install(chat_ckpt: Path) -> None:
    r = run_without("llguidance", ["generate", str(chat_ckpt), "--format", "json", "-p", "hi", "-n", "4"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install llguidance" in lines[0], r.stderr
