"""The README's Python examples run, and do what the README says they do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import server_engine

from access_audit import signals

README = Path(__file__).parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!-- file: (\S+)[^>]*-->\n)?```python\n(.*?)```", re.DOTALL)


def readme_blocks() -> list[tuple[str | None, str]]:
    """(file name or None, code) for each ```python block, in README order."""
    return [(name or None, code) for name, code in BLOCK.findall(README.read_text())]


def test_readme_examples_run_and_emit_what_they_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every inline ```python block runs, in order; the quickstart prints after COMMIT."""
    monkeypatch.chdir(tmp_path)
    blocks = [code for name, code in readme_blocks() if name is None]
    assert len(blocks) >= 6
    namespace: dict[str, object] = {"__name__": "readme"}
    try:
        exec(compile(blocks[0], "README.md[quickstart]", "exec"), namespace)
        assert capsys.readouterr().out == "group_member_added 42 u-7\n"
        for number, block in enumerate(blocks[1:], start=1):
            exec(compile(block, f"README.md[{number}]", "exec"), namespace)
        # The JSON-lines plugin registered by the README got the next commit.
        with namespace["SessionLocal"].begin() as session:  # type: ignore[attr-defined]
            namespace["stage_event"](  # type: ignore[operator]
                session, "tag_create", target_type="tag", target_id=1, action="create"
            )
        lines = (tmp_path / "audit.jsonl").read_text().splitlines()
        assert [json.loads(line)["event_type"] for line in lines] == ["tag_create"]
        # The unittest example is a real TestCase that passes.
        import unittest

        case = namespace["ApprovalTest"]
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(case)  # type: ignore[arg-type]
        result = unittest.TextTestRunner(stream=__import__("io").StringIO()).run(suite)
        assert result.testsRun == 1 and result.wasSuccessful()
    finally:
        receiver = namespace.get("on_discarded")
        if receiver is not None:
            signals.audit_event_discarded.disconnect(receiver)


README_DATABASE_URL = "postgresql+psycopg://localhost/myapp_test"


@pytest.mark.parametrize(
    ("app_module", "passed"),
    [("myapp.py", 2), ("flaskapp.py", 2)],
    ids=["sqlalchemy", "flask-sqlalchemy"],
)
def test_readme_rollback_per_test_recipes_pass(
    pytester: pytest.Pytester, app_module: str, passed: int
) -> None:
    """The README's conftest recipes, written out as files, pass on PostgreSQL."""
    url = server_engine("postgresql").url.render_as_string(hide_password=False)
    files = [
        (name, code.replace(README_DATABASE_URL, url))
        for name, code in readme_blocks()
        if name is not None
    ]
    start = [name for name, _ in files].index(app_module)
    group = files[start : start + 3]
    assert [name for name, _ in group][1] == "conftest.py"
    for name, code in group:
        (pytester.path / name).write_text(code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=passed)
