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

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import confluent_kafka
import pytest
from access_audit_kafka import AsyncKafkaPlugin, KafkaPlugin
from kafka_support import MockCluster, Record, logger, new_topic, read_topic, record
from sqlalchemy import Engine, create_engine
from support import outbox_rows

from access_audit import AuditEmitter
from access_audit.outbox import Outbox, count_pending

COMMITS = 4  # the first COMMITS - 1 are produced before the kill, the last is not

APPLICATION = """
import sys
import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from access_audit import AuditEmitter, hookimpl, stage_event
from access_audit.outbox import Outbox
from access_audit_kafka import KafkaPlugin

database_url, bootstrap_servers, topic, commits = sys.argv[1:5]
engine = create_engine(database_url)
entered = threading.Semaphore(0)
never = threading.Event()


class KilledInItsHook(KafkaPlugin):
    # The real plugin, which produces a batch staged as "sent-..." (and has
    # it acknowledged) and then hangs, so its delivery is never recorded;
    # and hangs before producing any other: the process is killed in here.
    @hookimpl
    def audit_events_committed(self, envelopes):
        if envelopes[0].payload["sent"]:
            self.publish(envelopes)
        entered.release()
        never.wait()


emitter = AuditEmitter(load_entrypoints=False, outbox=Outbox())
emitter.register(KilledInItsHook(bootstrap_servers, topic=topic), name="kafka")


def commit(index, sent):
    with Session(engine) as session:
        emitter.attach(session)
        # Two targets, each touched by every commit: their order is checked.
        for target in ("a", "b"):
            stage_event(
                session, "item_updated", target_type="item", target_id=target,
                action="update", payload={"commit": index, "sent": sent},
            )
        session.commit()


for index in range(int(commits)):
    with Session(engine) as session:  # rolled back: never delivered
        emitter.attach(session)
        stage_event(session, "item_updated", target_type="item", target_id="a",
                    action="update", payload={"commit": -1, "sent": True})
        session.rollback()
    # Each commit hangs in its delivery, so each gets a thread of its own.
    sent = index < int(commits) - 1
    threading.Thread(target=commit, args=(index, sent), daemon=True).start()
    entered.acquire()
print("hanging", flush=True)
never.wait()
"""


class DeduplicatingConsumer:
    """A consumer group member that processes each ``id`` header once.

    What the README tells consumers to do: remember the ids processed (here
    in memory; in production in the store the consumer writes to, in the
    same transaction), skip a record whose id was seen, commit offsets
    either way.
    """

    def __init__(self, bootstrap_servers: str, name: str, group: str) -> None:
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
        self.seen: set[str] = set()
        self.processed: list[Record] = []
        self.read = 0

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
            self.read += 1
            if found.id not in self.seen:
                self.seen.add(found.id)
                self.processed.append(found)
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


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[Engine, Outbox]]:
    """A file SQLite database with the outbox tables; the relay's Outbox."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(engine)
    yield engine, outbox
    engine.dispose()


def run_application_until_killed(
    tmp_path: Path, engine: Engine, bootstrap_servers: str, name: str
) -> None:
    """Start the application, wait until every commit hangs, SIGKILL it."""
    script = tmp_path / "application.py"
    script.write_text(APPLICATION)
    arguments = [str(engine.url), bootstrap_servers, name, str(COMMITS)]
    child = subprocess.Popen(
        [sys.executable, str(script), *arguments],
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
    cluster: MockCluster,
    topic: str,
    database: tuple[Engine, Outbox],
    tmp_path: Path,
    kind: str,
) -> None:
    """SIGKILL after COMMIT: the relay (sync or async plugin) delivers, the
    consumer de-duplicating by the id header sees every committed event once."""
    engine, outbox = database
    run_application_until_killed(tmp_path, engine, cluster.bootstrap_servers, topic)

    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["a", "b"] * COMMITS
    assert [row["states"] for row in rows] == [{}] * len(rows)  # none recorded
    produced_before_kill = len(read_topic(cluster.bootstrap_servers, topic))
    assert produced_before_kill == len(rows) - 2  # acknowledged, so stored

    plugin = (
        AsyncKafkaPlugin(cluster.bootstrap_servers, topic=topic)
        if kind == "async"
        else KafkaPlugin(cluster.bootstrap_servers, topic=topic)
    )
    relay = AuditEmitter(load_entrypoints=False, outbox=outbox)
    relay.register(plugin, name="kafka")
    try:
        stats = relay.relay(engine, once=True)
        assert (stats.delivered, stats.failed) == (len(rows), 0)
        assert count_pending(engine, outbox) == 0
        assert outbox_rows(engine, outbox) == []
        again = relay.relay(engine, once=True)
        assert again.delivered == 0
    finally:
        plugin.close()

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
