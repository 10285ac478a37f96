"""Where the record of a commit's dispatch goes when its session is bound to
a connection, on every database.

The record (which outbox rows the dispatch after COMMIT delivered) is
written through the engine, off the request path, once the rows are
committed: never on a connection that is the caller's to use next, and never
from another thread or task while the caller may be using it. A session
under ``joined_transactions="session"`` has its rows in the caller's open
transaction: an inline dispatch records there, in the caller's thread; any
other leaves them pending (they roll back with that transaction).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session
from support import Recorder, operation, stored_names

from access_audit import AuditEmitter
from access_audit.outbox import Outbox, count_pending

NAMES = ["one", "two", "three"]


def outbox_emitter(outbox: Outbox, recorder: Recorder, **options: Any) -> AuditEmitter:
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, **options)
    emitter.register(recorder, name="recorder")
    return emitter


@pytest.mark.parametrize("mode", ["conditional_savepoint", "control_fully"])
def test_a_session_that_controls_its_connection_hands_it_back_out_of_any_transaction(
    engine: Engine,
    outbox: Outbox,
    recorder: Recorder,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Session(bind=connection)`` that begins and commits the connection's
    transactions itself (the connection was in none, or ``control_fully``):
    after each commit the connection is in no transaction, its next commits
    are the session's own, and every row's delivery is recorded."""
    emitter = outbox_emitter(outbox, recorder)
    with engine.connect() as connection:
        if mode == "control_fully":
            connection.begin()
        session = Session(bind=connection, join_transaction_mode=mode)  # type: ignore[arg-type]
        emitter.attach(session)
        for name in NAMES:
            operation(session, name)
            session.commit()
            assert not connection.in_transaction()
        session.close()
        with connection.begin():  # the caller's own, next
            pass
    assert emitter.flush(timeout=10)
    assert recorder.names == NAMES
    assert stored_names(engine) == sorted(NAMES)
    assert count_pending(engine, outbox) == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_joined_sessions_record_is_written_when_flush_returns(
    engine: Engine,
    outbox: Outbox,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A joined session's batch is delivered when the outer transaction's
    COMMIT is known (the connection goes back to the pool here); its record
    is taken by the time ``flush()`` returns, however slowly it is handed
    over."""
    emitter = outbox_emitter(outbox, recorder)
    record = outbox.record

    def slow_record(*args: Any) -> None:
        time.sleep(0.3)
        record(*args)

    monkeypatch.setattr(outbox, "record", slow_record)
    with engine.connect() as connection:
        outer = connection.begin()
        with Session(bind=connection) as session:
            emitter.attach(session)
            operation(session, "joined")
            session.commit()
        outer.commit()
    assert emitter.flush(timeout=10)
    assert count_pending(engine, outbox) == 0
    assert recorder.names == ["joined"]


@pytest.mark.parametrize("dispatch", ["inline", "background"])
def test_session_mode_uses_the_callers_connection_only_in_its_thread(
    engine: Engine, outbox: Outbox, recorder: Recorder, dispatch: str
) -> None:
    """``joined_transactions="session"`` (the rollback-per-test recipe): the
    rows are in the caller's open transaction. An inline dispatch records
    there, in the caller's thread; a background one never touches the
    caller's connection (whose thread goes on using it) and leaves the rows
    pending, to roll back with the transaction."""
    emitter = outbox_emitter(
        outbox, recorder, dispatch=dispatch, joined_transactions="session"
    )
    threads: list[str] = []
    with engine.connect() as connection:

        def on_the_callers(conn: Connection, *_: Any) -> None:
            if conn is connection:
                threads.append(threading.current_thread().name)

        event.listen(engine, "before_cursor_execute", on_the_callers)
        outer = connection.begin()
        try:
            session = Session(bind=connection, join_transaction_mode="create_savepoint")
            emitter.attach(session)
            for name in NAMES:
                operation(session, name)
                session.commit()
            assert emitter.flush(timeout=10)
            pending = count_pending(connection, outbox)
            session.close()
        finally:
            event.remove(engine, "before_cursor_execute", on_the_callers)
            outer.rollback()
    assert recorder.names == NAMES
    assert set(threads) == {threading.current_thread().name}
    assert pending == (0 if dispatch == "inline" else len(NAMES))
    assert count_pending(engine, outbox) == 0  # rolled back with the test
