"""Every ```python block of README.md and docs/*.md runs, and does what it says.

A block runs on its own, in a fresh namespace and a temporary working
directory. A ```text block marked ``<!-- output -->`` after it is what it must
print; a ``unittest.TestCase`` it defines must pass. A block marked
``<!-- file: NAME -->`` is a file of a recipe: the files under one heading are
written out together and run with pytest (on PostgreSQL where they name the
docs' database URL). A block marked ``<!-- no-run: reason -->`` is not run.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import re
import unittest
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from access_audit import AuditEmitter, signals
from conftest import server_engine

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(`{3,})([^`\s]*)[^`]*")
MARK = re.compile(r"<!-- (file|no-run|output)(?:: (.+?))? -->")
HEADING = re.compile(r"#{1,6} (.+)")
DOCS_DATABASE_URL = "postgresql+psycopg://localhost/myapp_test"


@dataclasses.dataclass
class Block:
    """One ```python block, and what its page says about it."""

    page: str
    line: int
    heading: str
    code: str
    file: str | None = None
    no_run: str | None = None
    output: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown page, with their marks."""
    page = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    heading, mark = "", None
    number = 0
    while number < len(lines):
        line = lines[number]
        fence = FENCE.fullmatch(line)
        if fence is None:
            if found := MARK.fullmatch(line.strip()):
                mark = found.groups()
            elif found := HEADING.fullmatch(line):
                heading, mark = found[1], None
            elif line.strip():
                mark = None
            number += 1
            continue
        end = lines.index(fence[1], number + 1)
        code = "".join(text + "\n" for text in lines[number + 1 : end])
        kind, argument = mark or (None, None)
        if kind == "output":
            assert fence[2] == "text" and blocks, (
                f"{page}:{number + 1}: output of what?"
            )
            assert blocks[-1].output is None, f"{page}:{number + 1}: a second output"
            blocks[-1].output = code
        elif fence[2] == "python":
            block = Block(page, number + 1, heading, code)
            if kind == "file":
                block.file = argument
            elif kind == "no-run":
                assert argument, f"{page}:{number + 1}: no-run needs a reason"
                block.no_run = argument
            blocks.append(block)
        else:
            assert kind is None, (
                f"{page}:{number + 1}: {kind} mark on a {fence[2]!r} block"
            )
        mark = None
        number = end + 1
    return blocks


BLOCKS = [block for path in PAGES for block in read_blocks(path)]
STANDALONE = [block for block in BLOCKS if block.file is None and block.no_run is None]
RECIPES: dict[tuple[str, str], list[Block]] = {}
for _block in BLOCKS:
    if _block.file is not None:
        RECIPES.setdefault((_block.page, _block.heading), []).append(_block)


def test_the_pages_have_examples() -> None:
    """The README and the docs pages carry examples, most of them runnable alone."""
    pages = {block.page for block in STANDALONE}
    assert "README.md" in pages and len(pages) >= 8
    assert len([block for block in BLOCKS if block.no_run]) <= len(BLOCKS) // 10
    assert RECIPES


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A temporary working directory; loggers put back as they were."""
    monkeypatch.chdir(tmp_path)
    saved = {
        logger: (list(logger.handlers), logger.level, logger.propagate)
        for logger in all_loggers()
    }
    yield
    for logger in all_loggers():
        handlers, level, propagate = saved.get(logger, ([], logging.NOTSET, True))
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def all_loggers() -> list[logging.Logger]:
    """The root logger and every logger made so far."""
    made = logging.Logger.manager.loggerDict.values()
    return [logging.getLogger()] + [
        logger for logger in made if isinstance(logger, logging.Logger)
    ]


def clean_up(namespace: dict[str, object]) -> None:
    """Undo what a block left behind in the process: receivers, threads, pools."""
    for value in namespace.values():
        # Routines only: a block's receivers are functions, and other callables
        # (Flask's request proxies, say) may refuse to be hashed.
        if inspect.isroutine(value):
            for signal in (
                signals.audit_event_committed,
                signals.audit_event_discarded,
            ):
                signal.disconnect(value)
        if isinstance(value, AuditEmitter):
            value.close()
        elif isinstance(value, Engine):
            value.dispose()


@pytest.mark.usefixtures("isolated")
@pytest.mark.parametrize("block", STANDALONE, ids=[block.id for block in STANDALONE])
def test_example_runs(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    """The block runs alone, prints its output, and its TestCases pass."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    try:
        exec(compile(block.code, block.id, "exec", dont_inherit=True), namespace)
        printed = capsys.readouterr().out
        if block.output is not None:
            assert printed == block.output
        cases = [
            value
            for value in namespace.values()
            if isinstance(value, type) and issubclass(value, unittest.TestCase)
        ]
        for case in cases:
            suite = unittest.defaultTestLoader.loadTestsFromTestCase(case)
            result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
            assert result.testsRun and result.wasSuccessful(), result.failures
    finally:
        clean_up(namespace)


@pytest.fixture
def database_url(files: list[Block]) -> str | None:
    """The test server's URL if the recipe names the docs' database, else None.

    Asked before ``pytester``, which drops the modules imported during the
    test (the PostgreSQL dialect, registering SQL functions at import) and
    would have them imported, and registered, a second time.
    """
    if not any(DOCS_DATABASE_URL in block.code for block in files):
        return None
    return server_engine("postgresql").url.render_as_string(hide_password=False)


@pytest.mark.parametrize(
    "files", list(RECIPES.values()), ids=[" / ".join(key) for key in RECIPES]
)
def test_recipe_passes(
    database_url: str | None, pytester: pytest.Pytester, files: list[Block]
) -> None:
    """A recipe's files, written out, pass their tests (on PostgreSQL if named)."""
    for block in files:
        assert block.file is not None
        code = block.code
        if database_url is not None:
            code = code.replace(DOCS_DATABASE_URL, database_url)
        (pytester.path / block.file).write_text(code)
    tests = sum(
        len(re.findall(r"^(?:async )?def test_", block.code, re.MULTILINE))
        for block in files
        if block.file is not None and block.file.startswith("test_")
    )
    assert tests, "a recipe needs a test file"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=tests)
