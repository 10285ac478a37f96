"""``async def`` plugins: awaited side by side, each on its own.

A plugin with an ``async def`` delivery hook gets the batch in a task of its
own: its ``audit_event_logged`` calls in staging order, then its
``audit_events_committed``, both awaited. Each task runs its first step as it
is made (:func:`start_task`), so a plugin that never suspends is done before
anything waits; the tasks still pending run together and are waited for with
:func:`asyncio.wait`, never :func:`asyncio.gather`: one that fails, hangs past
its timeout (even one that ignores being cancelled) or is cancelled neither
cancels nor skips the others, and a caller cancelled while it waits leaves
them running; their failures are still reported.

Where the awaiting happens: inside ``await session.commit()`` of an
``AsyncSession`` the listeners run in SQLAlchemy's greenlet, and the
coroutine is awaited on the application's own loop (``await_only``); from
plain synchronous code it runs on an event loop of access_audit's, in a
daemon thread of its own (one per process, :data:`LOOP`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._logging import logger
from ._sqla import await_only, in_greenlet

if TYPE_CHECKING:
    from pluggy import HookImpl

    from ._envelope import AuditEventEnvelope

__all__ = [
    "LOOP",
    "AsyncPlugin",
    "Failure",
    "LoopThread",
    "deliver_to_async_plugins",
    "run_coroutine",
    "start_task",
]

T = TypeVar("T")

AsyncPlugin = tuple[str, "HookImpl | None", "HookImpl | None"]
"""One plugin with an ``async def`` delivery hook: its name, and its
``audit_event_logged`` and ``audit_events_committed`` implementations (either
may be a plain function, or absent)."""

Failure = tuple[str, "HookImpl", Sequence["AuditEventEnvelope"], BaseException]
"""A plugin's failure: its name, the implementation, the events, the error."""

Timeouts = tuple["float | None", Mapping[str, float]]
"""The default timeout in seconds (None: none), and per plugin name."""


class LoopThread:
    """An event loop in a daemon thread of its own, started when first needed.

    Runs the ``async def`` plugins of deliveries made from synchronous code
    (a sync ``Session``, the background worker). A forked child starts
    without the parent's thread and makes its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run *awaitable* on this loop and wait for its result in this thread.

        Called from the loop's own thread (a plugin running there commits a
        plain ``Session``), it cannot wait for itself: the awaitable then
        runs on a fresh loop in another thread, while this one waits.
        """
        if threading.current_thread() is self._thread:
            with concurrent.futures.ThreadPoolExecutor(1) as nested:
                return nested.submit(asyncio.run, _as_coroutine(awaitable)).result()
        loop = self._running_loop()
        return asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop).result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if (
                self._loop is None
                or self._thread is None
                or not self._thread.is_alive()
            ):
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="access_audit-asyncio", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._loop = self._thread = None


LOOP = LoopThread()
"""The process's loop for async plugins of deliveries from synchronous code."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=LOOP._forget)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run_coroutine(awaitable: Awaitable[T]) -> T:
    """Await *awaitable* from synchronous code, and return its result.

    Inside SQLAlchemy's greenlet (an ``AsyncSession`` committing) on the
    caller's own event loop; anywhere else on :data:`LOOP`.
    """
    if in_greenlet():
        result: T = await_only(awaitable)
        return result
    return LOOP.run(awaitable)


# Starting a task runs nothing until the loop's next turn, and waiting for it
# takes two more (its end wakes asyncio.wait(), which wakes the caller): about
# 35 µs of an aiosqlite AsyncSession commit, for a no-op plugin. Running each
# task's first step at once, as Python 3.12's eager tasks do, leaves a plugin
# that never suspends with no turn to wait for. The step runs with the task
# as the current task, so that what a plugin binds to its task before it
# first suspends (asyncio.timeout(), a TaskGroup, an anyio cancel scope)
# stays bound to the task that runs the rest; running the coroutine's first
# step outside any task, or in the caller's, would not.

if sys.version_info >= (3, 12):

    def start_task(
        loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]
    ) -> asyncio.Future[T]:
        """A task of its own for *coroutine*, its first step run already.

        The task is done on return if the coroutine finished without
        suspending. A loop with a task factory of its own gets its task
        from the factory, started as that factory starts it.
        """
        if loop.get_task_factory() is not None:
            return loop.create_task(coroutine)
        return asyncio.Task(coroutine, loop=loop, eager_start=True)

elif sys.version_info >= (3, 11):
    from asyncio.tasks import _enter_task, _leave_task

    def start_task(
        loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]
    ) -> asyncio.Future[T]:
        """A task of its own for *coroutine*, its first step run already.

        The task is done on return if the coroutine finished without
        suspending. A loop with a task factory of its own, or whose
        ``call_soon`` cannot be replaced on the instance (one without an
        instance dictionary, or replaced already), gets a task started by the
        loop.

        What Python 3.12's ``Task(..., eager_start=True)`` does, with 3.11's
        own means: a task schedules its first step through the loop's
        ``call_soon`` as it is made; that call is caught (for this task's
        step only) and the step run here, by the task itself, with the task
        entered as the current one as the loop would (by the functions 3.11's
        own tasks enter and leave their steps with).
        """
        attributes = getattr(loop, "__dict__", None)
        if (
            loop.get_task_factory() is not None
            or attributes is None
            or "call_soon" in attributes
        ):
            return loop.create_task(coroutine)
        task_context = contextvars.copy_context()
        schedule = loop.call_soon
        first_step: list[Callable[[], object]] = []

        def call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
            if context is task_context and not args and not first_step:
                first_step.append(callback)
                return None
            return schedule(callback, *args, context=context)

        loop.call_soon = call_soon  # type: ignore[method-assign,assignment]
        try:
            task = asyncio.Task(coroutine, loop=loop, context=task_context)
        finally:
            del loop.call_soon
        if not first_step:  # the loop scheduled it after all
            return task
        caller = asyncio.current_task(loop)
        if caller is not None:
            _leave_task(loop, caller)
        try:
            task_context.run(first_step[0])
        finally:
            if caller is not None:
                _enter_task(loop, caller)
        return task

else:

    def start_task(
        loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]
    ) -> asyncio.Future[T]:
        """A task of its own for *coroutine* (Python 3.10: started by the loop)."""
        return loop.create_task(coroutine)


async def deliver_to_async_plugins(
    plugins: Sequence[AsyncPlugin],
    envelopes: Sequence[AuditEventEnvelope],
    timeouts: Timeouts,
    late: Callable[[list[Failure]], None],
) -> list[Failure]:
    """Deliver *envelopes* to each plugin in a task of its own; return the failures.

    Each plugin gets its ``audit_event_logged`` calls in staging order (one
    that raises for an event does not stop the next), then its
    ``audit_events_committed``. A plugin past its timeout is cancelled,
    without waiting for it, and reported failed for the events it had not
    taken. Whatever a plugin raises is a failure here, even ``SystemExit``:
    the caller decides what to let through.

    Each task's first step runs at once (:func:`start_task`): a plugin that
    finishes without suspending needs no turn of the loop.

    If the caller is cancelled while it waits, the tasks keep running and
    *late* gets their failures as each finishes; the cancellation goes on.
    """
    loop = asyncio.get_running_loop()
    default, per_plugin = timeouts
    tasks: list[asyncio.Future[list[Failure]]] = []
    for plugin in plugins:
        delivery = _Delivery(plugin)
        timeout = per_plugin.get(delivery.name, default)
        if timeout is None:
            # No timeout to enforce: this task is the plugin's own.
            tasks.append(start_task(loop, delivery.run(envelopes)))
        else:
            tasks.append(start_task(loop, _timed(delivery, envelopes, timeout)))
    pending = [task for task in tasks if not task.done()]
    if pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            for task in tasks:
                task.add_done_callback(lambda done: late(done.result()))
            raise
    failures: list[Failure] = []
    for task in tasks:
        failures.extend(task.result())  # a delivery never raises
    return failures


class _Delivery:
    """One plugin's calls for one batch, its failures, and how far it got."""

    __slots__ = ("committed", "failures", "logged", "name", "reported", "taken")

    def __init__(self, plugin: AsyncPlugin) -> None:
        self.name, self.logged, self.committed = plugin
        self.failures: list[Failure] = []
        self.taken = 0
        """How many events ``audit_event_logged`` was called for."""
        self.reported = False
        """Reported failed by its timer's task (timed out, or cancelled from
        outside): the plugin's own cancellation after that is not news."""

    async def run(self, envelopes: Sequence[AuditEventEnvelope]) -> list[Failure]:
        """Make the plugin's calls; return the failures, a cancellation's included."""
        logged, committed = self.logged, self.committed
        try:
            if logged is not None:
                just_envelope = logged.argnames == ("envelope",)
                for envelope in envelopes:
                    try:
                        if just_envelope:
                            result = logged.function(envelope)
                        else:
                            result = _call(logged, envelope=envelope)
                        if hasattr(result, "__await__"):
                            await result
                    except asyncio.CancelledError:
                        raise
                    except BaseException as error:
                        self.failures.append((self.name, logged, (envelope,), error))
                    self.taken += 1
            if committed is not None:
                try:
                    await _maybe_await(_call(committed, envelopes=tuple(envelopes)))
                except asyncio.CancelledError:
                    raise
                except BaseException as error:
                    self.failures.append(
                        (self.name, committed, tuple(envelopes), error)
                    )
        except asyncio.CancelledError as cancelled:
            if not self.reported:
                self.stopped(envelopes, cancelled)
        return self.failures

    def stopped(
        self, envelopes: Sequence[AuditEventEnvelope], error: BaseException
    ) -> None:
        """Report the events not taken (all, if it got past them) as failed."""
        impl = self.logged if self.logged is not None else self.committed
        assert impl is not None
        taken = tuple(envelopes[self.taken :] or envelopes)
        self.failures.append((self.name, impl, taken, error))


async def _timed(
    delivery: _Delivery, envelopes: Sequence[AuditEventEnvelope], timeout: float
) -> list[Failure]:
    """*delivery* in a task of its own, cancelled (not waited for) at *timeout*."""
    task = start_task(asyncio.get_running_loop(), delivery.run(envelopes))
    if not task.done():
        try:
            await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError as cancelled:
            # Cancelled from outside (the loop ending cancels every task):
            # this task's result is what reports the delivery, so it reports
            # the plugin's cancellation itself, as the plugin's own task does
            # without a timeout, rather than raise and lose the report.
            if task.done() and not task.cancelled():
                return task.result()
            delivery.reported = True
            task.cancel()
            task.add_done_callback(_retrieve)
            delivery.stopped(envelopes, cancelled)
            return delivery.failures
    if not task.done():
        # Cancelled but not waited for: a plugin that ignores cancellation
        # must not hold the others up.
        delivery.reported = True
        task.cancel()
        task.add_done_callback(_retrieve)
        delivery.stopped(
            envelopes,
            TimeoutError(
                f"plugin {delivery.name!r} did not finish delivering within "
                f"{timeout} seconds"
            ),
        )
    elif task.cancelled():  # by a task factory's task, before it started
        delivery.stopped(envelopes, asyncio.CancelledError())
    return delivery.failures


def _retrieve(task: asyncio.Future[list[Failure]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("a timed-out async plugin raised afterwards", exc_info=True)


def _call(impl: HookImpl, **arguments: Any) -> Any:
    return impl.function(*[arguments[name] for name in impl.argnames])


async def _maybe_await(result: Any) -> Any:
    if hasattr(result, "__await__"):
        return await result
    return result
