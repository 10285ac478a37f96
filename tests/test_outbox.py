"""Outbox mode: rows written inside the committing transaction; rows every
plugin took leave the outbox once the dispatch after COMMIT is recorded.

Every database test runs on SQLite, PostgreSQL and MariaDB (the ``engine``
fixture). Each test creates the outbox tables on the engine and drops them
afterwards; server engines already work in a namespace of this run.
``written`` holds the rows each test's commits INSERTed (the outbox table
never sees an UPDATE); the tables themselves are read after
``outbox.flush()``, once what the dispatch delivered is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import DatabaseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import (
    Base,
    Item,
    aiosqlite_engine,
    deletes_from,
    make_commit_fail,
    operation,
    outbox_emitter,
    outbox_rows,
    stored_names,
)

from access_audit import (
    AuditEmitter,
    AuditEventEnvelope,
    hookimpl,
    stage_event,
)
from access_audit.outbox import DEAD, DELIVERED, PENDING, Outbox


class Sink:
    """A plugin that records every envelope; raises instead while ``failing``."""

    def __init__(self, *, failing: bool = False) -> None:
        self.events: list[AuditEventEnvelope] = []
        self.failing = failing

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        if self.failing:
            raise RuntimeError(f"sink down for {envelope.target_id}")
        self.events.append(envelope)

    @property
    def names(self) -> list[str]:
        return [envelope.target_id for envelope in self.events]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def Session(engine: Engine, outbox: Outbox, sink: Sink) -> Iterator[sessionmaker]:
    """A sessionmaker whose emitter writes to ``outbox`` and delivers to "sink"."""
    emitter = outbox_emitter(outbox, sink=sink)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    yield maker
    emitter.detach(maker)


@pytest.fixture
def written(engine: Engine, outbox: Outbox) -> Iterator[list[dict[str, Any]]]:
    """The rows INSERTed into the outbox table on *engine*, in order, by
    column name, as the driver got them; any other statement on that table
    but a DELETE (an UPDATE) fails the test."""
    rows: list[dict[str, Any]] = []
    others: list[str] = []
    prepared = outbox._insert_for(engine.dialect)

    def after_cursor_execute(
        connection: object,
        cursor: object,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if statement == prepared.sql:
            for row in parameters if executemany else [parameters]:
                if not isinstance(row, dict):
                    row = dict(zip(prepared.columns, row, strict=True))
                rows.append(row)
            return
        clause = getattr(context.compiled, "statement", None)
        if getattr(clause, "table", None) is outbox.table and not clause.is_delete:
            others.append(statement)

    event.listen(engine, "after_cursor_execute", after_cursor_execute)
    yield rows
    event.remove(engine, "after_cursor_execute", after_cursor_execute)
    assert others == []


def as_stored(engine: Engine, timestamp: datetime) -> Any:
    """*timestamp* as the driver gets it for ``created_at`` on *engine*."""
    column_type = Outbox().table.c.created_at.type
    process = column_type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
    return process(timestamp) if process is not None else timestamp


def row_names(written: list[dict[str, Any]]) -> list[str]:
    """The target ids (``aggregateid``) of *written* rows."""
    return [row["aggregateid"] for row in written]


def test_committed_events_get_one_row_each_that_parses_back_to_the_envelope(
    Session: sessionmaker,
    sink: Sink,
    engine: Engine,
    outbox: Outbox,
    written: list[dict[str, Any]],
) -> None:
    """Each committed event has a row whose columns and payload match its
    envelope; once the plugin took them, the rows leave the outbox."""
    with Session() as session:
        operation(session, "first", payload={"n": 1, "tags": ["a", "b"]})
        operation(session, "second", reason="because")
        session.commit()
        operation(session, "third")
        session.commit()
    assert sink.names == ["first", "second", "third"]
    rows = written
    assert len(rows) == len(sink.events)
    for row, envelope in zip(rows, sink.events, strict=True):
        assert row["id"] == str(envelope.id)
        assert row["aggregatetype"] == "item"
        assert row["aggregateid"] == envelope.target_id
        assert row["type"] == "item_created"
        assert AuditEventEnvelope.from_dict(json.loads(row["payload"])) == envelope
        assert row["created_at"] == as_stored(engine, envelope.timestamp)
        assert row["transaction_id"] == str(envelope.transaction_id)
        assert row["sequence"] == envelope.sequence
    assert [row["sequence"] for row in rows] == [0, 1, 0]
    assert rows[0]["transaction_id"] == rows[1]["transaction_id"]
    assert rows[1]["transaction_id"] != rows[2]["transaction_id"]
    assert stored_names(engine) == ["first", "second", "third"]
    assert outbox.flush(timeout=10)
    assert outbox_rows(engine, outbox) == []


def test_rolled_back_transaction_writes_no_rows(
    Session: sessionmaker, sink: Sink, engine: Engine, written: list[dict[str, Any]]
) -> None:
    """A transaction that rolls back leaves no outbox row and sends nothing."""
    with Session() as session:
        operation(session, "doomed")
        session.flush()
        session.rollback()
        operation(session, "kept")
        session.commit()
    assert sink.names == ["kept"]
    assert row_names(written) == ["kept"]
    assert stored_names(engine) == ["kept"]


def test_closed_session_writes_no_rows(
    Session: sessionmaker,
    sink: Sink,
    engine: Engine,
    outbox: Outbox,
    written: list[dict[str, Any]],
) -> None:
    """A session closed with its transaction open leaves no outbox row."""
    with Session() as session:
        operation(session, "abandoned")
        session.flush()
    assert sink.events == []
    assert written == []
    assert outbox_rows(engine, outbox) == []
    assert stored_names(engine) == []


def test_rolled_back_savepoint_leaves_no_rows_for_its_events(
    Session: sessionmaker, sink: Sink, engine: Engine, written: list[dict[str, Any]]
) -> None:
    """Events of a rolled-back SAVEPOINT get no row; the committed rest does."""
    with Session() as session:
        operation(session, "outer")
        savepoint = session.begin_nested()
        operation(session, "inner")
        session.flush()
        savepoint.rollback()
        session.commit()
    assert sink.names == ["outer"]
    assert row_names(written) == ["outer"]
    assert stored_names(engine) == ["outer"]


@pytest.mark.parametrize(
    "release", ["savepoint.commit", "session.commit"], ids=["released", "left-open"]
)
def test_savepoint_events_get_rows_once_the_outer_transaction_commits(
    Session: sessionmaker,
    sink: Sink,
    engine: Engine,
    outbox: Outbox,
    written: list[dict[str, Any]],
    release: str,
) -> None:
    """A SAVEPOINT's events committed with the outer transaction get rows, in order."""
    with Session() as session:
        operation(session, "before")
        savepoint = session.begin_nested()
        operation(session, "inner")
        if release == "savepoint.commit":
            savepoint.commit()
            operation(session, "after")
        session.commit()
    expected = ["before", "inner", "after"][: 3 if release == "savepoint.commit" else 2]
    assert sink.names == expected
    assert row_names(written) == expected
    assert [row["id"] for row in written] == [str(e.id) for e in sink.events]
    assert outbox.flush(timeout=10)
    assert outbox_rows(engine, outbox) == []


def outbox_rows_in(session: OrmSession, outbox: Outbox) -> int:
    """How many outbox rows the session's own transaction sees."""
    count = session.execute(select(outbox.table.c.id)).all()
    return len(count)


def test_released_savepoint_alone_writes_no_rows(
    Session: sessionmaker,
    sink: Sink,
    engine: Engine,
    outbox: Outbox,
    written: list[dict[str, Any]],
) -> None:
    """RELEASE SAVEPOINT writes nothing when the outer transaction then rolls back."""
    with Session() as session:
        savepoint = session.begin_nested()
        operation(session, "released")
        savepoint.commit()
        assert outbox_rows_in(session, outbox) == 0
        session.rollback()
    assert sink.events == []
    assert written == []
    assert outbox_rows(engine, outbox) == []
    assert stored_names(engine) == []


@pytest.mark.parametrize(
    "staged_before", [False, True], ids=["only-hook", "also-before"]
)
def test_events_staged_by_orm_hooks_during_the_commit_get_rows(
    Session: sessionmaker,
    sink: Sink,
    engine: Engine,
    outbox: Outbox,
    written: list[dict[str, Any]],
    staged_before: bool,
) -> None:
    """Events staged by an after_insert hook in the commit's flush get rows too."""

    def after_insert(mapper: object, connection: object, item: Item) -> None:
        session = OrmSession.object_session(item)
        assert session is not None
        stage_event(
            session, "item_inserted", target_type="item", target_id=item.name,
            action="insert",
        )  # fmt: skip

    event.listen(Item, "after_insert", after_insert)
    try:
        with Session() as session:
            expected = []
            if staged_before:
                stage_event(
                    session, "report_viewed", target_type="report", target_id=1,
                    action="view",
                )  # fmt: skip
                expected.append(("report_viewed", "1"))
            session.add(Item(name="hooked"))
            session.commit()
    finally:
        event.remove(Item, "after_insert", after_insert)
    expected.append(("item_inserted", "hooked"))
    assert [(e.event_type, e.target_id) for e in sink.events] == expected
    assert [(row["type"], row["aggregateid"]) for row in written] == expected
    assert outbox.flush(timeout=10)
    assert outbox_rows(engine, outbox) == []


def test_rows_every_plugin_took_leave_both_tables_off_the_request_path(
    engine: Engine, outbox: Outbox, written: list[dict[str, Any]]
) -> None:
    """After inline dispatch to every plugin, the rows (and any delivery
    state) are deleted by the outbox's recorder thread, not in the commit."""
    first, second = Sink(), Sink()
    emitter = outbox_emitter(outbox, alpha=first, beta=second)
    deleted_on: set[str] = set()

    def before_execute(connection: object, clause: Any, *_: Any) -> None:
        if deletes_from(clause, outbox.table) or deletes_from(
            clause, outbox.delivery_table
        ):
            deleted_on.add(threading.current_thread().name)

    event.listen(engine, "before_execute", before_execute)
    try:
        with OrmSession(engine) as session:
            emitter.attach(session)
            operation(session, "one")
            operation(session, "two")
            session.commit()
        assert emitter.flush(timeout=10)
    finally:
        event.remove(engine, "before_execute", before_execute)
    assert first.names == second.names == ["one", "two"]
    assert [json.loads(row["recipients"]) for row in written] == [["alpha", "beta"]] * 2
    assert outbox_rows(engine, outbox) == []
    with engine.connect() as connection:
        assert connection.execute(select(outbox.delivery_table)).all() == []
    assert deleted_on == {"access_audit-outbox-recorder"}


def test_rows_name_the_plugins_registered_at_their_commit(
    engine: Engine, outbox: Outbox, written: list[dict[str, Any]]
) -> None:
    """``recipients`` follows registrations between commits: a plugin
    registered later is named from then on, one unregistered no more."""
    emitter = outbox_emitter(outbox, alpha=Sink())
    with OrmSession(engine) as session:
        emitter.attach(session)
        operation(session, "one")
        session.commit()
        emitter.register(Sink(), name="beta")
        operation(session, "two")
        session.commit()
        emitter.plugin_manager.unregister(name="alpha")
        operation(session, "three")
        session.commit()
    assert emitter.flush(timeout=10)
    assert [json.loads(row["recipients"]) for row in written] == [
        ["alpha"],
        ["alpha", "beta"],
        ["beta"],
    ]


def test_raising_plugin_leaves_rows_pending_with_the_others_delivered(
    engine: Engine, outbox: Outbox
) -> None:
    """A raising plugin leaves its rows pending, naming who took them and the error."""
    good, bad = Sink(), Sink(failing=True)
    emitter = outbox_emitter(outbox, good=good, bad=bad)
    with OrmSession(engine) as session:
        emitter.attach(session)
        operation(session, "one")
        operation(session, "two")
        session.commit()
    assert emitter.flush(timeout=10)
    assert good.names == ["one", "two"]
    assert bad.events == []
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["one", "two"]
    for row in rows:
        assert row["states"] == {"good": DELIVERED, "bad": PENDING}
        assert row["attempts"]["bad"] == 1
        assert "sink down for " + row["aggregateid"] in row["errors"]["bad"]
        assert not row["parked"]
    assert stored_names(engine) == ["one", "two"]


def test_a_record_that_fails_is_logged_with_its_cause_and_the_commit_stands(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """When what the dispatch delivered cannot be recorded, the commit and
    the delivery stand, the rows stay for the relay, and the log says why."""

    class Unrecordable(Outbox):
        def record(self, *_: Any, **__: Any) -> None:
            raise RuntimeError("the delivery table is gone")

    outbox = Unrecordable()
    outbox.drop(engine)
    outbox.create(engine)
    try:
        sink = Sink()
        emitter = outbox_emitter(outbox, sink=sink)
        with OrmSession(engine) as session:
            emitter.attach(session)
            operation(session, "one")
            session.commit()
        assert sink.names == ["one"]
        assert stored_names(engine) == ["one"]
        assert [row["aggregateid"] for row in outbox_rows(engine, outbox)] == ["one"]
        [logged] = [r for r in caplog.records if r.levelname == "ERROR"]
        assert "the relay will deliver them again" in logged.getMessage()
        assert logged.exc_info is not None
        assert "the delivery table is gone" in str(logged.exc_info[1])
    finally:
        outbox.drop(engine)


def test_rows_are_forgotten_by_id_with_one_parameter_where_the_database_splits_it(
    engine: Engine, outbox: Outbox
) -> None:
    """Forgetting rows deletes exactly those ids, with their delivery state,
    in statements of at most 1,000 ids, each binding them as one parameter
    (text on PostgreSQL, JSON on SQLite and MariaDB)."""
    from sqlalchemy import insert

    from access_audit.outbox._store import forget

    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="relay")
    emitter.register(Sink(), name="sink")
    with OrmSession(engine) as session:
        emitter.attach(session)
        for name in ("one", "two", "three"):
            operation(session, name)
        session.commit()
    ids = {row["aggregateid"]: row["id"] for row in outbox_rows(engine, outbox)}
    bound: list[int] = []

    def before_cursor_execute(*args: Any) -> None:
        statement, parameters = args[2], args[3]
        if statement.startswith("DELETE"):
            bound.append(len(parameters))

    with engine.begin() as connection:
        connection.execute(
            insert(outbox.delivery_table),
            [
                {"event_id": ids["two"], "plugin": "sink", "state": PENDING,
                 "attempts": 1, "updated_at": datetime.now()},
            ],
        )  # fmt: skip
    unknown = [f"00000000-0000-7000-8000-{n:012d}" for n in range(1500)]
    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    try:
        with engine.begin() as connection:
            forget(connection, outbox, [ids["one"], *unknown, ids["two"]])
    finally:
        event.remove(engine, "before_cursor_execute", before_cursor_execute)
    [left] = outbox_rows(engine, outbox)
    assert left["aggregateid"] == "three"
    with engine.connect() as connection:
        assert connection.execute(select(outbox.delivery_table)).all() == []
    # Two statements per table, for 1,000 ids and then 502 (PostgreSQL binds
    # string_to_array's separator too).
    assert len(bound) == 4 and max(bound) <= 2, bound


def test_redaction_applies_to_the_outbox_payload(
    engine: Engine, outbox: Outbox, sink: Sink, written: list[dict[str, Any]]
) -> None:
    """Redacted keys are already redacted in the outbox row, at any depth."""
    emitter = AuditEmitter(
        load_entrypoints=False, outbox=outbox, redact_keys=("password", "Token")
    )
    emitter.register(sink, name="sink")
    with OrmSession(engine) as session:
        emitter.attach(session)
        operation(
            session,
            "secretive",
            payload={"password": "hunter2", "nested": {"TOKEN": "s3cr3t"}, "ok": 1},
            metadata={"token": "meta-s3cr3t"},
        )
        session.commit()
    [row] = written
    for secret in ("hunter2", "s3cr3t"):
        assert secret not in json.dumps(row, default=str)
    stored = json.loads(row["payload"])
    assert stored["payload"] == {
        "password": "[REDACTED]",
        "nested": {"TOKEN": "[REDACTED]"},
        "ok": 1,
    }
    assert stored["metadata"]["token"] == "[REDACTED]"
    assert AuditEventEnvelope.from_dict(stored) == sink.events[0]


def test_failed_commit_leaves_no_rows(
    Session: sessionmaker,
    sink: Sink,
    engine: Engine,
    outbox: Outbox,
    written: list[dict[str, Any]],
) -> None:
    """When COMMIT fails, the rows written before it are gone with the transaction."""
    session = Session()
    operation(session, "doomed")
    session.flush()
    make_commit_fail(session, engine)
    with pytest.raises(DatabaseError):
        session.commit()
    session.rollback()
    assert sink.events == []
    assert outbox_rows(engine, outbox) == []
    operation(session, "next")
    session.commit()
    session.close()
    assert sink.names == ["next"]
    assert row_names(written)[-1:] == ["next"]
    assert stored_names(engine) == ["next"]


def test_async_session_commit_writes_rows_and_records_the_delivery(
    tmp_path: Path,
) -> None:
    """With AsyncSession (aiosqlite), committed events get rows; a plugin
    that failed leaves its state, one that took the event none."""
    outbox = Outbox()
    sink, down = Sink(), Sink(failing=True)
    emitter = outbox_emitter(outbox, sink=sink, down=down)

    async def main() -> list[dict[str, Any]]:
        engine = aiosqlite_engine(tmp_path / "async.db")
        try:
            async with engine.begin() as connection:
                await connection.run_sync(outbox.create)
            maker = async_sessionmaker(engine)
            emitter.attach(maker)
            async with maker() as session:
                stage_event(
                    session, "report_viewed", target_type="report", target_id=1,
                    action="view",
                )  # fmt: skip
                await session.rollback()
                stage_event(
                    session, "report_viewed", target_type="report", target_id=2,
                    action="view",
                )  # fmt: skip
                await session.commit()
            assert await emitter.aflush(timeout=10)
            async with AsyncSession(engine) as reader:
                result = await reader.execute(select(outbox.table))
                rows = [dict(row) for row in result.mappings()]
                states = (await reader.execute(select(outbox.delivery_table))).all()
                for row in rows:
                    row["states"] = {
                        state.plugin: state.state
                        for state in states
                        if state.event_id == row["id"]
                    }
                return rows
        finally:
            await engine.dispose()

    rows = asyncio.run(main())
    assert sink.names == ["2"]
    assert [row["id"] for row in rows] == [str(sink.events[0].id)]
    assert rows[0]["states"] == {"sink": DELIVERED, "down": PENDING}


@pytest.mark.parametrize("dispatch", ["inline", "background", "asyncio"])
def test_an_async_record_that_fails_is_logged_with_its_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dispatch: str
) -> None:
    """With AsyncSession (aiosqlite), however the dispatch runs, a record
    that cannot be written leaves the commit, the delivery and the row, and
    the log says why."""

    class Unrecordable(Outbox):
        def record(self, *_: Any, **__: Any) -> None:
            raise RuntimeError("the delivery table is gone")

    outbox = Unrecordable()
    sink = Sink()
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch=dispatch)
    emitter.register(sink, name="sink")

    async def main() -> int:
        engine = aiosqlite_engine(tmp_path / "async.db")
        try:
            async with engine.begin() as connection:
                await connection.run_sync(outbox.create)
            maker = async_sessionmaker(engine)
            emitter.attach(maker)
            async with maker() as session:
                stage_event(
                    session, "report_viewed", target_type="report", target_id=1,
                    action="view",
                )  # fmt: skip
                await session.commit()
            assert await emitter.aflush(timeout=10)
            async with AsyncSession(engine) as reader:
                result = await reader.execute(select(outbox.table))
                return len(result.all())
        finally:
            await emitter.aclose(timeout=10)
            await engine.dispose()

    assert asyncio.run(main()) == 1
    assert sink.names == ["1"]
    [logged] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "the relay will deliver them again" in logged.getMessage()
    assert logged.exc_info is not None
    assert "the delivery table is gone" in str(logged.exc_info[1])


def _recorder_deletes(engine: Engine, outbox: Outbox) -> list[float]:
    """A list that gets the time of each DELETE of outbox rows the recorder
    thread runs on *engine* (listening until the test ends)."""
    deletes: list[float] = []

    def before_execute(connection: object, clause: Any, *_: Any) -> None:
        if (
            threading.current_thread().name == "access_audit-outbox-recorder"
            and deletes_from(clause, outbox.table)
        ):
            deletes.append(time.monotonic())

    event.listen(engine, "before_execute", before_execute)
    return deletes


def test_records_of_commits_within_the_linger_are_written_together(
    engine: Engine, outbox: Outbox, Session: sessionmaker, sink: Sink
) -> None:
    """The recorder gathers what the commits of its linger period delivered
    and deletes their rows in one statement, not one per commit."""
    deletes = _recorder_deletes(engine, outbox)
    with Session() as session:
        for number in range(5):
            operation(session, f"n{number}")
            session.commit()
    assert outbox.flush(timeout=10)
    assert len(sink.events) == 5
    assert outbox_rows(engine, outbox) == []
    assert len(deletes) == 1


def test_a_full_batch_of_records_is_written_before_the_linger_ends(
    engine: Engine,
    outbox: Outbox,
    Session: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """:data:`MAX_BATCH` records wake the recorder at once: with a linger of
    a minute, the rows of that many commits leave within seconds, with no
    flush; a record after them waits for the linger (or a flush)."""
    from access_audit.outbox import _recorder

    monkeypatch.setattr(_recorder, "LINGER", 60.0)
    monkeypatch.setattr(_recorder, "MAX_BATCH", 3)
    deletes = _recorder_deletes(engine, outbox)
    with Session() as session:
        for number in range(3):
            operation(session, f"n{number}")
            session.commit()
        deadline = time.monotonic() + 10
        while not deletes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(deletes) == 1
        assert outbox_rows(engine, outbox) == []
        operation(session, "n3")
        session.commit()
    time.sleep(0.3)
    assert [row["aggregateid"] for row in outbox_rows(engine, outbox)] == ["n3"]
    assert outbox.flush(timeout=10)
    assert len(deletes) == 2
    assert outbox_rows(engine, outbox) == []


def test_commits_during_a_write_wait_for_the_next_linger_period(
    engine: Engine,
    outbox: Outbox,
    Session: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a steady stream of commits the recorder writes once per linger
    period: records that arrive while it writes (here each of its
    statements is slowed by 50 ms) wait for the next period, instead of
    being written a few at a time, one transaction each, as they come."""
    from access_audit.outbox import _recorder

    linger = 0.2
    monkeypatch.setattr(_recorder, "LINGER", linger)
    deletes = _recorder_deletes(engine, outbox)

    def slow_write(connection: object, clause: Any, *_: Any) -> None:
        if threading.current_thread().name == "access_audit-outbox-recorder":
            time.sleep(0.05)

    event.listen(engine, "before_execute", slow_write)
    commits = 0
    deadline = time.monotonic() + 20
    with Session() as session:
        # Until three periods' writes began (with a flush, a fourth comes).
        while len(deletes) < 3 and time.monotonic() < deadline:
            operation(session, f"n{commits}")
            session.commit()
            commits += 1
    periodic = deletes[:3]
    assert outbox.flush(timeout=10)
    assert outbox_rows(engine, outbox) == []
    assert len(periodic) == 3
    assert commits > 20
    # One write per period: each begins a linger or more after the last one
    # ended, whatever commits arrived while it wrote.
    gaps = [later - earlier for earlier, later in itertools.pairwise(periodic)]
    assert min(gaps) >= linger - 0.01, gaps


def test_a_shared_in_memory_connection_never_commits_the_applications_transaction(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In-memory SQLite on a ``StaticPool`` (one connection for every
    thread, the usual test set-up of a web app): the record of a commit is
    written by the committing thread, never by the recorder's, whose COMMIT
    on that shared connection would commit a transaction the application
    has open on it, and then rolls back."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    from access_audit.outbox import _recorder

    monkeypatch.setattr(_recorder, "LINGER", 0.01)
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    Base.metadata.create_all(engine)
    outbox = Outbox()
    outbox.create(engine)
    sink = Sink()
    emitter = outbox_emitter(outbox, sink=sink)
    with OrmSession(engine) as session:
        emitter.attach(session)
        operation(session, "kept")
        session.commit()
        operation(session, "undone")
        session.flush()
        time.sleep(0.3)  # a recorder thread would have written by now
        session.rollback()
    assert stored_names(engine) == ["kept"]
    assert emitter.flush(timeout=10)
    assert stored_names(engine) == ["kept"]
    assert sink.names == ["kept"]
    assert outbox_rows(engine, outbox) == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_in_memory_sqlite_records_deliveries_later_in_the_committing_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-memory SQLite gives each thread a database of its own: the record
    of what the plugins took is kept by the committing thread, not written
    by its commit, and written with later ones (here, at flush)."""
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    outbox = Outbox()
    outbox.create(engine)
    sink = Sink()
    emitter = outbox_emitter(outbox, sink=sink)
    deletes: list[str] = []

    def before_execute(connection: object, clause: Any, *_: Any) -> None:
        if getattr(clause, "is_delete", False):
            deletes.append(threading.current_thread().name)

    event.listen(engine, "before_execute", before_execute)
    with OrmSession(engine) as session:
        emitter.attach(session)
        operation(session, "one")
        session.commit()
    assert deletes == []
    assert [row["aggregateid"] for row in outbox_rows(engine, outbox)] == ["one"]
    assert emitter.flush(timeout=10)
    assert deletes and set(deletes) == {threading.current_thread().name}
    assert sink.names == ["one"]
    assert outbox_rows(engine, outbox) == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def _without_json(action: int, first: Any, second: Any, *_: Any) -> int:
    """An SQLite authorizer that refuses the JSON functions (``json_each``
    read as a table, the others called), as a build without JSON would not
    know them."""
    import sqlite3

    json = any(str(name).startswith("json") for name in (first, second))
    return sqlite3.SQLITE_DENY if json else sqlite3.SQLITE_OK


@pytest.mark.parametrize("has_json", [True, False], ids=["json", "no-json"])
def test_sqlite_binds_ids_as_one_json_parameter_whenever_it_has_json_each(
    tmp_path: Path, has_json: bool
) -> None:
    """Whether SQLite gets its ids as one JSON parameter is asked of the
    database, once per engine, not read from its version: an SQLite older
    than 3.38 usually has JSON, and one built without it has none."""
    import sqlite3

    from sqlalchemy import create_engine

    from access_audit.outbox._store import forget

    engine = create_engine(f"sqlite:///{tmp_path / 'ids.db'}")
    refused: list[str] = []

    def authorize(action: int, first: Any, second: Any, *rest: Any) -> int:
        allowed = _without_json(action, first, second, *rest)
        if allowed != sqlite3.SQLITE_OK:
            refused.append(second)
        return allowed

    if not has_json:
        event.listen(
            engine,
            "connect",
            lambda dbapi_connection, _record: dbapi_connection.set_authorizer(
                authorize
            ),
        )
    with engine.connect():
        pass
    engine.dialect.server_version_info = (3, 31, 1)  # JSON1 optional then
    outbox = Outbox()
    outbox.create(engine)
    bound: list[int] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(*args: Any) -> None:
        if args[2].startswith("DELETE"):
            bound.append(len(args[3]))

    try:
        unknown = [f"00000000-0000-7000-8000-{n:012d}" for n in range(1200)]
        for _ in range(2):
            with engine.begin() as connection:
                forget(connection, outbox, unknown)
        assert bound == ([1] * 4 if has_json else [900, 300] * 2) * 2, bound
        assert refused == ([] if has_json else ["json_valid"])  # asked once
    finally:
        outbox.drop(engine)
        engine.dispose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 setlimit is 3.11+")
def test_retry_dead_for_many_plugins_stays_under_an_old_sqlites_variable_limit(
    tmp_path: Path,
) -> None:
    """``retry_dead(plugins=...)`` with more plugin names than an old SQLite
    (999 variables, no JSON) takes beside a full list of ids: every dead
    delivery of the named plugins is made due, the others are left."""
    import sqlite3

    from sqlalchemy import create_engine, insert

    from access_audit.outbox import retry_dead

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")

    @event.listens_for(engine, "connect")
    def old_sqlite(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        dbapi_connection.set_authorizer(_without_json)

    outbox = Outbox()
    outbox.create(engine)
    state = outbox.delivery_table
    ids = [f"00000000-0000-7000-8000-{n:012d}" for n in range(950)]
    now = datetime.now()

    def row(event_id: str, plugin: str) -> dict[str, Any]:
        return {"event_id": event_id, "plugin": plugin, "state": DEAD,
                "attempts": 5, "updated_at": now}  # fmt: skip

    try:
        with engine.begin() as connection:
            connection.execute(
                insert(state),
                [row(i, "p000") for i in ids] + [row(i, "kept") for i in ids[:5]],
            )
        named = {f"p{n:03d}" for n in range(150)}
        assert retry_dead(engine, outbox, named) == len(ids)
        with engine.connect() as connection:
            states = dict(
                connection.execute(
                    select(state.c.plugin, func.count())
                    .where(state.c.state == DEAD)
                    .group_by(state.c.plugin)
                ).all()
            )
        assert states == {"kept": 5}
    finally:
        outbox.drop(engine)
        engine.dispose()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 setlimit is 3.11+")
def test_an_older_sqlite_with_its_999_variable_limit_records_and_relays_big_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite before 3.32 (RHEL 8, Ubuntu 20.04) takes at most 999 bound
    variables a statement, and a build without JSON has no ``json_each``
    (emulated here by refusing the JSON functions): ids then go in IN lists, and every list
    stays under that limit, both when the dispatch's record is written and
    when the relay delivers."""
    import sqlite3

    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")

    @event.listens_for(engine, "connect")
    def old_sqlite(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        dbapi_connection.set_authorizer(_without_json)

    Base.metadata.create_all(engine)
    outbox = Outbox(relay_after=timedelta(0))  # the relay's rows are due at once
    outbox.create(engine)
    inline, later = Sink(), Sink()
    try:
        for dispatch, sink in (("inline", inline), ("relay", later)):
            names = [f"{dispatch}-{number}" for number in range(1200)]
            emitter = AuditEmitter(
                load_entrypoints=False, outbox=outbox, dispatch=dispatch
            )
            emitter.register(sink, name="sink")
            with OrmSession(engine) as session:
                emitter.attach(session)
                for name in names:
                    operation(session, name)
                session.commit()
            assert emitter.flush(timeout=30)
        assert inline.names == [f"inline-{number}" for number in range(1200)]
        assert len(outbox_rows(engine, outbox)) == 1200  # the relay's to deliver
        relay_emitter = outbox_emitter(outbox, sink=later)
        stats = relay_emitter.relay(engine, once=True)
        assert later.names == names, stats
        assert outbox_rows(engine, outbox) == []
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        outbox.drop(engine)
        engine.dispose()
