"""``KafkaPlugin``: the sync hook; and what it shares with the async one.

Both produce through one :class:`~access_audit_kafka._producer.DeliveryReports`
(a thread-safe librdkafka producer and its polling thread), made at the
first publish; they differ only in how the hook waits for the reports.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import confluent_kafka

from access_audit import hookimpl

from ._producer import Delivery, DeliveryFailed, DeliveryReports
from ._settings import ProducerSettings

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["KafkaPlugin", "ProducerOwner"]

logger = logging.getLogger("access_audit_kafka")

# How much longer than ``timeout`` a hook waits for librdkafka's report,
# which comes at the latest when a record's timeout has passed.
REPORT_GRACE = 5.0

# Producers a forked child inherited: never used, and never destroyed (their
# librdkafka threads are the parent's, and destroying would wait for them).
_inherited: list[DeliveryReports] = []


class ProducerOwner(ProducerSettings):
    """Owns the producer: makes it at the first publish, replaces it after a
    fatal error, closes it. Parameters: as
    :class:`~access_audit_kafka.ProducerSettings`."""

    def _setup(self) -> None:
        self._reports: DeliveryReports | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            reference = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget(reference))

    @property
    def running(self) -> bool:
        """Whether the plugin holds a producer (and its polling thread) now."""
        return self._reports is not None

    def close(self) -> None:
        """Wait up to ``timeout`` for records in flight, then close the producer.

        Idempotent; a later publish makes a new producer.
        """
        with self._lock:
            reports, self._reports = self._reports, None
        if reports is not None:
            reports.close(self.timeout)

    def _produce(
        self, batch: tuple[AuditEventEnvelope, ...]
    ) -> tuple[list[Delivery], BaseException | None]:
        """Hand *batch* to librdkafka in order; the deliveries of those it took,
        and why it refused the next one, if it did."""
        reports = self._producer()
        deliveries: list[Delivery] = []
        for envelope in batch:
            try:
                deliveries.append(reports.send(self.topic, self.record_for(envelope)))
            except (confluent_kafka.KafkaException, BufferError) as error:
                return deliveries, error
        return deliveries, None

    def _outcome(
        self,
        batch: tuple[AuditEventEnvelope, ...],
        deliveries: list[Delivery],
        refused: BaseException | None,
    ) -> None:
        """Raise for the first event of *batch* not delivered, if any.

        :raises KafkaPublishError: an event was refused, reported failed, or
            not reported within ``timeout`` plus a grace period.
        """
        delivered = sum(d.done() and d.exception() is None for d in deliveries)
        for envelope, delivery in zip(batch, deliveries, strict=False):
            if not delivery.done():
                error = TimeoutError(
                    f"no delivery report within {self.timeout + REPORT_GRACE} s"
                )
                raise self.error(batch, envelope, delivered, str(error)) from error
            failure = delivery.exception()
            if failure is not None:
                if isinstance(failure, DeliveryFailed) and failure.error.fatal():
                    self._replace_after(failure.error)
                raise self.error(batch, envelope, delivered, str(failure)) from failure
        if refused is not None:
            envelope = batch[len(deliveries)]
            raise self.error(
                batch, envelope, delivered, f"{type(refused).__name__}: {refused}"
            ) from refused

    def _producer(self) -> DeliveryReports:
        with self._lock:
            reports = self._reports
            if reports is not None and reports.fatal is not None:
                self._reports = None
                reports.abandon()
                reports = None
            if reports is None:
                reports = self._reports = DeliveryReports(
                    self.producer_config(
                        logging.getLogger("access_audit_kafka.librdkafka")
                    )
                )
            return reports

    def _replace_after(self, error: confluent_kafka.KafkaError) -> None:
        """Make the next publish use a new producer (this one failed for good)."""
        reports = self._reports
        if reports is not None and reports.fatal is None:
            reports.fatal = error


class KafkaPlugin(ProducerOwner):
    """Produce each committed event to a Kafka topic; return once Kafka acknowledged it.

    Each event becomes one record keyed ``target_type:target_id``, with the
    envelope id in the ``id`` header (see
    :class:`~access_audit_kafka.ProducerSettings`), produced by an idempotent
    producer (``enable.idempotence``, ``acks=all``). The hook returns once
    Kafka acknowledged every event of the batch: an acknowledged record is
    in every in-sync replica of its partition. The first event that is
    refused (too large), not acknowledged within ``timeout`` (librdkafka
    retries until then), or failed otherwise raises
    :class:`~access_audit_kafka.KafkaPublishError`, so access_audit logs it,
    calls ``audit_delivery_failed`` and, with an outbox, keeps the batch for
    the relay; the commit itself does not fail.

    **Ordering**: a target's events share a key, so a partition, where the
    idempotent producer keeps them in the order produced, retries included.
    **De-duplication key**: the ``id`` header. Idempotence drops the
    duplicates of librdkafka's own retries only; an event produced again
    (the outbox re-delivering it) is a new record: consumers skip ids they
    have processed.

    The hook is synchronous: it blocks the committing thread (or the
    emitter's worker, or the relay) until the batch is acknowledged. One
    producer, made at the first publish, serves every thread; a thread
    named ``access_audit_kafka`` serves its delivery reports. After a fatal
    producer error the next publish makes a new producer. :meth:`close`
    waits for records in flight and closes it. A forked child makes its own.

    Parameters: as :class:`~access_audit_kafka.ProducerSettings`.
    """

    def __enter__(self) -> KafkaPlugin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Produce the committed batch; return once Kafka acknowledged every event.

        :raises KafkaPublishError: an event was not acknowledged.
        """
        self.publish(envelopes)

    def publish(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> list[confluent_kafka.Message]:
        """Produce *envelopes* in order; return the acknowledged records.

        Each returned message says where its record is (``partition()``,
        ``offset()``).

        :raises KafkaPublishError: an event was not acknowledged.
        """
        batch = tuple(envelopes)
        if not batch:
            return []
        deliveries, refused = self._produce(batch)
        concurrent.futures.wait(deliveries, timeout=self.timeout + REPORT_GRACE)
        self._outcome(batch, deliveries, refused)
        return [delivery.result() for delivery in deliveries]


def _forget(reference: weakref.ref[ProducerOwner]) -> None:
    owner = reference()
    if owner is not None:
        owner._lock = threading.Lock()
        if owner._reports is not None:
            _inherited.append(owner._reports)
        owner._reports = None
