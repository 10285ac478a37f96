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
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

from access_audit import hookimpl

from ._async_plugin import AsyncRabbitMQPlugin
from ._settings import PublisherSettings

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["THREAD_NAME", "RabbitMQPlugin"]

THREAD_NAME = "access_audit_rabbitmq"
"""The name of the thread a :class:`RabbitMQPlugin` publishes from."""


class _LoopThread:
    """An event loop running forever in a daemon thread, until :meth:`stop`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


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
            loop = self._runner.loop
        # Bounded inside: connecting and each confirm wait at most timeout.
        asyncio.run_coroutine_threadsafe(self._publisher.publish(batch), loop).result()

    def close(self) -> None:
        """Close the connection and stop the loop thread; idempotent.

        A later publish starts them again.
        """
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(
                self._publisher.aclose(), runner.loop
            ).result()
        finally:
            runner.stop()


def _forget(reference: weakref.ref[RabbitMQPlugin]) -> None:
    plugin = reference()
    if plugin is not None:
        # The parent's thread does not exist here, and its socket is not ours.
        plugin._lock = threading.Lock()
        plugin._runner = None
        plugin._publisher._forget()
