"""Outbox mode: rows written inside the committing transaction, marked after dispatch.

Every database test runs on SQLite, PostgreSQL and MariaDB (the ``engine``
fixture). Each test creates the outbox table on the engine and drops it
afterwards; server engines already work in a namespace of this run.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import DatabaseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import (
    Item,
    aiosqlite_engine,
    make_commit_fail,
    operation,
    outbox_emitter,
    outbox_rows,
    stored_names,
)

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event
from access_audit.outbox import DELIVERED, PENDING, Outbox


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


def row_names(engine: Engine, outbox: Outbox) -> list[str]:
    """The target ids (``aggregateid``) of the outbox rows, in commit order."""
    return [row["aggregateid"] for row in outbox_rows(engine, outbox)]


def test_committed_events_get_one_row_each_that_parses_back_to_the_envelope(
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox
) -> None:
    """Each committed event has a row whose columns and payload match its envelope."""
    with Session() as session:
        operation(session, "first", payload={"n": 1, "tags": ["a", "b"]})
        operation(session, "second", reason="because")
        session.commit()
        operation(session, "third")
        session.commit()
    assert sink.names == ["first", "second", "third"]
    rows = outbox_rows(engine, outbox)
    assert len(rows) == len(sink.events)
    for row, envelope in zip(rows, sink.events, strict=True):
        assert row["id"] == str(envelope.id)
        assert row["aggregatetype"] == "item"
        assert row["aggregateid"] == envelope.target_id
        assert row["type"] == "item_created"
        assert AuditEventEnvelope.from_dict(json.loads(row["payload"])) == envelope
        assert row["created_at"] == envelope.timestamp
        assert row["transaction_id"] == str(envelope.transaction_id)
        assert row["sequence"] == envelope.sequence
    assert [row["sequence"] for row in rows] == [0, 1, 0]
    assert rows[0]["transaction_id"] == rows[1]["transaction_id"]
    assert rows[1]["transaction_id"] != rows[2]["transaction_id"]
    assert stored_names(engine) == ["first", "second", "third"]


def test_rolled_back_transaction_writes_no_rows(
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox
) -> None:
    """A transaction that rolls back leaves no outbox row and sends nothing."""
    with Session() as session:
        operation(session, "doomed")
        session.flush()
        session.rollback()
        operation(session, "kept")
        session.commit()
    assert sink.names == ["kept"]
    assert row_names(engine, outbox) == ["kept"]
    assert stored_names(engine) == ["kept"]


def test_closed_session_writes_no_rows(
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox
) -> None:
    """A session closed with its transaction open leaves no outbox row."""
    with Session() as session:
        operation(session, "abandoned")
        session.flush()
    assert sink.events == []
    assert outbox_rows(engine, outbox) == []
    assert stored_names(engine) == []


def test_rolled_back_savepoint_leaves_no_rows_for_its_events(
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox
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
    assert row_names(engine, outbox) == ["outer"]
    assert stored_names(engine) == ["outer"]


@pytest.mark.parametrize(
    "release", ["savepoint.commit", "session.commit"], ids=["released", "left-open"]
)
def test_savepoint_events_get_rows_once_the_outer_transaction_commits(
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox, release: str
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
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == expected
    assert [row["id"] for row in rows] == [str(e.id) for e in sink.events]
    assert {row["status"] for row in rows} == {DELIVERED}


def outbox_rows_in(session: OrmSession, outbox: Outbox) -> int:
    """How many outbox rows the session's own transaction sees."""
    count = session.execute(select(outbox.table.c.id)).all()
    return len(count)


def test_released_savepoint_alone_writes_no_rows(
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox
) -> None:
    """RELEASE SAVEPOINT writes nothing when the outer transaction then rolls back."""
    with Session() as session:
        savepoint = session.begin_nested()
        operation(session, "released")
        savepoint.commit()
        assert outbox_rows_in(session, outbox) == 0
        session.rollback()
    assert sink.events == []
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
    rows = outbox_rows(engine, outbox)
    assert [(row["type"], row["aggregateid"]) for row in rows] == expected
    assert {row["status"] for row in rows} == {DELIVERED}


def test_inline_dispatch_marks_rows_delivered_to_every_plugin(
    engine: Engine, outbox: Outbox
) -> None:
    """After inline dispatch each row is delivered, to the names of all plugins."""
    first, second = Sink(), Sink()
    emitter = outbox_emitter(outbox, alpha=first, beta=second)
    with OrmSession(engine) as session:
        emitter.attach(session)
        operation(session, "one")
        operation(session, "two")
        session.commit()
    assert first.names == second.names == ["one", "two"]
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["one", "two"]
    for row in rows:
        assert row["status"] == DELIVERED
        assert json.loads(row["delivered_to"]) == ["alpha", "beta"]
        assert json.loads(row["failures"]) == {}
        assert row["delivered_at"] is not None
        assert row["delivered_at"] >= row["created_at"]


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
    assert good.names == ["one", "two"]
    assert bad.events == []
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["one", "two"]
    for row in rows:
        assert row["status"] == PENDING
        assert json.loads(row["delivered_to"]) == ["good"]
        failures = json.loads(row["failures"])
        assert list(failures) == ["bad"]
        assert failures["bad"]["attempts"] == 1
        assert failures["bad"]["dead"] is False
        assert "sink down for " + row["aggregateid"] in failures["bad"]["error"]
        assert row["delivered_at"] is None
    assert stored_names(engine) == ["one", "two"]


def test_redaction_applies_to_the_outbox_payload(
    engine: Engine, outbox: Outbox, sink: Sink
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
    [row] = outbox_rows(engine, outbox)
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
    Session: sessionmaker, sink: Sink, engine: Engine, outbox: Outbox
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
    assert row_names(engine, outbox) == ["next"]
    assert stored_names(engine) == ["next"]


def test_async_session_commit_writes_and_marks_rows(tmp_path: Path) -> None:
    """With AsyncSession (aiosqlite), committed events get rows marked delivered."""
    outbox = Outbox()
    sink = Sink()
    emitter = outbox_emitter(outbox, sink=sink)

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
            async with AsyncSession(engine) as reader:
                result = await reader.execute(select(outbox.table))
                return [dict(row) for row in result.mappings()]
        finally:
            await engine.dispose()

    rows = asyncio.run(main())
    assert sink.names == ["2"]
    assert [row["id"] for row in rows] == [str(sink.events[0].id)]
    assert rows[0]["status"] == DELIVERED
    assert json.loads(rows[0]["delivered_to"]) == ["sink"]
