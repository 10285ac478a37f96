"""End to end: an app SIGKILLed after COMMIT, the relay, a de-duplicating consumer.

The application (a child process) commits through an outbox emitter whose
"redis" plugin is the real :class:`~access_audit_redis.RedisStreamPlugin`,
and is killed with SIGKILL inside that plugin's hook: after appending some
batches (whose delivery was therefore never recorded) and before appending
the last one. A relay then delivers every committed event, and a consumer
reading the stream through a consumer group, de-duplicating by the ``id``
field, sees each committed event exactly once, in commit order.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import broker_support
import pytest
import redis
from access_audit_redis import AsyncRedisStreamPlugin, RedisStreamPlugin
from redis_support import REDIS_URL, Entry, Stream, fresh_stream


class DeduplicatingConsumer(broker_support.Deduplicating[dict[str, str]]):
    """Reads a stream through a consumer group; processes each ``id`` once,
    acknowledging every entry."""

    def __init__(self, client: redis.Redis, key: str, group: str) -> None:
        super().__init__()
        self.client, self.key, self.group = client, key, group
        client.xgroup_create(key, group, id="0", mkstream=True)

    def drain(self) -> None:
        """Read and acknowledge everything new for the group."""
        while True:
            reply = self.client.xreadgroup(
                self.group, "consumer-1", {self.key: ">"}, count=100
            )
            entries: list[Entry] = reply[0][1] if reply else []
            if not entries:
                return
            for entry_id, fields in entries:
                self.receive(fields["id"], fields)
                self.client.xack(self.key, self.group, entry_id)


@pytest.fixture
def stream() -> Iterator[Stream]:
    """A fresh stream key, deleted afterwards; skips (fails under CI) without Redis."""
    with fresh_stream() as created:
        yield created


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_killed_application_relay_and_deduplicating_consumer_see_each_event_once(
    stream: Stream, tmp_path: Path, kind: str
) -> None:
    """SIGKILL after COMMIT: the relay (sync or async plugin) delivers, the
    consumer de-duplicating by id sees every committed event exactly once."""
    with broker_support.outbox_database(tmp_path) as database:
        rows = broker_support.kill_application_after_commit(
            tmp_path,
            database,
            plugin="access_audit_redis:RedisStreamPlugin",
            url=REDIS_URL,
            destination=("stream", stream.key),
            name="redis",
            targets=broker_support.TARGETS_PER_COMMIT,
        )
        committed = broker_support.committed_targets(broker_support.TARGETS_PER_COMMIT)
        appended_before_kill = [f["id"] for _, f in stream.entries()]
        assert appended_before_kill == [row["id"] for row in rows[:-2]]

        cls = AsyncRedisStreamPlugin if kind == "async" else RedisStreamPlugin
        broker_support.relay_everything(
            database, cls(REDIS_URL, stream=stream.key), "redis", len(rows)
        )

        consumer = DeduplicatingConsumer(stream.client, stream.key, "audit-readers")
        consumer.drain()
        # The batches appended before the kill were appended again by the relay.
        assert consumer.read == len(committed) + len(appended_before_kill)
        assert [fields["id"] for fields in consumer.processed] == [
            row["id"] for row in rows
        ]
        assert [fields["key"] for fields in consumer.processed] == [
            f"item:{target}" for target in committed
        ]
        pending = stream.client.xpending(stream.key, "audit-readers")
        assert pending["pending"] == 0  # every entry was acknowledged
