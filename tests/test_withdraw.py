"""staged_events() and discard_staged(): seeing and withdrawing what waits.

The adopter's case: an approval staged its event, a nested step refused, and
the operation returned without committing; the next unrelated commit sent the
"approved" event. The operation withdraws its events before returning.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from support import Item, Recorder, operation, stored_names

from access_audit import discard_staged, stage_event, staged_events
from access_audit.testing import capture_audit_events


def approve(session: object, name: str, *, refuse: bool) -> bool:
    """Stage "approved", then give up without committing when a step refuses."""
    stage_event(
        session,  # type: ignore[arg-type]
        "request_approved",
        target_type="request",
        target_id=name,
        action="approve",
    )
    if refuse:
        discard_staged(session)
        return False
    return True


def test_staged_events_lists_every_level_in_commit_order(
    Session: sessionmaker,
) -> None:
    """Outer events first, then each open SAVEPOINT's; rolled-back ones vanish."""
    with Session() as session:
        assert staged_events(session) == ()
        operation(session, "outer")
        savepoint = session.begin_nested()
        operation(session, "dropped")
        savepoint.rollback()
        session.begin_nested()
        operation(session, "inner")
        assert [e.target_id for e in staged_events(session)] == ["outer", "inner"]
        session.commit()
        assert staged_events(session) == ()


def test_operation_that_gives_up_leaves_nothing_for_the_next_commit(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """discard_staged() withdraws the events; a later commit does not send them."""
    with Session() as session, capture_audit_events() as audit_events:
        assert approve(session, "r-1", refuse=True) is False
        operation(session, "unrelated")
        session.commit()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("r-1", "unstaged")
        ]
    assert recorder.names == ["unrelated"]
    assert stored_names(engine) == ["unrelated"]


def test_discard_some_keeps_the_others(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """Only the events named are withdrawn, from whichever level holds them."""
    with Session() as session, capture_audit_events() as audit_events:
        operation(session, "keep-outer")
        session.begin_nested()
        operation(session, "drop-inner")
        operation(session, "keep-inner")
        drop = [e for e in staged_events(session) if e.target_id == "drop-inner"]
        discard_staged(session, drop)
        assert [e.target_id for e in staged_events(session)] == [
            "keep-outer",
            "keep-inner",
        ]
        session.commit()
        assert [d.reason for d in audit_events.discarded] == ["unstaged"]
    assert recorder.names == ["keep-outer", "keep-inner"]
    assert stored_names(engine) == ["drop-inner", "keep-inner", "keep-outer"]


def test_discarding_a_lazy_event_never_calls_its_values(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A withdrawn event's lazy values are not resolved at the commit."""
    calls: list[str] = []

    def lazy_id() -> str:
        calls.append("called")
        return "never"

    with Session() as session:
        session.add(Item(name="x"))
        stage_event(
            session, "item_created", target_type="item", target_id=lazy_id, action="c"
        )
        discard_staged(session)
        session.commit()
    assert calls == []
    assert recorder.events == []


def test_discarding_an_event_not_staged_raises_and_withdraws_nothing(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """An event already sent (or from another session) is refused with ValueError."""
    with Session() as session:
        operation(session, "sent")
        sent = staged_events(session)
        session.commit()
        operation(session, "waiting")
        with pytest.raises(ValueError, match="not staged"):
            discard_staged(session, [*staged_events(session), *sent])
        assert [e.target_id for e in staged_events(session)] == ["waiting"]
        session.commit()
        with pytest.raises(ValueError, match="not staged"):
            discard_staged(session, sent)
    assert recorder.names == ["sent", "waiting"]


def test_discard_with_nothing_staged_is_a_noop(Session: sessionmaker) -> None:
    """discard_staged() on a session with nothing staged does nothing."""
    with Session() as session, capture_audit_events() as audit_events:
        discard_staged(session)
        assert audit_events.discarded == []
        assert staged_events(session) == ()
