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

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from access_audit_rabbitmq import AsyncRabbitMQPlugin, RabbitMQPlugin
from rabbitmq_support import RABBITMQ_URL, Queue, Received, fresh_queue
from sqlalchemy import Engine, create_engine
from support import outbox_rows

from access_audit import AuditEmitter
from access_audit.outbox import Outbox, count_pending

COMMITS = 4  # the first COMMITS - 1 are published before the kill, the last is not

APPLICATION = """
import sys
import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from access_audit import AuditEmitter, hookimpl, stage_event
from access_audit.outbox import Outbox
from access_audit_rabbitmq import RabbitMQPlugin

database_url, amqp_url, queue, commits = sys.argv[1:5]
engine = create_engine(database_url)
entered = threading.Semaphore(0)
never = threading.Event()


class KilledInItsHook(RabbitMQPlugin):
    # The real plugin, which publishes a batch staged as "sent-..." (and has
    # it confirmed) and then hangs, so its delivery is never recorded; and
    # hangs before publishing any other: the process is killed in here.
    @hookimpl
    def audit_events_committed(self, envelopes):
        if envelopes[0].target_id.startswith("sent-"):
            self.publish(envelopes)
        entered.release()
        never.wait()


emitter = AuditEmitter(load_entrypoints=False, outbox=Outbox())
emitter.register(KilledInItsHook(amqp_url, routing_key=queue), name="rabbitmq")


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
    """Processes each ``message_id`` once, acknowledging every message.

    What the README tells consumers to do: remember the ids processed (here
    in memory; in production in the store the consumer writes to, in the
    same transaction), skip a message whose id was seen, ack either way.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.processed: list[Received] = []
        self.read = 0

    def consume(self, messages: list[Received]) -> None:
        for message in messages:
            self.read += 1
            assert message.message_id is not None
            if message.message_id not in self.seen:
                self.seen.add(message.message_id)
                self.processed.append(message)


@pytest.fixture
def queue() -> Iterator[Queue]:
    """A fresh quorum queue, deleted afterwards; skips (fails under CI) without RabbitMQ."""
    with fresh_queue() as created:
        yield created


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[Engine, Outbox]]:
    """A file SQLite database with the outbox tables; the relay's Outbox."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(engine)
    yield engine, outbox
    engine.dispose()


def run_application_until_killed(tmp_path: Path, engine: Engine, name: str) -> None:
    """Start the application, wait until every commit hangs, SIGKILL it."""
    script = tmp_path / "application.py"
    script.write_text(APPLICATION)
    child = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(engine.url),
            RABBITMQ_URL,
            name,
            str(COMMITS),
        ],
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
    queue: Queue, database: tuple[Engine, Outbox], tmp_path: Path, kind: str
) -> None:
    """SIGKILL after COMMIT: the relay (sync or async plugin) delivers, the
    consumer de-duplicating by message_id sees every committed event once."""
    engine, outbox = database
    run_application_until_killed(tmp_path, engine, queue.name)

    committed = [
        f"{'sent' if index < COMMITS - 1 else 'held'}-{index}-{n}"
        for index in range(COMMITS)
        for n in range(2)
    ]
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == committed
    assert [row["states"] for row in rows] == [{}] * len(committed)  # none recorded
    published_before_kill = len(committed) - 2
    assert queue.count() == published_before_kill  # confirmed, so durable

    plugin = (
        AsyncRabbitMQPlugin(RABBITMQ_URL, routing_key=queue.name)
        if kind == "async"
        else RabbitMQPlugin(RABBITMQ_URL, routing_key=queue.name)
    )
    relay = AuditEmitter(load_entrypoints=False, outbox=outbox)
    relay.register(plugin, name="rabbitmq")
    try:
        stats = relay.relay(engine, once=True)
        assert (stats.delivered, stats.failed) == (len(committed), 0)
        assert count_pending(engine, outbox) == 0
        assert outbox_rows(engine, outbox) == []
        again = relay.relay(engine, once=True)
        assert again.delivered == 0
    finally:
        if isinstance(plugin, AsyncRabbitMQPlugin):
            asyncio.run(plugin.aclose())
        else:
            plugin.close()

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
