"""End to end: an app SIGKILLed after COMMIT, the relay, a de-duplicating consumer.

The application (a child process) commits through an outbox emitter whose
"kafka" plugin is the real :class:`~access_audit_kafka.KafkaPlugin`,
producing to this process's librdkafka mock cluster, and is killed with
SIGKILL inside that plugin's hook: after producing some batches
(acknowledged, but their delivery never recorded) and before producing the
last one. A relay then delivers every committed event, and a consumer group
member that de-duplicates by the ``id`` header sees each committed event
exactly once, each target's events in commit order.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import broker_support
import confluent_kafka
import pytest
from access_audit_kafka import AsyncKafkaPlugin, KafkaPlugin
from kafka_support import MockCluster, Record, logger, new_topic, read_topic, record


class DeduplicatingConsumer(broker_support.Deduplicating[Record]):
    """A consumer group member that processes each ``id`` header once,
    committing the offset of every record."""

    def __init__(self, bootstrap_servers: str, name: str, group: str) -> None:
        super().__init__()
        self.consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "logger": logger,
            }
        )
        self.consumer.subscribe([name])

    def consume(self, expected: int, timeout: float = 30) -> None:
        """Read until *expected* records were read (or fail after *timeout*)."""
        deadline = time.monotonic() + timeout
        while self.read < expected:
            assert time.monotonic() < deadline, f"read {self.read} of {expected}"
            message = self.consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            found = record(message)
            self.receive(found.id, found)
            self.consumer.commit(message, asynchronous=False)

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[MockCluster]:
    """The module's librdkafka mock cluster."""
    started = MockCluster()
    yield started
    started.close()


@pytest.fixture
def topic() -> str:
    """A topic of the test's own."""
    return new_topic()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_killed_application_relay_and_deduplicating_consumer_see_each_event_once(
    cluster: MockCluster,
    topic: str,
    tmp_path: Path,
    kind: str,
) -> None:
    """SIGKILL after COMMIT: the relay (sync or async plugin) delivers, the
    consumer de-duplicating by the id header sees every committed event once."""
    with broker_support.outbox_database(tmp_path) as database:
        rows = broker_support.kill_application_after_commit(
            tmp_path,
            database,
            plugin="access_audit_kafka:KafkaPlugin",
            url=cluster.bootstrap_servers,
            destination=("topic", topic),
            name="kafka",
            targets=broker_support.TARGETS_SHARED,
        )
        assert [row["aggregateid"] for row in rows] == [
            "a",
            "b",
        ] * broker_support.COMMITS
        produced_before_kill = len(read_topic(cluster.bootstrap_servers, topic))
        assert produced_before_kill == len(rows) - 2  # acknowledged, so stored

        cls = AsyncKafkaPlugin if kind == "async" else KafkaPlugin
        plugin = cls(cluster.bootstrap_servers, topic=topic)
        # Either kind closes with close() (an AsyncKafkaPlugin's blocks, too).
        broker_support.relay_everything(
            database, plugin, "kafka", len(rows), closing=lambda p: p.close()
        )

        consumer = DeduplicatingConsumer(
            cluster.bootstrap_servers, topic, f"audit-readers-{uuid.uuid4().hex}"
        )
        try:
            # The batches produced before the kill were produced again by the relay.
            consumer.consume(len(rows) + produced_before_kill)
            assert sorted(r.id for r in consumer.processed) == sorted(
                row["id"] for row in rows
            )
            for target in ("a", "b"):
                ids = [row["id"] for row in rows if row["aggregateid"] == target]
                # Each target's events, de-duplicated, in commit order.
                assert [
                    r.id for r in consumer.processed if r.key == f"item:{target}"
                ] == ids
            assert consumer.consumer.poll(1.0) is None  # and nothing more
        finally:
            consumer.close()
