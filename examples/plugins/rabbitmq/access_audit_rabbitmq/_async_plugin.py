"""``AsyncRabbitMQPlugin``: the ``async def`` hook, one connection per event loop.

access_audit awaits an ``async def`` hook on the application's own loop
inside ``await session.commit()`` of an ``AsyncSession``, and on the loop the
emitter owns for a sync ``Session`` (or its worker, or a relay). An aio-pika
connection belongs to the loop it was made on, so the plugin keeps one
connection, with one channel in confirm mode, per loop, opened at that
loop's first publish.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.connection import make_url

from access_audit import hookimpl

from ._settings import PublisherSettings

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

    from access_audit import AuditEventEnvelope

__all__ = ["AsyncRabbitMQPlugin"]

logger = logging.getLogger("access_audit_rabbitmq")

_WINDOW = 500
"""Messages of a batch waiting for their confirms at once, at most."""


class _Link:
    """A loop's connection, confirm-mode channel and exchange, once open.

    :ivar lock: held for a whole batch, so that batches published on the
        loop reach the channel one after the other, never interleaved.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        self.exchange: AbstractExchange | None = None
        self._closing: set[asyncio.Future[None]] = set()

    def is_open(self) -> bool:
        return (
            self.connection is not None
            and not self.connection.is_closed
            and self.channel is not None
            and not self.channel.is_closed
        )

    def drop(self) -> None:
        """Forget the connection, closing it in the background.

        After a failure the broker may not answer at all, and aiormq then
        waits a few seconds for its goodbye: the failing batch does not wait
        for that. :meth:`close` does.
        """
        connection = self._detach()
        if connection is not None and not connection.is_closed:
            closing = asyncio.ensure_future(_close(connection))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the connection, and wait for those :meth:`drop` is closing."""
        connection = self._detach()
        if connection is not None and not connection.is_closed:
            await _close(connection)
        if self._closing:
            # return_exceptions: one that close() cancelled has nothing to say.
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _detach(self) -> AbstractConnection | None:
        connection, self.connection = self.connection, None
        self.channel = self.exchange = None
        return connection


async def _close(connection: AbstractConnection) -> None:
    """Close *connection*; never raises (a broker that is gone has nothing to hear)."""
    try:
        await connection.close()
    except Exception as error:
        logger.debug("closing the RabbitMQ connection failed: %r", error)


class AsyncRabbitMQPlugin(PublisherSettings):
    """Publish each committed event to RabbitMQ; return once the broker confirmed it.

    Each event becomes one persistent message (``message_id`` = the envelope
    id; see :class:`~access_audit_rabbitmq.PublisherSettings`), published
    with ``mandatory`` set on a channel in publisher-confirm mode. The hook
    returns once the broker confirmed every event of the batch: a confirmed
    message is in every queue it was routed to (for a durable or quorum
    queue, on disk). The first event that is nacked, returned as unroutable
    (no queue bound for its routing key), not confirmed within ``timeout``,
    or not sent (the broker unreachable, the exchange missing) raises
    :class:`~access_audit_rabbitmq.RabbitMQPublishError`, so access_audit
    logs it, calls ``audit_delivery_failed`` and, with an outbox, keeps the
    batch for the relay; the commit itself does not fail. The plugin does
    not retry, and after a failure it opens a new connection at the next
    publish.

    **De-duplication key**: ``message_id``, the envelope id. RabbitMQ does not
    drop a re-published message: consumers skip ids they have processed.

    A batch's messages are published one after the other without waiting
    in between (the broker confirms them together), and no other batch of
    this plugin is published on the loop's channel meanwhile: a queue gets
    a batch's messages contiguous and in staging order.

    Connections: one per event loop, made at that loop's first publish
    (none at construction) and reused. :meth:`aclose` closes every loop's
    connection, each on its own loop: await it before the loop ends (a
    lifespan's shutdown); a connection left on a loop that has ended is
    dropped. A later publish makes a new one.

    Parameters: as :class:`~access_audit_rabbitmq.PublisherSettings`.
    """

    def _setup(self) -> None:
        self._links: dict[asyncio.AbstractEventLoop, _Link] = {}
        self._lock = threading.Lock()

    async def __aenter__(self) -> AsyncRabbitMQPlugin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def connections(self) -> int:
        """How many event loops hold an open connection of this plugin now."""
        with self._lock:
            links = [link for loop, link in self._links.items() if not loop.is_closed()]
        return sum(link.is_open() for link in links)

    @hookimpl
    async def audit_events_committed(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> None:
        """Publish the committed batch; return once the broker confirmed every event.

        :raises RabbitMQPublishError: an event was not confirmed.
        """
        await self.publish(envelopes)

    async def publish(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Publish *envelopes* in order; return once each one was confirmed.

        Runs on the running loop, with that loop's connection.

        :raises RabbitMQPublishError: an event was not confirmed; the error's
            ``confirmed`` counts those before it that were.
        """
        batch = tuple(envelopes)
        if not batch:
            return
        link = self._link()
        async with link.lock:
            healthy = False
            try:
                await self._publish(link, batch)
                healthy = True
            finally:
                if not healthy:
                    # Whatever failed (or was cancelled), the next batch
                    # starts on a new connection, in a known state.
                    link.drop()

    async def aclose(self) -> None:
        """Close every loop's connection, each on its own loop; idempotent.

        The running loop's is closed here; one on a loop running in another
        thread (the emitter's) is closed there, awaited without blocking
        this loop; one on a loop that no longer runs is dropped.
        """
        current = asyncio.get_running_loop()
        with self._lock:
            links = list(self._links.items())
            self._links.clear()
        for loop, link in links:
            if loop is current:
                await link.close()
            elif loop.is_running():
                await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(link.close(), loop)
                )

    async def _publish(
        self, link: _Link, batch: tuple[AuditEventEnvelope, ...]
    ) -> None:
        try:
            exchange = await asyncio.wait_for(self._open(link), self.timeout)
        except Exception as error:
            raise self.error(batch, 0, error) from error
        # Started in order: each publish writes its frames under the
        # channel's FIFO lock before awaiting its confirm, so the messages
        # go out in staging order and are confirmed together. At most
        # _WINDOW wait at once, so that a message's timeout runs from about
        # when it is sent, not from the start of a batch of any size.
        waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        confirmed = 0
        try:
            for envelope in batch:
                if len(waiting) >= _WINDOW:
                    await self._confirm(batch, confirmed, waiting.popleft())
                    confirmed += 1
                waiting.append(
                    asyncio.ensure_future(
                        exchange.publish(
                            self.message_for(envelope),
                            self.routing_key_for(envelope),
                            mandatory=True,
                            timeout=self.timeout,
                        )
                    )
                )
            while waiting:
                await self._confirm(batch, confirmed, waiting.popleft())
                confirmed += 1
        finally:
            for publishing in waiting:
                publishing.cancel()

    async def _confirm(
        self,
        batch: tuple[AuditEventEnvelope, ...],
        confirmed: int,
        publishing: asyncio.Future[Any],
    ) -> None:
        """Wait for the confirm of ``batch[confirmed]``; raise if it is not one."""
        try:
            result = await publishing
        except Exception as error:
            raise self.error(batch, confirmed, error) from error
        if not isinstance(result, aiormq.spec.Basic.Ack):
            refused = RuntimeError(f"the broker answered {result!r}")
            raise self.error(batch, confirmed, refused)

    async def _open(self, link: _Link) -> AbstractExchange:
        """The link's exchange, (re)connecting first if the link is not open."""
        if link.is_open():
            assert link.exchange is not None
            return link.exchange
        link.drop()
        # What aio_pika.connect() does, with the connection on the link before
        # it connects: if connecting fails or times out, drop() closes it
        # (left alone, its finalizer would try to, without a loop).
        url = make_url(self.url)
        if "name" not in url.query:  # the connection's name in the broker's UI
            url = url.update_query(name="access_audit_rabbitmq")
        connection = aio_pika.Connection(url)
        link.connection = connection
        await connection.connect(timeout=self.timeout)
        link.channel = await connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        link.exchange = (
            await link.channel.get_exchange(self.exchange, ensure=False)
            if self.exchange
            else link.channel.default_exchange
        )
        return link.exchange

    def _link(self) -> _Link:
        loop = asyncio.get_running_loop()
        with self._lock:
            link = self._links.get(loop)
            if link is None:
                for stale in [k for k in self._links if k.is_closed()]:
                    del self._links[stale]
                link = self._links[loop] = _Link()
            return link

    def _forget(self) -> None:
        """Drop every link without closing it (a forked child's: not its sockets)."""
        self._lock = threading.Lock()
        self._links = {}
