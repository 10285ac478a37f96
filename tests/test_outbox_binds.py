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

import gc
import threading
import time
import warnings
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


def commit_joined(engine: Engine, emitter: AuditEmitter, name: str) -> None:
    """Commit an operation *name* on a session joined to a connection's
    transaction, then that transaction (its batch is delivered as the
    connection goes back to the pool)."""
    with engine.connect() as connection:
        outer = connection.begin()
        with Session(bind=connection) as session:
            emitter.attach(session)
            operation(session, name)
            session.commit()
        outer.commit()


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

    def slow_record(*args: Any, **options: Any) -> None:
        time.sleep(0.3)
        record(*args, **options)

    monkeypatch.setattr(outbox, "record", slow_record)
    commit_joined(engine, emitter, "joined")
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


def _background_async_outbox(tmp_path: Any, plugin_delay: float) -> tuple[Any, ...]:
    """A background-dispatch emitter with an outbox on an aiosqlite engine
    (its records go to the engine's event loop), and one event to commit."""
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker
    from support import aiosqlite_engine

    from access_audit import hookimpl, stage_event

    class Slow:
        @hookimpl
        def audit_event_logged(self, envelope: Any) -> None:
            time.sleep(plugin_delay)

    outbox = Outbox()
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="background")
    emitter.register(Slow(), name="slow")

    async def commit() -> Any:
        engine = aiosqlite_engine(tmp_path / "records.db")
        async with engine.begin() as connection:
            await connection.run_sync(outbox.create)
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            stage_event(session, "x", target_type="t", target_id=1, action="a")
            await session.commit()
        return engine

    return emitter, outbox, commit, asyncio


def test_a_sync_flush_on_the_loop_that_would_write_the_record_does_not_wait(
    tmp_path: Any,
) -> None:
    """A record handed to the event loop cannot be written while a sync
    ``flush()`` blocks that loop's thread: it says False at once, instead of
    waiting out its timeout (or forever); ``aflush()`` then waits for it."""
    emitter, outbox, commit, asyncio = _background_async_outbox(tmp_path, 0.3)

    async def main() -> tuple[bool, float, bool, int]:
        engine = await commit()
        # The worker delivers while this thread waits in flush(), and hands
        # the record to this thread's loop.
        started = time.monotonic()
        flushed = emitter.flush(timeout=5)
        took = time.monotonic() - started
        awaited = await emitter.aflush(timeout=10)
        async with engine.connect() as connection:
            pending = await connection.run_sync(count_pending, outbox)
        await engine.dispose()
        return flushed, took, awaited, pending

    flushed, took, awaited, pending = asyncio.run(main())
    assert (flushed, awaited, pending) == (False, True, 0)
    assert took < 2  # the worker's 0.3 s, not the 5 s timeout


def test_a_record_whose_loop_closed_first_is_logged_and_flush_says_so(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop a record was handed to closed before running it: the first
    flush after says False and the log names the rows (the relay delivers
    them again); later flushes are not held up by it."""
    emitter, _outbox, commit, asyncio = _background_async_outbox(tmp_path, 0.3)
    loop = asyncio.new_event_loop()
    engine = loop.run_until_complete(commit())
    loop.run_until_complete(engine.dispose())  # before the worker delivers
    time.sleep(0.8)  # delivered; its record handed to the idle loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # never awaited, indeed
        loop.close()
        gc.collect()
    assert emitter.flush(timeout=5) is False
    assert emitter.flush(timeout=5) is True
    [logged] = [r for r in caplog.records if "could not mark" in r.getMessage()]
    assert "event loop closed" in str(logged.exc_info[1] if logged.exc_info else "")


def test_a_record_kept_on_a_shared_connection_is_not_written_inside_its_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-memory SQLite on a ``StaticPool``: a record kept from an earlier
    commit is due when a joined session's batch is settled inside the
    connection's own begin event; writing it there would COMMIT on the
    shared connection, and count the transaction just begun as committed.
    It is kept instead: the joined session's change, rolled back, sends
    nothing."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import StaticPool
    from support import Base, Item

    from access_audit import stage_event
    from access_audit.outbox import _recorder

    monkeypatch.setattr(_recorder, "LINGER", 0.01)
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    outbox = Outbox()
    outbox.create(engine)
    recorder = Recorder()
    emitter = outbox_emitter(outbox, recorder)
    with Session(engine) as session:
        emitter.attach(session)
        operation(session, "plain")
        session.commit()  # its record is kept, to write later
    time.sleep(0.05)
    connection = engine.connect()
    connection.begin()
    first = Session(bind=connection)
    emitter.attach(first)
    stage_event(first, "e1", target_type="t", target_id=1, action="a")
    first.commit()
    second = Session(bind=connection)
    emitter.attach(second)
    stage_event(second, "e2", target_type="t", target_id=2, action="a")
    connection.commit()
    connection.execute(text("SELECT 1"))  # the next transaction begins
    second.add(Item(name="undone"))
    second.commit()  # flushed into that next transaction
    connection.rollback()
    connection.close()
    second.close()
    assert [e.event_type for e in recorder.events] == ["item_created", "e1"]
    assert stored_names(engine) == ["plain"]
    assert emitter.flush(timeout=10)
    assert count_pending(engine, outbox) == 0


def test_a_store_written_before_apart_still_records_a_joined_sessions_batch(
    engine: Engine, outbox: Outbox, recorder: Recorder
) -> None:
    """A delivery store whose ``record()`` predates the ``apart`` keyword is
    called without it, for a joined session's batch too."""
    calls: list[int] = []

    class OlderOutbox(Outbox):
        def record(self, bind: Any, envelopes: Any, plugins: Any, report: Any) -> None:
            calls.append(len(envelopes))
            super().record(bind, envelopes, plugins, report)

    older = OlderOutbox(table_name=outbox.table.name)
    emitter = outbox_emitter(older, recorder)  # type: ignore[arg-type]
    commit_joined(engine, emitter, "joined")
    assert emitter.flush(timeout=10)
    assert calls == [1]
    assert count_pending(engine, outbox) == 0


def test_a_record_whose_loop_closed_before_it_was_handed_over_fails_one_flush(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop that would write a record closed before the worker handed
    it over: it is logged, the next flush says False, later ones True."""
    emitter, _outbox, commit, asyncio = _background_async_outbox(tmp_path, 0.3)

    async def main() -> None:
        engine = await commit()
        await engine.dispose()

    asyncio.run(main())  # ends before the worker delivers
    time.sleep(0.8)
    assert emitter.flush(timeout=5) is False
    assert emitter.flush(timeout=5) is True
    assert any("could not mark" in r.getMessage() for r in caplog.records)
