"""docs/semantics.md: every row of the "What gets emitted when" table, on every database.

Each test asserts what the plugin received *and* what the database holds, so
an event can never disagree with the data it describes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, event, insert
from sqlalchemy.exc import DatabaseError, IntegrityError, InvalidRequestError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session, sessionmaker
from support import Item, Recorder, make_commit_fail, operation, stored_names

from access_audit import AuditConfigurationError, AuditEmitter, signals, stage_event
from access_audit.testing import capture_audit_events


def test_outermost_commit_emits_its_events_once_in_order(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """An outermost commit sends its events once, in staging order, as one batch."""
    with Session() as session:
        for name in ("a", "b", "c"):
            operation(session, name)
        session.commit()
        assert recorder.names == ["a", "b", "c"]
        assert [len(batch) for batch in recorder.batches] == [3]
        session.commit()  # nothing new staged: nothing sent again
    assert recorder.names == ["a", "b", "c"]
    assert [envelope.sequence for envelope in recorder.events] == [0, 1, 2]
    assert stored_names(engine) == ["a", "b", "c"]


def test_begin_block_that_raises_emits_nothing(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """``with session.begin():`` that raises rolls back and sends nothing."""
    with Session() as session, pytest.raises(LookupError), session.begin():
        operation(session, "a")
        session.flush()
        raise LookupError("the operation failed after its event was staged")
    assert recorder.events == []
    assert stored_names(engine) == []


def test_released_savepoint_waits_for_the_outer_commit(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A released SAVEPOINT sends nothing yet; its events join the enclosing level."""
    with Session() as session:
        operation(session, "outer-1")
        with session.begin_nested():
            operation(session, "inner")
        assert recorder.events == []
        operation(session, "outer-2")
        session.commit()
    assert recorder.names == ["outer-1", "inner", "outer-2"]
    assert len({envelope.transaction_id for envelope in recorder.events}) == 1
    assert stored_names(engine) == ["inner", "outer-1", "outer-2"]


def test_rolled_back_savepoint_drops_only_its_events(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A rolled-back SAVEPOINT drops its events, and those released into it."""
    with Session() as session:
        operation(session, "outer")
        middle = session.begin_nested()
        operation(session, "middle")
        with session.begin_nested():
            operation(session, "released-into-middle")
        middle.rollback()
        with session.begin_nested():
            operation(session, "kept")
        session.commit()
    assert recorder.names == ["outer", "kept"]
    assert stored_names(engine) == ["kept", "outer"]


def test_savepoint_closed_by_a_flush_error_drops_its_events(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A SAVEPOINT that ends unreleased because its flush failed drops its events."""
    discarded: list[tuple[str, str]] = []

    def on_discard(sender: object, event: object, reason: str) -> None:
        discarded.append((event.target_id, reason))  # type: ignore[attr-defined]

    with signals.audit_event_discarded.connected_to(on_discard), Session() as session:
        operation(session, "taken")
        session.flush()
        with pytest.raises(IntegrityError), session.begin_nested():
            operation(session, "doomed")
            operation(session, "taken")  # duplicate name: the flush fails
            session.flush()
        operation(session, "after")
        session.commit()
    assert recorder.names == ["taken", "after"]
    assert stored_names(engine) == ["after", "taken"]
    assert sorted(name for name, _ in discarded) == ["doomed", "taken"]


def test_savepoint_open_at_close_drops_everything(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """``close()`` with a SAVEPOINT open drops the events of every level."""
    session = Session()
    operation(session, "outer")
    session.begin_nested()
    operation(session, "inner")
    session.close()
    assert recorder.events == []
    assert stored_names(engine) == []


def test_released_savepoint_then_outer_rollback_emits_nothing(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """Events released from a SAVEPOINT die with the outer rollback."""
    with Session() as session:
        with session.begin_nested():
            operation(session, "inner")
        operation(session, "outer")
        session.rollback()
        assert recorder.events == []
    assert stored_names(engine) == []


def test_commit_with_savepoints_still_open_emits_all_once(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """``session.commit()`` with SAVEPOINTs open releases them and emits all once."""
    with Session() as session:
        operation(session, "outer")
        session.begin_nested()
        operation(session, "level-1")
        session.begin_nested()
        operation(session, "level-2")
        session.commit()
        assert not session.in_transaction()
    assert recorder.names == ["outer", "level-1", "level-2"]
    assert len(recorder.batches) == 1
    assert stored_names(engine) == ["level-1", "level-2", "outer"]


def _end_by_rollback(session: OrmSession) -> None:
    session.rollback()


def _end_by_close(session: OrmSession) -> None:
    session.close()


def _end_by_reset(session: OrmSession) -> None:
    session.reset()


def _end_by_invalidate(session: OrmSession) -> None:
    session.invalidate()


@pytest.mark.parametrize(
    "end",
    [_end_by_rollback, _end_by_close, _end_by_reset, _end_by_invalidate],
    ids=["rollback", "close", "reset", "invalidate"],
)
@pytest.mark.parametrize("with_savepoint", [False, True], ids=["flat", "savepoint"])
def test_ending_without_commit_emits_nothing_and_leaks_nothing(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    end: object,
    with_savepoint: bool,
) -> None:
    """rollback/close/reset/invalidate send nothing; the next transaction is clean."""
    session = Session()
    operation(session, "lost")
    if with_savepoint:
        session.begin_nested()
        operation(session, "lost-inner")
    session.flush()
    end(session)  # type: ignore[operator]
    assert recorder.events == []
    assert dict(session.info) == {}
    operation(session, "next")
    session.commit()
    session.close()
    assert recorder.names == ["next"]
    assert stored_names(engine) == ["next"]


def test_scoped_session_remove_emits_nothing_and_leaks_nothing(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """``scoped_session.remove()`` drops staged events; the next session is clean."""
    registry = scoped_session(sessionmaker(engine))
    emitter.attach(registry)
    try:
        operation(registry(), "lost")
        stage_event(
            registry, "item_touched", target_type="item", target_id=1, action="x"
        )
        registry.remove()
        operation(registry(), "next")
        registry.commit()
        registry.remove()
    finally:
        emitter.detach(registry)
    assert recorder.names == ["next"]
    assert stored_names(engine) == ["next"]


def test_flask_sqlalchemy_teardown_emits_nothing(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A Flask request that ends without commit drops its events at teardown."""
    flask = pytest.importorskip("flask")
    flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = engine.url.render_as_string(
        hide_password=False
    )
    db = flask_sqlalchemy.SQLAlchemy(app)
    with app.app_context():
        emitter.attach(db.session)

    @app.post("/lost")
    def lost() -> str:
        operation(db.session, "lost")
        db.session.flush()
        return "not committed"

    @app.post("/kept")
    def kept() -> str:
        operation(db.session, "kept")
        db.session.commit()
        return "committed"

    client = app.test_client()
    assert client.post("/lost").status_code == 200
    assert recorder.events == []
    assert client.post("/kept").status_code == 200
    with app.app_context():
        emitter.detach(db.session)
        db.engine.dispose()
    assert recorder.names == ["kept"]
    assert stored_names(engine) == ["kept"]


def test_failed_commit_emits_nothing_and_leaves_the_session_clean(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """When COMMIT itself fails nothing is sent; after rollback() the session is clean."""
    session = Session()
    operation(session, "doomed")
    session.flush()
    make_commit_fail(session, engine)
    with pytest.raises(DatabaseError):
        session.commit()
    assert recorder.events == []
    session.rollback()
    assert dict(session.info) == {}
    operation(session, "next")
    session.commit()
    session.close()
    assert recorder.names == ["next"]
    assert stored_names(engine) == ["next"]


def test_commit_without_any_sql_emits_the_staged_events(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A transaction that never touched the database still emits on commit."""
    statements: list[str] = []

    here = threading.get_ident()

    def record(
        connection: object, cursor: object, statement: str, *args: object
    ) -> None:
        if threading.get_ident() == here:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with Session() as session:
            stage_event(
                session,
                "report_viewed",
                target_type="report",
                target_id=7,
                action="view",
            )
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [envelope.event_type for envelope in recorder.events] == ["report_viewed"]
    assert recorder.events[0].target_id == "7"
    assert statements == []


@pytest.fixture
def stage_on_insert() -> Iterator[None]:
    """Stage an event from an ORM ``after_insert`` hook, as applications do."""

    def after_insert(mapper: object, connection: object, item: Item) -> None:
        session = OrmSession.object_session(item)
        assert session is not None
        stage_event(
            session,
            "item_inserted",
            target_type="item",
            target_id=item.name,
            action="insert",
        )

    event.listen(Item, "after_insert", after_insert)
    yield
    event.remove(Item, "after_insert", after_insert)


@pytest.mark.usefixtures("stage_on_insert")
def test_events_staged_by_orm_hooks_in_the_final_flush_are_included(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """ORM hooks of the commit's own flush stage in order; a rolled-back flush's do not."""
    with Session() as session:
        savepoint = session.begin_nested()
        session.add(Item(name="rolled-back"))
        session.flush()
        savepoint.rollback()
        stage_event(
            session, "batch_started", target_type="batch", target_id="b", action="start"
        )
        session.add(Item(name="first"))
        session.add(Item(name="second"))
        session.commit()  # the final flush runs the after_insert hooks
    assert [(e.event_type, e.target_id) for e in recorder.events] == [
        ("batch_started", "b"),
        ("item_inserted", "first"),
        ("item_inserted", "second"),
    ]
    assert stored_names(engine) == ["first", "second"]


def test_staging_without_a_transaction_autobegins(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Staging begins a transaction as ``Session.add`` does, without connecting."""
    with Session() as session:
        assert not session.in_transaction()
        stage_event(
            session, "thing_done", target_type="thing", target_id=1, action="do"
        )
        assert session.in_transaction()
        assert session.get_transaction() is not None
        session.commit()
    assert [envelope.target_id for envelope in recorder.events] == ["1"]


def test_staging_with_autobegin_off_raises_like_session_add(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """With ``autobegin=False`` staging raises SQLAlchemy's InvalidRequestError."""
    maker = sessionmaker(engine, autobegin=False)
    emitter.attach(maker)
    with maker() as session:
        with pytest.raises(InvalidRequestError, match="Autobegin is disabled"):
            session.add(Item(name="x"))
        with pytest.raises(InvalidRequestError, match="Autobegin is disabled"):
            stage_event(
                session, "thing_done", target_type="thing", target_id=1, action="do"
            )
        with session.begin():
            operation(session, "explicit")
    emitter.detach(maker)
    assert recorder.names == ["explicit"]


def test_session_joined_to_an_outer_transaction_emits_on_its_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """With joined_transactions="session", a joined session's commit emits."""
    emitter.joined_transactions = "session"
    with engine.connect() as connection:
        outer = connection.begin()
        maker = sessionmaker(bind=connection, join_transaction_mode="create_savepoint")
        emitter.attach(maker)
        session = maker()
        operation(session, "first")
        session.commit()
        assert recorder.names == ["first"]
        operation(session, "second")
        session.rollback()
        with session.begin_nested():
            operation(session, "third")
        session.commit()
        session.close()
        emitter.detach(maker)
        assert recorder.names == ["first", "third"]
        outer.rollback()  # the usual test recipe: the outer transaction is undone
    assert stored_names(engine) == []


def test_staging_inside_a_savepoint_begun_on_the_connection_is_refused(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A SAVEPOINT begun on the session's connection (not ``session.begin_nested()``)
    is one the session cannot see roll back: a later event staged in it is
    refused, and the earlier one is still sent."""
    with Session() as session:
        operation(session, "kept")
        session.flush()
        savepoint = session.connection().begin_nested()
        session.execute(insert(Item).values(name="undone"))
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            stage_event(
                session,
                "item_created",
                target_type="item",
                target_id="undone",
                action="create",
            )
        savepoint.rollback()
        session.commit()
    assert recorder.names == ["kept"]
    assert stored_names(engine) == ["kept"]


def test_flushing_staged_work_inside_a_savepoint_begun_on_the_connection_is_refused(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """An object whose event is staged, flushed inside a SAVEPOINT begun on
    the connection: the flush raises, and nothing is sent for the row that
    the SAVEPOINT's rollback would undo unseen."""
    with capture_audit_events() as audit_events, Session() as session:
        item = Item(name="ghost")
        session.add(item)
        stage_event(
            session,
            "item_created",
            target_type="item",
            target_id=lambda: str(item.id),
            action="create",
        )
        session.connection().begin_nested()
        with pytest.raises(AuditConfigurationError, match="SAVEPOINT"):
            session.flush()
        session.rollback()
    assert recorder.names == []
    assert [d.reason for d in audit_events.discarded] == ["rollback"]
    assert stored_names(engine) == []
