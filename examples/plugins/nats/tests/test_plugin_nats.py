"""examples/plugins/nats: the installed access-audit-nats package, against real NATS.

Every delivery test commits through a real SQLite session with a
:class:`~access_audit_nats.JetStreamPublisher` attached, then reads the
JetStream stream back. Each test gets a memory stream of its own, capturing
``<unique prefix>.>`` with a 120 s duplicate window, deleted afterwards.
The server is ``ACCESS_AUDIT_TEST_NATS_URL`` (``nats://127.0.0.1:4222``);
if it cannot be reached the tests skip, except under ``CI=true``, where they
fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import access_audit_nats
import nats.aio.client
import pytest
from access_audit_nats import JetStreamPublisher, JetStreamPublishError
from cloudevents.core.formats.json import JSONFormat
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StorageType, StreamConfig
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from support import Base, Failures, Item, Recorder, operation, reach, stored_names

from access_audit import AuditEmitter, AuditEventEnvelope, stage_event

NATS_URL = os.environ.get("ACCESS_AUDIT_TEST_NATS_URL", "nats://127.0.0.1:4222")
THREAD_NAME = "access_audit_nats"  # the loop thread the plugin used to own
EMITTER_LOOP_THREAD = "access_audit-asyncio"
T = TypeVar("T")


def admin(operation: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """Run one JetStream call on a short-lived connection of the test's own."""

    async def main() -> T:
        client = nats.aio.client.Client()
        try:
            # connect() keeps retrying an unreachable server for minutes.
            await asyncio.wait_for(
                client.connect(NATS_URL, connect_timeout=2, allow_reconnect=False), 3
            )
            return await operation(client.jetstream(timeout=5))
        finally:
            await client.close()

    return asyncio.run(main())


def plugin_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def emitter_loop_threads() -> int:
    return sum(t.name == EMITTER_LOOP_THREAD for t in threading.enumerate())


def on_a_loop(publisher: JetStreamPublisher, work: Callable[[], Awaitable[T]]) -> T:
    """Await ``work()`` on a fresh loop, then close the publisher's connections."""

    async def main() -> T:
        try:
            return await work()
        finally:
            await publisher.aclose()

    return asyncio.run(main())


@dataclasses.dataclass
class Stream:
    """A test stream capturing ``<prefix>.>``."""

    name: str
    prefix: str

    def messages(self) -> list[RawStreamMsg]:
        """Every message in the stream, in stream order."""

        async def read(js: JetStreamContext) -> list[RawStreamMsg]:
            state = (await js.stream_info(self.name)).state
            if not state.messages:
                return []
            return [
                await js.get_msg(self.name, seq)
                for seq in range(state.first_seq, state.last_seq + 1)
            ]

        return admin(read)

    def count(self) -> int:
        async def count(js: JetStreamContext) -> int:
            return (await js.stream_info(self.name)).state.messages

        return admin(count)


@pytest.fixture
def stream() -> Iterator[Stream]:
    """A fresh memory stream with a 120 s duplicate window; deleted afterwards.

    The server is asked once per run whether JetStream is there: if not, every
    test that needs a stream skips (fails under ``CI=true``).
    """
    reach(f"NATS JetStream at {NATS_URL}", lambda: admin(lambda js: js.account_info()))
    token = uuid.uuid4().hex[:12]
    created = Stream(name=f"AUDIT_TEST_{token.upper()}", prefix=f"audit_test_{token}")
    config = StreamConfig(
        name=created.name,
        subjects=[f"{created.prefix}.>"],
        storage=StorageType.MEMORY,
        duplicate_window=120,
    )
    admin(lambda js: js.add_stream(config))
    yield created
    assert admin(lambda js: js.delete_stream(created.name))


@dataclasses.dataclass
class Harness:
    """An in-memory SQLite database, an emitter with the publisher, recorders."""

    publisher: JetStreamPublisher
    engine: Engine
    maker: sessionmaker[Session]
    recorder: Recorder
    failures: Failures


@pytest.fixture
def make_harness(memory_engine: Engine) -> Iterator[Callable[..., Harness]]:
    """Build harnesses around publishers; close them; the plugin owns no thread."""
    made: list[Harness] = []

    def make(**options: Any) -> Harness:
        publisher = JetStreamPublisher(**{"servers": NATS_URL, **options})
        recorder, failures = Recorder(), Failures()
        emitter = AuditEmitter([recorder, failures], load_entrypoints=False)
        emitter.register(publisher, name="nats")
        maker = sessionmaker(memory_engine)
        emitter.attach(maker)
        harness = Harness(publisher, memory_engine, maker, recorder, failures)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.publisher.close()
    assert plugin_threads() == []


def stage(
    session: Session | AsyncSession, event_type: str, target_id: str, **fields: Any
) -> None:
    stage_event(
        session,
        event_type,
        target_type="group",
        target_id=target_id,
        action="update",
        **fields,
    )


def ids(envelopes: Sequence[AuditEventEnvelope]) -> list[str]:
    return [str(envelope.id) for envelope in envelopes]


def test_package_is_installed_and_its_entry_point_is_loaded() -> None:
    """access-audit-nats is installed and AuditEmitter() registers its plugin as "nats"."""
    distribution = importlib.metadata.distribution("access-audit-nats")
    entry_points = [
        ep for ep in distribution.entry_points if ep.group == "access_audit"
    ]
    assert [(ep.name, ep.value) for ep in entry_points] == [
        ("nats", "access_audit_nats:plugin")
    ]
    emitter = AuditEmitter(load_entrypoints=True)
    assert emitter.plugin_manager.get_plugin("nats") is access_audit_nats.plugin
    assert isinstance(access_audit_nats.plugin, JetStreamPublisher)


@pytest.mark.skipif(
    "ACCESS_AUDIT_NATS_URL" in os.environ,
    reason="ACCESS_AUDIT_NATS_URL is set: the entry-point plugin is configured",
)
def test_entry_point_plugin_is_inert_without_url(
    caplog: pytest.LogCaptureFixture, memory_engine: Engine
) -> None:
    """Without ACCESS_AUDIT_NATS_URL the plugin starts nothing, logs nothing, raises nothing."""
    with caplog.at_level(logging.DEBUG, logger="access_audit_nats"):
        inert = JetStreamPublisher.from_env({})
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    caplog.clear()
    failures = Failures()
    emitter = AuditEmitter([failures], load_entrypoints=True)
    emitter.register(inert, name="inert")
    maker = sessionmaker(memory_engine)
    emitter.attach(maker)
    with caplog.at_level(logging.DEBUG, logger="access_audit_nats"), maker() as session:
        operation(session, "quiet")
        session.commit()
    for plugin in (inert, access_audit_nats.plugin):
        assert not plugin.enabled
        assert repr(plugin) == "<JetStreamPublisher inert>"
        asyncio.run(plugin.audit_events_committed(()))
        with pytest.raises(RuntimeError, match="ACCESS_AUDIT_NATS_URL"):
            asyncio.run(plugin.publish(()))
        assert plugin.connections == 0
    assert failures.calls == []
    assert caplog.records == []
    assert plugin_threads() == []


def test_from_env_reads_every_variable() -> None:
    """from_env maps ACCESS_AUDIT_NATS_* onto the constructor's arguments."""
    publisher = JetStreamPublisher.from_env(
        {
            "ACCESS_AUDIT_NATS_URL": "nats://a:4222, nats://user:s3cret@b:4223",
            "ACCESS_AUDIT_NATS_SUBJECT_PREFIX": "prod.audit",
            "ACCESS_AUDIT_NATS_TIMEOUT": "2.5",
            "ACCESS_AUDIT_NATS_CLOUDEVENTS": "yes",
            "ACCESS_AUDIT_NATS_SOURCE": "/services/access-app",
            "ACCESS_AUDIT_NATS_STREAM": "AUDIT",
        }
    )
    assert publisher.enabled
    assert publisher.servers == ("nats://a:4222", "nats://user:s3cret@b:4223")
    assert (publisher.subject_prefix, publisher.timeout) == ("prod.audit", 2.5)
    assert (publisher.cloudevents, publisher.source) == (True, "/services/access-app")
    assert publisher.stream == "AUDIT"
    assert "s3cret" not in repr(publisher)
    assert "nats://***@b:4223" in repr(publisher)
    assert "tok3n" not in repr(JetStreamPublisher("nats://tok3n@[::1]:4222"))
    assert "nats://***@[::1]:4222" in repr(
        JetStreamPublisher("nats://tok3n@[::1]:4222")
    )
    defaults = JetStreamPublisher.from_env({"ACCESS_AUDIT_NATS_URL": "nats://h"})
    assert (defaults.subject_prefix, defaults.timeout) == ("audit", 5.0)
    assert (defaults.cloudevents, defaults.stream) == (False, None)
    assert plugin_threads() == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ACCESS_AUDIT_NATS_TIMEOUT", "soon"),
        ("ACCESS_AUDIT_NATS_TIMEOUT", "0"),
        ("ACCESS_AUDIT_NATS_CLOUDEVENTS", "maybe"),
        ("ACCESS_AUDIT_NATS_SUBJECT_PREFIX", "audit.*"),
        ("ACCESS_AUDIT_NATS_SUBJECT_PREFIX", "audit."),
        ("ACCESS_AUDIT_NATS_SOURCE", ""),
        ("ACCESS_AUDIT_NATS_STREAM", "A.B"),
    ],
    ids=[
        "timeout-text",
        "timeout-zero",
        "cloudevents-not-bool",
        "prefix-wildcard",
        "prefix-empty-token",
        "source-empty",
        "stream-dot",
    ],
)
def test_from_env_rejects_invalid_values(variable: str, value: str) -> None:
    """An invalid variable raises ValueError naming what is wrong."""
    environ = {"ACCESS_AUDIT_NATS_URL": NATS_URL, variable: value}
    with pytest.raises(ValueError, match=f"^{variable}="):
        JetStreamPublisher.from_env(environ)


def test_commits_are_published_once_in_order_with_msg_id(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """Each committed event is one message on prefix.event_type, Nats-Msg-Id = id."""
    harness = make_harness(subject_prefix=stream.prefix)
    with harness.maker() as session:
        operation(session, "alpha")
        stage(
            session,
            "group_member_added",
            "admins",
            payload={"member": "alice", "roles": ["owner"]},
            metadata={"ip_address": "192.0.2.1"},
        )
        session.commit()
        stage(session, "group.member_removed", "admins", reason="left")
        session.commit()
    committed = harness.recorder.events
    assert [e.event_type for e in committed] == [
        "item_created",
        "group_member_added",
        "group.member_removed",
    ]
    messages = stream.messages()
    assert [m.subject for m in messages] == [
        f"{stream.prefix}.item_created",
        f"{stream.prefix}.group_member_added",
        f"{stream.prefix}.group.member_removed",
    ]
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in messages] == ids(committed)
    assert {(m.headers or {}).get("Content-Type") for m in messages} == {
        "application/json"
    }
    for message, envelope in zip(messages, committed, strict=True):
        assert message.data is not None
        assert json.loads(message.data) == envelope.to_dict()
        assert AuditEventEnvelope.from_dict(json.loads(message.data)) == envelope
    assert harness.failures.calls == []
    assert stored_names(harness.engine) == ["alpha"]


def test_rolled_back_transactions_publish_nothing(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """rollback() and a failing session.begin() block publish nothing."""
    harness = make_harness(subject_prefix=stream.prefix)
    with harness.maker() as session:
        operation(session, "beta")
        session.rollback()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), harness.maker.begin() as session:
        operation(session, "gamma")
        raise Boom
    assert stream.count() == 0
    assert harness.recorder.events == []
    with harness.maker() as session:
        operation(session, "delta")
        session.commit()
    messages = stream.messages()
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in messages] == ids(
        harness.recorder.events
    )
    assert harness.recorder.names == ["delta"]
    assert stored_names(harness.engine) == ["delta"]


def test_redelivery_is_dropped_by_jetstream_duplicate_window(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """Publishing the same envelopes again stores nothing: acks say duplicate=True."""
    harness = make_harness(subject_prefix=stream.prefix)
    with harness.maker() as session:
        operation(session, "one")
        operation(session, "two")
        session.commit()
    (batch,) = harness.recorder.batches
    stored = stream.messages()
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in stored] == ids(batch)

    # What an at-least-once relay does: the hook again, then envelopes rebuilt
    # from their stored JSON (new objects, same ids).
    on_a_loop(
        harness.publisher, lambda: harness.publisher.audit_events_committed(batch)
    )
    rebuilt = [AuditEventEnvelope.from_dict(e.to_dict()) for e in batch]
    acks = on_a_loop(harness.publisher, lambda: harness.publisher.publish(rebuilt))
    assert [ack.duplicate for ack in acks] == [True, True]
    assert [ack.seq for ack in acks] == [m.seq for m in stored]
    assert {ack.stream for ack in acks} == {stream.name}
    assert stream.count() == 2

    # A new event is not a duplicate: the window drops by id only.
    with harness.maker() as session:
        operation(session, "three")
        session.commit()
    assert stream.count() == 3
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in stream.messages()] == ids(
        harness.recorder.events
    )
    assert harness.failures.calls == []


def test_cloudevents_mode_publishes_valid_structured_cloudevents(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """cloudevents=True bodies parse with the CloudEvents SDK; id is the envelope id."""
    source = "/services/access-app"
    harness = make_harness(
        subject_prefix=stream.prefix, cloudevents=True, source=source
    )
    with harness.maker() as session:
        stage(
            session,
            "group_member_added",
            "admins",
            actor_id="u1",
            actor_email="admin@example.com",
            payload={"member": "bob"},
        )
        session.commit()
    (envelope,) = harness.recorder.events
    (message,) = stream.messages()
    assert message.subject == f"{stream.prefix}.group_member_added"
    assert message.headers == {
        "Nats-Msg-Id": str(envelope.id),
        "Content-Type": "application/cloudevents+json",
    }
    assert message.data is not None
    event = JSONFormat().read(None, message.data)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == str(envelope.id)
    assert event.get_source() == source
    assert event.get_type() == "access_audit.group_member_added"
    assert event.get_subject() == "group/admins"
    assert event.get_time() == envelope.timestamp
    assert event.get_data() == envelope.to_cloudevent(source=source)["data"]
    assert json.loads(message.data) == envelope.to_cloudevent(source=source)
    assert b"admin@example.com" not in message.data.split(b'"data"')[0]


async def make_async_maker(emitter: AuditEmitter) -> tuple[Any, Any]:
    """An in-memory aiosqlite engine with the test tables, and its attached maker."""
    engine = create_async_engine("sqlite+aiosqlite://")
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    maker = async_sessionmaker(engine)
    emitter.attach(maker)
    return engine, maker


def test_async_session_commits_publish_on_the_applications_loop(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """AsyncSession commits publish once each, Msg-Id = id, on the app's loop, no thread."""
    harness = make_harness(subject_prefix=stream.prefix)
    publisher = harness.publisher
    emitter = AuditEmitter([harness.recorder, harness.failures], load_entrypoints=False)
    emitter.register(publisher, name="nats")
    loop_threads = emitter_loop_threads()

    async def main() -> list[str]:
        engine, maker = await make_async_maker(emitter)
        try:
            async with maker() as session:
                session.add(Item(name="async"))
                stage(session, "group_member_added", "async")
                await session.commit()
                stage(session, "group.member_removed", "async")
                await session.commit()
            # The connection was made on this loop, and no thread was started
            # for it: neither a plugin thread nor the emitter's loop thread.
            assert publisher.connections == 1
            assert plugin_threads() == []
            assert emitter_loop_threads() == loop_threads
            async with maker() as session:
                return list(await session.scalars(select(Item.name)))
        finally:
            await publisher.aclose()
            await engine.dispose()

    assert asyncio.run(main()) == ["async"]
    assert publisher.connections == 0
    assert harness.failures.calls == []
    committed = harness.recorder.events
    assert [e.event_type for e in committed] == [
        "group_member_added",
        "group.member_removed",
    ]
    messages = stream.messages()
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in messages] == ids(committed)
    assert [m.subject for m in messages] == [
        f"{stream.prefix}.group_member_added",
        f"{stream.prefix}.group.member_removed",
    ]


def test_sync_session_publishes_on_the_emitters_loop_one_connection_per_loop(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """A sync commit uses a connection on the emitter's loop; each loop has its own."""
    harness = make_harness(subject_prefix=stream.prefix)
    publisher = harness.publisher
    with harness.maker() as session:
        operation(session, "sync-1")
        session.commit()
    assert publisher.connections == 1  # made on the emitter's loop
    assert plugin_threads() == []

    emitter = AuditEmitter([harness.recorder, harness.failures], load_entrypoints=False)
    emitter.register(publisher, name="nats")

    async def main() -> None:
        engine, maker = await make_async_maker(emitter)
        try:
            async with maker() as session:
                stage(session, "group_member_added", "async")
                await session.commit()
            assert publisher.connections == 2  # the emitter's loop's, and this one's
            with pytest.raises(RuntimeError, match="aclose"):
                publisher.close()  # would block the loop that must drain it
            await publisher.aclose()  # both, each on its own loop
            assert publisher.connections == 0
        finally:
            await engine.dispose()

    asyncio.run(main())
    with harness.maker() as session:  # a new connection on the emitter's loop
        operation(session, "sync-2")
        session.commit()
    assert publisher.connections == 1
    publisher.close()
    publisher.close()
    assert publisher.connections == 0
    assert harness.failures.calls == []
    assert harness.recorder.names == ["sync-1", "async", "sync-2"]
    messages = stream.messages()
    assert len(messages) == 3
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in messages] == ids(
        harness.recorder.events
    )


def test_concurrent_commits_share_one_connection(
    stream: Stream, make_harness: Callable[..., Harness]
) -> None:
    """Commits from several threads are all published once, each batch in order."""
    harness = make_harness(subject_prefix=stream.prefix)
    errors: list[BaseException] = []

    def commit_some(worker: int) -> None:
        try:
            for n in range(5):
                with harness.maker() as session:  # no SQL: events only
                    stage(session, "group_member_added", f"w{worker}-{n}")
                    stage(session, "group_member_removed", f"w{worker}-{n}")
                    session.commit()
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=commit_some, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert harness.failures.calls == []
    assert plugin_threads() == []
    assert harness.publisher.connections == 1  # all on the emitter's loop
    messages = stream.messages()
    assert len(messages) == 40
    by_id = {str(e.id): e for e in harness.recorder.events}
    published = [by_id[(m.headers or {})["Nats-Msg-Id"]] for m in messages]
    assert sorted(ids(published)) == sorted(by_id)
    for transaction in {e.transaction_id for e in published}:
        sequences = [e.sequence for e in published if e.transaction_id == transaction]
        assert sequences == [0, 1]


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def commit_and_expect_failure(harness: Harness) -> tuple[JetStreamPublishError, float]:
    """Commit one event; the commit succeeds and the publisher's failure is reported."""
    started = time.monotonic()
    with harness.maker() as session:
        operation(session, "kept")
        session.commit()
    elapsed = time.monotonic() - started
    assert stored_names(harness.engine) == ["kept"]
    assert harness.recorder.names == ["kept"]
    ((name, envelopes, error),) = harness.failures.calls
    assert name == "nats"
    assert envelopes == tuple(harness.recorder.events)
    assert isinstance(error, JetStreamPublishError)
    assert error.envelope is envelopes[0]
    assert str(envelopes[0].id) in str(error)
    return error, elapsed


def test_unreachable_server_raises_after_timeout_and_commit_succeeds(
    make_harness: Callable[..., Harness],
) -> None:
    """Nothing listening: the hook raises after timeout, audit_delivery_failed fires."""
    url = f"nats://127.0.0.1:{free_port()}"
    harness = make_harness(servers=url, timeout=0.3)
    error, elapsed = commit_and_expect_failure(harness)
    assert 0.3 <= elapsed < 3
    assert url in str(error)
    # asyncio.TimeoutError is the builtin TimeoutError only from Python 3.11 on.
    assert isinstance(error.__cause__, (TimeoutError, asyncio.TimeoutError))
    assert error.acknowledged == 0
    # The session and the plugin stay usable: the next commit is tried again.
    with pytest.raises(JetStreamPublishError, match="could not connect"):
        on_a_loop(
            harness.publisher,
            lambda: harness.publisher.publish(harness.recorder.events),
        )


def test_async_session_publish_failure_is_reported_and_the_loop_keeps_running(
    make_harness: Callable[..., Harness],
) -> None:
    """An unacknowledged publish in an AsyncSession commit reaches audit_delivery_failed;
    the application's loop runs other tasks while the publisher waits."""
    harness = make_harness(servers=f"nats://127.0.0.1:{free_port()}", timeout=0.5)
    emitter = AuditEmitter([harness.recorder, harness.failures], load_entrypoints=False)
    emitter.register(harness.publisher, name="nats")
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main() -> None:
        engine, maker = await make_async_maker(emitter)
        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            async with maker() as session:
                session.add(Item(name="kept"))
                stage(session, "group_member_added", "kept")
                await session.commit()
            async with maker() as session:
                assert list(await session.scalars(select(Item.name))) == ["kept"]
        finally:
            ticker.cancel()
            await harness.publisher.aclose()
            await engine.dispose()

    asyncio.run(main())
    ((name, envelopes, error),) = harness.failures.calls
    assert name == "nats"
    assert envelopes == tuple(harness.recorder.events)
    assert isinstance(error, JetStreamPublishError)
    assert "could not connect" in str(error)
    assert error.envelope is envelopes[0]
    # About 50 ticks in the 0.5 s wait; a loop blocked by the publisher has none.
    assert len(ticks) >= 20


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"subject_prefix": "audit_nostream_" + uuid.uuid4().hex[:8]}, "no response"),
        ({"stream": "AUDIT_NOT_THIS_ONE"}, "expected stream does not match"),
    ],
    ids=["no-stream-captures-subject", "wrong-expected-stream"],
)
def test_refused_publish_raises_and_commit_succeeds(
    stream: Stream,
    make_harness: Callable[..., Harness],
    options: dict[str, Any],
    reason: str,
) -> None:
    """JetStream not storing the event raises from the hook; nothing is stored."""
    harness = make_harness(**{"subject_prefix": stream.prefix, **options})
    error, _ = commit_and_expect_failure(harness)
    assert reason in str(error).lower()
    assert error.subject.endswith(".item_created")
    assert stream.count() == 0


def test_aclose_drains_is_idempotent_and_a_later_publish_reconnects(
    stream: Stream,
) -> None:
    """aclose() closes the loop's connection, twice is fine; publishing reconnects."""
    envelope = AuditEventEnvelope.from_dict(
        {
            "id": str(uuid.uuid4()),
            "event_type": "group_member_added",
            "timestamp": "2024-05-01T12:00:00+00:00",
            "staged_at": "2024-05-01T12:00:00+00:00",
            "actor_id": "system",
            "actor_email": None,
            "target_type": "group",
            "target_id": "g",
            "target_name": None,
            "action": "add",
            "reason": None,
            "payload": {},
            "metadata": {},
            "transaction_id": str(uuid.uuid4()),
            "sequence": 0,
        }
    )

    async def main() -> tuple[Any, Any]:
        async with JetStreamPublisher(NATS_URL, subject_prefix=stream.prefix) as pub:
            assert pub.connections == 0  # nothing is made before the first publish
            (first,) = await pub.publish([envelope])
            assert pub.connections == 1
            await pub.aclose()
            await pub.aclose()
            assert pub.connections == 0
            (again,) = await pub.publish([envelope])
            assert pub.connections == 1
        assert pub.connections == 0
        return first, again

    first, again = asyncio.run(main())
    assert plugin_threads() == []
    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert stream.count() == 1


@pytest.mark.parametrize(
    "options",
    [
        {"subject_prefix": ""},
        {"subject_prefix": "audit.>"},
        {"subject_prefix": "au dit"},
        {"timeout": 0},
        {"timeout": True},
        {"source": ""},
        {"stream": "with space"},
    ],
    ids=[
        "prefix-empty",
        "prefix-wildcard",
        "prefix-space",
        "timeout-zero",
        "timeout-bool",
        "source-empty",
        "stream-space",
    ],
)
def test_constructor_rejects_invalid_arguments(options: dict[str, Any]) -> None:
    """Invalid constructor arguments raise ValueError naming the argument."""
    (name,) = options
    with pytest.raises(ValueError, match=name):
        JetStreamPublisher(NATS_URL, **options)
