"""The core's layout: imports run one way, and SQLAlchemy internals stay in _sqla.

Read from the source (``ast``), so imports made only for type hints count:
a lower layer that needs an upper one's shape takes a protocol instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "access_audit"
PRIVATE = sorted(
    path
    for path in PACKAGE.glob("*.py")
    if path.name.startswith("_") and path.name not in {"__init__.py", "__main__.py"}
)
CORE = [*PRIVATE, PACKAGE / "signals.py"]
"""The core: the private modules at the top of the package, and the signals."""

OPTIONAL = ("outbox", "flask", "fastapi", "testing", "sinks")
"""The optional worlds, which build on the core and never the other way."""

SQLALCHEMY_INTERNALS = {
    "_transaction",
    "_parent",
    "_connections",
    "_current_fn",
    "_autobegin_t",
    "_state",
    "_flushing",
    "_execution_options",
    "_is_autocommit_isolation",
    "_on_connect_isolation_level",
    "_previous_nested",
    "_Session__binds",
    "binds",
    "SessionTransactionState",
    "_new",
    "_dirty",
    "_deleted",
}
"""What ``_sqla.py`` reads of SQLAlchemy's private state (tests/test_sqla_shim.py
checks each against the installed SQLAlchemy)."""


def module_name(path: Path) -> str:
    return path.stem


def imported_modules(path: Path) -> set[str]:
    """The ``access_audit`` modules *path* imports, as top-level names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import signals
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("access_audit."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("access_audit."):
                    found.add(alias.name.split(".")[1])
    return found


def core_graph() -> dict[str, set[str]]:
    names = {module_name(path) for path in CORE}
    return {
        module_name(path): imported_modules(path) & names - {module_name(path)}
        for path in CORE
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of *graph* as a path of names, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            cycle = visit(target, [*path, name])
            if cycle is not None:
                return cycle
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name, [])
        if cycle is not None:
            return cycle
    return None


def test_the_core_import_graph_is_acyclic() -> None:
    """No core module imports, even for type hints, one that imports it back."""
    graph = core_graph()
    assert "_lifecycle" in graph and "_emitter" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    """The check above can fail: a two-module loop is reported."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_data_path_runs_down() -> None:
    """Staging -> lifecycle -> envelope -> dispatch, with the emitter on top."""
    graph = core_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            name = stack.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                stack.extend(graph[name])
        return False

    for upper, lower in [
        ("_staging", "_lifecycle"),
        ("_lifecycle", "_envelope"),
        ("_listeners", "_lifecycle"),
        ("_emitter", "_dispatch"),
        ("_emitter", "_listeners"),
    ]:
        assert reaches(upper, lower)
        assert not reaches(lower, upper), f"{lower} reaches back to {upper}"
    assert not any(reaches(name, "_emitter") for name in graph if name != "_emitter")


@pytest.mark.parametrize("path", CORE, ids=[path.name for path in CORE])
def test_core_modules_never_import_the_optional_worlds(path: Path) -> None:
    """The outbox plugs in through a protocol; Flask, testing, sinks sit above."""
    assert not imported_modules(path) & set(OPTIONAL)


EVERY_MODULE = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "_sqla.py")


@pytest.mark.parametrize(
    "path",
    EVERY_MODULE,
    ids=[str(path.relative_to(PACKAGE)) for path in EVERY_MODULE],
)
def test_only_the_shim_reads_sqlalchemy_internals(path: Path) -> None:
    """Every read of SQLAlchemy's private state goes through ``_sqla``."""
    source = path.read_text()
    if "sqlalchemy" not in source and path in EVERY_MODULE and path not in CORE:
        return  # an optional world's module that does not touch SQLAlchemy
    tree = ast.parse(source)
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in SQLALCHEMY_INTERNALS
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqla")
        for alias in node.names
        if alias.name in SQLALCHEMY_INTERNALS
    }
    assert not used


def test_the_shim_names_what_it_reads() -> None:
    """``_sqla.py`` itself reads each internal listed above (the list is honest)."""
    source = (PACKAGE / "_sqla.py").read_text()
    assert all(name in source for name in SQLALCHEMY_INTERNALS)
