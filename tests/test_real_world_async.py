"""The adopter's service in miniature: concurrent requests on AsyncSession.

Built like the FastAPI service access_audit grew out of (issue 15, item 7),
with plain asyncio code standing in for FastAPI: an ``async_scoped_session``
keyed by a ContextVar that each "request" task sets, a module-level emitter
whose ``async def`` plugins (one slow, one failing on some events) are
awaited inside ``await session.commit()``, and an app factory that makes a
fresh engine and ``async_sessionmaker`` per test and attaches it, never
detaching it, with ``gc.collect()`` between tests: over the rounds, a new
maker's Session subclass can land at a collected one's address.

Each round serves 20 concurrent requests (committing, failing and rolling
back, abandoned mid-request, or losing a SAVEPOINT to a unique violation)
and the background tasks they leave behind, which commit on sessions of
their own after the request returned. Runs on aiosqlite and asyncpg (a down
PostgreSQL skips locally and fails under CI=true).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from support import Item
from test_async import BACKENDS, Backend, probe_asyncpg, run, stored_rows

from access_audit import (
    AuditEmitter,
    AuditEventEnvelope,
    StagedEvent,
    audit_context,
    hookimpl,
    signals,
    stage_event,
)

ROUNDS = 30
REQUESTS = 20
KINDS = ("create", "conflict", "fails", "create", "abandoned")
"""What request *i* does: ``KINDS[i % len(KINDS)]``."""
FLAKY_SUFFIX = "-b"
"""The flaky plugin raises on every event whose target_id ends with this."""
SEED = "seed"
"""A row committed unaudited before the requests; inserting it again conflicts."""

request_scope: ContextVar[str | None] = ContextVar("request_scope", default=None)
"""The current request's id: the ``async_scoped_session``'s scope."""


class SlowSink:
    """An async plugin that takes its time, as a network sink does."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received: list[uuid.UUID] = []
        self.batches: list[frozenset[uuid.UUID]] = []

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        await asyncio.sleep(0.002 * (len(envelope.target_id) % 3))
        self.received.append(envelope.id)

    @hookimpl
    async def audit_events_committed(
        self, envelopes: tuple[AuditEventEnvelope, ...]
    ) -> None:
        await asyncio.sleep(0)
        self.batches.append(frozenset(envelope.id for envelope in envelopes))


class FlakySink:
    """An async plugin that receives every event and fails on some of them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received: list[uuid.UUID] = []

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.received.append(envelope.id)
        await asyncio.sleep(0)
        if envelope.target_id.endswith(FLAKY_SUFFIX):
            raise ConnectionError("sink down")


class FailureLog:
    """Records the deliveries that failed, by plugin and event."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.failed: list[tuple[str, uuid.UUID, str]] = []

    @hookimpl
    def audit_delivery_failed(
        self,
        plugin_name: str,
        envelopes: Sequence[AuditEventEnvelope],
        error: BaseException,
    ) -> None:
        for envelope in envelopes:
            self.failed.append((plugin_name, envelope.id, type(error).__name__))


# The service's audit module: one emitter for the process, plugins registered
# once; every test's app factory attaches its own new sessionmaker to it.
slow, flaky, failure_log = SlowSink(), FlakySink(), FailureLog()
emitter = AuditEmitter(load_entrypoints=False)
emitter.register(slow, name="slow")
emitter.register(flaky, name="flaky")
emitter.register(failure_log, name="failure_log")


class RequestFailed(Exception):
    """A handler error the app turns into a 500 after rolling back."""


class ClientDisconnected(Exception):
    """A request abandoned mid-way: its session is closed, not rolled back."""


@dataclasses.dataclass
class Expected:
    """What the requests and background tasks should leave behind."""

    committed: dict[str, str] = dataclasses.field(default_factory=dict)
    """target_id -> actor_id of every event that must be delivered."""
    discarded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(target_id, reason) of every event that must be discarded."""


@dataclasses.dataclass
class App:
    """What the service's app factory builds: a maker, a scoped session, tasks."""

    maker: async_sessionmaker[AsyncSession]
    scoped: async_scoped_session[AsyncSession]
    background: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    expected: Expected = dataclasses.field(default_factory=Expected)


def create_app(engine: AsyncEngine) -> App:
    """A new async_sessionmaker, attached to the module's emitter, and its scope."""
    maker = async_sessionmaker(engine, expire_on_commit=False)
    emitter.attach(maker)
    return App(maker, async_scoped_session(maker, scopefunc=request_scope.get))


def create_item(session: Any, name: str, actor: str | None = None) -> None:
    """Add an Item and stage the event that records it."""
    session.add(Item(name=name))
    stage_event(
        session,
        "item_created",
        target_type="item",
        target_id=name,
        action="create",
        actor_id=actor,
    )


Job = Callable[[], Awaitable[None]]
Handler = Callable[[App, str, list[Job]], Awaitable[None]]


async def create(app: App, request: str, jobs: list[Job]) -> None:
    """Two items in one commit, and a post-response job that adds a third."""
    create_item(app.scoped, f"{request}-a")
    await asyncio.sleep(0)
    create_item(app.scoped, f"{request}{FLAKY_SUFFIX}")
    await app.scoped.commit()
    actor = f"user-{request}"
    app.expected.committed.update({f"{request}-a": actor, f"{request}-b": actor})

    async def notify() -> None:
        await asyncio.sleep(0.001)
        async with app.maker() as session:
            create_item(session, f"{request}-bg", actor="system")
            await asyncio.sleep(0)
            await session.commit()
        app.expected.committed[f"{request}-bg"] = "system"

    jobs.append(notify)


async def conflict(app: App, request: str, jobs: list[Job]) -> None:
    """A SAVEPOINT lost to a unique violation; the rest of the request commits."""
    create_item(app.scoped, f"{request}-a")
    with pytest.raises(IntegrityError):
        async with app.scoped.begin_nested():
            app.scoped.add(Item(name=SEED))
            stage_event(
                app.scoped,
                "item_created",
                target_type="item",
                target_id=f"{request}-dup",
                action="create",
            )
            await asyncio.sleep(0)
            await app.scoped.flush()
    app.expected.discarded.append((f"{request}-dup", "savepoint_rollback"))
    create_item(app.scoped, f"{request}-c")
    await app.scoped.commit()
    actor = f"user-{request}"
    app.expected.committed.update({f"{request}-a": actor, f"{request}-c": actor})


async def fails(app: App, request: str, jobs: list[Job]) -> None:
    """Stages and flushes, then fails: the app rolls back."""
    create_item(app.scoped, f"{request}-a")
    await app.scoped.flush()
    await asyncio.sleep(0)
    app.expected.discarded.append((f"{request}-a", "rollback"))
    raise RequestFailed(request)


async def abandoned(app: App, request: str, jobs: list[Job]) -> None:
    """Stages, then the client goes away: the session is only closed."""
    create_item(app.scoped, f"{request}-a")
    await asyncio.sleep(0)
    app.expected.discarded.append((f"{request}-a", "close"))
    raise ClientDisconnected(request)


HANDLERS: dict[str, Handler] = {
    "create": create,
    "conflict": conflict,
    "fails": fails,
    "abandoned": abandoned,
}


async def serve(app: App, request: str, handler: Handler) -> int:
    """One request as the service's middleware runs it; returns its status."""
    jobs: list[Job] = []
    token = request_scope.set(request)
    try:
        with audit_context(actor_id=f"user-{request}"):
            await handler(app, request, jobs)
        status = 200
    except RequestFailed:
        await app.scoped.rollback()
        status = 500
    except ClientDisconnected:
        status = 499
    finally:
        await app.scoped.remove()
        request_scope.reset(token)
    # The response is sent; background jobs run after it, in tasks of their own.
    app.background += [asyncio.create_task(job()) for job in jobs]
    return status


@dataclasses.dataclass
class ServiceBackend(Backend):
    """The suite's backends, aiosqlite taking its write lock at BEGIN.

    Concurrent writers on one SQLite file with deferred transactions can
    deadlock on the lock upgrade; ``BEGIN IMMEDIATE`` makes them queue
    instead (in aiosqlite's threads, so the event loop keeps running).
    """

    def engine(self) -> AsyncEngine:
        if self.name != "aiosqlite":
            return super().engine()
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{self.path}", connect_args={"timeout": 30}
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, record: object) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> ServiceBackend:
    """aiosqlite on a file in ``tmp_path``, or asyncpg (skipped if down)."""
    if request.param == "asyncpg":
        probe_asyncpg()
    return ServiceBackend(request.param, tmp_path / "test.db")


@pytest.fixture(autouse=True)
def fresh_process_state() -> Iterator[None]:
    """Empty plugins, and collected garbage (old makers' classes) between tests."""
    gc.collect()
    for plugin in (slow, flaky, failure_log):
        plugin.reset()
    yield
    gc.collect()


@pytest.fixture
def outcomes() -> Iterator[tuple[list[AuditEventEnvelope], list[tuple[str, str]]]]:
    """The emitter's committed envelopes and (target_id, reason) of its discards."""
    committed: list[AuditEventEnvelope] = []
    discarded: list[tuple[str, str]] = []

    def on_committed(sender: object, *, envelope: AuditEventEnvelope) -> None:
        committed.append(envelope)

    def on_discarded(sender: object, *, event: StagedEvent, reason: str) -> None:
        discarded.append((str(event.target_id), reason))

    with (
        signals.audit_event_committed.connected_to(on_committed, sender=emitter),
        signals.audit_event_discarded.connected_to(on_discarded, sender=emitter),
    ):
        yield committed, discarded


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_requests_deliver_exactly_what_committed(
    backend: ServiceBackend,
    round_: int,
    outcomes: tuple[list[AuditEventEnvelope], list[tuple[str, str]]],
) -> None:
    """Each committed event reaches each plugin once; each rolled-back one is discarded."""
    committed, discarded = outcomes
    expected = Expected()
    rows: dict[str, int] = {}
    statuses: list[int] = []

    async def body(engine: AsyncEngine) -> None:
        async with AsyncSession(engine) as session:
            session.add(Item(name=SEED))
            await session.commit()
        app = create_app(engine)
        app.expected = expected
        requests = [
            serve(app, f"r{round_}.{number}", HANDLERS[KINDS[number % len(KINDS)]])
            for number in range(REQUESTS)
        ]
        statuses.extend(await asyncio.gather(*requests))
        await asyncio.gather(*app.background)
        # No request left a session behind in the scope registry.
        assert app.scoped.registry.registry == {}
        rows.update(await stored_rows(engine))

    run(backend, body)

    kinds = [KINDS[number % len(KINDS)] for number in range(REQUESTS)]
    assert statuses == [
        {"fails": 500, "abandoned": 499}.get(kind, 200) for kind in kinds
    ]
    # Committed: exactly the expected events, each once, with its request's actor.
    assert Counter(e.target_id for e in committed) == Counter(list(expected.committed))
    assert {e.target_id: e.actor_id for e in committed} == expected.committed
    # Every plugin got every committed event exactly once, and nothing else.
    ids = Counter(envelope.id for envelope in committed)
    assert Counter(slow.received) == ids
    assert Counter(flaky.received) == ids
    # Each transaction's events came as one batch, from one request only.
    transactions: defaultdict[str, set[str]] = defaultdict(set)
    for envelope in committed:
        transactions[envelope.transaction_id].add(envelope.id)
    assert Counter(slow.batches) == Counter(map(frozenset, transactions.values()))
    by_id = {envelope.id: envelope for envelope in committed}
    for batch in slow.batches:
        assert len({by_id[id_].target_id.rsplit("-", 1)[0] for id_ in batch}) == 1
    # Discarded: exactly the rolled-back events, each once, with its reason.
    assert sorted(discarded) == sorted(expected.discarded)
    # The flaky plugin's failures were reported for its events only.
    assert sorted(failure_log.failed) == sorted(
        ("flaky", e.id, "ConnectionError")
        for e in committed
        if e.target_id.endswith(FLAKY_SUFFIX)
    )
    # The database holds a row for each delivered item event, and no other.
    assert sorted(rows) == sorted([SEED, *expected.committed])
