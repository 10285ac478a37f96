"""AsyncSession: the same transaction semantics through its ``sync_session``.

Every test runs on aiosqlite (a file database with the SAVEPOINT workaround)
and on asyncpg. pytest-asyncio is not used: each test drives its own event
loop with :func:`asyncio.run` and disposes its engine inside that loop.

On PostgreSQL every test creates the tables of ``support.Base`` in a schema of
its own (``schema_translate_map``), so that it cannot clash with other test
runs using the same database at the same time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from support import Base, Item, Recorder, aiosqlite_engine, reach

from access_audit import (
    AuditConfigurationError,
    AuditEmitter,
    StagedEvent,
    signals,
    stage_event,
)

POSTGRESQL_ASYNC_URL = os.environ.get(
    "ACCESS_AUDIT_TEST_POSTGRESQL_ASYNC_URL",
    "postgresql+asyncpg://root@127.0.0.1:5432/test",
)
BACKENDS = ["aiosqlite", "asyncpg"]

AsyncTarget = Any
"""An AsyncSession, or an async_scoped_session standing for one."""


def probe_asyncpg() -> None:
    """Connect once per run; skip (or fail under CI) if PostgreSQL is down."""

    async def connect() -> None:
        engine = create_async_engine(POSTGRESQL_ASYNC_URL)
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    reach("PostgreSQL (asyncpg)", lambda: asyncio.run(connect()))


@dataclasses.dataclass
class Backend:
    """How to build a fresh async engine for one test, inside its event loop."""

    name: str
    path: Path
    schema: str = dataclasses.field(
        default_factory=lambda: f"audit_async_{uuid.uuid4().hex[:12]}"
    )

    def engine(self) -> AsyncEngine:
        if self.name == "aiosqlite":
            return aiosqlite_engine(self.path)
        return create_async_engine(
            POSTGRESQL_ASYNC_URL,
            execution_options={"schema_translate_map": {None: self.schema}},
        )

    async def create_tables(self, engine: AsyncEngine) -> None:
        async with engine.begin() as connection:
            if self.name == "asyncpg":
                await connection.execute(text(f'CREATE SCHEMA "{self.schema}"'))
            await connection.run_sync(Base.metadata.create_all)

    async def drop_tables(self, engine: AsyncEngine) -> None:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            if self.name == "asyncpg":
                await connection.execute(text(f'DROP SCHEMA "{self.schema}" CASCADE'))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """aiosqlite on a file in ``tmp_path``, or asyncpg (skipped if down)."""
    if request.param == "asyncpg":
        probe_asyncpg()
    return Backend(request.param, tmp_path / "test.db")


Body = Callable[[AsyncEngine], Awaitable[None]]


def run(backend: Backend, body: Body) -> None:
    """Run *body* on a fresh engine with the test tables, in a new event loop."""

    async def main() -> None:
        engine = backend.engine()
        try:
            await backend.create_tables(engine)
            try:
                await body(engine)
            finally:
                await backend.drop_tables(engine)
        finally:
            await engine.dispose()

    asyncio.run(main())


@pytest.fixture
def discarded(emitter: AuditEmitter) -> Iterator[list[tuple[str, str]]]:
    """(target_id, reason) of each event ``emitter`` reports as discarded."""
    seen: list[tuple[str, str]] = []

    def receiver(sender: AuditEmitter, *, event: StagedEvent, reason: str) -> None:
        seen.append((str(event.target_id), reason))

    signals.audit_event_discarded.connect(receiver, sender=emitter, weak=False)
    yield seen
    signals.audit_event_discarded.disconnect(receiver, sender=emitter)


def operation(session: AsyncTarget, name: str) -> Item:
    """Add an Item and stage the event that records it, on an async session."""
    item = Item(name=name)
    session.add(item)
    stage_event(
        session, "item_created", target_type="item", target_id=name, action="create"
    )
    return item


async def stored_rows(engine: AsyncEngine) -> dict[str, int]:
    """name -> id of the Items really in the database (an unaudited session)."""
    async with AsyncSession(engine) as session:
        rows = await session.execute(select(Item.name, Item.id))
        return {name: id_ for name, id_ in rows}


async def stored_names(engine: AsyncEngine) -> list[str]:
    return sorted(await stored_rows(engine))


def key_of(item: Item) -> Callable[[], int]:
    """The lazy target_id of *item*: its primary key, read when called."""
    return lambda: item.id


# -- transaction semantics, attached through an async_sessionmaker -----------


def test_commit_emits(
    backend: Backend, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An AsyncSession commit emits its events once, in order, as one batch."""

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            operation(session, "a")
            operation(session, "b")
            assert recorder.events == []
            await session.commit()
        assert recorder.names == ["a", "b"]
        assert [len(batch) for batch in recorder.batches] == [2]
        assert [envelope.sequence for envelope in recorder.events] == [0, 1]
        assert await stored_names(engine) == ["a", "b"]

    run(backend, body)


def test_savepoint_released_then_commit_emits_all(
    backend: Backend, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A released SAVEPOINT emits nothing; the later commit emits every event."""

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            operation(session, "a")
            async with session.begin_nested():
                operation(session, "b")
            assert recorder.events == []
            operation(session, "c")
            await session.commit()
        assert recorder.names == ["a", "b", "c"]
        assert len(recorder.batches) == 1
        assert await stored_names(engine) == ["a", "b", "c"]

    run(backend, body)


def test_savepoint_rollback_drops_only_its_events(
    backend: Backend,
    emitter: AuditEmitter,
    recorder: Recorder,
    discarded: list[tuple[str, str]],
) -> None:
    """A rolled-back SAVEPOINT drops its events; the outer ones are emitted."""

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            operation(session, "a")
            nested = await session.begin_nested()
            operation(session, "b")
            await nested.rollback()
            assert discarded == [("b", "savepoint_rollback")]
            operation(session, "c")
            await session.commit()
        assert recorder.names == ["a", "c"]
        assert await stored_names(engine) == ["a", "c"]

    run(backend, body)


def test_rollback_emits_nothing(
    backend: Backend,
    emitter: AuditEmitter,
    recorder: Recorder,
    discarded: list[tuple[str, str]],
) -> None:
    """rollback() emits nothing, and nothing leaks into the next transaction."""

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            operation(session, "a")
            await session.flush()
            await session.rollback()
            assert recorder.events == []
            assert discarded == [("a", "rollback")]
            operation(session, "b")
            await session.commit()
        assert recorder.names == ["b"]
        assert await stored_names(engine) == ["b"]

    run(backend, body)


def test_lazy_target_id_is_the_generated_key(
    backend: Backend, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A lazy target_id resolves to the database-generated key on commit."""

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            first, second = Item(name="first"), Item(name="second")
            session.add_all([first, second])
            for item in (first, second):
                stage_event(
                    session,
                    "item_created",
                    target_type="item",
                    target_id=key_of(item),
                    target_name=item.name,
                    action="create",
                )
            # Nothing is flushed yet: the keys do not exist at stage time.
            assert inspect(first).pending and inspect(second).pending
            await session.commit()
        rows = await stored_rows(engine)
        assert sorted(rows) == ["first", "second"]
        assert [(e.target_name, e.target_id) for e in recorder.events] == [
            ("first", str(rows["first"])),
            ("second", str(rows["second"])),
        ]

    run(backend, body)


# -- every async attach target -----------------------------------------------


class OwnSyncSession(Session):
    """The sync_session_class of :class:`OwnAsyncSession`."""


class OwnAsyncSession(AsyncSession):
    """An AsyncSession subclass with a sync session class of its own."""

    sync_session_class = OwnSyncSession


AsyncTargetFactory = Callable[[AsyncEngine], tuple[Any, Callable[[], AsyncTarget]]]


def via_async_sessionmaker(engine: AsyncEngine) -> tuple[Any, Callable[[], Any]]:
    maker = async_sessionmaker(engine)
    return maker, maker


def via_instance(engine: AsyncEngine) -> tuple[Any, Callable[[], Any]]:
    session = AsyncSession(engine)
    return session, lambda: session


def via_subclass(engine: AsyncEngine) -> tuple[Any, Callable[[], Any]]:
    return OwnAsyncSession, lambda: OwnAsyncSession(engine)


def via_scoped(engine: AsyncEngine) -> tuple[Any, Callable[[], Any]]:
    scoped = async_scoped_session(
        async_sessionmaker(engine), scopefunc=asyncio.current_task
    )
    return scoped, lambda: scoped


ASYNC_TARGETS: list[AsyncTargetFactory] = [
    via_async_sessionmaker,
    via_instance,
    via_subclass,
    via_scoped,
]
ASYNC_TARGET_IDS = [
    "async_sessionmaker",
    "AsyncSession_instance",
    "AsyncSession_subclass",
    "async_scoped_session",
]


@pytest.mark.parametrize("make_target", ASYNC_TARGETS, ids=ASYNC_TARGET_IDS)
def test_attach_async_target(
    backend: Backend,
    emitter: AuditEmitter,
    recorder: Recorder,
    make_target: AsyncTargetFactory,
) -> None:
    """attach() works on every async target; stage_event takes what it hands out."""

    async def body(engine: AsyncEngine) -> None:
        target, session_of = make_target(engine)
        emitter.attach(target)
        try:
            session = session_of()
            operation(session, "a")
            nested = await session.begin_nested()
            operation(session, "dropped")
            await nested.rollback()
            operation(session, "b")
            await session.commit()
            assert recorder.names == ["a", "b"]
            operation(session, "c")
            await session.rollback()
            await session.close()
            assert recorder.names == ["a", "b"]
            # An unaudited session next to it is refused, not silently dropped.
            async with AsyncSession(engine) as other:
                with pytest.raises(AuditConfigurationError):
                    operation(other, "lost")
        finally:
            if isinstance(target, async_scoped_session):
                await target.remove()
            emitter.detach(target)
        assert await stored_names(engine) == ["a", "b"]

    run(backend, body)


def test_a_session_made_before_its_async_sessionmaker_was_attached_is_refused(
    backend: Backend, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An AsyncSession the maker made before ``attach()`` has the plain
    Session class, which attaching the maker cannot reach without reaching
    every session: staging on it is refused, saying so, and the maker's
    later sessions are audited."""

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        early = maker()
        emitter.attach(maker)
        try:
            with pytest.raises(AuditConfigurationError, match="before it was attached"):
                operation(early, "early")
            await early.close()
            async with maker() as session:
                operation(session, "later")
                await session.commit()
        finally:
            emitter.detach(maker)
        assert recorder.names == ["later"]
        assert await stored_names(engine) == ["later"]

    run(backend, body)


def test_async_scoped_session_per_task(
    backend: Backend, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An async_scoped_session keyed by task keeps each task's events apart."""

    async def body(engine: AsyncEngine) -> None:
        scoped = async_scoped_session(
            async_sessionmaker(engine), scopefunc=asyncio.current_task
        )
        emitter.attach(scoped)

        async def task(name: str, commit: bool, staged: asyncio.Event) -> None:
            operation(scoped, name)
            staged.set()
            await asyncio.sleep(0)
            if commit:
                await scoped.commit()
            else:
                await scoped.rollback()
            await scoped.remove()

        staged = [asyncio.Event(), asyncio.Event()]
        try:
            await asyncio.gather(
                task("committed", True, staged[0]),
                task("rolled_back", False, staged[1]),
            )
        finally:
            emitter.detach(scoped)
        assert all(flag.is_set() for flag in staged)
        assert recorder.names == ["committed"]
        assert await stored_names(engine) == ["committed"]

    run(backend, body)


@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
@pytest.mark.parametrize("outer_commits", [True, False], ids=["committed", "open"])
def test_a_joined_sessions_events_settle_when_its_connection_is_dropped_as_garbage(
    backend: Backend,
    emitter: AuditEmitter,
    recorder: Recorder,
    discarded: list[tuple[str, str]],
    outer_commits: bool,
) -> None:
    """The caller's AsyncConnection, never closed, is dropped as garbage: an
    async pool drops it without the checkin a plain pool gives, so the
    events of the session joined to its transaction are settled then. The
    transaction committed: they are delivered; left open (the server rolls
    it back): discarded, reason ``"rollback"``. Nothing is lost in silence."""
    import gc

    async def body(engine: AsyncEngine) -> None:
        connection = await engine.connect()
        await connection.begin()
        session = AsyncSession(bind=connection)
        emitter.attach(session)
        operation(session, "joined")
        await session.commit()
        await session.close()
        if outer_commits:
            await connection.commit()
        del connection, session
        gc.collect()
        await asyncio.sleep(0)
        assert await stored_names(engine) == (["joined"] if outer_commits else [])

    run(backend, body)
    if outer_commits:
        assert (recorder.names, discarded) == (["joined"], [])
    else:
        assert (recorder.names, discarded) == ([], [("joined", "rollback")])


# -- outbox records of sessions bound to an AsyncConnection ------------------


@pytest.mark.parametrize("joined", [False, True], ids=["controls", "joined"])
def test_outbox_records_of_a_session_bound_to_its_connection_go_through_the_engine(
    backend: Backend,
    recorder: Recorder,
    joined: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``AsyncSession(bind=connection)`` in outbox mode: one that commits
    the connection's transactions itself hands the connection back in none;
    one joined to the caller's transaction has its batch delivered when that
    commits. Either way ``aflush()`` returns once every row's delivery is
    recorded, through the engine."""
    from access_audit.outbox import Outbox, count_pending

    names = ["one", "two", "three"]

    async def body(engine: AsyncEngine) -> None:
        outbox = Outbox()
        async with engine.begin() as connection:
            await connection.run_sync(outbox.create)
        emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
        emitter.register(recorder, name="recorder")
        async with engine.connect() as connection:
            outer = await connection.begin() if joined else None
            session = AsyncSession(bind=connection)
            emitter.attach(session)
            for name in names:
                operation(session, name)
                await session.commit()
                assert connection.in_transaction() is joined
            await session.close()
            if outer is not None:
                await outer.commit()
        assert await emitter.aflush(10)
        async with engine.connect() as connection:
            assert await connection.run_sync(count_pending, outbox) == 0
        assert recorder.names == names
        assert await stored_names(engine) == sorted(names)
        async with engine.begin() as connection:
            await connection.run_sync(outbox.drop)

    run(backend, body)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
