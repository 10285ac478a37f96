"""``RedisStreamPlugin``: the sync hook, over one thread-safe redis-py client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis
from redis.retry import Retry

from access_audit import hookimpl

from ._settings import StreamSettings, client_options

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["RedisStreamPlugin"]


class RedisStreamPlugin(StreamSettings):
    """Append each committed event to a Redis stream; return once Redis has it.

    Each committed batch is appended with one ``MULTI``/``XADD``.../``EXEC``
    round trip: its entries are contiguous in the stream, in staging order,
    and either all of them are appended or none (unless the connection is
    lost while Redis answers, when the outcome is unknown). The hook returns
    once Redis answered: an event reported delivered is in the stream (in
    the server's memory; persistence and replication are the server's
    configuration). Anything else (unreachable, no answer within
    ``timeout``, an error reply such as ``WRONGTYPE``) raises
    :class:`~access_audit_redis.RedisStreamPublishError`, so access_audit
    logs it, calls ``audit_delivery_failed`` and, with an outbox, keeps the
    batch for the relay; the commit itself does not fail. The plugin does
    not retry.

    **De-duplication key**: the ``id`` field, the envelope id. Redis does not
    drop a re-appended entry: consumers skip ids they have processed.

    The hook is synchronous: it blocks the committing thread (or the
    emitter's worker, or the relay) for one round trip. In an asyncio
    application use :class:`~access_audit_redis.AsyncRedisStreamPlugin`,
    which does not block the loop. One redis-py client (a thread-safe
    connection pool, connected at first use) serves every thread; a forked
    child makes connections of its own.

    Parameters: as :class:`~access_audit_redis.StreamSettings`.
    """

    def _setup(self) -> None:
        self._client: redis.Redis = redis.Redis.from_url(
            self.url, **client_options(self.timeout, Retry)
        )

    def __enter__(self) -> RedisStreamPlugin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Append the committed batch; return once Redis has every entry.

        :raises RedisStreamPublishError: the batch was not appended.
        """
        self.publish(envelopes)

    def publish(self, envelopes: Sequence[AuditEventEnvelope]) -> list[str]:
        """Append *envelopes* in order, atomically; return their stream entry ids.

        :raises RedisStreamPublishError: they were not appended (see the class).
        """
        batch = tuple(envelopes)
        if not batch:
            return []
        try:
            with self._client.pipeline(transaction=True) as pipeline:
                self._append(pipeline, batch)
                entry_ids: list[str] = pipeline.execute()
        except redis.RedisError as error:
            raise self.error(batch, error) from error
        return entry_ids

    def close(self) -> None:
        """Close the pooled connections; idempotent. A later publish reconnects."""
        self._client.close()
