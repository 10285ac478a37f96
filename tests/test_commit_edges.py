"""Events staged around the edges of commit(): SAVEPOINTs still open, ORM hooks,
other before_commit/after_commit listeners. Lazy values must be resolved and
outbox rows written before COMMIT in every one of these, on every database."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import Item, Recorder, outbox_rows, stored_names

from access_audit import AuditEmitter, signals, stage_event, staged_events
from access_audit.outbox import Outbox


def stage(session: OrmSession, name: str, **fields: Any) -> None:
    fields.setdefault("target_id", name)
    stage_event(session, "item_touched", target_type="item", action="touch", **fields)


@pytest.fixture
def OutboxSession(
    engine: Engine, recorder: Recorder, outbox: Outbox
) -> Iterator[sessionmaker]:
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    emitter.register(recorder, name="recorder")
    maker = sessionmaker(engine)
    emitter.attach(maker)
    yield maker
    emitter.detach(maker)


def outbox_ids(engine: Engine, outbox: Outbox) -> list[str]:
    return [row["id"] for row in outbox_rows(engine, outbox)]


def test_begin_block_with_a_savepoint_left_open_resolves_before_commit(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """``with session.begin():`` ending with a SAVEPOINT open fails before COMMIT."""

    def broken() -> str:
        raise KeyError("no id")

    with pytest.raises(ValueError, match="target_id"), Session.begin() as session:
        session.add(Item(name="never"))
        stage(session, "broken", target_id=broken)
        session.begin_nested()
        stage(session, "inner")
    assert recorder.events == []
    assert stored_names(engine) == []


def test_begin_block_with_a_savepoint_left_open_reads_expired_attributes(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A lazy value may load an expired attribute: it runs before COMMIT."""
    session = Session()
    item = Item(name="admins")
    session.add(item)
    session.commit()  # item is expired now
    with session.begin():
        stage(session, "renamed", target_name=lambda: item.name)
        session.begin_nested()
        stage(session, "inner")
    session.close()
    assert [(e.target_id, e.target_name) for e in recorder.events] == [
        ("renamed", "admins"),
        ("inner", None),
    ]


def test_outbox_rows_are_written_when_the_commit_releases_open_savepoints(
    OutboxSession: sessionmaker, recorder: Recorder, engine: Engine, outbox: Outbox
) -> None:
    """Root commit with SAVEPOINTs open: every level's events get outbox rows."""
    with OutboxSession.begin() as session:
        stage(session, "outer")
        session.begin_nested()
        stage(session, "middle")
        session.begin_nested()
        stage(session, "inner")
    assert recorder.names == ["outer", "middle", "inner"]
    assert outbox_ids(engine, outbox) == [str(e.id) for e in recorder.events]


@pytest.fixture
def stage_on_insert() -> Iterator[None]:
    """An after_insert hook stages an event whose lazy value fails for "bad"."""

    def after_insert(mapper: object, connection: object, item: Item) -> None:
        session = OrmSession.object_session(item)
        assert session is not None
        stage(
            session,
            f"inserted-{item.name}",
            target_name=lambda: None if item.name == "bad" else item.name.upper(),
            payload={"id": lambda: item.id if item.name != "bad" else object()},
        )

    event.listen(Item, "after_insert", after_insert)
    yield
    event.remove(Item, "after_insert", after_insert)


@pytest.mark.usefixtures("stage_on_insert")
def test_first_event_staged_by_an_orm_hook_in_the_final_flush_fails_before_commit(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """With nothing staged before commit(), a hook's bad lazy value fails it."""
    session = Session()
    session.add(Item(name="bad"))
    with pytest.raises(TypeError, match="payload"):
        session.commit()
    session.rollback()
    session.add(Item(name="good"))
    session.commit()
    session.close()
    assert [(e.target_id, e.target_name) for e in recorder.events] == [
        ("inserted-good", "GOOD")
    ]
    assert stored_names(engine) == ["good"]


@pytest.mark.usefixtures("stage_on_insert")
def test_first_events_staged_by_an_orm_hook_get_outbox_rows(
    OutboxSession: sessionmaker, recorder: Recorder, engine: Engine, outbox: Outbox
) -> None:
    """Events that the commit's own flush stages are written to the outbox."""
    with OutboxSession.begin() as session:
        session.add_all([Item(name="a"), Item(name="b")])
    assert recorder.names == ["inserted-a", "inserted-b"]
    assert outbox_ids(engine, outbox) == [str(e.id) for e in recorder.events]


def test_event_staged_by_a_later_before_commit_listener_gets_keys_and_rows(
    OutboxSession: sessionmaker, recorder: Recorder, engine: Engine, outbox: Outbox
) -> None:
    """An app before_commit listener may add rows and stage lazy events."""

    def before_commit(session: OrmSession) -> None:
        if session.info.pop("add_late", False):
            late = Item(name="late")
            session.add(late)
            stage(session, "late", payload={"id": lambda: late.id})

    event.listen(OutboxSession, "before_commit", before_commit)
    try:
        session = OutboxSession()
        session.info["add_late"] = True
        session.add(Item(name="first"))
        stage(session, "first")
        session.commit()
        session.close()
    finally:
        event.remove(OutboxSession, "before_commit", before_commit)
    assert recorder.names == ["first", "late"]
    assert isinstance(recorder.events[1].payload["id"], int)
    assert outbox_ids(engine, outbox) == [str(e.id) for e in recorder.events]
    assert stored_names(engine) == ["first", "late"]


@pytest.mark.parametrize("prior", [False, True], ids=["nothing-staged", "staged"])
def test_staging_from_an_after_commit_listener_raises(
    Session: sessionmaker, recorder: Recorder, prior: bool
) -> None:
    """After COMMIT the transaction takes no more events, staged before or not."""
    errors: list[BaseException] = []

    def after_commit(session: OrmSession) -> None:
        try:
            stage(session, "too-late")
        except RuntimeError as error:
            errors.append(error)

    event.listen(Session, "after_commit", after_commit)
    try:
        with Session() as session:
            if prior:
                stage(session, "in-time")
            session.add(Item(name="x"))
            session.commit()
    finally:
        event.remove(Session, "after_commit", after_commit)
    assert len(errors) == 1
    assert "after this transaction was committed" in str(errors[0])
    assert recorder.names == (["in-time"] if prior else [])


def test_a_commit_refused_by_an_app_listener_leaves_staging_as_before(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A before_commit listener that raises: later lazies still wait for COMMIT."""

    def refuse(session: OrmSession) -> None:
        if session.info.pop("refuse", False):
            raise PermissionError("not now")

    event.listen(Session, "before_commit", refuse)
    try:
        session = Session()
        stage(session, "first")
        session.info["refuse"] = True
        with pytest.raises(PermissionError):
            session.commit()
        item = Item(name="pending")
        session.add(item)
        stage(session, "second", payload={"id": lambda: item.id})
        session.commit()
        session.close()
    finally:
        event.remove(Session, "before_commit", refuse)
    assert recorder.names == ["first", "second"]
    assert isinstance(recorder.events[1].payload["id"], int)
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Item)) == 1


def _commit_after_a_caught_failure(maker: sessionmaker[Any], name: str) -> None:
    """Insert and stage *name*, then run a statement that fails (a duplicate
    name), catch its error as an application expecting it would, and commit
    without rolling back. SQLAlchemy asks for a rollback only after a failed
    flush; PostgreSQL has aborted the transaction, and its COMMIT rolls back,
    reported as success."""
    with maker() as session:
        session.add(Item(name=name))
        session.flush()
        stage(session, name)
        with pytest.raises(IntegrityError):
            session.execute(insert(Item).values(name=name))
        session.commit()


def test_a_transaction_the_database_rolls_back_at_commit_sends_nothing(
    engine: Engine, Session: sessionmaker[Any], recorder: Recorder
) -> None:
    """The event is sent exactly when its row committed: on PostgreSQL the
    failed statement doomed the transaction (nothing is stored, the event is
    discarded as a rollback); SQLite and MariaDB undo only the statement."""
    discarded: list[str] = []

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    with signals.audit_event_discarded.connected_to(note):
        _commit_after_a_caught_failure(Session, "doomed")
    stored = stored_names(engine)
    assert stored == ([] if engine.dialect.name == "postgresql" else ["doomed"])
    assert recorder.names == stored
    assert discarded == ([] if stored else ["rollback"])


@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "lazy"])
def test_a_failure_caught_inside_the_commits_own_flush_sends_nothing_either(
    engine: Engine, Session: sessionmaker[Any], recorder: Recorder, lazy: bool
) -> None:
    """A mapper hook's "best effort" statement fails during the flush that
    commit() runs, and the hook catches it: on PostgreSQL the transaction
    is doomed all the same, and its events are discarded as a rollback
    (they were asked about before that flush only, and sent)."""
    discarded: list[str] = []

    def best_effort(mapper: object, connection: Any, item: Item) -> None:
        with contextlib.suppress(IntegrityError):
            connection.execute(insert(Item).values(name=item.name))  # a duplicate

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    event.listen(Item, "after_insert", best_effort)
    try:
        with signals.audit_event_discarded.connected_to(note), Session() as session:
            item = Item(name="doomed")
            session.add(item)
            stage(session, "doomed", payload={"id": lambda: item.id} if lazy else None)
            session.commit()
    finally:
        event.remove(Item, "after_insert", best_effort)
    stored = stored_names(engine)
    assert stored == ([] if engine.dialect.name == "postgresql" else ["doomed"])
    assert recorder.names == stored
    assert discarded == ([] if stored else ["rollback"])


def test_a_failure_caught_in_a_later_flush_of_an_outbox_commit_sends_nothing(
    engine: Engine, OutboxSession: sessionmaker[Any], recorder: Recorder
) -> None:
    """The outbox rows are written before the commit's final flush (the
    envelopes built); an application's before_commit listener then adds a
    row, and a hook's caught failure in that flush dooms the transaction on
    PostgreSQL. The events are discarded, and only that: the envelopes
    built for them were delivered besides."""
    discarded: list[str] = []

    def add_late(session: OrmSession) -> None:
        if not session.info.pop("late", False):
            return
        session.add(Item(name="late"))

    def best_effort(mapper: object, connection: Any, item: Item) -> None:
        if item.name == "late":
            with contextlib.suppress(IntegrityError):
                connection.execute(insert(Item).values(name="first"))  # a duplicate

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    event.listen(OutboxSession, "before_commit", add_late)
    event.listen(Item, "after_insert", best_effort)
    try:
        with (
            signals.audit_event_discarded.connected_to(note),
            OutboxSession() as session,
        ):
            session.add(Item(name="first"))
            stage(session, "first")
            session.info["late"] = True
            session.commit()
    finally:
        event.remove(Item, "after_insert", best_effort)
        event.remove(OutboxSession, "before_commit", add_late)
    stored = stored_names(engine)
    doomed = engine.dialect.name == "postgresql"
    assert stored == ([] if doomed else ["first", "late"])
    assert recorder.names == ([] if doomed else ["first"])
    assert discarded == (["rollback"] if doomed else [])


@pytest.mark.parametrize("mode", ["plain", "outbox"])
def test_a_failure_caught_in_a_later_before_commit_listener_sends_nothing(
    engine: Engine,
    Session: sessionmaker[Any],
    OutboxSession: sessionmaker[Any],
    recorder: Recorder,
    mode: str,
) -> None:
    """An application's ``before_commit`` listener, registered after
    ``attach()`` so it runs after access_audit's, runs a statement that
    fails and catches it, with nothing left to flush: PostgreSQL's COMMIT
    rolls the transaction back all the same, and the events are discarded,
    not sent (asked at the connection's COMMIT, the last moment)."""
    maker = OutboxSession if mode == "outbox" else Session
    discarded: list[str] = []

    def best_effort(session: OrmSession) -> None:
        with contextlib.suppress(IntegrityError):
            session.execute(insert(Item).values(name="first"))  # a duplicate

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    event.listen(maker, "before_commit", best_effort)
    try:
        with signals.audit_event_discarded.connected_to(note), maker() as session:
            session.add(Item(name="first"))
            session.flush()
            stage(session, "first")
            session.commit()
    finally:
        event.remove(maker, "before_commit", best_effort)
    stored = stored_names(engine)
    doomed = engine.dialect.name == "postgresql"
    assert stored == ([] if doomed else ["first"])
    assert recorder.names == stored
    assert discarded == (["rollback"] if doomed else [])


def test_psycopg2_tells_the_aborted_transaction_too(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """The same on PostgreSQL through psycopg2 (SQLAlchemy's default driver)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    pytest.importorskip("psycopg2")
    other = create_engine(
        engine.url.set(drivername="postgresql+psycopg2"),
        execution_options=engine.get_execution_options(),
    )
    maker = sessionmaker(other)
    emitter.attach(maker)
    try:
        _commit_after_a_caught_failure(maker, "doomed")
    finally:
        emitter.detach(maker)
        other.dispose()
    assert stored_names(engine) == []
    assert recorder.names == []


def test_a_joined_session_whose_outer_transaction_rolls_back_at_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A session joined to the caller's transaction: the caller's COMMIT of
    a transaction PostgreSQL aborted sends nothing either."""
    with engine.connect() as connection:
        outer = connection.begin()
        maker = sessionmaker(bind=connection, join_transaction_mode="rollback_only")
        emitter.attach(maker)
        _commit_after_a_caught_failure(maker, "joined")
        outer.commit()
        emitter.detach(maker)
    stored = stored_names(engine)
    assert stored == ([] if engine.dialect.name == "postgresql" else ["joined"])
    assert recorder.names == stored


def test_an_app_after_commit_listener_that_raises_first_loses_no_event(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An application's after_commit listener registered before attach()
    raises: SQLAlchemy stops the listeners after it, and commit() raises
    although the COMMIT went through. The event is still sent (when the
    session closes), never discarded as if nothing had committed."""
    maker = sessionmaker(engine)

    def invalidate_cache(session: OrmSession) -> None:
        raise ConnectionError("cache down")

    event.listen(maker, "after_commit", invalidate_cache)
    emitter.attach(maker)
    try:
        with maker() as session:
            session.add(Item(name="kept"))
            stage(session, "kept")
            with pytest.raises(ConnectionError):
                session.commit()
    finally:
        emitter.detach(maker)
    assert stored_names(engine) == ["kept"]
    assert recorder.names == ["kept"]


@contextlib.contextmanager
def raising_first(
    maker: sessionmaker, emitter: AuditEmitter, name: str
) -> Iterator[dict[str, Any]]:
    """An application's *name* listener, registered before ``attach()``,
    that raises once when ``armed["on"]`` is a predicate its transaction
    satisfies; yields *armed*, and the discards seen (``armed["discarded"]``)."""
    armed: dict[str, Any] = {"on": None, "discarded": []}

    def listener(session: OrmSession, *args: Any) -> None:
        test = armed["on"]
        if test is not None and test(session, *args):
            armed["on"] = None
            raise ConnectionError("cache down")

    def note(sender: object, event: Any, reason: str) -> None:
        armed["discarded"].append((event.target_id, reason))

    event.listen(maker, name, listener)
    emitter.attach(maker)
    try:
        with signals.audit_event_discarded.connected_to(note):
            yield armed
    finally:
        emitter.detach(maker)


def test_an_app_end_listener_that_raises_first_after_commit_loses_no_event(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An application's after_transaction_end listener registered before
    attach() raises as the committed transaction ends: commit() raises,
    the session is closed as usual, and the event is sent (not discarded
    as if nothing had committed)."""
    maker = sessionmaker(engine)
    with raising_first(maker, emitter, "after_transaction_end") as armed:
        with maker() as session:
            session.add(Item(name="kept"))
            stage(session, "kept")
            armed["on"] = lambda session, transaction: transaction.parent is None
            with pytest.raises(ConnectionError):
                session.commit()
        gc.collect()
    assert stored_names(engine) == ["kept"]
    assert (recorder.names, armed["discarded"]) == (["kept"], [])


@pytest.mark.parametrize("ending", ["release", "rollback"])
def test_an_app_end_listener_that_raises_first_at_a_savepoint_loses_no_event(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, ending: str
) -> None:
    """The same listener raising as a SAVEPOINT ends: its events follow
    the SAVEPOINT's fate (sent with the commit after a release, discarded
    with reason ``"savepoint_rollback"`` after a rollback), never dropped
    without a word."""
    maker = sessionmaker(engine)
    with raising_first(maker, emitter, "after_transaction_end") as armed:
        with maker() as session:
            stage(session, "outer")
            savepoint = session.begin_nested()
            session.add(Item(name="inner"))
            stage(session, "inner")
            armed["on"] = lambda session, transaction: transaction.nested
            with pytest.raises(ConnectionError):
                savepoint.commit() if ending == "release" else savepoint.rollback()
            session.commit()
        gc.collect()
    if ending == "release":
        assert (stored_names(engine), recorder.names) == (["inner"], ["outer", "inner"])
        assert armed["discarded"] == []
    else:
        assert (stored_names(engine), recorder.names) == ([], ["outer"])
        assert armed["discarded"] == [("inner", "savepoint_rollback")]


def test_an_app_rollback_listener_that_raises_first_reports_the_rollback(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An application's after_rollback listener registered before attach()
    raises: the events are discarded with reason ``"rollback"``, which is
    what happened, and the next transaction's are sent."""
    maker = sessionmaker(engine)
    with raising_first(maker, emitter, "after_rollback") as armed:
        with maker() as session:
            session.add(Item(name="undone"))
            stage(session, "undone")
            armed["on"] = lambda session: True
            with pytest.raises(ConnectionError):
                session.rollback()
            stage(session, "next")
            session.commit()
        gc.collect()
    assert (recorder.names, armed["discarded"]) == (["next"], [("undone", "rollback")])


@pytest.mark.parametrize("flush", [False, True], ids=["no-sql", "flushed"])
@pytest.mark.parametrize("first", ["access_audit", "application"])
@pytest.mark.parametrize("dispatch", ["inline", "relay"])
@pytest.mark.parametrize("ending", ["release", "rollback"])
def test_a_savepoint_a_before_commit_listener_opens_holds_its_outbox_rows(
    engine: Engine,
    outbox: Outbox,
    recorder: Recorder,
    ending: str,
    dispatch: str,
    first: str,
    flush: bool,
) -> None:
    """An application's before_commit listener opens a SAVEPOINT, stages in
    it and ends it, having run no SQL there (or flushed a change). The event's outbox row is
    written in the SAVEPOINT: rolled back, neither the row nor a delivery
    stays (the event is discarded); released, both do. Registered before
    attach(), the listener runs first, and the rows of the transaction's
    own events are written in the SAVEPOINT too: written again after its
    rollback."""
    outbox.relay_after = timedelta(0)
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch=dispatch)
    emitter.register(recorder, name="recorder")
    maker = sessionmaker(engine)

    def optional_step(session: OrmSession) -> None:
        if session.info.pop("optional", False):
            savepoint = session.begin_nested()
            if flush:
                session.add(Item(name="optional"))
                session.flush()
            stage(session, "optional")
            savepoint.commit() if ending == "release" else savepoint.rollback()

    if first == "application":
        event.listen(maker, "before_commit", optional_step)
    emitter.attach(maker)
    if first == "access_audit":
        event.listen(maker, "before_commit", optional_step)
    try:
        with maker() as session:
            stage(session, "main")
            session.info["optional"] = True
            session.commit()
    finally:
        emitter.detach(maker)
    kept = ["main", "optional"] if ending == "release" else ["main"]
    assert stored_names(engine) == (
        ["optional"] if flush and ending == "release" else []
    )
    if dispatch == "relay":
        assert [row["aggregateid"] for row in outbox_rows(engine, outbox)] == kept
        assert recorder.names == []
        emitter.relay(engine, once=True)
    assert recorder.names == kept


def test_staging_after_a_failed_commit_says_to_roll_back(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """The COMMIT failed (here refused by a listener that runs as SQLAlchemy
    prepares it): staging before rollback() is refused, saying to roll back
    first, not that the events are being sent; then they are discarded."""
    discarded: list[str] = []

    def refuse(connection: Any) -> None:
        raise ConnectionError("lost the server at COMMIT")

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    with Session() as session:
        session.add(Item(name="x"))
        stage(session, "first")
        session.flush()
        connection = session.connection()
        event.listen(connection, "commit", refuse)
        with pytest.raises(ConnectionError):
            session.commit()
        with pytest.raises(
            RuntimeError, match=r"its COMMIT, or a SAVEPOINT.s RELEASE, failed"
        ):
            stage(session, "second")
        with signals.audit_event_discarded.connected_to(note):
            session.rollback()
    assert recorder.names == []
    assert discarded == ["rollback"]


def test_a_deadlock_victims_events_are_discarded_and_later_ones_kept(
    engine: Engine, Session: sessionmaker, recorder: Recorder
) -> None:
    """MariaDB rolls a deadlock's victim back whole, and the statements the
    application runs next (it retries the one that failed, without a
    rollback) go into a new transaction. The events staged before the
    deadlock are discarded; those staged after it are sent with the commit."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        pytest.skip("MariaDB rolls a deadlock's victim back whole")
    with engine.begin() as connection:
        connection.execute(insert(Item), [{"name": "a"}, {"name": "b"}])
    discarded: list[str] = []
    locked, go = threading.Event(), threading.Event()

    def other() -> None:
        # The heavier transaction, so that InnoDB picks the session as victim.
        with engine.begin() as connection:
            connection.execute(
                insert(Item), [{"name": f"bulk-{n}"} for n in range(100)]
            )
            connection.execute(update(Item).where(Item.name == "b").values(name="b2"))
            locked.set()
            go.wait(10)
            connection.execute(update(Item).where(Item.name == "a").values(name="a2"))

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    thread = threading.Thread(target=other)
    with Session() as session, signals.audit_event_discarded.connected_to(note):
        session.add(Item(name="doomed"))
        session.flush()
        stage(session, "doomed")
        session.execute(update(Item).where(Item.name == "a").values(name="a1"))
        thread.start()
        assert locked.wait(10)
        go.set()
        time.sleep(0.3)  # the other transaction now waits for row a
        with pytest.raises(OperationalError, match="1213"):
            session.execute(update(Item).where(Item.name == "b2").values(name="b3"))
        thread.join(10)
        session.add(Item(name="after"))
        stage(session, "after")
        session.commit()
    assert "doomed" not in stored_names(engine)
    assert "after" in stored_names(engine)
    assert recorder.names == ["after"]
    assert discarded == ["rollback"]


def test_an_async_session_on_psycopg_tells_the_aborted_transaction_too(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """The same through an AsyncSession on psycopg's async driver."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    async def run() -> None:
        other = create_async_engine(
            engine.url, execution_options=engine.get_execution_options()
        )
        maker = async_sessionmaker(other)
        emitter.attach(maker)
        try:
            async with maker() as session:
                session.add(Item(name="doomed"))
                await session.flush()
                stage(session.sync_session, "doomed")
                with pytest.raises(IntegrityError):
                    await session.execute(insert(Item).values(name="doomed"))
                await session.commit()
        finally:
            emitter.detach(maker)
            await other.dispose()

    asyncio.run(run())
    assert stored_names(engine) == []
    assert recorder.names == []


class Interrupted(BaseException):
    """What lands as the commit hands its connection back to the pool: an
    asyncio cancellation as an async driver resets it, a Ctrl-C."""


@contextlib.contextmanager
def interrupted_once(engine: Engine) -> Iterator[None]:
    """Raise :class:`Interrupted` from the pool's next reset of a connection
    (after COMMIT and ``after_commit``, before ``after_transaction_end``)."""
    armed = [True]

    def interrupt(*_: Any) -> None:
        if armed:
            armed.clear()
            raise Interrupted

    event.listen(engine, "reset", interrupt)
    try:
        yield
    finally:
        event.remove(engine, "reset", interrupt)


@pytest.mark.parametrize("then", ["read", "stage", "commit", "close"])
def test_an_interrupt_as_the_commit_gives_its_connection_back_loses_nothing(
    engine: Engine, Session: sessionmaker[Any], recorder: Recorder, then: str
) -> None:
    """COMMIT succeeded and ``after_commit`` ran, but SQLAlchemy never fired
    ``after_transaction_end``: the interrupt came out of the pool's reset.
    The events are delivered as the session goes on (a read, a stage, a
    commit); a session closed and dropped first discards them, reason
    ``"close"``. They were lost without a word after a read, and discarded
    as ``"detached"`` at the next stage."""
    discarded: list[tuple[str, str]] = []
    ours: set[Any] = set()

    def note(sender: object, event: Any, reason: str) -> None:
        if event.id in ours:  # not an earlier test's session, collected now
            discarded.append((event.target_id, reason))

    pool_log = logging.getLogger(engine.pool.logger.name)
    with signals.audit_event_discarded.connected_to(note):
        session = Session()
        session.add(Item(name="first"))
        stage(session, "first")
        ours.update(staged.id for staged in staged_events(session))
        # The pool logs the interrupt with its traceback, which pytest's
        # log capture would keep, and the session with it, past gc.
        pool_log.disabled = True
        try:
            with interrupted_once(engine):
                session.commit()
        except Interrupted:
            pass  # not pytest.raises: its traceback would keep the session
        else:
            pytest.fail("the pool's reset was not interrupted")
        finally:
            pool_log.disabled = False
        if then == "read":
            session.execute(select(Item.id)).all()
        elif then == "stage":
            session.add(Item(name="second"))
            stage(session, "second")
            session.commit()
        elif then == "commit":
            session.add(Item(name="second"))
            session.commit()
        session.close()
        del session
        gc.collect()
    assert "first" in stored_names(engine)
    if then == "close":
        assert recorder.names == []
        assert discarded == [("first", "close")]
    else:
        assert recorder.names == (["first", "second"] if then == "stage" else ["first"])
        assert discarded == []


def test_an_event_staged_as_the_last_transaction_ends_is_sent_with_the_next(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An application's ``after_transaction_end`` listener, registered
    before ``attach()``, stages the next step of a workflow on the session
    as a transaction ends: that event belongs to the next transaction, and
    is sent when it commits. (Our own listener, running after it, took the
    new transaction's events for a stale one's and discarded them.)"""
    maker = sessionmaker(engine)
    followups = ["second"]

    def next_step(session: OrmSession, transaction: Any) -> None:
        if transaction.parent is None and followups and session.info.get("go"):
            name = followups.pop()
            session.add(Item(name=name))
            stage(session, name)

    event.listen(maker, "after_transaction_end", next_step)
    emitter.attach(maker)
    discarded: list[str] = []

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append(event.target_id)

    with signals.audit_event_discarded.connected_to(note), maker() as session:
        session.add(Item(name="first"))
        stage(session, "first")
        session.info["go"] = True
        session.commit()  # the next step is staged as this one ends
        session.info["go"] = False
        session.commit()
    assert sorted(stored_names(engine)) == ["first", "second"]
    assert recorder.names == ["first", "second"]
    assert discarded == []


@pytest.mark.parametrize("then", ["commit", "rollback"])
def test_events_a_detached_emitter_left_are_reported_detached_when_attached_again(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, then: str
) -> None:
    """Staged, the emitter detached, the transaction committed unheard, the
    emitter attached again: the session's next transaction ending reports
    the events as "detached" (they said "close", which says no COMMIT came)."""
    maker = sessionmaker(engine)
    emitter.attach(maker)
    discarded: list[tuple[str, str]] = []

    def note(sender: object, event: Any, reason: str) -> None:
        discarded.append((event.target_id, reason))

    try:
        with signals.audit_event_discarded.connected_to(note), maker() as session:
            session.add(Item(name="first"))
            stage(session, "first")
            emitter.detach(maker)
            session.commit()
            emitter.attach(maker)
            session.execute(select(Item.id)).all()
            getattr(session, then)()
    finally:
        emitter.detach(maker)
    assert recorder.names == []
    assert discarded == [("first", "detached")]
