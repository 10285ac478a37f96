"""What the access-audit-kafka tests share: librdkafka's mock cluster, a reader.

No Kafka server is needed: a mock cluster serves each test module, and each
test produces to a topic of its own (:func:`new_topic`).

A module with a name no other package uses, and no conftest.py: the core
suite's modules import ``conftest`` by name, and would get whichever
conftest.py pytest loaded last. The test modules make their fixtures
from these helpers.

The mock cluster is librdkafka's own (``test.mock.num.brokers``): a client
configured with it starts an in-process Kafka cluster listening on
localhost, which lives as long as that client. :class:`MockCluster` keeps
such a client and gives the cluster's address to every other client,
the plugin's producer, the tests' consumers, and other processes, as their
``bootstrap.servers``. It auto-creates a topic (4 partitions) at its first
use.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import uuid

import confluent_kafka

logger = logging.getLogger("kafka_support.librdkafka")


class MockCluster:
    """A one-broker librdkafka mock cluster, up until :meth:`close`."""

    def __init__(self) -> None:
        self._holder: confluent_kafka.Producer | None = confluent_kafka.Producer(
            {"test.mock.num.brokers": 1, "logger": logger}
        )
        brokers = self._holder.list_topics(timeout=10).brokers.values()
        self.bootstrap_servers = ",".join(f"{b.host}:{b.port}" for b in brokers)

    def close(self) -> None:
        """Stop the cluster (its brokers stop listening)."""
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.flush(1)
            del holder


@dataclasses.dataclass(frozen=True)
class Record:
    """A record as a consumer read it."""

    partition: int
    offset: int
    key: str
    value: bytes
    headers: dict[str, bytes]

    @property
    def id(self) -> str:
        return self.headers["id"].decode()


def record(message: confluent_kafka.Message) -> Record:
    key, value = message.key(), message.value()
    partition, offset = message.partition(), message.offset()
    assert key is not None and value is not None
    assert partition is not None and offset is not None
    return Record(
        partition,
        offset,
        key.decode(),
        value,
        {name: bytes(data or b"") for name, data in message.headers() or []},
    )


def read_topic(bootstrap_servers: str, topic: str) -> list[Record]:
    """Every record of *topic*, partition by partition, each in offset order."""
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "logger": logger,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            return []  # never produced to
        counts: dict[int, int] = {}
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(
                confluent_kafka.TopicPartition(topic, partition), timeout=10
            )
            if high > low:
                counts[partition] = high - low
        consumer.assign(
            [
                confluent_kafka.TopicPartition(
                    topic, partition, confluent_kafka.OFFSET_BEGINNING
                )
                for partition in counts
            ]
        )
        read: list[Record] = []
        deadline = time.monotonic() + 20
        while len(read) < sum(counts.values()) and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            assert message.error() is None, message.error()
            read.append(record(message))
        assert len(read) == sum(counts.values()), "the topic was not read to its end"
        return sorted(read, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def new_topic() -> str:
    """A topic name no other test uses (auto-created at first use)."""
    return f"access_audit_test.{uuid.uuid4().hex}"


def dead_servers() -> str:
    """Bootstrap servers on a local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"
