"""``AsyncKafkaPlugin``: the ``async def`` hook.

librdkafka's producer is thread-safe and belongs to no event loop: every
loop the hook runs on (the application's inside ``await session.commit()``
of an ``AsyncSession``, the emitter's for a sync ``Session`` or a relay)
shares the plugin's one producer, and awaits the delivery reports its
polling thread resolves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import confluent_kafka

from access_audit import hookimpl

from ._plugin import REPORT_GRACE, ProducerOwner

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["AsyncKafkaPlugin"]


class AsyncKafkaPlugin(ProducerOwner):
    """:class:`~access_audit_kafka.KafkaPlugin` from an ``async def`` hook.

    Produces, orders, confirms, fails and de-duplicates exactly as the sync
    plugin (an idempotent producer, key ``target_type:target_id``, the
    envelope id in the ``id`` header, the hook returning once Kafka
    acknowledged the batch), and awaits the acknowledgements: the loop
    serves other tasks meanwhile. Handing a record to librdkafka does not
    block (a full local queue is a failure, not a wait).

    One producer serves every event loop and thread: it is made at the
    first publish, with a thread named ``access_audit_kafka`` that serves its
    delivery reports. :meth:`aclose` (or :meth:`close` from synchronous
    code) waits for records in flight and closes it; a later publish makes
    a new one.

    Parameters: as :class:`~access_audit_kafka.ProducerSettings`.
    """

    async def __aenter__(self) -> AsyncKafkaPlugin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @hookimpl
    async def audit_events_committed(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> None:
        """Produce the committed batch; return once Kafka acknowledged every event.

        :raises KafkaPublishError: an event was not acknowledged.
        """
        await self.publish(envelopes)

    async def publish(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> list[confluent_kafka.Message]:
        """Produce *envelopes* in order; return the acknowledged records.

        :raises KafkaPublishError: an event was not acknowledged.
        """
        batch = tuple(envelopes)
        if not batch:
            return []
        deliveries, refused = self._produce(batch)
        if deliveries:
            # Waiting neither cancels nor consumes them: a report that comes
            # after the wait (or after the caller was cancelled) is dropped.
            await asyncio.wait(
                [asyncio.wrap_future(delivery) for delivery in deliveries],
                timeout=self.timeout + REPORT_GRACE,
            )
        self._outcome(batch, deliveries, refused)
        return [delivery.result() for delivery in deliveries]

    async def aclose(self) -> None:
        """:meth:`close` without blocking the loop: waits in a worker thread."""
        await asyncio.to_thread(self.close)
