"""``AsyncRedisStreamPlugin``: the ``async def`` hook, one client per event loop.

access_audit awaits an ``async def`` hook on the application's own loop
inside ``await session.commit()`` of an ``AsyncSession``, and on the loop the
emitter owns for a sync ``Session`` (or its worker, or a relay). A
``redis.asyncio`` connection belongs to the loop it was made on, so the
plugin keeps one client per loop, made at that loop's first publish.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis
import redis.asyncio
from redis.asyncio.retry import Retry

from access_audit import hookimpl

from ._settings import StreamSettings, client_options

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["AsyncRedisStreamPlugin"]


class AsyncRedisStreamPlugin(StreamSettings):
    """:class:`~access_audit_redis.RedisStreamPlugin` from an ``async def`` hook.

    Appends, orders, confirms, fails and de-duplicates exactly as the sync
    plugin does (one ``MULTI``/``XADD``.../``EXEC`` per committed batch; the
    ``id`` field is the envelope id), awaiting Redis's answer so that the
    loop keeps serving other tasks meanwhile.

    Connections: one ``redis.asyncio.Redis`` client per event loop, made at
    that loop's first publish (none at construction) and reused by every
    later one. :meth:`aclose` closes every loop's client, each on its own
    loop: await it before the loop ends (a lifespan's shutdown); a client
    left on a loop that has ended is dropped. A later publish makes a new one.

    Parameters: as :class:`~access_audit_redis.StreamSettings`.
    """

    def _setup(self) -> None:
        self._clients: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}
        self._lock = threading.Lock()

    async def __aenter__(self) -> AsyncRedisStreamPlugin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def clients(self) -> int:
        """How many event loops hold a client of this plugin now."""
        with self._lock:
            return sum(not loop.is_closed() for loop in self._clients)

    @hookimpl
    async def audit_events_committed(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> None:
        """Append the committed batch; return once Redis has every entry.

        :raises RedisStreamPublishError: the batch was not appended.
        """
        await self.publish(envelopes)

    async def publish(self, envelopes: Sequence[AuditEventEnvelope]) -> list[str]:
        """Append *envelopes* in order, atomically; return their stream entry ids.

        Runs on the running loop, with that loop's client.

        :raises RedisStreamPublishError: they were not appended.
        """
        batch = tuple(envelopes)
        if not batch:
            return []
        client = self._client()
        try:
            async with client.pipeline(transaction=True) as pipeline:
                self._append(pipeline, batch)
                entry_ids: list[str] = await pipeline.execute()
        except redis.RedisError as error:
            raise self.error(batch, error) from error
        return entry_ids

    async def aclose(self) -> None:
        """Close every loop's client, each on its own loop; idempotent.

        The running loop's is closed here; one on a loop running in another
        thread (the emitter's) is closed there, awaited without blocking
        this loop; one on a loop that no longer runs is dropped.
        """
        current = asyncio.get_running_loop()
        with self._lock:
            clients = list(self._clients.items())
            self._clients.clear()
        for loop, client in clients:
            if loop is current:
                await client.aclose()
            elif loop.is_running():
                await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                )

    def _client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None:
                for stale in [k for k in self._clients if k.is_closed()]:
                    del self._clients[stale]
                client = self._clients[loop] = redis.asyncio.Redis.from_url(
                    self.url, **client_options(self.timeout, Retry)
                )
            return client
