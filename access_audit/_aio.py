"""``async def`` plugins: awaited side by side, each on its own.

A plugin with an ``async def`` delivery hook gets the batch in a task of its
own: its ``audit_event_logged`` calls in staging order, then its
``audit_events_committed``, both awaited. The tasks run together and are
waited for with :func:`asyncio.wait`, never :func:`asyncio.gather`: one that
fails, hangs past its timeout or is cancelled neither cancels nor skips the
others, and a caller cancelled while it waits leaves them running.

Where the awaiting happens: inside ``await session.commit()`` of an
``AsyncSession`` the listeners run in SQLAlchemy's greenlet, and the
coroutine is awaited on the application's own loop (``await_only``); from
plain synchronous code it runs on an event loop the emitter owns, in a
thread of its own (:class:`LoopThread`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._sqla import await_only, in_greenlet

if TYPE_CHECKING:
    from pluggy import HookImpl

    from ._envelope import AuditEventEnvelope

__all__ = ["AsyncPlugin", "LoopThread", "deliver_to_async_plugins", "run_coroutine"]

T = TypeVar("T")

AsyncPlugin = tuple[str, "HookImpl | None", "HookImpl | None", "float | None"]
"""One plugin with an ``async def`` delivery hook: its name, its
``audit_event_logged`` and ``audit_events_committed`` implementations (either
may be sync, or absent) and its timeout in seconds (None: none)."""

Failure = tuple[str, "HookImpl", Sequence["AuditEventEnvelope"], BaseException]
"""A plugin's failure: its name, the implementation, the events, the error."""


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
        if hasattr(os, "register_at_fork"):
            reference = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget_loop(reference))

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run *awaitable* on this loop and wait for its result in this thread.

        :raises RuntimeError: called from the loop's own thread, which would
            wait for itself.
        """
        loop = self._running_loop()
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "an async plugin's delivery waited for the emitter's own event "
                "loop from inside it"
            )
        return asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop).result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="access_audit-asyncio", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop


def _forget_loop(reference: weakref.ref[LoopThread]) -> None:
    owner = reference()
    if owner is not None:
        owner._lock = threading.Lock()
        owner._loop = owner._thread = None


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run_coroutine(awaitable: Awaitable[T], loop_thread: LoopThread) -> T:
    """Await *awaitable* from synchronous code, and return its result.

    Inside SQLAlchemy's greenlet (an ``AsyncSession`` committing) on the
    caller's own event loop; anywhere else on *loop_thread*.
    """
    if in_greenlet():
        result: T = await_only(_as_coroutine(awaitable))
        return result
    return loop_thread.run(awaitable)


async def deliver_to_async_plugins(
    plugins: Sequence[AsyncPlugin], envelopes: Sequence[AuditEventEnvelope]
) -> list[Failure]:
    """Deliver *envelopes* to each plugin in a task of its own; return the failures.

    Each plugin gets its ``audit_event_logged`` calls in staging order (one
    that raises for an event does not stop the next), then its
    ``audit_events_committed``. A plugin past its timeout is cancelled and
    reported failed for the events it had not taken.
    """
    loop = asyncio.get_running_loop()
    tasks = {
        loop.create_task(_one_plugin(plugin, envelopes)): plugin for plugin in plugins
    }
    done, _ = await asyncio.wait(tasks)
    failures: list[Failure] = []
    for task in done:
        found = task.result()  # _one_plugin never raises
        failures.extend(found)
    return failures


async def _one_plugin(
    plugin: AsyncPlugin, envelopes: Sequence[AuditEventEnvelope]
) -> list[Failure]:
    name, logged, committed, timeout = plugin
    failures: list[Failure] = []
    untaken = list(envelopes)

    async def run() -> None:
        if logged is not None:
            for envelope in envelopes:
                try:
                    await _maybe_await(_call(logged, envelope=envelope))
                except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
                    raise
                except BaseException as error:
                    failures.append((name, logged, (envelope,), error))
                untaken.remove(envelope)
        if committed is not None:
            try:
                await _maybe_await(_call(committed, envelopes=tuple(envelopes)))
            except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
                raise
            except BaseException as error:
                failures.append((name, committed, tuple(envelopes), error))

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        impl = logged if logged is not None else committed
        assert impl is not None
        error = TimeoutError(
            f"plugin {name!r} did not finish delivering within {timeout} seconds"
        )
        failures.append((name, impl, tuple(untaken or envelopes), error))
    except asyncio.CancelledError as error:
        impl = logged if logged is not None else committed
        assert impl is not None
        failures.append((name, impl, tuple(untaken or envelopes), error))
    return failures


def _call(impl: HookImpl, **arguments: Any) -> Any:
    return impl.function(*[arguments[name] for name in impl.argnames])


async def _maybe_await(result: Any) -> Any:
    if isinstance(result, Coroutine) or hasattr(result, "__await__"):
        return await result
    return result
