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

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from access_audit_redis import AsyncRedisStreamPlugin, RedisStreamPlugin
from redis_support import REDIS_URL, Entry, Stream, fresh_stream
from sqlalchemy import Engine, create_engine
from support import outbox_rows

from access_audit import AuditEmitter
from access_audit.outbox import Outbox, count_pending

COMMITS = 4  # the first COMMITS - 1 are appended before the kill, the last is not

APPLICATION = """
import sys
import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from access_audit import AuditEmitter, hookimpl, stage_event
from access_audit.outbox import Outbox
from access_audit_redis import RedisStreamPlugin

database_url, redis_url, stream, commits = sys.argv[1:5]
engine = create_engine(database_url)
entered = threading.Semaphore(0)
never = threading.Event()


class KilledInItsHook(RedisStreamPlugin):
    # The real plugin, which appends a batch staged as "sent-..." and then
    # hangs (its delivery is never recorded), and hangs before appending
    # any other: the process is killed in here.
    @hookimpl
    def audit_events_committed(self, envelopes):
        if envelopes[0].target_id.startswith("sent-"):
            self.publish(envelopes)
        entered.release()
        never.wait()


emitter = AuditEmitter(load_entrypoints=False, outbox=Outbox())
emitter.register(KilledInItsHook(redis_url, stream=stream), name="redis")


def commit(prefix, index):
    with Session(engine) as session:
        emitter.attach(session)
        for n in range(2):
            stage_event(
                session, "item_updated", target_type="item",
                target_id=f"{prefix}-{index}-{n}", action="update",
            )
        session.commit()


for index in range(int(commits)):
    with Session(engine) as session:  # rolled back: never delivered
        emitter.attach(session)
        stage_event(session, "item_updated", target_type="item",
                    target_id=f"rolled-back-{index}", action="update")
        session.rollback()
    prefix = "sent" if index < int(commits) - 1 else "held"
    # Each commit hangs in its delivery, so each gets a thread of its own.
    threading.Thread(target=commit, args=(prefix, index), daemon=True).start()
    entered.acquire()
print("hanging", flush=True)
never.wait()
"""


class DeduplicatingConsumer:
    """Reads a stream through a consumer group; processes each ``id`` once.

    What the README tells consumers to do: remember the ids processed (here
    in memory; in production in the store the consumer writes to, in the
    same transaction), skip an entry whose id was seen, acknowledge every
    entry either way.
    """

    def __init__(self, client: redis.Redis, key: str, group: str) -> None:
        self.client, self.key, self.group = client, key, group
        self.seen: set[str] = set()
        self.processed: list[dict[str, str]] = []
        self.read = 0
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
                self.read += 1
                if fields["id"] not in self.seen:
                    self.seen.add(fields["id"])
                    self.processed.append(fields)
                self.client.xack(self.key, self.group, entry_id)


@pytest.fixture
def stream() -> Iterator[Stream]:
    """A fresh stream key, deleted afterwards; skips (fails under CI) without Redis."""
    with fresh_stream() as created:
        yield created


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[Engine, Outbox]]:
    """A file SQLite database with the outbox tables; the relay's Outbox."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(engine)
    yield engine, outbox
    engine.dispose()


def run_application_until_killed(tmp_path: Path, engine: Engine, key: str) -> None:
    """Start the application, wait until every commit hangs, SIGKILL it."""
    script = tmp_path / "application.py"
    script.write_text(APPLICATION)
    child = subprocess.Popen(
        [sys.executable, str(script), str(engine.url), REDIS_URL, key, str(COMMITS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, child.kill)
    watchdog.start()
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "hanging\n", line or child.communicate()[1]
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_killed_application_relay_and_deduplicating_consumer_see_each_event_once(
    stream: Stream, database: tuple[Engine, Outbox], tmp_path: Path, kind: str
) -> None:
    """SIGKILL after COMMIT: the relay (sync or async plugin) delivers, the
    consumer de-duplicating by id sees every committed event exactly once."""
    engine, outbox = database
    run_application_until_killed(tmp_path, engine, stream.key)

    committed = [
        f"{'sent' if index < COMMITS - 1 else 'held'}-{index}-{n}"
        for index in range(COMMITS)
        for n in range(2)
    ]
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == committed
    assert [row["states"] for row in rows] == [{}] * len(committed)  # none recorded
    appended_before_kill = [f["id"] for _, f in stream.entries()]
    assert appended_before_kill == [row["id"] for row in rows[:-2]]

    plugin = (
        AsyncRedisStreamPlugin(REDIS_URL, stream=stream.key)
        if kind == "async"
        else RedisStreamPlugin(REDIS_URL, stream=stream.key)
    )
    relay = AuditEmitter(load_entrypoints=False, outbox=outbox)
    relay.register(plugin, name="redis")
    try:
        stats = relay.relay(engine, once=True)
        assert (stats.delivered, stats.failed) == (len(committed), 0)
        assert count_pending(engine, outbox) == 0
        assert outbox_rows(engine, outbox) == []
        again = relay.relay(engine, once=True)
        assert again.delivered == 0
    finally:
        if isinstance(plugin, AsyncRedisStreamPlugin):
            asyncio.run(plugin.aclose())
        else:
            plugin.close()

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
