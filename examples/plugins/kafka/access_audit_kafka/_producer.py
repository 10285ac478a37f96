"""One idempotent producer and the thread that serves its delivery reports.

librdkafka sends records from threads of its own, but hands each delivery
report (acknowledged, or failed for good) to the application only from
``poll()``. A daemon thread polls for the producer's whole life, so that a
report reaches the waiting hook, sync or async, as soon as it exists:
each produced record gets a :class:`concurrent.futures.Future`, resolved by
its report.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

import confluent_kafka

from ._settings import Record

__all__ = ["THREAD_NAME", "Delivery", "DeliveryFailed", "DeliveryReports"]

THREAD_NAME = "access_audit_kafka"
"""The name of the thread that polls a plugin's producer."""

logger = logging.getLogger("access_audit_kafka")

Delivery = concurrent.futures.Future[confluent_kafka.Message]
"""A record's delivery: its acknowledged message, or a :class:`DeliveryFailed`."""


class DeliveryFailed(Exception):
    """Kafka reported a record as not delivered; ``error`` is librdkafka's."""

    def __init__(self, error: confluent_kafka.KafkaError) -> None:
        super().__init__(f"{error.name()}: {error.str()}")
        self.error = error


class DeliveryReports:
    """A producer and its polling thread (named :data:`THREAD_NAME`).

    :ivar fatal: the fatal error the producer reported, if any: an
        idempotent producer that lost track of its sequence numbers cannot
        produce again, and must be replaced.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.fatal: confluent_kafka.KafkaError | None = None
        self.producer = confluent_kafka.Producer({**config, "error_cb": self._error})
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._poll, name=THREAD_NAME, daemon=True
        )
        self._thread.start()

    def send(self, topic: str, record: Record) -> Delivery:
        """Produce *record*; its delivery, resolved by its report.

        :raises confluent_kafka.KafkaException: librdkafka refused the record
            at once (too large, a fatal state).
        :raises BufferError: the producer's local queue is full.
        """
        key, value, headers = record
        delivery: Delivery = concurrent.futures.Future()
        self.producer.produce(
            topic,
            value=value,
            key=key,
            headers=headers,
            on_delivery=lambda error, message: _report(delivery, error, message),
        )
        return delivery

    def close(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for records in flight, then stop polling."""
        try:
            left = self.producer.flush(timeout)
            if left:
                logger.warning("%d audit record(s) were not delivered at close", left)
        finally:
            self._stop.set()
            self._thread.join()

    def abandon(self) -> None:
        """Stop polling at once; records in flight are left undelivered."""
        self._stop.set()
        self.producer.purge()
        self.producer.poll(0)  # their reports: each one's waiter is told
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.1)

    def _error(self, error: confluent_kafka.KafkaError) -> None:
        if error.fatal():
            self.fatal = error
            logger.error("the Kafka producer failed for good: %s", error.str())
        else:
            # Transient (a broker down, all brokers down): librdkafka retries
            # until each record's timeout; its report tells the hook.
            logger.warning("Kafka: %s", error.str())


def _report(
    delivery: Delivery,
    error: confluent_kafka.KafkaError | None,
    message: confluent_kafka.Message,
) -> None:
    try:
        if error is None:
            delivery.set_result(message)
        else:
            delivery.set_exception(DeliveryFailed(error))
    except concurrent.futures.InvalidStateError:
        pass  # its waiter gave up (cancelled it): nobody to tell
