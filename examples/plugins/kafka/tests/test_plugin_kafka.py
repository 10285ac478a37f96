"""examples/plugins/kafka: the installed access-audit-kafka package, against
librdkafka's mock cluster.

Delivery tests commit through a real SQLite session with a plugin attached
and read the test's topic back with a consumer (see kafka_support.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import access_audit_kafka
import broker_support
import confluent_kafka
import pytest
from access_audit_kafka import (
    THREAD_NAME,
    AsyncKafkaPlugin,
    KafkaPlugin,
    KafkaPublishError,
    from_env,
)
from kafka_support import MockCluster, dead_servers, new_topic, read_topic
from sqlalchemy import Engine
from support import operation

from access_audit import AuditEventEnvelope

Plugin = KafkaPlugin | AsyncKafkaPlugin


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


def plugin_threads() -> int:
    return sum(t.name == THREAD_NAME for t in threading.enumerate())


def publish(plugin: Plugin, batch: list[AuditEventEnvelope]) -> list[Any]:
    """What the hook does, from synchronous code (an async plugin on a fresh loop)."""
    if isinstance(plugin, AsyncKafkaPlugin):
        return asyncio.run(plugin.publish(batch))
    return plugin.publish(batch)


@pytest.fixture
def make_plugin(cluster: MockCluster) -> Iterator[Callable[..., Plugin]]:
    """Make plugins of either kind (``kind="sync"|"async"``) on the mock
    cluster; close them after."""
    with broker_support.plugin_maker(
        KafkaPlugin,
        AsyncKafkaPlugin,
        {"bootstrap_servers": cluster.bootstrap_servers},
        closing=lambda plugin: plugin.close(),  # either kind's close() blocks
    ) as make:
        yield make
    assert plugin_threads() == 0


# An emitter with a plugin as "kafka", a recorder and a failure log.
attach = functools.partial(broker_support.attach, "kafka")


# A stand-alone envelope, as a relay rebuilds one from its row.
envelope = broker_support.envelope


# -- the package and its entry point ------------------------------------------


def test_package_is_installed_and_its_entry_point_is_loaded() -> None:
    """access-audit-kafka is installed and AuditEmitter() registers its plugin as "kafka"."""
    broker_support.assert_entry_point_is_loaded(
        "access-audit-kafka", "kafka", access_audit_kafka
    )


@pytest.mark.skipif(
    "ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS" in os.environ,
    reason="ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS is set: the entry point is configured",
)
def test_unconfigured_entry_point_has_no_hook_and_is_no_outbox_recipient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS the plugin implements nothing."""
    broker_support.assert_unconfigured_entry_point_is_no_outbox_recipient(
        caplog,
        "kafka",
        access_audit_kafka,
        "ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS is not set: access_audit_kafka "
        "produces nothing",
        "BOOTSTRAP_SERVERS is unset",
    )
    assert plugin_threads() == 0


def test_from_env_reads_every_variable() -> None:
    """from_env maps ACCESS_AUDIT_KAFKA_* onto the constructor's arguments."""
    plugin = from_env(
        {
            "ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS": "k1:9092, k2:9092",
            "ACCESS_AUDIT_KAFKA_TOPIC": "prod.audit",
            "ACCESS_AUDIT_KAFKA_TIMEOUT": "12.5",
            "ACCESS_AUDIT_KAFKA_CONFIG": '{"security.protocol": "SASL_SSL", "linger.ms": 20}',
        }
    )
    assert isinstance(plugin, KafkaPlugin)
    assert (plugin.bootstrap_servers, plugin.topic) == ("k1:9092,k2:9092", "prod.audit")
    assert plugin.timeout == 12.5
    assert plugin.config == {"security.protocol": "SASL_SSL", "linger.ms": 20}
    defaults = from_env({"ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS": "k1:9092"})
    assert isinstance(defaults, KafkaPlugin)
    assert (defaults.topic, defaults.timeout, defaults.config) == ("audit", 30.0, {})
    assert plugin_threads() == 0  # nothing is started before a publish


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS", "k1"),
        ("ACCESS_AUDIT_KAFKA_TOPIC", "audit events"),
        ("ACCESS_AUDIT_KAFKA_TIMEOUT", "soon"),
        ("ACCESS_AUDIT_KAFKA_CONFIG", "linger.ms=5"),
        ("ACCESS_AUDIT_KAFKA_CONFIG", '["acks"]'),
        ("ACCESS_AUDIT_KAFKA_CONFIG", '{"acks": "1"}'),
    ],
    ids=[
        "servers-no-port",
        "topic-space",
        "timeout-text",
        "config-not-json",
        "config-not-object",
        "config-acks",
    ],
)
def test_from_env_rejects_invalid_values(variable: str, value: str) -> None:
    """An invalid variable raises ValueError naming it."""
    environ = {"ACCESS_AUDIT_KAFKA_BOOTSTRAP_SERVERS": "k1:9092", variable: value}
    with pytest.raises(ValueError, match=r"^ACCESS_AUDIT_KAFKA_"):
        from_env(environ)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"bootstrap_servers": ""}, "bootstrap_servers"),
        ({"bootstrap_servers": "k1:9092,"}, "bootstrap_servers"),
        ({"topic": ""}, "topic"),
        ({"topic": "a/b"}, "topic"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"config": {"enable.idempotence": False}}, "enable.idempotence"),
        ({"config": {"acks": 1}}, "acks"),
        ({"config": {"request.required.acks": 0}}, "request.required.acks"),
        ({"config": {"bootstrap.servers": "x:1"}}, "bootstrap_servers="),
        ({"config": {"delivery.timeout.ms": 10}}, "timeout="),
        ({"config": ["acks"]}, "config"),
    ],
    ids=[
        "servers-empty",
        "servers-empty-item",
        "topic-empty",
        "topic-slash",
        "timeout-zero",
        "timeout-bool",
        "config-no-idempotence",
        "config-acks-1",
        "config-acks-alias",
        "config-bootstrap",
        "config-delivery-timeout",
        "config-not-mapping",
    ],
)
def test_constructor_rejects_invalid_arguments(
    kind: str, options: dict[str, Any], named: str
) -> None:
    """Invalid arguments, or a config weakening delivery, raise ValueError naming them."""
    cls = AsyncKafkaPlugin if kind == "async" else KafkaPlugin
    with pytest.raises(ValueError, match=named):
        cls(**{"bootstrap_servers": "k1:9092", **options})


def test_producer_config_is_idempotent_acks_all_murmur2_with_the_timeout() -> None:
    """The producer is idempotent with acks=all, keys partition as Java's do, and
    further properties pass through."""
    plugin = KafkaPlugin(
        "k1:9092",
        timeout=2.5,
        config={"linger.ms": 20, "enable.idempotence": "true", "acks": -1},
    )
    config = plugin.producer_config(logging.getLogger("test"))
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["message.timeout.ms"] == 2500
    assert config["partitioner"] == "murmur2_random"
    assert (config["bootstrap.servers"], config["linger.ms"]) == ("k1:9092", 20)


# -- delivery -------------------------------------------------------------------


def test_commits_are_produced_once_keyed_by_target_with_the_id_header(
    cluster: MockCluster,
    topic: str,
    make_plugin: Callable[..., Plugin],
    memory_engine: Engine,
) -> None:
    """Each committed event is one record: key target_type:target_id, id header,
    value the envelope JSON; a rolled-back one is not produced."""
    maker, recorder, failures = attach(memory_engine, make_plugin(topic=topic))
    broker_support.commit_three_and_roll_back_one(maker)
    committed = {str(e.id): e for e in recorder.events}
    assert [e.target_id for e in recorder.events] == ["alpha", "admins", "beta"]
    records = read_topic(cluster.bootstrap_servers, topic)
    assert sorted(r.id for r in records) == sorted(committed)
    for found in records:
        sent = committed[found.id]
        assert found.key == f"{sent.target_type}:{sent.target_id}"
        assert found.headers == {
            "id": str(sent.id).encode(),
            "type": sent.event_type.encode(),
        }
        assert AuditEventEnvelope.from_dict(json.loads(found.value)) == sent
    assert failures.calls == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_each_targets_events_share_a_partition_in_commit_order(
    cluster: MockCluster, topic: str, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """Concurrent batches (threads, or tasks on one loop) for 8 targets: every
    event lands once, each target in one partition, its events in order."""
    plugin = make_plugin(kind, topic=topic)
    targets = [f"t{n}" for n in range(8)]
    # Four writers, each sending ten batches that touch every target once.
    batches = [
        [
            [envelope(target, {"writer": w, "n": n}) for target in targets]
            for n in range(10)
        ]
        for w in range(4)
    ]
    acknowledged: list[Any] = []
    if isinstance(plugin, AsyncKafkaPlugin):

        async def writer(w: int) -> None:
            for batch in batches[w]:
                acknowledged.extend(await plugin.publish(batch))

        async def main() -> None:
            await asyncio.gather(*(writer(w) for w in range(4)))

        asyncio.run(main())
    else:

        def write(w: int) -> None:
            for batch in batches[w]:
                acknowledged.extend(plugin.publish(batch))

        workers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert plugin_threads() == 1  # one producer, one polling thread
    records = read_topic(cluster.bootstrap_servers, topic)
    assert len(records) == len(acknowledged) == 320
    assert len({r.id for r in records}) == 320
    assert {(m.partition(), m.offset()) for m in acknowledged} == {
        (r.partition, r.offset) for r in records
    }
    partitions = {
        r.key: {s.partition for s in records if s.key == r.key} for r in records
    }
    assert all(len(found) == 1 for found in partitions.values())
    assert len(set().union(*partitions.values())) > 1  # the targets are spread
    for target in targets:
        # Per target and writer, the partition holds the batches' order.
        for w in range(4):
            numbers = [
                json.loads(r.value)["payload"]["n"]
                for r in records
                if r.key == f"group:{target}"
                and json.loads(r.value)["payload"]["writer"] == w
            ]
            assert numbers == list(range(10))


def test_async_session_commits_produce_on_the_applications_loop(
    cluster: MockCluster, topic: str, make_plugin: Callable[..., Plugin]
) -> None:
    """AsyncSession commits are produced once each, awaited on the app's loop."""
    plugin = make_plugin("async", topic=topic)
    assert isinstance(plugin, AsyncKafkaPlugin)
    recorder = broker_support.commit_twice_on_the_applications_loop(
        plugin,
        "kafka",
        lambda: plugin.running,
        (False, True, False),
        loop_ran_meanwhile=True,
    )
    assert sorted(r.id for r in read_topic(cluster.bootstrap_servers, topic)) == sorted(
        str(e.id) for e in recorder.events
    )


def test_async_plugin_from_a_sync_session(
    cluster: MockCluster,
    topic: str,
    make_plugin: Callable[..., Plugin],
    memory_engine: Engine,
) -> None:
    """A sync commit awaits the async hook on the emitter's loop."""
    maker, recorder, failures = attach(memory_engine, make_plugin("async", topic=topic))
    with maker() as session:
        operation(session, "sync")
        session.commit()
    assert failures.calls == []
    assert [r.id for r in read_topic(cluster.bootstrap_servers, topic)] == [
        str(recorder.events[0].id)
    ]


def test_sync_plugin_makes_its_producer_at_first_publish_and_close_stops_it(
    cluster: MockCluster, topic: str, make_plugin: Callable[..., Plugin]
) -> None:
    """No producer or thread before the first publish; close() stops them (twice
    is fine); publishing again makes a new producer."""
    plugin = make_plugin(topic=topic)
    assert isinstance(plugin, KafkaPlugin)
    assert (plugin.running, plugin_threads()) == (False, 0)
    first, second = envelope("1"), envelope("2")
    (message,) = plugin.publish([first])
    assert (message.topic(), message.error()) == (topic, None)
    assert (plugin.running, plugin_threads()) == (True, 1)
    plugin.close()
    plugin.close()
    assert (plugin.running, plugin_threads()) == (False, 0)
    with plugin:
        plugin.publish([second])
    assert (plugin.running, plugin_threads()) == (False, 0)
    assert sorted(r.id for r in read_topic(cluster.bootstrap_servers, topic)) == sorted(
        [str(first.id), str(second.id)]
    )
    assert plugin.publish([]) == []


# -- failures -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unreachable_cluster_fails_the_hook_after_the_timeout_and_the_outbox_keeps_it(
    cluster: MockCluster,
    topic: str,
    make_plugin: Callable[..., Plugin],
    tmp_path: Path,
    kind: str,
) -> None:
    """No broker: the record times out, the hook raises, audit_delivery_failed
    fires, and the relay delivers it once the cluster is there."""
    with broker_support.outbox_database(tmp_path, models=True) as database:
        servers = dead_servers()
        down = make_plugin(kind, bootstrap_servers=servers, topic=topic, timeout=1)
        envelopes, error = broker_support.fail_one_commit(
            database, down, "kafka", seconds=(1, 4)
        )
        assert isinstance(error, KafkaPublishError)
        assert (error.envelope, error.delivered) == (envelopes[0], 0)
        assert "_MSG_TIMED_OUT" in str(error)
        assert servers in str(error)

        up = make_plugin(kind, topic=topic)
        broker_support.relay_once(database, up, "kafka", 1, backoff=0)
        assert [r.id for r in read_topic(cluster.bootstrap_servers, topic)] == [
            str(envelopes[0].id)
        ]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_cluster_that_goes_away_leaves_the_batch_unacknowledged(
    make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """Produced fine, then the cluster stops: the next batch is not acknowledged
    within timeout and publish raises, naming the first event."""
    gone = MockCluster()
    try:
        # 2 s: enough for a new producer's first batch on a busy machine (it
        # fetches metadata and a producer id, and the topic is created).
        plugin = make_plugin(kind, bootstrap_servers=gone.bootstrap_servers, timeout=2)
        publish(plugin, [envelope("before")])
    finally:
        gone.close()
    batch = [envelope("after-1"), envelope("after-2")]
    started = time.monotonic()
    with pytest.raises(KafkaPublishError, match="_MSG_TIMED_OUT") as raised:
        publish(plugin, batch)
    assert 2 <= time.monotonic() - started < 6
    assert (raised.value.envelopes, raised.value.delivered) == (tuple(batch), 0)
    assert raised.value.envelope is batch[0]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_record_librdkafka_refuses_fails_the_batch_after_those_before_it(
    cluster: MockCluster, topic: str, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """A record over message.max.bytes is refused at once: the error names it and
    counts the events before it, which were acknowledged."""
    plugin = make_plugin(kind, topic=topic, config={"message.max.bytes": 2000})
    small, large, after = (
        envelope("small"),
        envelope("large", {"x": "y" * 5000}),
        envelope("after"),
    )
    with pytest.raises(KafkaPublishError, match="MSG_SIZE_TOO_LARGE") as raised:
        publish(plugin, [small, large, after])
    assert (raised.value.envelope, raised.value.delivered) == (large, 1)
    assert isinstance(raised.value.__cause__, confluent_kafka.KafkaException)
    assert [r.id for r in read_topic(cluster.bootstrap_servers, topic)] == [
        str(small.id)
    ]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_after_a_fatal_producer_error_the_next_publish_uses_a_new_producer(
    cluster: MockCluster, topic: str, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """A fatal error (an idempotent producer out of sequence, which the mock
    cluster cannot be made to send) retires the producer and its thread."""
    plugin = make_plugin(kind, topic=topic)
    first, second = envelope("first"), envelope("second")
    publish(plugin, [first])
    retired = plugin._reports
    assert retired is not None
    # What librdkafka's error callback receives for such an error.
    retired._error(
        confluent_kafka.KafkaError(
            confluent_kafka.KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "lost", fatal=True
        )
    )
    publish(plugin, [second])
    assert plugin._reports is not None and plugin._reports is not retired
    assert plugin_threads() == 1  # the retired producer's thread stopped
    assert sorted(r.id for r in read_topic(cluster.bootstrap_servers, topic)) == sorted(
        [str(first.id), str(second.id)]
    )
