"""The relay from asyncio: ``await emitter.arelay(async_engine)`` and the command
line with an async driver's URL.

The relay's guarantees are tested on both kinds of engine in test_relay.py
(its ``relay`` variants); here is what only asyncio has: a polling relay that
leaves the event loop free and stops on an ``asyncio.Event``, cancellation,
an ``AsyncConnection``, and the engines each entry point refuses. Tests run
on aiosqlite and asyncpg, each driving its own event loop with
:func:`asyncio.run`, on the database of the ``engine`` fixture.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from support import lines_of, outbox_emitter, outbox_rows, wait_until
from test_relay import (
    APP_NAME,
    CLI_PLUGIN,
    CLI_PLUGIN_NAME,
    Relay,
    Sink,
    assert_outbox_empty,
    async_twin,
    commit_events,
)

from access_audit import (
    AuditConfigurationError,
    AuditEmitter,
    AuditEventEnvelope,
    hookimpl,
)
from access_audit.outbox import PENDING, Outbox, count_pending

on_async_drivers = pytest.mark.parametrize(
    ("engine", "driver"),
    [("sqlite", "aiosqlite"), ("postgresql", "asyncpg")],
    indirect=["engine"],
    ids=["aiosqlite", "asyncpg"],
)


def run(
    engine: Engine, driver: str, body: Callable[[AsyncEngine], Awaitable[None]]
) -> None:
    """Run *body* on an async engine for *engine*'s database, in a new event loop."""

    async def main() -> None:
        async_engine = async_twin(engine, driver)
        try:
            await body(async_engine)
        finally:
            await async_engine.dispose()

    asyncio.run(main())


def leave_two_pending(engine: Engine, outbox: Outbox) -> None:
    """Commit events for "a" and "b" whose dispatch to "sink" failed: due at once."""
    commit_events(engine, outbox_emitter(outbox, sink=Sink(failing=True)), ["a", "b"])
    assert count_pending(engine, outbox) == 2
    assert_left_pending(engine, outbox)


def assert_left_pending(engine: Engine, outbox: Outbox) -> None:
    """The rows of :func:`leave_two_pending` are as it left them."""
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["a", "b"]
    assert [(row["states"], row["attempts"]) for row in rows] == [
        ({"sink": PENDING}, {"sink": 1})
    ] * 2


@on_async_drivers
def test_a_polling_arelay_leaves_the_loop_free_and_stops_on_its_event(
    engine: Engine, driver: str, outbox: Outbox
) -> None:
    """Other tasks run while it polls; setting ``stop`` ends its wait at once."""
    leave_two_pending(engine, outbox)
    sink = Sink()
    emitter = outbox_emitter(outbox, sink=sink)

    async def body(async_engine: AsyncEngine) -> None:
        stop = asyncio.Event()
        ticks: list[float] = []

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        relaying = asyncio.create_task(
            emitter.arelay(async_engine, once=False, interval=5, stop=stop)
        )
        deadline = time.monotonic() + 30
        while len(sink.events) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sink.names == ["a", "b"]
        before = len(ticks)
        await asyncio.sleep(0.5)  # the relay waits out its 5 s interval meanwhile
        assert not relaying.done()
        stopped_at = time.monotonic()
        stop.set()
        stats = await asyncio.wait_for(relaying, 10)
        assert time.monotonic() - stopped_at < 2
        await ticking
        assert stats.delivered == 2
        assert len(ticks) - before >= 20
        assert max(later - earlier for earlier, later in itertools.pairwise(ticks)) < 1

    run(engine, driver, body)
    assert_outbox_empty(engine, outbox)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_polling_arelay_through_asyncpg_reconnects_through_a_killed_connection(
    engine: Engine, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg reports a killed connection as a bare ``DBAPIError`` (not
    the ``OperationalError`` other drivers raise): the relay still says so,
    keeps running and delivers everything."""
    from sqlalchemy import event, text

    commit_events(engine, outbox_emitter(outbox, sink=Sink(failing=True)),
                  [str(number) for number in range(120)])  # fmt: skip
    backends: list[int] = []

    class Killer(Sink):
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            super().audit_event_logged(envelope)
            if len(self.events) == 30:  # in the middle of the first batch
                with engine.connect() as admin:
                    for backend in backends:
                        admin.execute(
                            text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}
                        )
                    admin.commit()

    sink = Killer()
    emitter = outbox_emitter(outbox, sink=sink)
    caplog.set_level("WARNING", logger="access_audit")

    async def body(async_engine: AsyncEngine) -> None:
        @event.listens_for(async_engine.sync_engine, "connect")
        def remember(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("SELECT pg_backend_pid()")
            backends.append(int(cursor.fetchone()[0]))

        stop = asyncio.Event()
        relaying = asyncio.create_task(
            emitter.arelay(
                async_engine, once=False, interval=0.05, batch_size=50, stop=stop
            )
        )
        deadline = time.monotonic() + 30
        while count_pending(engine, outbox) and time.monotonic() < deadline:
            assert not relaying.done(), relaying.exception()
            await asyncio.sleep(0.05)
        stop.set()
        stats = await asyncio.wait_for(relaying, 10)
        assert stats.reconnects >= 1

    run(engine, "asyncpg", body)
    assert set(sink.names) == {str(number) for number in range(120)}
    assert any("trying again" in message for message in caplog.messages)
    assert_outbox_empty(engine, outbox)


class CancellingSink(Sink):
    """Cancels the task relaying to it at its first event: mid-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.task: asyncio.Task[object] | None = None

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        super().audit_event_logged(envelope)
        if self.task is not None:
            self.task.cancel()
            self.task = None


@on_async_drivers
def test_a_cancelled_arelay_rolls_its_batch_back_and_gives_its_connection_back(
    engine: Engine, driver: str, outbox: Outbox
) -> None:
    """Cancelled mid-batch, the rows stay pending; the next run delivers them again."""
    leave_two_pending(engine, outbox)
    sink = CancellingSink()
    emitter = outbox_emitter(outbox, sink=sink)

    async def body(async_engine: AsyncEngine) -> None:
        relaying = asyncio.create_task(
            emitter.arelay(async_engine, once=False, interval=5)
        )
        sink.task = relaying
        with pytest.raises(asyncio.CancelledError):
            await relaying
        # A NullPool (file aiosqlite on SQLAlchemy 2.0) keeps nothing to return.
        pool = async_engine.sync_engine.pool
        assert getattr(pool, "checkedout", lambda: 0)() == 0
        assert sink.names == ["a", "b"]
        assert count_pending(engine, outbox) == 2
        assert_left_pending(engine, outbox)  # no state of the batch was kept
        stats = await emitter.arelay(async_engine, once=True)
        assert stats.delivered == 2

    run(engine, driver, body)
    assert sink.names == ["a", "b", "a", "b"]  # at least once
    assert_outbox_empty(engine, outbox)


@on_async_drivers
def test_arelay_on_an_async_connection_works_in_the_callers_transaction(
    engine: Engine, driver: str, outbox: Outbox
) -> None:
    """On an AsyncConnection the relay's updates are the caller's to commit or not."""
    leave_two_pending(engine, outbox)
    sink = Sink()
    emitter = outbox_emitter(outbox, sink=sink)

    async def body(async_engine: AsyncEngine) -> None:
        async with async_engine.connect() as connection:
            assert (await emitter.arelay(connection, once=True)).delivered == 2
            await connection.rollback()
        assert count_pending(engine, outbox) == 2
        assert_left_pending(engine, outbox)
        connection = async_engine.connect()  # not started: arelay starts it
        try:
            assert (await emitter.arelay(connection, once=True)).delivered == 2
            await connection.commit()
        finally:
            await connection.close()

    run(engine, driver, body)
    assert sink.names == ["a", "b", "a", "b"]
    assert_outbox_empty(engine, outbox)


class AsyncSink:
    """An ``async def`` plugin noting the loop each event reaches it on."""

    def __init__(self) -> None:
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.names: list[str] = []

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        await asyncio.sleep(0)
        self.loops.append(asyncio.get_running_loop())
        self.names.append(envelope.target_id)


@on_async_drivers
def test_arelay_awaits_async_plugins_on_the_running_loop(
    engine: Engine, driver: str, outbox: Outbox
) -> None:
    """An ``async def`` plugin is awaited on the relay's own loop, not the emitter's."""
    leave_two_pending(engine, outbox)
    sink = AsyncSink()
    emitter = outbox_emitter(outbox, sink=sink)
    loops: list[asyncio.AbstractEventLoop] = []

    async def body(async_engine: AsyncEngine) -> None:
        loops.append(asyncio.get_running_loop())
        assert (await emitter.arelay(async_engine, once=True)).delivered == 2

    try:
        run(engine, driver, body)
    finally:
        emitter.close()
    assert sink.names == ["a", "b"]
    assert sink.loops == loops * 2
    assert_outbox_empty(engine, outbox)


def test_relay_and_arelay_each_refuse_the_other_kind_of_engine(tmp_path: Path) -> None:
    """``relay`` names ``arelay`` for an AsyncEngine, and the other way round."""
    emitter = outbox_emitter(Outbox(), sink=Sink())
    sync_engine = create_engine(f"sqlite:///{tmp_path / 'sync.db'}")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.db'}")
    try:
        with pytest.raises(
            TypeError, match=r"not AsyncEngine; .*await emitter\.arelay"
        ):
            emitter.relay(async_engine)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"not Engine; .*emitter\.relay\(bind"):
            asyncio.run(emitter.arelay(sync_engine))
        with pytest.raises(AuditConfigurationError, match="no outbox"):
            asyncio.run(AuditEmitter(load_entrypoints=False).arelay(async_engine))
    finally:
        sync_engine.dispose()
        asyncio.run(async_engine.dispose())


@on_async_drivers
def test_the_cli_relays_through_an_async_url_and_stops_at_sigterm(
    engine: Engine, driver: str, outbox: Outbox, tmp_path: Path
) -> None:
    """``relay --database-url sqlite+aiosqlite://...`` polls, delivers, exits 0 at SIGTERM."""
    (tmp_path / f"{CLI_PLUGIN_NAME}.py").write_text(CLI_PLUGIN)
    commit_events(
        engine, outbox_emitter(outbox, **{APP_NAME: Sink(failing=True)}), ["a", "b"]
    )
    log = tmp_path / "cli.log"
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tmp_path), environment.get("PYTHONPATH")])
    )
    environment["AUDIT_RELAY_CLI_LOG"] = str(log)
    arguments = Relay(engine, async_twin(engine, driver)).cli_arguments()
    child = subprocess.Popen(
        [
            sys.executable, "-m", "access_audit", "relay", *arguments,
            "--no-entrypoints", "--create-table", "--interval", "30",
            "--plugin", f"{APP_NAME}={CLI_PLUGIN_NAME}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        wait_until(lambda: child.poll() is not None or lines_of(log) == 2, 30)
        time.sleep(0.3)  # into its 30 s wait
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "relay: 2 delivered, 0 failed, 0 dead" in out
    assert "Traceback" not in err
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["a", "b"]
    assert_outbox_empty(engine, outbox)
