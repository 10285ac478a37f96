"""The FastAPI example's demo walk (``./scripts/demo-fastapi``) runs and checks out."""

from __future__ import annotations

import pytest
from fastapi_app import demo


def test_demo_walk_prints_the_expected_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The walk exits 0, printing each event as it arrives and the failed approval's discards."""
    assert demo.main([]) == 0
    printed = capsys.readouterr().out
    assert "event 12  role_request_reject" in printed
    assert "request: walk-12 POST /role-requests/{request_id}/approve" in printed
    for reason in ["savepoint_rollback"] * 3 + ["close"]:
        assert f"({reason})" in printed
    assert "-> 409 Conflict: role request #2 cannot be approved" in printed
    assert "the failed approval (walk-14) emitted nothing" in printed
    assert "every one of the 15 requests emitted exactly its events" in printed
