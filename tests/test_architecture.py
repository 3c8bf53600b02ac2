"""The layering rules, read from the source: no import cycles, lower layers never import
higher ones, and SQL lives in ``store/`` alone.

Imports are read with ``ast`` from every module of ``daemon/`` and ``store/``, wherever
they stand (module level, inside a function, under ``TYPE_CHECKING``): a lazy import is
still a dependency.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "store")

LOWER_LAYERS = ("daemon.editors", "daemon.engine", "daemon.service", "daemon.model", "store")
"""Packages that must not depend on the evaluation, the fact world or the HTTP API."""

UPPER_LAYERS = ("daemon.eval", "daemon.world", "daemon.api")

SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM"
    r"|CREATE\s+(TABLE|INDEX|TRIGGER|VIEW)|ALTER\s+TABLE|DROP\s+TABLE|PRAGMA\s+\w+"
    r"|BEGIN\s+(IMMEDIATE|EXCLUSIVE|DEFERRED)|SAVEPOINT\s+\w+)",
    re.IGNORECASE | re.DOTALL,
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports (``from p import m`` counts
    as importing ``p.m`` when that is a module, else ``p``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names]
            if not all(t in known for t in targets):
                targets.append(source)
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@cache
def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def string_constants(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
            yield node.lineno, text


def docstring_lines(path: Path) -> set[int]:
    """Line numbers where a module, class or function docstring starts."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                lines.add(body[0].lineno)
    return lines


def test_the_reader_sees_imports_at_every_level(tmp_path: Path) -> None:
    """The import reader finds module-level, lazy, relative and ``TYPE_CHECKING`` imports,
    and the cycle finder reports a two-module cycle (so the tests below can fail)."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import store.db\n"
        "if TYPE_CHECKING:\n    from daemon.config import Config\n"
        "def f():\n    from daemon.errors import EditdError\n"
        "from . import queue\n"
    )
    known = {"store.db": source, "daemon.config": source, "daemon.errors": source}
    known |= {"store.queue": source, "store.m": source}
    found = imported("store.m", source, known)
    assert found == {"store.db", "daemon.config", "daemon.errors", "store.queue"}
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert SQL.search("SELECT id FROM edits") and not SQL.search("select a back-end")


def test_no_import_cycles() -> None:
    """No module of ``daemon/`` or ``store/`` reaches itself through its imports."""
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("lower", LOWER_LAYERS)
def test_lower_layers_do_not_import_eval_world_or_api(lower: str) -> None:
    """The editors, the engine, the service, the model layer and the store never import
    the evaluation, the fact world or the HTTP API."""
    graph = import_graph()
    bad = {
        module: sorted(t for t in targets if t.startswith(UPPER_LAYERS))
        for module, targets in graph.items()
        if (module == lower or module.startswith(lower + "."))
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_store_imports_nothing_of_the_daemon_but_its_errors() -> None:
    """``store/`` is the bottom layer: of ``daemon`` it may use only ``daemon.errors``."""
    graph = import_graph()
    bad = {
        module: sorted(t for t in targets if t.startswith("daemon") and t != "daemon.errors")
        for module, targets in graph.items()
        if module.startswith("store")
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_no_sql_outside_the_store() -> None:
    """SQL statements appear in string literals of ``store/`` only (docstrings aside)."""
    offenders = []
    for package in ("daemon",):
        for path in sorted((ROOT / package).rglob("*.py")):
            docs = docstring_lines(path)
            for line, text in string_constants(path):
                if line not in docs and SQL.search(text):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {text[:60]!r}")
    assert offenders == []


TRANSACTIONS_OUTSIDE_THE_STORE = {"daemon/feeds/spool.py": 6}
"""Known debt: the spool importer still opens transactions around its own steps, some
of which move files inside them (one importer of several must win each file). Nothing
else may; it may not add more."""


def store_transactions(path: Path) -> int:
    """Calls of ``<...store>.write()`` / ``<...store>.read()`` in ``path``."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("write", "read") or node.args or node.keywords:
            continue
        owner = node.func.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        count += name.endswith("store")
    return count


def test_transactions_are_opened_by_the_store() -> None:
    """Outside ``store/`` no module opens a store transaction, but the listed debt."""
    found = {}
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        n = store_transactions(path)
        if n:
            found[str(path.relative_to(ROOT))] = n
    assert found == TRANSACTIONS_OUTSIDE_THE_STORE
