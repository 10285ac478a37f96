"""``async def`` plugins: awaited side by side, each on its own.

A plugin with an ``async def`` delivery hook gets the batch in a task of its
own: its ``audit_event_logged`` calls in staging order, then its
``audit_events_committed``, both awaited. The tasks run together and are
waited for with :func:`asyncio.wait`, never :func:`asyncio.gather`: one that
fails, hangs past its timeout (even one that ignores being cancelled) or is
cancelled neither cancels nor skips the others, and a caller cancelled while
it waits leaves them running; their failures are still reported.

Where the awaiting happens: inside ``await session.commit()`` of an
``AsyncSession`` the listeners run in SQLAlchemy's greenlet, and the
coroutine is awaited on the application's own loop (``await_only``); from
plain synchronous code it runs on an event loop of access_audit's, in a
daemon thread of its own (one per process, :data:`LOOP`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
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

    If the caller is cancelled while it waits, the tasks keep running and
    *late* gets their failures as each finishes; the cancellation goes on.
    """
    loop = asyncio.get_running_loop()
    default, per_plugin = timeouts
    tasks = [
        loop.create_task(
            _one_plugin(plugin, envelopes, per_plugin.get(plugin[0], default))
        )
        for plugin in plugins
    ]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.add_done_callback(lambda done: late(done.result()))
        raise
    failures: list[Failure] = []
    for task in tasks:
        failures.extend(task.result())  # _one_plugin never raises
    return failures


async def _one_plugin(
    plugin: AsyncPlugin, envelopes: Sequence[AuditEventEnvelope], timeout: float | None
) -> list[Failure]:
    name, logged, committed = plugin
    impl = logged if logged is not None else committed
    assert impl is not None
    failures: list[Failure] = []
    taken = 0

    async def run() -> None:
        nonlocal taken
        if logged is not None:
            for envelope in envelopes:
                try:
                    await _maybe_await(_call(logged, envelope=envelope))
                except asyncio.CancelledError:
                    raise
                except BaseException as error:
                    failures.append((name, logged, (envelope,), error))
                taken += 1
        if committed is not None:
            try:
                await _maybe_await(_call(committed, envelopes=tuple(envelopes)))
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                failures.append((name, committed, tuple(envelopes), error))

    if timeout is None:
        # No timeout to enforce: this task is the plugin's own already.
        try:
            await run()
        except asyncio.CancelledError as cancelled:
            failures.append(
                (name, impl, tuple(envelopes[taken:] or envelopes), cancelled)
            )
        return failures
    task = asyncio.get_running_loop().create_task(run())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        # Cancelled but not waited for: a plugin that ignores cancellation
        # must not hold the others up.
        task.cancel()
        task.add_done_callback(_retrieve)
        error: BaseException = TimeoutError(
            f"plugin {name!r} did not finish delivering within {timeout} seconds"
        )
        failures.append((name, impl, tuple(envelopes[taken:] or envelopes), error))
    elif task.cancelled():
        failures.append(
            (
                name,
                impl,
                tuple(envelopes[taken:] or envelopes),
                asyncio.CancelledError(),
            )
        )
    return failures


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("a timed-out async plugin raised afterwards", exc_info=True)


def _call(impl: HookImpl, **arguments: Any) -> Any:
    return impl.function(*[arguments[name] for name in impl.argnames])


async def _maybe_await(result: Any) -> Any:
    if hasattr(result, "__await__"):
        return await result
    return result
