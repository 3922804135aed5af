"""The package's layout (issue #17), read from the source with ``ast``: which room may import which, and no
function longer than a screen.

Rooms, bottom up: ``core/`` (the wrapping mechanism and the registry), ``methods/`` (one file per method),
``data/``, ``models/``, ``train/`` (only the loop), ``eval/`` (scoring), ``runs/`` (config -> load -> train ->
score -> files), ``serve/`` (the HTTP service over runs) and ``cli/`` on top. An import that runs back up is a fault.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"

#: room -> rooms it must never import (at module level or inside a function)
FORBIDDEN = {
    "train": ("eval", "runs", "methods", "serve", "cli"),
    "core": ("runs", "train", "eval", "serve", "cli", "data"),
    "methods": ("runs", "train", "eval", "serve", "cli"),
    "data": ("runs", "train", "eval", "serve", "cli", "methods"),
    "eval": ("runs", "serve", "cli"),
    "models": ("runs", "serve", "cli", "train"),
    "runs": ("serve", "cli"),
    "serve": ("cli",),
}
#: the one import that runs back up: the registry discovers the built-in methods
ALLOWED = {("core/registry.py", "peftkit.methods")}
MAX_FUNCTION_LINES = 60


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, absolute names (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    return _imports_in(path.read_text(encoding="utf-8"), package)


def _imports_in(code: str, package: str) -> list[str]:
    tree = ast.parse(code)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]  # `from peftkit import methods`
    return found


def _room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "peftkit" else None


def _files(room: str) -> list[Path]:
    return sorted((SRC / room).rglob("*.py"))


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_no_import_runs_back_up(room: str) -> None:
    bad = []
    for path in _files(room):
        rel = path.relative_to(SRC).as_posix()
        for module in _imports(path):
            target = _room_of(module)
            if target in FORBIDDEN[room] and (rel, module) not in ALLOWED:
                bad.append(f"{rel} imports {module}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_guard_sees_a_forbidden_import() -> None:
    """The reader finds function-local and relative imports (so the test above can fail)."""
    code = "def f():\n    from peftkit.eval import metrics\n    from ..runs import run\n    import peftkit.methods.lora\n"
    assert {_room_of(m) for m in _imports_in(code, "peftkit.train")} == {"eval", "runs", "methods"}


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts:  # a schema revision is a declaration, one table after another
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - start + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC).as_posix()}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
