"""The README's Python examples run, in order, and do what the README says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from access_audit import signals

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_examples_run_and_emit_what_they_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ```python block of the README runs; the quickstart prints after COMMIT."""
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 5
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
    finally:
        receiver = namespace.get("on_discarded")
        if receiver is not None:
            signals.audit_event_discarded.disconnect(receiver)
