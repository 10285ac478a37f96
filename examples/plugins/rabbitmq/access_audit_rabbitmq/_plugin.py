"""``RabbitMQPlugin``: the sync hook, publishing on a loop thread of its own.

The publishing itself is :class:`AsyncRabbitMQPlugin`'s, run on an event
loop that this plugin starts in a daemon thread at its first publish: the
committing thread waits for the confirms there. pika's
``BlockingConnection`` would need no thread, but it waits for a publisher
confirm without a time limit (a quorum queue that lost its majority never
confirms); on a loop every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from access_audit import hookimpl

from ._async_plugin import AsyncRabbitMQPlugin, logger
from ._settings import PublisherSettings

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["THREAD_NAME", "RabbitMQPlugin"]

_T = TypeVar("_T")

THREAD_NAME = "access_audit_rabbitmq"
"""The name of the thread a :class:`RabbitMQPlugin` publishes from."""


class _LoopThread:
    """An event loop running forever in a daemon thread, until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._lock = threading.Lock()
        self._stopping = False
        self._waiting: set[concurrent.futures.Future[Any]] = set()
        """What the threads calling :meth:`run` wait for."""
        self._tasks: set[asyncio.Task[Any]] = set()
        """The tasks running those coroutines (used on the loop's thread)."""
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run *coroutine* on the loop and wait for its result.

        :raises concurrent.futures.CancelledError: :meth:`stop` cancelled it,
            or was called before it could start.
        """
        with self._lock:
            if self._stopping:
                coroutine.close()
                raise concurrent.futures.CancelledError
            future = asyncio.run_coroutine_threadsafe(
                self._tracked(coroutine), self.loop
            )
            self._waiting.add(future)
        try:
            return future.result()
        finally:
            with self._lock:
                self._waiting.discard(future)

    async def _tracked(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """*coroutine*, as a task :meth:`stop` cancels (on the loop's thread)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await coroutine
        finally:
            self._tasks.discard(task)

    def stop(self, closing: Coroutine[Any, Any, None]) -> None:
        """Cancel the coroutines :meth:`run` is running (a batch being
        published, whose thread then gets
        :class:`concurrent.futures.CancelledError`), run *closing*, then stop
        the loop and its thread. A loop stopped with a coroutine still on it
        would leave its waiting thread blocked forever. The connection's own
        tasks (aio-pika's reader, its heartbeat) are left to *closing*: a
        connection whose reader was cancelled never hears the broker's
        goodbye, and its close waits for good.
        """
        with self._lock:
            self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(
                self._wind_down(closing), self.loop
            ).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            with self._lock:
                left = list(self._waiting)
            for future in left:
                # A task that outlived the wind-down never ends now: its
                # thread is told, rather than left waiting for good.
                future.cancel()

    async def _wind_down(self, closing: Coroutine[Any, Any, None]) -> None:
        running = set(self._tasks)
        for task in running:
            task.cancel()
        if running:
            # A cancelled publish drops its connection at once; one that
            # ignores cancelling is not waited for past this.
            await asyncio.wait(running, timeout=_CANCEL_WAIT)
        try:
            await asyncio.wait_for(closing, _CANCEL_WAIT)
        except asyncio.TimeoutError:
            logger.warning(
                "closing the RabbitMQ connection took over %.0f s; it is dropped",
                _CANCEL_WAIT,
            )


_CANCEL_WAIT = 5.0
"""Seconds :meth:`_LoopThread.stop` waits for the cancelled publishes to
end, and then for the connection to close."""


class RabbitMQPlugin(PublisherSettings):
    """:class:`~access_audit_rabbitmq.AsyncRabbitMQPlugin` from a sync hook.

    Publishes, confirms, fails and de-duplicates exactly as the async
    plugin (persistent messages, ``message_id`` = the envelope id, publisher
    confirms, :class:`~access_audit_rabbitmq.RabbitMQPublishError` for an
    event not confirmed), and blocks the committing thread (or the emitter's
    worker, or the relay's thread) until the broker has confirmed the batch
    or it failed. Every thread's batches go through one connection and
    channel, one batch at a time.

    The connection lives on an event loop that the plugin runs in a daemon
    thread named ``access_audit_rabbitmq``, started at the first publish
    (none at construction). :meth:`close` closes the connection and stops
    the thread; a later publish starts them again. A forked child starts
    its own.

    Parameters: as :class:`~access_audit_rabbitmq.PublisherSettings`.
    """

    def _setup(self) -> None:
        self._publisher = AsyncRabbitMQPlugin(
            self.url,
            exchange=self.exchange,
            routing_key=self.routing_key,
            timeout=self.timeout,
        )
        self._runner: _LoopThread | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            reference = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget(reference))

    def __enter__(self) -> RabbitMQPlugin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the plugin's loop thread runs (it has published since start or close)."""
        runner = self._runner
        return runner is not None and runner.thread.is_alive()

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Publish the committed batch; return once the broker confirmed every event.

        :raises RabbitMQPublishError: an event was not confirmed.
        """
        self.publish(envelopes)

    def publish(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Publish *envelopes* in order; return once each one was confirmed.

        :raises RabbitMQPublishError: an event was not confirmed.
        """
        batch = tuple(envelopes)
        if not batch:
            return
        with self._lock:
            if self._runner is None:
                self._runner = _LoopThread()
            runner = self._runner
        try:
            # Bounded inside: connecting and each confirm wait at most timeout.
            runner.run(self._publisher.publish(batch))
        except concurrent.futures.CancelledError as cancelled:
            closed = RuntimeError("the plugin was closed during the publish")
            raise self.error(batch, 0, closed) from cancelled

    def close(self) -> None:
        """Close the connection and stop the loop thread; idempotent.

        A batch another thread is publishing meanwhile fails (with
        :class:`~access_audit_rabbitmq.RabbitMQPublishError`: access_audit
        logs it, and with an outbox the relay delivers it again). A later
        publish starts them again.
        """
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop(self._publisher.aclose())


def _forget(reference: weakref.ref[RabbitMQPlugin]) -> None:
    plugin = reference()
    if plugin is not None:
        # The parent's thread does not exist here, and its socket is not ours.
        plugin._lock = threading.Lock()
        plugin._runner = None
        plugin._publisher._forget()
