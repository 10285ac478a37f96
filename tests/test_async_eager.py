"""``async def`` plugins start at once: each task's first step runs in the commit.

A plugin that finishes without suspending costs the commit no turn of the
event loop; one that suspends goes on in a task of its own, exactly as if it
had been started in one: the same task before and after it suspends, its own
copy of the caller's context, its own timeout and failures, and a caller
cancelled while it runs leaves it running.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from support import Item, Recorder
from test_async import Backend, run
from test_async_plugins import AsyncSink, Failures, backend, commit_items

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl

__all__ = ["backend"]  # the fixture, parametrized over aiosqlite and asyncpg

needs_eager = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 starts plugin tasks on the loop"
)

seen_by_caller: contextvars.ContextVar[str] = contextvars.ContextVar(
    "seen_by_caller", default="unset"
)


class NoOp:
    """An async plugin that finishes without ever suspending."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.events.append(envelope.target_id)


class SyncNoOp:
    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        pass


class CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Counts the event loop's turns: each one polls the selector once."""

    turns = 0

    def select(self, timeout: float | None = None) -> Any:
        self.turns += 1
        return super().select(timeout)


def run_counting(
    backend: Backend, body: Callable[[AsyncEngine, CountingSelector], Awaitable[None]]
) -> None:
    """:func:`test_async.run` on a selector event loop that counts its turns."""
    selector = CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)

    async def main() -> None:
        engine = backend.engine()
        try:
            await backend.create_tables(engine)
            try:
                await body(engine, selector)
            finally:
                await backend.drop_tables(engine)
        finally:
            await engine.dispose()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@needs_eager
def test_a_plugin_that_never_suspends_costs_the_commit_no_turn_of_the_loop(
    tmp_path: Path,
) -> None:
    """An async no-op plugin's commit takes the loop's turns of a sync plugin's."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    asynchronous = NoOp()
    commits = 20
    extra: list[int] = []

    async def body(engine: AsyncEngine, selector: CountingSelector) -> None:
        with_async = async_sessionmaker(engine)
        with_sync = async_sessionmaker(engine)
        AuditEmitter([asynchronous], load_entrypoints=False).attach(with_async)
        AuditEmitter([SyncNoOp()], load_entrypoints=False).attach(with_sync)
        for name, maker in (("sync", with_sync), ("async", with_async)):
            await commit_items(maker, f"{name}-warm-up")
        turns = {}
        for name, maker in (("sync", with_sync), ("async", with_async)):
            before = selector.turns
            for number in range(commits):
                await commit_items(maker, f"{name}-{number}")
            turns[name] = selector.turns - before
        extra.append(turns["async"] - turns["sync"])

    run_counting(backend, body)
    assert len(asynchronous.events) == commits + 1
    # Started by the loop, each delivery took three more turns per commit.
    assert extra[0] <= commits


def test_plugins_run_in_their_own_copy_of_the_callers_context(
    backend: Backend,
) -> None:
    """A plugin sees the caller's context; what it sets, before or after it
    suspends, reaches neither the caller nor another plugin."""
    seen: dict[str, list[str]] = {"first": [], "second": []}

    class Setting:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            seen[self.name].append(seen_by_caller.get())
            seen_by_caller.set(f"{self.name}-before")
            await asyncio.sleep(0.01)
            seen[self.name].append(seen_by_caller.get())
            seen_by_caller.set(f"{self.name}-after")

    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(Setting("first"), name="first")
    emitter.register(Setting("second"), name="second")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        seen_by_caller.set("caller")
        await commit_items(maker, "one")
        assert seen_by_caller.get() == "caller"

    run(backend, body)
    assert seen == {
        "first": ["caller", "first-before"],
        "second": ["caller", "second-before"],
    }


def test_a_plugin_keeps_one_task_of_its_own_across_its_first_suspension(
    backend: Backend,
) -> None:
    """current_task() in a plugin's first step is its own, and the same after it
    suspends, so a timeout it entered there cancels it, not the caller."""
    tasks: list[asyncio.Task[Any] | None] = []
    timed_out: list[bool] = []

    class Timing:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            tasks.append(asyncio.current_task())
            try:
                await asyncio.wait_for(asyncio.sleep(0.01), timeout=5)
                tasks.append(asyncio.current_task())
                await asyncio.wait_for(asyncio.sleep(5), timeout=0.05)
            except asyncio.TimeoutError:
                timed_out.append(True)
            tasks.append(asyncio.current_task())

    emitter = AuditEmitter([Timing()], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        caller = asyncio.current_task()
        assert caller is not None
        await commit_items(maker, "one")
        assert caller not in tasks
        if sys.version_info >= (3, 11):
            assert caller.cancelling() == 0
        await asyncio.sleep(0.05)  # still not cancelled by anything
        tasks.append(asyncio.current_task())

    run(backend, body)
    assert timed_out == [True]
    assert tasks[0] is not None and tasks[:3] == [tasks[0]] * 3


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout()")
def test_a_timeout_scope_entered_before_suspending_stays_the_plugins(
    backend: Backend,
) -> None:
    """asyncio.timeout() entered in a plugin's first step and expiring after it
    suspended cancels the plugin's own task only."""
    outcome: list[str] = []

    class Scoped:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            try:
                async with asyncio.timeout(0.05):  # type: ignore[attr-defined,unused-ignore]
                    await asyncio.sleep(5)
            except TimeoutError:
                outcome.append("timed out")

    emitter = AuditEmitter([Scoped()], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "one")
        await asyncio.sleep(0.1)  # the caller is not cancelled later either
        outcome.append("caller went on")

    run(backend, body)
    assert outcome == ["timed out", "caller went on"]


class Raising:
    """Raises for every event: at once, or after suspending once."""

    def __init__(self, suspend: bool) -> None:
        self.suspend = suspend

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        if self.suspend:
            await asyncio.sleep(0.01)
        raise ConnectionError("sink down")


@pytest.mark.parametrize("suspend", [False, True], ids=["at-once", "after-suspending"])
def test_a_plugin_raising_is_reported_alone(backend: Backend, suspend: bool) -> None:
    """A plugin raising in its first step, or after it suspended: the others
    get the batch, the failure hook hears it, the commit returns."""
    healthy, recorder, failures = NoOp(), Recorder(), Failures()
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(Raising(suspend), name="raising")
    emitter.register(healthy, name="healthy")
    emitter.register(recorder, name="recorder")
    emitter.register(failures, name="failures")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "a", "b")

    run(backend, body)
    assert healthy.events == recorder.names == ["a", "b"]
    assert failures.sync == [("raising", "ConnectionError")] * 2


def test_a_plugin_cancelling_its_own_task_is_reported_cancelled(
    backend: Backend,
) -> None:
    """A plugin that cancels its own task in its first step is stopped there and
    reported; the others get the batch."""
    healthy, failures = NoOp(), Failures()
    reached: list[str] = []

    class SelfCancelling:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(1)
            reached.append("after")

    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(SelfCancelling(), name="self_cancelling")
    emitter.register(healthy, name="healthy")
    emitter.register(failures, name="failures")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        started = time.monotonic()
        await commit_items(maker, "a")
        assert time.monotonic() - started < 0.9

    run(backend, body)
    assert reached == []
    assert healthy.events == ["a"]
    assert failures.sync == [("self_cancelling", "CancelledError")]


def test_a_suspended_plugin_past_its_timeout_is_cancelled_alone(
    backend: Backend,
) -> None:
    """A plugin that started, then hangs: cancelled at its timeout and reported;
    the others deliver and the commit returns."""
    quick, failures = NoOp(), Failures()
    progress: list[str] = []

    class Hanging:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            progress.append("started")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                progress.append("cancelled")
                raise

    emitter = AuditEmitter(load_entrypoints=False, async_timeouts={"hanging": 0.2})
    emitter.register(Hanging(), name="hanging")
    emitter.register(quick, name="quick")
    emitter.register(failures, name="failures")
    took: list[float] = []

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        started = time.monotonic()
        await commit_items(maker, "late")
        took.append(time.monotonic() - started)
        await asyncio.sleep(0.05)

    run(backend, body)
    assert quick.events == ["late"]
    assert progress == ["started", "cancelled"]
    assert failures.sync == [("hanging", "TimeoutError")]
    assert took[0] < 5


def test_a_plugin_with_a_timeout_that_never_suspends_is_delivered(
    backend: Backend,
) -> None:
    """A timeout does not stop a plugin that finishes in its first step."""
    plugin, failures = NoOp(), Failures()
    emitter = AuditEmitter(load_entrypoints=False, async_timeout=0.5)
    emitter.register(plugin, name="plugin")
    emitter.register(failures, name="failures")

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "a", "b")

    run(backend, body)
    assert plugin.events == ["a", "b"]
    assert failures.sync == []


def test_a_cancelled_caller_leaves_a_started_plugin_running(tmp_path: Path) -> None:
    """Cancelled while a plugin that already ran its first step is suspended:
    that plugin finishes, and the cancellation reaches the caller."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    progress: list[str] = []
    started: list[asyncio.Event] = []

    class Slow:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            progress.append("started")
            started[0].set()
            await asyncio.sleep(0.3)
            progress.append("finished")

    emitter = AuditEmitter([Slow()], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        started.append(asyncio.Event())
        task = asyncio.create_task(commit_items(maker, "kept"))
        await started[0].wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert progress == ["started"]
        await asyncio.sleep(0.5)

    run(backend, body)
    assert progress == ["started", "finished"]


@pytest.mark.parametrize("delay", [0, 0.01], ids=["bare-yield", "future"])
def test_plugins_suspending_either_way_are_delivered(
    backend: Backend, delay: float
) -> None:
    """A plugin that gives up one turn (sleep(0)) or waits on a future, once per
    event, gets every event, in order."""
    sink = AsyncSink(delay=delay)
    emitter = AuditEmitter([sink], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "a", "b", "c")

    run(backend, body)
    assert sink.events == ["a", "b", "c"]
    assert sink.batches == [3]


def test_a_plugin_committing_an_async_session_in_its_first_step(
    backend: Backend,
) -> None:
    """A plugin's first step may itself commit an AsyncSession: it runs on the
    loop's side of the commit, not inside SQLAlchemy's greenlet."""
    makers: list[Any] = []

    class Writing:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            async with makers[0]() as session:
                session.add(Item(name=f"copy-of-{envelope.target_id}"))
                await session.commit()

    emitter = AuditEmitter([Writing()], load_entrypoints=False)

    async def body(engine: AsyncEngine) -> None:
        makers.append(async_sessionmaker(engine))
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "one")
        async with makers[0]() as session:
            names = (await session.scalars(select(Item.name))).all()
        assert sorted(names) == ["copy-of-one", "one"]

    run(backend, body)


def test_a_loops_own_task_factory_makes_the_plugins_tasks(tmp_path: Path) -> None:
    """On a loop with a task factory, each plugin runs in a task from that factory."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    made: list[asyncio.Task[Any]] = []
    ran_in: list[asyncio.Task[Any] | None] = []

    class Recording:
        @hookimpl
        async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            ran_in.append(asyncio.current_task())
            await asyncio.sleep(0.01)
            ran_in.append(asyncio.current_task())

    emitter = AuditEmitter([Recording()], load_entrypoints=False)

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> Any:
        task = asyncio.Task(coro, loop=loop, **options)
        made.append(task)
        return task

    async def body(engine: AsyncEngine) -> None:
        asyncio.get_running_loop().set_task_factory(factory)
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "one")

    run(backend, body)
    assert len(ran_in) == 2 and ran_in[0] is ran_in[1]
    assert ran_in[0] in made


def test_a_loop_keeps_its_own_call_soon(tmp_path: Path) -> None:
    """A loop whose call_soon was replaced on the instance keeps it, and one
    whose was not is left without one: plugins are delivered either way."""
    backend = Backend("aiosqlite", tmp_path / "test.db")
    plugin = NoOp()
    emitter = AuditEmitter([plugin], load_entrypoints=False)
    calls: list[object] = []

    async def body(engine: AsyncEngine) -> None:
        loop = asyncio.get_running_loop()
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        await commit_items(maker, "plain")
        assert "call_soon" not in vars(loop)
        schedule = loop.call_soon

        def counting(callback: Any, *args: Any, context: Any = None) -> Any:
            calls.append(callback)
            return schedule(callback, *args, context=context)

        loop.call_soon = counting  # type: ignore[method-assign,assignment]
        try:
            await commit_items(maker, "instrumented")
            assert vars(loop)["call_soon"] is counting
        finally:
            del loop.call_soon

    run(backend, body)
    assert plugin.events == ["plain", "instrumented"]
    assert calls
