"""End to end: an app SIGKILLed after COMMIT, the relay, a de-duplicating consumer.

The application (a child process) commits through an outbox emitter whose
"rabbitmq" plugin is the real :class:`~access_audit_rabbitmq.RabbitMQPlugin`,
and is killed with SIGKILL inside that plugin's hook: after publishing some
batches (confirmed by the broker, but their delivery never recorded) and
before publishing the last one. A relay then delivers every committed
event, and a consumer of the quorum queue that de-duplicates by
``message_id`` sees each committed event exactly once, in commit order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import broker_support
import pytest
from access_audit_rabbitmq import AsyncRabbitMQPlugin, RabbitMQPlugin
from rabbitmq_support import RABBITMQ_URL, Queue, Received, fresh_queue


class DeduplicatingConsumer(broker_support.Deduplicating[Received]):
    """Processes each ``message_id`` once (the queue acknowledged every message)."""

    def consume(self, messages: list[Received]) -> None:
        for message in messages:
            assert message.message_id is not None
            self.receive(message.message_id, message)


@pytest.fixture
def queue() -> Iterator[Queue]:
    """A fresh quorum queue, deleted afterwards; skips (fails under CI) without RabbitMQ."""
    with fresh_queue() as created:
        yield created


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_killed_application_relay_and_deduplicating_consumer_see_each_event_once(
    queue: Queue, tmp_path: Path, kind: str
) -> None:
    """SIGKILL after COMMIT: the relay (sync or async plugin) delivers, the
    consumer de-duplicating by message_id sees every committed event once."""
    with broker_support.outbox_database(tmp_path) as database:
        rows = broker_support.kill_application_after_commit(
            tmp_path,
            database,
            plugin="access_audit_rabbitmq:RabbitMQPlugin",
            url=RABBITMQ_URL,
            destination=("routing_key", queue.name),
            name="rabbitmq",
            targets=broker_support.TARGETS_PER_COMMIT,
        )
        committed = broker_support.committed_targets(broker_support.TARGETS_PER_COMMIT)
        published_before_kill = len(committed) - 2
        assert queue.count() == published_before_kill  # confirmed, so durable

        cls = AsyncRabbitMQPlugin if kind == "async" else RabbitMQPlugin
        plugin = cls(RABBITMQ_URL, routing_key=queue.name)
        broker_support.relay_everything(database, plugin, "rabbitmq", len(rows))

        consumer = DeduplicatingConsumer()
        consumer.consume(queue.take())
        # The batches published before the kill were published again by the relay.
        assert consumer.read == len(committed) + published_before_kill
        assert [m.message_id for m in consumer.processed] == [row["id"] for row in rows]
        assert [m.headers["key"] for m in consumer.processed] == [
            f"item:{target}" for target in committed
        ]
        assert {m.delivery_mode for m in consumer.processed} == {2}  # persistent
        assert queue.count() == 0  # every message was acknowledged
