"""Sessions joined to an outer transaction they do not end, on every database.

A ``Session(bind=connection)`` on a connection that is in a transaction
already only releases a SAVEPOINT (or does nothing) on ``commit()``; whoever
began the connection's transaction decides. By default the events wait for
that outer transaction; ``joined_transactions="session"`` sends them on the
session's commit, for rollback-per-test suites.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session
from support import (
    Child,
    Item,
    Recorder,
    operation,
    outbox_rows,
    stored_names,
    wait_until,
)

from access_audit import (
    AuditConfigurationError,
    AuditEmitter,
    AuditEventEnvelope,
    hookimpl,
    stage_event,
    staged_events,
)
from access_audit.outbox import Outbox, count_pending
from access_audit.testing import capture_audit_events

JOIN_MODES = ["conditional_savepoint", "create_savepoint", "rollback_only"]


def joined_session(
    emitter: AuditEmitter, connection: Connection, mode: str = "conditional_savepoint"
) -> Session:
    session = Session(bind=connection, join_transaction_mode=mode)  # type: ignore[arg-type]
    emitter.attach(session)
    return session


@pytest.mark.parametrize("mode", JOIN_MODES, ids=JOIN_MODES)
def test_events_wait_for_the_outer_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, mode: str
) -> None:
    """A joined session's commit sends nothing until the outer transaction commits."""
    with engine.connect() as connection:
        outer = connection.begin()
        with joined_session(emitter, connection, mode) as session:
            operation(session, "joined")
            session.commit()
            assert recorder.names == []
        outer.commit()
        connection.begin()  # the next transaction: the COMMIT went through
        assert recorder.names == ["joined"]
        assert [len(batch) for batch in recorder.batches] == [1]
        connection.rollback()
    assert recorder.names == ["joined"]
    assert stored_names(engine) == ["joined"]


@pytest.mark.parametrize("mode", JOIN_MODES, ids=JOIN_MODES)
def test_outer_rollback_discards_the_events(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, mode: str
) -> None:
    """A joined session's events are discarded ("rollback") when the outer rolls back."""
    with engine.connect() as connection, capture_audit_events() as audit_events:
        outer = connection.begin()
        with joined_session(emitter, connection, mode) as session:
            operation(session, "undone")
            session.commit()
        outer.rollback()
        assert [d.reason for d in audit_events.discarded] == ["rollback"]
        assert audit_events.discarded[0].event.target_id == "undone"
    assert recorder.names == []
    assert stored_names(engine) == []


def test_outer_block_delivers_when_it_commits_and_closes(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Inside ``with engine.begin()`` the events go out as the block commits."""
    with engine.begin() as connection:
        with joined_session(emitter, connection) as session:
            operation(session, "in-block")
            session.commit()
        assert recorder.names == []
    assert recorder.names == ["in-block"]
    assert stored_names(engine) == ["in-block"]


def test_control_fully_delivers_on_the_session_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """In "control_fully" mode the session's commit commits the outer: it sends."""
    with engine.connect() as connection:
        connection.begin()
        with joined_session(emitter, connection, "control_fully") as session:
            operation(session, "owned")
            session.commit()
        assert recorder.names == ["owned"]
    assert stored_names(engine) == ["owned"]


@pytest.mark.parametrize("outer_commits", [True, False], ids=["commit", "rollback"])
def test_two_sessions_sharing_one_connection(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, outer_commits: bool
) -> None:
    """The session that joined waits for the one that began the transaction."""
    with engine.connect() as connection:
        first = joined_session(emitter, connection)
        operation(first, "first")  # first begins the connection's transaction
        first.flush()
        second = joined_session(emitter, connection)
        operation(second, "second")
        second.commit()  # joined: only the first one's commit is final
        assert recorder.names == []
        if outer_commits:
            first.commit()
        else:
            first.rollback()
        first.close()
        second.close()
        connection.begin()
        expected = ["first", "second"] if outer_commits else []
        assert recorder.names == expected
        connection.rollback()
    assert stored_names(engine) == expected


def test_session_mode_delivers_on_the_session_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """``joined_transactions="session"``: sent on session.commit(), whatever follows."""
    emitter.joined_transactions = "session"
    with engine.connect() as connection:
        outer = connection.begin()
        with joined_session(emitter, connection, "create_savepoint") as session:
            operation(session, "per-test")
            session.commit()
            assert recorder.names == ["per-test"]
        outer.rollback()
    assert recorder.names == ["per-test"]
    assert stored_names(engine) == []


def test_outer_commit_that_fails_discards_the_events(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An outer COMMIT that fails (a deferred constraint) sends nothing."""
    if engine.dialect.name == "mysql":
        pytest.skip("MariaDB cannot defer a constraint to COMMIT")
    with engine.connect() as connection, capture_audit_events() as audit_events:
        outer = connection.begin()
        with joined_session(emitter, connection) as session:
            session.add(Child(item_id=999_999))  # checked only at COMMIT
            operation(session, "orphan")
            session.commit()
        with pytest.raises(DatabaseError):
            outer.commit()
        assert recorder.names == []
        connection.rollback()
        assert [d.reason for d in audit_events.discarded] == ["rollback"]
    assert recorder.names == []
    assert stored_names(engine) == []


def test_killed_connection_discards_the_events(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A connection invalidated while the outer transaction is open sends nothing."""
    with engine.connect() as connection, capture_audit_events() as audit_events:
        connection.begin()
        with joined_session(emitter, connection) as session:
            operation(session, "lost")
            session.commit()
        connection.invalidate()
        assert [d.reason for d in audit_events.discarded] == ["rollback"]
    assert recorder.names == []
    assert stored_names(engine) == []


def test_outbox_with_an_outer_rollback_sends_nothing(
    engine: Engine, outbox: Outbox, recorder: Recorder
) -> None:
    """In outbox mode, the rows roll back with the outer and nothing is sent inline."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    emitter.register(recorder, name="recorder")
    with engine.connect() as connection:
        outer = connection.begin()
        with joined_session(emitter, connection) as session:
            operation(session, "outboxed")
            session.commit()
        outer.rollback()
    assert recorder.names == []
    assert outbox_rows(engine, outbox) == []


def test_outbox_with_an_outer_commit_sends_once(
    engine: Engine, outbox: Outbox, recorder: Recorder
) -> None:
    """In outbox mode, the outer commit sends the events and keeps their rows."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    emitter.register(recorder, name="recorder")
    with (
        engine.begin() as connection,
        joined_session(emitter, connection) as session,
    ):
        operation(session, "outboxed")
        session.commit()
    assert recorder.names == ["outboxed"]
    assert [row["aggregateid"] for row in outbox_rows(engine, outbox)] == ["outboxed"]
    assert wait_until(lambda: count_pending(engine, outbox) == 0)
    assert emitter.relay(engine).delivered == 0  # recorded as delivered


def _nested_before_connecting(connection: Connection, session: Session) -> None:
    connection.begin_nested()


def _nested_after_connecting(connection: Connection, session: Session) -> None:
    connection.begin_nested()
    session.connection()


@pytest.mark.parametrize(
    "arrange",
    [_nested_before_connecting, _nested_after_connecting],
    ids=["staged-before-joining", "staged-after-joining"],
)
@pytest.mark.parametrize("mode", [*JOIN_MODES, "control_fully"])
def test_foreign_savepoint_is_refused_at_stage_time(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    mode: str,
    arrange: Callable[[Connection, Session], None],
) -> None:
    """Inside a SAVEPOINT the session did not open, staging raises: its rollback is invisible."""
    with engine.connect() as connection:
        connection.begin()
        session = Session(bind=connection, join_transaction_mode=mode)  # type: ignore[arg-type]
        emitter.attach(session)
        arrange(connection, session)
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            operation(session, "refused")
        assert staged_events(session) == ()
        session.close()
        connection.rollback()
    assert recorder.names == []


@pytest.mark.parametrize("mode", [*JOIN_MODES, "control_fully"])
def test_session_mode_accepts_an_enclosing_savepoint_and_refuses_an_inner_one(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, mode: str
) -> None:
    """``joined_transactions="session"`` lets a suite's SAVEPOINT enclose the
    session, but one begun inside the session's transaction (the code under
    test's ``session.connection().begin_nested()``) is refused as in
    production: a test must not pass on what production refuses."""
    emitter.joined_transactions = "session"
    with engine.connect() as connection:
        connection.begin()
        connection.begin_nested()  # the suite's, around the session
        session = Session(bind=connection, join_transaction_mode=mode)  # type: ignore[arg-type]
        emitter.attach(session)
        operation(session, "kept")
        savepoint = session.connection().begin_nested()
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            operation(session, "refused")
        savepoint.rollback()
        session.commit()
        session.close()
        connection.rollback()
    assert recorder.names == ["kept"]


def test_foreign_savepoint_found_when_connecting_fails_the_flush(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A connection acquired after staging is checked too: the flush raises."""
    with engine.connect() as connection, capture_audit_events() as audit_events:
        connection.begin()
        connection.begin_nested()
        session = Session(binds={Item: connection})  # no session-wide bind to check
        emitter.attach(session)
        operation(session, "late")
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            session.flush()
        session.close()
        connection.rollback()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("late", "refused")
        ]
    assert recorder.names == []


def test_savepoint_the_session_opened_is_accepted(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A joined session's own SAVEPOINTs are observable: staging inside one works."""
    with (
        engine.begin() as connection,
        joined_session(emitter, connection, "create_savepoint") as session,
    ):
        with session.begin_nested():
            operation(session, "inner")
        session.commit()
    assert recorder.names == ["inner"]


def test_outer_connection_statement_runs_before_delivery(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Work the outer transaction does after the session's commit is part of it."""
    with engine.connect() as connection:
        outer = connection.begin()
        with joined_session(emitter, connection) as session:
            operation(session, "with-more")
            session.commit()
        connection.execute(text("DELETE FROM audit_test_item"))
        assert recorder.names == []
        outer.commit()
    assert recorder.names == ["with-more"]
    assert stored_names(engine) == []  # the outer deleted it: the event is true


def test_outer_rolled_back_before_the_session_commits_discards(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An outer transaction that ended before the session's commit decides it."""
    with engine.connect() as connection, capture_audit_events() as audit_events:
        connection.begin()
        session = joined_session(emitter, connection)
        operation(session, "undone")
        session.flush()
        connection.rollback()  # the change is gone
        connection.begin()
        session.commit()
        connection.commit()
        session.close()
        assert [d.reason for d in audit_events.discarded] == ["rollback"]
    assert recorder.names == []
    assert stored_names(engine) == []


@pytest.mark.parametrize("owner_commits", [True, False], ids=["commit", "rollback"])
def test_owner_ending_before_the_joined_session_commits(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, owner_commits: bool
) -> None:
    """Two sessions on one connection: the owner ends first, the joined one follows."""
    with engine.connect() as connection:
        owner = joined_session(emitter, connection)
        operation(owner, "owner")
        owner.flush()  # begins the connection's transaction
        joined = joined_session(emitter, connection)
        operation(joined, "joined")
        joined.flush()
        if owner_commits:
            owner.commit()
        else:
            owner.rollback()
            operation(owner, "owner-again")
            owner.commit()
        joined.commit()
        owner.close()
        joined.close()
    stored = stored_names(engine)
    assert stored == (["joined", "owner"] if owner_commits else ["owner-again"])
    assert sorted(recorder.names) == stored


@pytest.mark.parametrize("next_commits", [True, False], ids=["commit", "rollback"])
def test_a_joined_session_working_on_after_the_outer_commit_waits_for_the_next(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    next_commits: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The outer transaction commits while the joined session is still
    open, and the session goes on: its next flush runs in the connection's
    next transaction, which the session's commit does not commit. Its
    events wait for that one too, all of them, with a warning: discarded
    when it rolls back (nothing is sent for the lost change), sent when the
    caller commits it."""
    with engine.connect() as connection, capture_audit_events() as audit_events:
        outer = connection.begin()
        session = joined_session(emitter, connection)
        operation(session, "before")
        session.flush()
        outer.commit()
        operation(session, "after")
        session.commit()  # flushes "after" into the connection's next transaction
        session.close()
        assert recorder.names == []
        if next_commits:
            connection.commit()
            connection.begin()  # the next transaction: the COMMIT went through
            connection.rollback()
        else:
            connection.rollback()
        discarded = [(d.event.target_id, d.reason) for d in audit_events.discarded]
    stored = stored_names(engine)
    if next_commits:
        assert stored == ["after", "before"]
        assert recorder.names == ["before", "after"]
        assert discarded == []
    else:
        assert stored == ["before"]
        assert recorder.names == []
        assert discarded == [("before", "rollback"), ("after", "rollback")]
    assert caplog.text.count("still open after that transaction committed") == 1


def test_a_joined_session_working_on_after_its_owner_committed_sends_nothing_undone(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Two sessions on one connection: the owner commits while the joined
    one is open, and the joined one works on in a transaction nobody
    commits (rolled back when the connection closes). No event is sent for
    a change that is not in the database."""
    with engine.connect() as connection:
        owner = joined_session(emitter, connection)
        joined = joined_session(emitter, connection)
        operation(owner, "owner")
        owner.flush()
        operation(joined, "joined")
        joined.flush()
        owner.commit()
        operation(joined, "lost")
        joined.commit()
        owner.close()
        joined.close()
    stored = stored_names(engine)
    assert stored == ["joined", "owner"]
    assert "lost" not in recorder.names
    assert set(recorder.names) <= set(stored)
    assert "owner" in recorder.names


def test_a_joined_session_left_open_is_warned_about_once(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A joined session left open while the caller commits transaction after
    transaction on the connection follows each of them, with one warning."""
    with engine.connect() as connection:
        connection.begin()
        session = joined_session(emitter, connection)
        operation(session, "joined")
        session.flush()
        for _ in range(3):
            connection.commit()
            connection.begin()
        connection.commit()
        session.commit()
        session.close()
        connection.begin()
        connection.commit()
    assert recorder.names == ["joined"]
    assert caplog.text.count("still open after that transaction committed") == 1


@pytest.mark.parametrize("ending", ["commit", "close"])
def test_a_joined_session_that_ended_is_not_waited_for_in_the_next_transaction(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    ending: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a session still in its transaction follows the connection into
    the next one: one that committed or closed before the outer
    commit is settled by it, and then leaves the connection alone."""
    from access_audit._outer import _KEY

    with engine.connect() as connection:
        outer = connection.begin()
        session = joined_session(emitter, connection)
        operation(session, "joined")
        session.flush()
        getattr(session, ending)()
        outer.commit()
        for _ in range(3):
            connection.begin()
            connection.commit()
        assert _KEY not in connection.info
    assert recorder.names == (["joined"] if ending == "commit" else [])
    assert "still open after that transaction committed" not in caplog.text


def test_savepoint_opened_by_the_caller_after_staging_is_refused(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A flush inside a SAVEPOINT the caller opened after joining raises."""
    with engine.connect() as connection:
        outer = connection.begin()
        session = joined_session(emitter, connection)
        operation(session, "ghost")
        session.connection()  # joined before the caller's SAVEPOINT
        connection.begin_nested()
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            session.flush()
        session.close()  # the failed flush rolled the joined transaction back
        assert not outer.is_active
        connection.rollback()
    assert recorder.names == []


def test_savepoint_opened_by_the_caller_before_staging_is_refused(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Staging on a joined session inside a later caller SAVEPOINT raises."""
    with engine.connect() as connection:
        outer = connection.begin()
        session = joined_session(emitter, connection)
        session.connection()
        connection.begin_nested()
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            operation(session, "ghost")
        session.close()
        outer.rollback()
    assert recorder.names == []


def test_event_staged_after_the_first_inside_a_caller_savepoint_is_refused(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Every event is checked, not only a transaction's first: one staged
    inside a SAVEPOINT the caller opened after the first raises, and the
    first is still sent when the outer transaction commits."""
    with engine.connect() as connection:
        outer = connection.begin()
        session = joined_session(emitter, connection)
        operation(session, "kept")
        session.flush()
        savepoint = connection.begin_nested()
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            operation(session, "undone")
        session.expunge_all()
        savepoint.rollback()
        session.commit()
        session.close()
        outer.commit()
    assert recorder.names == ["kept"]
    assert stored_names(engine) == ["kept"]


class FailingPlugin:
    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        raise RuntimeError("plugin bug")


def test_strict_mode_outer_delivery_neither_loses_events_nor_leaks(
    engine: Engine, recorder: Recorder
) -> None:
    """A plugin error while the outer delivers is logged; every batch settles."""
    emitter = AuditEmitter(
        [FailingPlugin(), recorder], load_entrypoints=False, raise_plugin_errors=True
    )
    # A NullPool (file SQLite on SQLAlchemy 2.0) keeps nothing to leak.
    pool_size = getattr(engine.pool, "checkedout", lambda: 0)
    checked_out = pool_size()
    with engine.connect() as connection:
        connection.begin()
        sessions = [joined_session(emitter, connection) for _ in range(2)]
        for number, session in enumerate(sessions):
            operation(session, f"s{number}")
            session.commit()
        connection.commit()
    assert sorted(recorder.names) == ["s0", "s1"]
    assert pool_size() == checked_out


def test_detach_then_attach_again_reports_the_stale_events(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Events whose transaction ended while detached are discarded ("detached")."""
    session = Session(engine)
    with capture_audit_events() as audit_events:
        emitter.attach(session)
        operation(session, "first")
        emitter.detach(session)
        session.commit()
        emitter.attach(session)
        operation(session, "second")
        session.commit()
        session.close()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("first", "detached")
        ]
    assert recorder.names == ["second"]


def test_two_phase_outer_commit_delivers(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A joined session inside an XA transaction sends once the XA commit is done."""
    if engine.dialect.name != "mysql":
        pytest.skip("two-phase commit runs on MariaDB here (XA)")
    with engine.connect() as connection:
        xa = connection.begin_twophase()
        with joined_session(emitter, connection) as session:
            operation(session, "xa")
            session.commit()
        xa.prepare()
        xa.commit()
    assert recorder.names == ["xa"]
    assert stored_names(engine) == ["xa"]


EXIT_SCRIPT = """
import sys
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from support import Base, Item, operation
from access_audit import AuditEmitter, hookimpl

class Print:
    @hookimpl
    def audit_event_logged(self, envelope):
        print("delivered", envelope.target_id, flush=True)

engine = create_engine(sys.argv[1])
Base.metadata.create_all(engine)
emitter = AuditEmitter([Print()], load_entrypoints=False)
connection = engine.connect()
outer = connection.begin()
session = Session(bind=connection)
emitter.attach(session)
operation(session, "at-exit")
session.commit()
outer.commit()
print("exiting without closing", flush=True)
"""


def test_outer_committed_then_process_exits_delivers(tmp_path: Path) -> None:
    """An outer commit whose connection is never closed is delivered at exit."""
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    url = f"sqlite:///{tmp_path / 'exit.db'}"
    tests = Path(__file__).parent
    completed = subprocess.run(
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tests), "PATH": ""},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "exiting without closing",
        "delivered at-exit",
    ]


def test_outbox_joined_commit_does_not_wait_for_the_pool(
    engine: Engine, outbox: Outbox, recorder: Recorder
) -> None:
    """With a one-connection pool, recording deliveries never blocks the outer's close."""
    if engine.dialect.name == "sqlite":
        pytest.skip("the file SQLite engine's pool is not the point here")
    small = create_engine(engine.url, pool_size=1, max_overflow=0, pool_timeout=3)
    try:
        emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
        emitter.register(recorder, name="recorder")
        started = time.monotonic()
        with (
            small.begin() as connection,
            joined_session(emitter, connection) as session,
        ):
            operation(session, "pooled")
            session.commit()
        assert time.monotonic() - started < 2
        assert recorder.names == ["pooled"]
        assert wait_until(lambda: count_pending(small, outbox) == 0)
    finally:
        small.dispose()


def test_after_begin_is_not_installed_for_a_plain_engine_session(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Querying before staging on an Engine-bound session needs no after_begin."""
    from sqlalchemy import event, select
    from sqlalchemy.orm import sessionmaker

    maker = sessionmaker(engine)
    emitter.attach(maker)
    with maker() as session:
        session.scalars(select(Item)).all()  # connected before the first stage
        operation(session, "plain")
        session.commit()
    assert recorder.names == ["plain"]
    assert not event.contains(
        maker.class_, "after_begin", emitter._listeners._after_begin
    )
    emitter.detach(maker)


@pytest.mark.parametrize("outer_commits", [True, False], ids=["commit", "rollback"])
def test_commit_without_sql_on_a_joined_session_waits_for_the_outer(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, outer_commits: bool
) -> None:
    """A joined session that ran no SQL still waits for the outer transaction."""
    with engine.connect() as connection:
        outer = connection.begin()
        connection.execute(text("SELECT 1"))
        with joined_session(emitter, connection) as session:
            stage_event(
                session, "thing_done", target_type="thing", target_id=1, action="do"
            )
            session.commit()
            assert recorder.events == []
        if outer_commits:
            outer.commit()
        else:
            outer.rollback()
    assert len(recorder.events) == (1 if outer_commits else 0)


@pytest.mark.parametrize("how", ["constructor", "attribute"])
def test_a_misspelt_joined_transactions_is_refused(how: str) -> None:
    """Set in the constructor or, as test suites do, on the attribute: a
    value other than "outer" or "session" is refused naming it (assigned,
    it was taken, and behaved as "session")."""
    with pytest.raises(ValueError, match="joined_transactions must be"):
        if how == "constructor":
            AuditEmitter(load_entrypoints=False, joined_transactions="sessions")  # type: ignore[arg-type]
        else:
            emitter = AuditEmitter(load_entrypoints=False)
            emitter.joined_transactions = "sessions"  # type: ignore[assignment]
