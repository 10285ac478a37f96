"""``async def`` plugins, awaited in isolation, and ``dispatch="asyncio"``.

AsyncSession tests run on aiosqlite and asyncpg (a down PostgreSQL skips
locally and fails under CI=true), each in an event loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from support import Base, Item, Recorder, aiosqlite_engine, commit_one
from test_async import BACKENDS, Backend, probe_asyncpg, run

from access_audit import (
    AuditEmitter,
    AuditEventEnvelope,
    hookimpl,
    signals,
    stage_event,
)


class AsyncSink:
    """An async plugin: sleeps, then records, noting the loop and thread."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.events: list[str] = []
        self.batches: list[int] = []
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.threads: list[threading.Thread] = []

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.loops.append(asyncio.get_running_loop())
        self.threads.append(threading.current_thread())
        await asyncio.sleep(self.delay)
        if envelope.target_id == self.fail_on:
            raise ConnectionError("sink down")
        self.events.append(envelope.target_id)

    @hookimpl
    async def audit_events_committed(
        self, envelopes: tuple[AuditEventEnvelope, ...]
    ) -> None:
        self.batches.append(len(envelopes))


class Failures:
    """Sync and async audit_delivery_failed implementations, recording."""

    def __init__(self) -> None:
        self.sync: list[tuple[str, str]] = []
        self.async_: list[tuple[str, str]] = []

    @hookimpl
    def audit_delivery_failed(
        self, plugin_name: str, envelopes: Any, error: BaseException
    ) -> None:
        self.sync.append((plugin_name, type(error).__name__))


class AsyncFailures:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    async def audit_delivery_failed(
        self, plugin_name: str, envelopes: Any, error: BaseException
    ) -> None:
        await asyncio.sleep(0)
        self.seen.append((plugin_name, type(error).__name__))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """aiosqlite on a file in ``tmp_path``, or asyncpg (skipped if down)."""
    if request.param == "asyncpg":
        probe_asyncpg()
    return Backend(request.param, tmp_path / "test.db")


async def commit_items(maker: Any, *names: str) -> None:
    async with maker() as session:
        await commit_items_on(session, list(names))


def test_commit_returns_after_async_plugins_finished(backend: Backend) -> None:
    """``await session.commit()`` awaits async plugins, on the caller's own loop."""
    sink = AsyncSink(delay=0.05)
    emitter = AuditEmitter([sink], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "a", "b")
        assert sink.events == ["a", "b"]
        assert sink.batches == [2]
        assert set(sink.loops) == {asyncio.get_running_loop()}

    run(backend, body)


def test_sync_and_async_plugins_mix(backend: Backend) -> None:
    """Sync plugins and async ones all get every event, in staging order."""
    sink, recorder = AsyncSink(), Recorder()
    emitter = AuditEmitter([sink, recorder], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "x", "y", "z")

    run(backend, body)
    assert sink.events == recorder.names == ["x", "y", "z"]


def test_async_plugins_run_side_by_side(backend: Backend) -> None:
    """Two slow async plugins take the time of one, not of both."""
    slow = [AsyncSink(delay=0.3), AsyncSink(delay=0.3)]
    emitter = AuditEmitter(load_entrypoints=False)
    for number, sink in enumerate(slow):
        emitter.register(sink, name=f"slow{number}")
    took: list[float] = []

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        started = time.monotonic()
        await commit_items(maker, "one")
        took.append(time.monotonic() - started)

    run(backend, body)
    assert [sink.events for sink in slow] == [["one"], ["one"]]
    assert took[0] < 0.55


def test_a_failing_async_plugin_skips_nothing(backend: Backend) -> None:
    """One async plugin raising: the others get the batch, failure hooks hear it."""
    broken, healthy, recorder = AsyncSink(fail_on="b"), AsyncSink(), Recorder()
    failures, async_failures = Failures(), AsyncFailures()
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(broken, name="broken")
    emitter.register(healthy, name="healthy")
    emitter.register(recorder, name="recorder")
    emitter.register(failures, name="failures")
    emitter.register(async_failures, name="async_failures")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "a", "b", "c")

    run(backend, body)
    assert broken.events == ["a", "c"]
    assert healthy.events == recorder.names == ["a", "b", "c"]
    assert failures.sync == async_failures.seen == [("broken", "ConnectionError")]


def test_a_hanging_async_plugin_times_out_alone(backend: Backend) -> None:
    """Past its timeout an async plugin is cancelled and reported; others deliver."""
    hanging, quick = AsyncSink(delay=30), AsyncSink()
    failures = Failures()
    emitter = AuditEmitter(
        load_entrypoints=False, async_timeout=30, async_timeouts={"hanging": 0.2}
    )
    emitter.register(hanging, name="hanging")
    emitter.register(quick, name="quick")
    emitter.register(failures, name="failures")
    took: list[float] = []

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        started = time.monotonic()
        await commit_items(maker, "late")
        took.append(time.monotonic() - started)

    run(backend, body)
    assert quick.events == ["late"] and hanging.events == []
    assert failures.sync == [("hanging", "TimeoutError")]
    assert took[0] < 5


def test_a_cancelled_caller_leaves_deliveries_running(tmp_path: Path) -> None:
    """Cancelling the committing task does not cancel the plugins' deliveries."""
    sink = AsyncSink(delay=0.3)
    emitter = AuditEmitter([sink], load_entrypoints=False)
    backend = Backend("aiosqlite", tmp_path / "test.db")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        task = asyncio.create_task(commit_items(maker, "kept"))
        await asyncio.sleep(0.1)  # COMMIT is done; the plugin is sleeping
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        assert sink.events == ["kept"]

    run(backend, body)


@pytest.mark.parametrize("ending", ["close", "begin"])
def test_a_timeout_while_a_joined_sessions_plugins_run_is_absorbed_not_deferred(
    backend: Backend, ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A joined session's events are delivered as the caller's connection
    ends its transaction (its next begin(), or close()), inside SQLAlchemy's
    events, which cannot be left halfway: a timeout that cancels the caller
    there leaves the plugins running, and the call returns. The cancellation
    is neither raised later, outside the timeout that sent it (the task
    would die at its next wait), nor logged as a failed delivery."""
    from sqlalchemy.ext.asyncio import AsyncSession

    sink = AsyncSink(delay=0.3)
    emitter = AuditEmitter([sink], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        connection = await engine.connect()
        await connection.begin()
        session = AsyncSession(bind=connection)
        emitter.attach(session)
        session.add(Item(name="joined"))
        stage_event(
            session, "item.create", target_type="item", target_id="joined", action="c"
        )
        await session.commit()
        await session.close()
        await connection.commit()
        ends = connection.close() if ending == "close" else connection.begin()
        await asyncio.wait_for(ends, 0.05)
        await asyncio.sleep(0.5)  # no cancellation is left pending for the task
        assert sink.events == ["joined"]  # the plugin went on to its end
        await connection.close()

    run(backend, body)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_an_async_plugin_failing_every_event_of_a_commit_logs_two_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As a plain plugin's: the first failure with its traceback, the rest of
    the commit's in one line, not a traceback per event."""
    from sqlalchemy.ext.asyncio import AsyncSession

    class Down:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            raise ConnectionError("sink down")

    emitter = AuditEmitter([Down()], load_entrypoints=False)
    caplog.set_level(logging.ERROR, logger="access_audit")

    async def body(engine: AsyncEngine) -> None:
        async with AsyncSession(engine) as session:
            emitter.attach(session)
            await commit_items_on(session, [f"item-{n}" for n in range(1000)])

    run(Backend("aiosqlite", tmp_path / "test.db"), body)
    first, rest = [r for r in caplog.records if r.name == "access_audit"]
    assert first.exc_info is not None and rest.exc_info is None
    assert "for 999 more events of the batch" in rest.getMessage()


async def commit_items_on(session: Any, names: list[str]) -> None:
    """Stage and commit one item_created event per name on *session*."""
    for name in names:
        session.add(Item(name=name))
        stage_event(
            session, "item_created", target_type="item", target_id=name,
            action="create",
        )  # fmt: skip
    await session.commit()


@pytest.fixture
def sync_maker(engine: Any) -> Iterator[sessionmaker[Any]]:
    yield sessionmaker(engine)


def test_async_plugins_of_a_sync_session_run_on_the_emitters_loop(
    sync_maker: sessionmaker[Any],
) -> None:
    """With a sync Session, async plugins run on a loop the emitter owns; never skipped."""
    sink = AsyncSink(delay=0.01)
    emitter = AuditEmitter([sink], load_entrypoints=False)
    emitter.attach(sync_maker)
    commit_one(sync_maker, "sync-1")
    commit_one(sync_maker, "sync-2")
    assert sink.events == ["sync-1", "sync-2"]
    assert sink.threads[0] is not threading.current_thread()
    assert sink.threads[0].name == "access_audit-asyncio"
    emitter.detach(sync_maker)


def test_async_plugins_of_a_sync_session_need_no_greenlet(tmp_path: Path) -> None:
    """Installed without greenlet (SQLAlchemy 2.1 no longer brings it; only
    the ``async`` extra does), a plain Session's async plugins still get
    their events and the commit returns: greenlet serves AsyncSession only."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.modules["greenlet"] = None  # as if not installed
            from sqlalchemy import create_engine, text
            from sqlalchemy.orm import sessionmaker
            from access_audit import AuditEmitter, hookimpl, stage_event

            class Async:
                @hookimpl
                async def audit_event_logged(self, envelope):
                    print("async", envelope.target_id, flush=True)

            class Plain:
                @hookimpl
                def audit_event_logged(self, envelope):
                    print("plain", envelope.target_id, flush=True)

            engine = create_engine("sqlite:///{tmp_path / "plain.db"}")
            emitter = AuditEmitter(load_entrypoints=False)
            emitter.register(Async(), name="async")
            emitter.register(Plain(), name="plain")
            maker = sessionmaker(engine)
            emitter.attach(maker)
            with maker.begin() as session:
                session.execute(text("create table t (id integer)"))
                stage_event(session, "item.create", target_type="item", target_id="i1", action="create")
            print("committed", flush=True)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["async i1", "plain i1", "committed"]


def test_asyncio_dispatch_delivers_after_the_commit_returns(backend: Backend) -> None:
    """dispatch="asyncio": commit returns first; aflush() waits for the deliveries."""
    sink = AsyncSink(delay=0.5)
    emitter = AuditEmitter([sink], load_entrypoints=False, dispatch="asyncio")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "first")
        await commit_items(maker, "second")
        # The worker may have started on "first" during the second commit's
        # I/O; neither delivery can be done before its sleep.
        assert sink.events == []
        assert await emitter.aflush(timeout=10)
        assert sink.events == ["first", "second"]
        assert await emitter.aclose(timeout=10)

    run(backend, body)


def test_asyncio_dispatch_closed_with_a_request_in_flight_delivers_its_events(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """A lifespan's shutdown closes the emitter while a request still runs:
    the events it staged before and commits after are delivered as the
    commit returns, with a warning, instead of a log line alone; as the
    worker would, whatever the plugins raise (even with
    ``raise_plugin_errors``, which this dispatch never raises for)."""

    class Down:
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            raise SystemExit("a plugin's bug")

    sink = AsyncSink()
    emitter = AuditEmitter(
        [sink, Down()],
        load_entrypoints=False,
        dispatch="asyncio",
        raise_plugin_errors=True,
    )

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        async with maker() as session:
            session.add(Item(name="in-flight"))
            stage_event(
                session, "item_created", target_type="item", target_id="in-flight",
                action="create",
            )  # fmt: skip
            assert await emitter.aclose(timeout=10)
            await session.commit()
            assert sink.events == ["in-flight"]

    run(backend, body)
    warned = [r for r in caplog.records if r.name == "access_audit"]
    assert [r.levelname for r in warned] == ["WARNING", "ERROR"], caplog.text
    assert "delivered in the committing thread" in warned[0].getMessage()
    assert "raised in audit_event_logged" in warned[1].getMessage()


def test_asyncio_dispatch_needs_the_async_waits(tmp_path: Path) -> None:
    """flush()/close() refuse with dispatch="asyncio": waiting needs the loop."""
    emitter = AuditEmitter(load_entrypoints=False, dispatch="asyncio")
    with pytest.raises(RuntimeError, match="aflush"):
        emitter.flush()
    with pytest.raises(RuntimeError, match="aclose"):
        emitter.close()


def test_asyncio_dispatch_without_a_running_loop_delivers_inline(
    sync_maker: sessionmaker[Any],
) -> None:
    """A commit from a thread with no running loop is delivered before it returns."""
    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False, dispatch="asyncio")
    emitter.attach(sync_maker)
    commit_one(sync_maker, "inline")
    assert recorder.names == ["inline"]
    emitter.detach(sync_maker)


def test_asyncio_dispatch_with_a_full_queue_blocks_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """queue_full="block": a committing AsyncSession waits; other tasks still run."""
    sink = AsyncSink(delay=0.05)
    emitter = AuditEmitter(
        [sink], load_entrypoints=False, dispatch="asyncio", queue_size=1
    )
    backend = Backend("aiosqlite", tmp_path / "test.db")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.create_task(tick())
        for name in ("q1", "q2", "q3", "q4"):
            await commit_items(maker, name)
        assert await emitter.aflush(timeout=10)
        ticker.cancel()
        assert sink.events == ["q1", "q2", "q3", "q4"]
        assert ticks > 5

    run(backend, body)


class ExitingSink:
    """An async plugin that raises SystemExit, as a buggy client library might."""

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        raise SystemExit(3)


def test_an_async_plugin_raising_system_exit_stops_only_that_delivery(
    sync_maker: sessionmaker[Any],
) -> None:
    """SystemExit from an async plugin on the emitter's loop: later commits still deliver."""
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter([recorder, failures], load_entrypoints=False)
    emitter.register(ExitingSink(), name="exiting")
    emitter.attach(sync_maker)
    with pytest.raises(SystemExit):
        commit_one(sync_maker, "first")  # inline: the interrupt goes on, after the rest
    emitter.unregister(emitter.plugin_manager.get_plugin("exiting"))
    commit_one(sync_maker, "second")
    assert recorder.names == ["first", "second"]
    assert failures.sync == [("exiting", "SystemExit")]
    emitter.detach(sync_maker)


def test_background_worker_survives_an_async_plugin_raising_system_exit(
    sync_maker: sessionmaker[Any],
) -> None:
    """With dispatch="background", SystemExit from an async plugin is a reported failure."""
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter(
        [recorder, failures], load_entrypoints=False, dispatch="background"
    )
    emitter.register(ExitingSink(), name="exiting")
    emitter.attach(sync_maker)
    commit_one(sync_maker, "a")
    commit_one(sync_maker, "b")
    assert emitter.flush(timeout=10)
    assert recorder.names == ["a", "b"]
    assert failures.sync == [("exiting", "SystemExit")] * 2
    emitter.close(timeout=10)
    emitter.detach(sync_maker)


def test_a_sync_session_committed_inside_an_async_plugin_is_delivered(
    sync_maker: sessionmaker[Any],
) -> None:
    """A plugin on the emitter's loop committing a plain Session gets that event sent."""
    recorder = Recorder()

    class Cascading:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            if envelope.target_id == "outer":
                commit_one(sync_maker, "inner")

    emitter = AuditEmitter([recorder, Cascading()], load_entrypoints=False)
    emitter.attach(sync_maker)
    commit_one(sync_maker, "outer")
    assert sorted(recorder.names) == ["inner", "outer"]
    emitter.detach(sync_maker)


def test_a_plugin_ignoring_cancellation_cannot_outlast_its_timeout(
    sync_maker: sessionmaker[Any],
) -> None:
    """A timed-out plugin that swallows CancelledError does not hold the commit."""

    class Stubborn:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            for _ in range(50):
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.1)

    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter([recorder, failures], load_entrypoints=False)
    emitter.register(Stubborn(), name="stubborn")
    emitter.plugin_manager.async_timeouts["stubborn"] = 0.2
    emitter.attach(sync_maker)
    started = time.monotonic()
    commit_one(sync_maker, "on-time")
    assert time.monotonic() - started < 2
    assert recorder.names == ["on-time"]
    assert failures.sync == [("stubborn", "TimeoutError")]
    emitter.detach(sync_maker)


async def cancel_while_delivering(maker: Any, slow: AsyncSink) -> None:
    """Commit "kept" in a task of its own, and cancel that task once COMMIT
    went through and *slow* (an async plugin) is delivering."""
    task = asyncio.create_task(commit_items(maker, "kept"))

    async def delivering() -> None:
        while not slow.loops:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(delivering(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("loop_ends", [False, True], ids=["loop-goes-on", "loop-ends"])
def test_a_cancelled_caller_still_gets_the_plain_plugins_and_failure_reports(
    tmp_path: Path, loop_ends: bool
) -> None:
    """Cancelled while async plugins run: the plain plugins get the batch,
    and each async plugin's failure is reported: its own error, or, when the
    loop ends before it finished, its cancellation; with an
    ``async_timeout`` too (that report was lost: the timer's task, cancelled
    with the loop, raised in the callback meant to make it)."""
    slow = AsyncSink(delay=5.0 if loop_ends else 0.3)
    broken = AsyncSink(delay=0.2, fail_on="kept")
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter(
        load_entrypoints=False, async_timeout=30 if loop_ends else None
    )
    for name, plugin in [
        ("slow", slow), ("broken", broken), ("recorder", recorder),
        ("failures", failures),
    ]:  # fmt: skip
        emitter.register(plugin, name=name)
    backend = Backend("aiosqlite", tmp_path / "test.db")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await cancel_while_delivering(maker, slow)
        if not loop_ends:
            await asyncio.sleep(0.5)

    run(backend, body)
    assert recorder.names == ["kept"]
    if loop_ends:
        assert slow.events == []
        assert sorted(failures.sync) == [
            ("broken", "CancelledError"),
            ("slow", "CancelledError"),
        ]
    else:
        assert slow.events == ["kept"]
        assert failures.sync == [("broken", "ConnectionError")]


def test_a_cancellation_landing_after_commit_still_delivers(tmp_path: Path) -> None:
    """A client gone just after COMMIT: the cancellation lands as aiosqlite
    resets the connection going back to the pool, so SQLAlchemy never ends
    the transaction in the session's eyes. The committed event reaches the
    plugins as the session goes on (here, one read); it was lost without a
    word."""
    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False)
    backend = Backend("aiosqlite", tmp_path / "test.db")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)

        async def handler() -> None:
            async with maker() as session:

                def disconnect(_session: Any) -> None:
                    task = asyncio.current_task()
                    assert task is not None
                    task.cancel()  # lands at the next await: the pool's reset

                sync_session = session.sync_session
                sqlalchemy_event.listen(sync_session, "after_commit", disconnect)
                try:
                    await commit_items_on(session, ["kept"])
                except asyncio.CancelledError:
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                else:
                    pytest.fail("the cancellation did not land")
                sqlalchemy_event.remove(sync_session, "after_commit", disconnect)
                await session.rollback()
                await session.execute(select(Item.id))

        await asyncio.create_task(handler())

    run(backend, body)
    assert recorder.names == ["kept"]


def test_asyncio_dispatch_with_a_plugin_committing_does_not_deadlock(
    tmp_path: Path,
) -> None:
    """queue_full="block": a plugin committing from the worker never waits for itself."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    recorder = Recorder()
    emitter = AuditEmitter(
        [recorder], load_entrypoints=False, dispatch="asyncio", queue_size=1
    )
    makers: list[Any] = []

    class Cascading:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            if envelope.target_id == "outer":
                await commit_items(makers[0], "inner-1")
                await commit_items(makers[0], "inner-2")

    emitter.register(Cascading(), name="cascading")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        makers.append(maker)
        emitter.attach(maker)
        await commit_items(maker, "outer")
        assert await emitter.aflush(timeout=5)

    run(backend, body)
    assert recorder.names == ["outer", "inner-1", "inner-2"]


def test_asyncio_dispatch_delivers_what_is_queued_when_the_loop_ends(
    tmp_path: Path,
) -> None:
    """asyncio.run() returning without aclose(): the queued batches are still sent."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False, dispatch="asyncio")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        for name in ("e1", "e2", "e3"):
            await commit_items(maker, name)

    run(backend, body)
    assert sorted(recorder.names) == ["e1", "e2", "e3"]


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["no-timeout", "timeout"])
def test_asyncio_dispatch_loop_ending_mid_delivery_still_reaches_plain_plugins(
    tmp_path: Path, timeout: float | None
) -> None:
    """asyncio.run() ending while the worker awaits a slow async plugin: the
    batch in flight still reaches the plain plugins and the signal receivers
    (as the queued ones do), and the async plugin's cancellation is reported
    as its failure, never lost without a word, with an ``async_timeout`` too
    (its timer's task, cancelled with the loop, lost the report)."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    recorder, slow, failures = Recorder(), AsyncSink(delay=5.0), Failures()
    emitter = AuditEmitter(
        load_entrypoints=False, dispatch="asyncio", async_timeout=timeout
    )
    emitter.register(recorder, name="plain")
    emitter.register(slow, name="slow")
    emitter.register(failures, name="failures")
    received: list[str] = []

    def receive(sender: object, envelope: AuditEventEnvelope) -> None:
        received.append(envelope.target_id)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "e1")
        await asyncio.sleep(0.05)  # the worker is now awaiting the slow plugin

    with signals.audit_event_committed.connected_to(receive):
        run(backend, body)
    assert recorder.names == ["e1"]
    assert received == ["e1"]
    assert slow.events == []
    assert failures.sync == [("slow", "CancelledError")]


class ExitingPlainSink:
    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        raise SystemExit(3)


@pytest.mark.parametrize("sink", [ExitingPlainSink, ExitingSink])
def test_asyncio_dispatch_worker_isolates_system_exit(
    tmp_path: Path, sink: type[Any]
) -> None:
    """A plugin raising SystemExit in the asyncio worker, long after the
    commit returned, fails that delivery only: it must not stop the
    application's event loop (background dispatch isolates it likewise)."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter(load_entrypoints=False, dispatch="asyncio")
    emitter.register(sink(), name="exiting")
    emitter.register(recorder, name="recorder")
    emitter.register(failures, name="failures")
    served: list[str] = []

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        for name in ("r1", "r2"):
            await commit_items(maker, name)
            await asyncio.sleep(0.02)
            served.append(name)
        assert await emitter.aflush(5)

    run(backend, body)
    assert served == ["r1", "r2"]
    assert recorder.names == ["r1", "r2"]
    assert failures.sync == [("exiting", "SystemExit")] * 2


def _run_and_close(engine_path: Path, emitter: AuditEmitter, *names: str) -> None:
    """Commit *names* on a loop that is then closed without cancelling its
    tasks (``run_until_complete`` and ``close()``, as scripts and task
    runners do), the delivery worker left suspended."""

    async def commits() -> None:
        engine = aiosqlite_engine(engine_path)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        for name in names:
            await commit_items(maker, name)
        emitter.detach(maker)
        await engine.dispose()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(commits())
    finally:
        loop.close()


def test_asyncio_dispatch_jobs_stranded_on_a_closed_loop_go_to_the_next_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop closed without cancelling its tasks strands its queued
    batches: the next loop that commits delivers them first, in order, and
    the batch that was in flight is logged as interrupted, by event id."""
    recorder, slow = Recorder(), AsyncSink(delay=0.5)
    emitter = AuditEmitter(load_entrypoints=False, dispatch="asyncio")
    emitter.register(recorder, name="plain")
    emitter.register(slow, name="slow")
    ids: list[str] = []

    class Noting:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            ids.append(str(envelope.id))

    emitter.register(Noting(), name="noting")
    with caplog.at_level("ERROR", logger="access_audit"):
        _run_and_close(tmp_path / "one.db", emitter, "e1", "e2", "e3")
        assert recorder.names == []  # e1 in flight, e2 and e3 queued
        assert len(ids) == 1
        gc.collect()
        backend = Backend("aiosqlite", tmp_path / "two.db")

        async def body(engine: AsyncEngine) -> None:
            maker = async_sessionmaker(engine)
            emitter.attach(maker)
            await commit_items(maker, "e4")
            assert await emitter.aflush(5)
            emitter.detach(maker)

        run(backend, body)
    assert recorder.names == ["e2", "e3", "e4"]
    assert slow.events == ["e2", "e3", "e4"]
    interrupted = [r.message for r in caplog.records if "interrupted" in r.message]
    assert len(interrupted) == 1 and ids[0] in interrupted[0], caplog.text


def test_asyncio_dispatch_jobs_stranded_at_exit_are_delivered(tmp_path: Path) -> None:
    """A script whose last loop closed without cancelling its tasks: what
    it stranded is delivered at interpreter exit."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_async_plugins import AsyncSink, _run_and_close
            from access_audit import AuditEmitter, hookimpl

            class Printer:
                @hookimpl
                def audit_event_logged(self, envelope):
                    print("delivered", envelope.target_id, flush=True)

            emitter = AuditEmitter(load_entrypoints=False, dispatch="asyncio")
            emitter.register(Printer(), name="printer")
            emitter.register(AsyncSink(delay=0.5), name="slow")
            from pathlib import Path
            _run_and_close(Path({str(tmp_path / "exit.db")!r}), emitter, "e1", "e2", "e3")
            print("exiting", flush=True)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["exiting", "delivered e2", "delivered e3"]
    assert "interrupted" in done.stderr


def test_asyncio_dispatch_aflush_waits_for_what_was_queued_not_later_commits(
    tmp_path: Path,
) -> None:
    """Tasks committing all the time keep the loop's queue from draining:
    aflush() still returns once what was queued when it was called has run."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    sink = AsyncSink(delay=0.01)
    emitter = AuditEmitter(load_entrypoints=False, dispatch="asyncio")
    emitter.register(sink, name="sink")
    left: list[int] = []

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                await commit_items(maker, f"load-{len(sink.events)}-{time.monotonic()}")

        loaders = [asyncio.create_task(load()) for _ in range(3)]
        await asyncio.sleep(0.05)
        await commit_items(maker, "mine")
        try:
            assert await emitter.aflush(20)
            assert "mine" in sink.events
            queue = emitter._on_loop._queues[asyncio.get_running_loop()]  # type: ignore[union-attr]
            left.append(len(queue.jobs))
        finally:
            stop.set()
            await asyncio.gather(*loaders)
        assert await emitter.aflush(60)
        emitter.detach(maker)

    run(backend, body)
    assert left[0] > 0  # the load really kept the queue from draining


def test_an_async_hook_behind_a_decorator_is_awaited(
    sync_maker: sessionmaker[Any],
) -> None:
    """An async def wrapped with functools.wraps is still recognised and awaited."""
    import functools

    seen: list[str] = []

    def traced(function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return wrapper

    class Wrapped:
        @hookimpl
        @traced
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            await asyncio.sleep(0)
            seen.append(envelope.target_id)

    emitter = AuditEmitter([Wrapped()], load_entrypoints=False)
    emitter.attach(sync_maker)
    commit_one(sync_maker, "wrapped")
    assert seen == ["wrapped"]
    emitter.detach(sync_maker)


class ReturnsItsWork:
    """A plain ``def`` hook that returns its work: another function's
    coroutine (as an ``async def`` behind a decorator without
    ``functools.wraps`` does), or a task it scheduled."""

    def __init__(self, as_task: bool = False) -> None:
        self.as_task = as_task
        self.events: list[str] = []

    async def _send(self, envelope: AuditEventEnvelope) -> None:
        self.events.append(envelope.target_id)

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> Any:
        work = self._send(envelope)
        return asyncio.get_running_loop().create_task(work) if self.as_task else work


def test_a_plain_hook_returning_a_coroutine_fails_that_delivery_saying_why(
    sync_maker: sessionmaker[Any],
) -> None:
    """A coroutine returned by a plain hook is work that never ran: the
    delivery is that plugin's failure (reported, and in outbox mode left
    for the relay), never an event counted as taken, and no "never awaited"
    warning is left behind."""
    plugin, failures = ReturnsItsWork(), Failures()
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(plugin, name="returns")
    emitter.register(failures, name="failures")
    emitter.attach(sync_maker)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        commit_one(sync_maker, "one")
    assert [str(w.message) for w in warned] == []
    assert plugin.events == []
    assert failures.sync == [("returns", "TypeError")]
    emitter.detach(sync_maker)


class Ready:
    """An awaitable that is neither a coroutine nor a future."""

    def __await__(self) -> Any:
        return iter(())


class ReturnsAnAwaitable:
    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> Any:
        return Ready()


def test_a_plain_hook_returning_another_awaitable_fails_that_delivery_too(
    sync_maker: sessionmaker[Any],
) -> None:
    """Any awaitable but a scheduled task or future is work that never ran."""
    plugin, failures = ReturnsAnAwaitable(), Failures()
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(plugin, name="awaitable")
    emitter.register(failures, name="failures")
    emitter.attach(sync_maker)
    commit_one(sync_maker, "one")
    assert failures.sync == [("awaitable", "TypeError")]
    emitter.detach(sync_maker)


def test_a_plain_hook_returning_a_task_is_left_to_it(backend: Backend) -> None:
    """A task a plain hook schedules on the application's loop and returns
    runs as it is: the delivery is not failed, nor waited for."""
    plugin, failures = ReturnsItsWork(as_task=True), Failures()
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(plugin, name="tasks")
    emitter.register(failures, name="failures")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "a", "b")
        await asyncio.sleep(0.05)
        emitter.detach(maker)

    run(backend, body)
    assert plugin.events == ["a", "b"]
    assert failures.sync == []


class ReturnsAFailingTask:
    """A plain ``def`` hook that schedules work which fails, and returns it."""

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> Any:
        async def send() -> None:
            raise ConnectionError(f"siem down for {envelope.target_id}")

        return asyncio.get_running_loop().create_task(send())


def test_a_task_a_plain_hook_returns_that_fails_is_logged(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery counted as taken when the hook returned its task; the
    task's later failure is not silent: it is logged with the plugin's name,
    the event's id and the error (not left to "Task exception was never
    retrieved" at garbage collection)."""
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(ReturnsAFailingTask(), name="tasks")
    seen: list[str] = []

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        recorder = Recorder()
        emitter.register(recorder, name="recorder")
        await commit_items(maker, "a")
        await asyncio.sleep(0.05)
        seen.extend(str(envelope.id) for envelope in recorder.events)
        emitter.detach(maker)

    with caplog.at_level("ERROR", logger="access_audit"):
        run(backend, body)
    failed = [
        record for record in caplog.records if "returned a task" in record.message
    ]
    assert len(failed) == 1, caplog.text
    assert "'tasks'" in failed[0].message and seen[0] in failed[0].message
    assert isinstance(failed[0].exc_info[1], ConnectionError)  # type: ignore[index]
