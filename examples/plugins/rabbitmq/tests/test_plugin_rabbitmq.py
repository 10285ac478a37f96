"""examples/plugins/rabbitmq: the installed access-audit-rabbitmq package, against real RabbitMQ.

Delivery tests commit through a real SQLite session with a plugin attached
and read the test's quorum queue back (see conftest.py for the broker).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import access_audit_rabbitmq
import aio_pika
import aiormq
import broker_support
import pytest
from access_audit_rabbitmq import (
    THREAD_NAME,
    AsyncRabbitMQPlugin,
    RabbitMQPlugin,
    RabbitMQPublishError,
    from_env,
)
from aio_pika.abc import AbstractChannel
from rabbitmq_support import (
    RABBITMQ_URL,
    FreezingProxy,
    Queue,
    admin,
    dead_url,
    fresh_queue,
    reach_broker,
)
from sqlalchemy import Engine
from support import operation

from access_audit import AuditEventEnvelope

Plugin = RabbitMQPlugin | AsyncRabbitMQPlugin


@pytest.fixture
def queue() -> Iterator[Queue]:
    """A fresh quorum queue, deleted afterwards; skips (fails under CI) without RabbitMQ."""
    with fresh_queue() as created:
        yield created


@pytest.fixture
def proxy() -> Iterator[FreezingProxy]:
    """A proxy to the broker that the test can freeze."""
    created = FreezingProxy(reach_broker())
    yield created
    created.close()


def plugin_threads() -> int:
    return sum(t.name == THREAD_NAME for t in threading.enumerate())


def publish(plugin: Plugin, batch: list[AuditEventEnvelope]) -> None:
    """What the hook does, from synchronous code (an async plugin on a fresh loop)."""
    if isinstance(plugin, AsyncRabbitMQPlugin):

        async def publish_and_close() -> None:
            try:
                await plugin.publish(batch)
            finally:
                await plugin.aclose()

        asyncio.run(publish_and_close())
    else:
        plugin.publish(batch)


@pytest.fixture
def make_plugin() -> Iterator[Callable[..., Plugin]]:
    """Make plugins of either kind (``kind="sync"|"async"``); close them after."""
    with broker_support.plugin_maker(
        RabbitMQPlugin, AsyncRabbitMQPlugin, {"url": RABBITMQ_URL}
    ) as make:
        yield make
    assert plugin_threads() == 0


# An emitter with a plugin as "rabbitmq", a recorder and a failure log.
attach = functools.partial(broker_support.attach, "rabbitmq")


# A stand-alone envelope, as a relay rebuilds one from its row.
envelope = broker_support.envelope


# -- the package and its entry point ------------------------------------------


def test_package_is_installed_and_its_entry_point_is_loaded() -> None:
    """access-audit-rabbitmq is installed and AuditEmitter() registers it as "rabbitmq"."""
    broker_support.assert_entry_point_is_loaded(
        "access-audit-rabbitmq", "rabbitmq", access_audit_rabbitmq
    )


@pytest.mark.skipif(
    "ACCESS_AUDIT_RABBITMQ_URL" in os.environ,
    reason="ACCESS_AUDIT_RABBITMQ_URL is set: the entry-point plugin is configured",
)
def test_unconfigured_entry_point_has_no_hook_and_is_no_outbox_recipient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without ACCESS_AUDIT_RABBITMQ_URL the plugin implements nothing: rows are not for it."""
    broker_support.assert_unconfigured_entry_point_is_no_outbox_recipient(
        caplog,
        "rabbitmq",
        access_audit_rabbitmq,
        "ACCESS_AUDIT_RABBITMQ_URL is not set: access_audit_rabbitmq publishes nothing",
        "ACCESS_AUDIT_RABBITMQ_URL is unset",
    )
    assert plugin_threads() == 0


def test_from_env_reads_every_variable() -> None:
    """from_env maps ACCESS_AUDIT_RABBITMQ_* onto the constructor's arguments."""
    plugin = from_env(
        {
            "ACCESS_AUDIT_RABBITMQ_URL": "amqps://app:s3cret@mq:5671/prod",
            "ACCESS_AUDIT_RABBITMQ_EXCHANGE": "audit",
            "ACCESS_AUDIT_RABBITMQ_ROUTING_KEY": "audit.{target_type}.{event_type}",
            "ACCESS_AUDIT_RABBITMQ_TIMEOUT": "2.5",
        }
    )
    assert isinstance(plugin, RabbitMQPlugin)
    assert (plugin.url, plugin.exchange) == ("amqps://app:s3cret@mq:5671/prod", "audit")
    assert (plugin.routing_key, plugin.timeout) == (
        "audit.{target_type}.{event_type}",
        2.5,
    )
    assert "s3cret" not in repr(plugin)
    assert "amqps://app:***@mq:5671/prod" in repr(plugin)
    assert plugin.routing_key_for(envelope()) == "audit.group.member_added"
    defaults = from_env({"ACCESS_AUDIT_RABBITMQ_URL": "amqp://mq"})
    assert isinstance(defaults, RabbitMQPlugin)
    assert (defaults.exchange, defaults.routing_key, defaults.timeout) == (
        "",
        "audit",
        5.0,
    )
    assert plugin_threads() == 0  # nothing is started before a publish


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ACCESS_AUDIT_RABBITMQ_URL", "http://mq:5672"),
        ("ACCESS_AUDIT_RABBITMQ_ROUTING_KEY", "audit.{actor_id}"),
        ("ACCESS_AUDIT_RABBITMQ_ROUTING_KEY", "audit.{"),
        ("ACCESS_AUDIT_RABBITMQ_EXCHANGE", "x" * 256),
        ("ACCESS_AUDIT_RABBITMQ_TIMEOUT", "soon"),
        ("ACCESS_AUDIT_RABBITMQ_TIMEOUT", "0"),
    ],
    ids=[
        "url-scheme",
        "routing-key-placeholder",
        "routing-key-brace",
        "exchange-too-long",
        "timeout-text",
        "timeout-zero",
    ],
)
def test_from_env_rejects_invalid_values(variable: str, value: str) -> None:
    """An invalid variable raises ValueError naming it."""
    environ = {"ACCESS_AUDIT_RABBITMQ_URL": RABBITMQ_URL, variable: value}
    with pytest.raises(ValueError, match=f"^{variable}"):
        from_env(environ)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "options",
    [
        {"url": "localhost:5672"},
        {"url": "http://app:s3cret@mq"},
        {"exchange": None},
        {"routing_key": "{}"},
        {"routing_key": "{event_type!r}"},
        {"routing_key": "{event_type:>9}"},
        {"timeout": -1},
        {"timeout": True},
    ],
    ids=[
        "url-no-scheme",
        "url-http",
        "exchange-none",
        "routing-key-positional",
        "routing-key-conversion",
        "routing-key-format-spec",
        "timeout-negative",
        "timeout-bool",
    ],
)
def test_constructor_rejects_invalid_arguments(
    kind: str, options: dict[str, Any]
) -> None:
    """Invalid arguments raise ValueError naming the argument, hiding a password."""
    (name,) = options
    cls = AsyncRabbitMQPlugin if kind == "async" else RabbitMQPlugin
    with pytest.raises(ValueError, match=name) as raised:
        cls(**{"url": RABBITMQ_URL, **options})
    assert "s3cret" not in str(raised.value)


# -- delivery -------------------------------------------------------------------


def test_commits_are_published_once_in_order_persistent_with_message_id(
    queue: Queue, make_plugin: Callable[..., Plugin], memory_engine: Engine
) -> None:
    """Each committed event is one persistent message: message_id = envelope id."""
    maker, recorder, failures = attach(
        memory_engine, make_plugin(routing_key=queue.name)
    )
    broker_support.commit_three_and_roll_back_one(maker)
    committed = recorder.events
    assert [e.target_id for e in committed] == ["alpha", "admins", "beta"]
    messages = queue.take()
    assert [m.message_id for m in messages] == [str(e.id) for e in committed]
    assert [m.headers["key"] for m in messages] == [
        "item:alpha",
        "group:admins",
        "item:beta",
    ]
    assert [m.type for m in messages] == [e.event_type for e in committed]
    for message, sent in zip(messages, committed, strict=True):
        assert message.delivery_mode == 2  # persistent
        assert (message.content_type, message.app_id) == (
            "application/json",
            "access_audit",
        )
        assert (message.routing_key, message.redelivered) == (queue.name, False)
        assert AuditEventEnvelope.from_dict(json.loads(message.body)) == sent
    assert failures.calls == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_routing_key_placeholders_route_through_a_topic_exchange(
    queue: Queue, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """{target_type}/{event_type} fill the routing key; an event no binding
    matches is returned unroutable, and the hook raises."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def bind(channel: AbstractChannel) -> None:
        bound = await channel.get_queue(queue.name, ensure=False)
        await bound.bind("amq.topic", routing_key=f"{prefix}.item.#")

    admin(bind)
    plugin = make_plugin(
        kind,
        exchange="amq.topic",
        routing_key=f"{prefix}.{{target_type}}.{{event_type}}",
    )
    item = envelope("i1", target_type="item")
    publish(plugin, [item])
    (message,) = queue.take()
    assert (message.message_id, message.routing_key) == (
        str(item.id),
        f"{prefix}.item.member_added",
    )
    group = envelope("g1")
    with pytest.raises(RabbitMQPublishError, match="NO_ROUTE") as raised:
        publish(plugin, [group])
    assert isinstance(raised.value.__cause__, aiormq.exceptions.PublishError)
    assert f"{prefix}.group.member_added" in str(raised.value)
    assert (raised.value.envelopes, raised.value.confirmed) == ((group,), 0)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_concurrent_batches_arrive_whole_and_in_order(
    queue: Queue, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """Batches published at once (threads, or tasks on one loop) reach the queue
    each contiguous and in staging order."""
    plugin = make_plugin(kind, routing_key=queue.name)
    batches = [[envelope(f"w{w}-{n}") for n in range(100)] for w in range(4)]
    if isinstance(plugin, AsyncRabbitMQPlugin):

        async def publish_all() -> None:
            try:
                await asyncio.gather(*map(plugin.publish, batches))
            finally:
                await plugin.aclose()

        asyncio.run(publish_all())
    else:
        workers = [
            threading.Thread(target=plugin.publish, args=(batch,)) for batch in batches
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert plugin_threads() == 1  # one loop thread, whatever the callers
    received = [m.message_id for m in queue.take()]
    assert len(received) == 400
    for batch in batches:
        start = received.index(str(batch[0].id))
        assert received[start : start + 100] == [str(e.id) for e in batch]


def test_async_session_commits_publish_on_the_applications_loop(
    queue: Queue, make_plugin: Callable[..., Plugin]
) -> None:
    """AsyncSession commits publish once each on the app's loop, one connection."""
    plugin = make_plugin("async", routing_key=queue.name)
    assert isinstance(plugin, AsyncRabbitMQPlugin)
    recorder = broker_support.commit_twice_on_the_applications_loop(
        plugin, "rabbitmq", lambda: plugin.connections, (0, 1, 0)
    )
    assert plugin_threads() == 0
    assert [m.message_id for m in queue.take()] == [str(e.id) for e in recorder.events]


def test_async_plugin_from_a_sync_session_uses_the_emitters_loop(
    queue: Queue, make_plugin: Callable[..., Plugin], memory_engine: Engine
) -> None:
    """A sync commit awaits the async hook on the emitter's loop; aclose reaches it."""
    plugin = make_plugin("async", routing_key=queue.name)
    assert isinstance(plugin, AsyncRabbitMQPlugin)
    maker, recorder, failures = attach(memory_engine, plugin)
    with maker() as session:
        operation(session, "sync")
        session.commit()
    assert plugin.connections == 1
    asyncio.run(plugin.aclose())  # closes the connection on the emitter's loop
    assert plugin.connections == 0
    with maker() as session:
        operation(session, "again")
        session.commit()
    assert failures.calls == []
    assert plugin_threads() == 0
    assert [m.message_id for m in queue.take()] == [str(e.id) for e in recorder.events]


def test_sync_plugin_starts_its_thread_at_first_publish_and_close_stops_it(
    queue: Queue, make_plugin: Callable[..., Plugin]
) -> None:
    """No thread before the first publish; close() stops it (twice is fine);
    publishing again starts it again."""
    plugin = make_plugin(routing_key=queue.name)
    assert isinstance(plugin, RabbitMQPlugin)
    assert (plugin.running, plugin_threads()) == (False, 0)
    first, second = envelope("1"), envelope("2")
    plugin.publish([first])
    assert (plugin.running, plugin_threads()) == (True, 1)
    plugin.close()
    plugin.close()
    assert (plugin.running, plugin_threads()) == (False, 0)
    with plugin:
        plugin.publish([second])
        assert plugin.running
    assert (plugin.running, plugin_threads()) == (False, 0)
    assert [m.message_id for m in queue.take()] == [str(first.id), str(second.id)]


def test_sync_plugin_closed_during_a_publish_ends_that_publish(
    queue: Queue, make_plugin: Callable[..., Plugin]
) -> None:
    """close() from a shutdown hook while another thread publishes a large
    batch: that thread's publish returns or raises promptly, instead of
    waiting on a loop that close() stopped under it."""
    plugin = make_plugin(routing_key=queue.name, timeout=5)
    assert isinstance(plugin, RabbitMQPlugin)
    plugin.publish([envelope("through")])  # the connection opens
    raised: list[BaseException] = []
    batch = [envelope(str(number)) for number in range(10_000)]
    # close() while the batch is under way, however fast the broker: once
    # its 1,000th message is being sent (a fixed sleep let a quick broker
    # confirm all 10,000 first).
    under_way = threading.Event()
    routing_key_for = plugin._publisher.routing_key_for

    def noting(sent: AuditEventEnvelope) -> str:
        if sent.target_id == "1000":
            under_way.set()
        return routing_key_for(sent)

    plugin._publisher.routing_key_for = noting  # type: ignore[method-assign]

    def publish_many() -> None:
        try:
            plugin.publish(batch)
        except BaseException as error:
            raised.append(error)

    publisher = threading.Thread(target=publish_many, daemon=True)
    publisher.start()
    assert under_way.wait(15), "the batch never got under way"
    plugin.close()
    publisher.join(15)
    assert not publisher.is_alive(), "publish() still waits after close()"
    assert [type(error) for error in raised] == [RabbitMQPublishError]
    assert "closed during the publish" in str(raised[0])
    assert (plugin.running, plugin_threads()) == (False, 0)


def test_close_bounds_a_connection_that_never_says_goodbye(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed publish leaves its connection closing in the background (a
    broker gone silent never says goodbye): the sync plugin's close() waits
    for it a bounded time, then drops it, and raises nothing."""
    from access_audit_rabbitmq import _plugin
    from access_audit_rabbitmq._async_plugin import _Link

    monkeypatch.setattr(_plugin, "_CANCEL_WAIT", 0.2)

    async def failed() -> _Link:
        link = _Link()
        link._closing.add(asyncio.ensure_future(asyncio.sleep(3600)))
        return link

    runner = _plugin._LoopThread()
    link = runner.run(failed())
    [closing] = link._closing
    started = time.monotonic()
    runner.stop(link.close())
    assert time.monotonic() - started < 5
    assert closing.cancelled()
    assert not runner.thread.is_alive()


def test_close_leaves_the_connections_own_tasks_to_its_closing() -> None:
    """close() cancels the publishes callers wait for, not the tasks the
    connection runs for itself (aio-pika's reader): a connection whose
    reader was cancelled never hears the broker's goodbye, and its close
    hung the plugin's close() for good."""
    from access_audit_rabbitmq import _plugin

    async def reader() -> None:
        await asyncio.sleep(3600)

    async def connect() -> asyncio.Task[None]:
        return asyncio.ensure_future(reader())  # outlives this coroutine

    runner = _plugin._LoopThread()
    own = runner.run(connect())
    seen: list[bool] = []

    async def closing() -> None:
        seen.append(own.cancelled())
        own.cancel()

    runner.stop(closing())
    assert seen == [False]
    assert not runner.thread.is_alive()


def test_close_tells_a_thread_whose_task_outlived_the_wind_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task that ignores its cancelling past the wind-down's wait: the
    loop stops without it, and the thread waiting for it is told
    (CancelledError) instead of waiting for good."""
    import concurrent.futures

    from access_audit_rabbitmq import _plugin

    monkeypatch.setattr(_plugin, "_CANCEL_WAIT", 0.2)

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    async def nothing() -> None:
        pass

    runner = _plugin._LoopThread()
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            runner.run(stubborn())
        except BaseException as error:
            raised.append(error)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.2)
    runner.stop(nothing())
    waiter.join(10)
    assert not waiter.is_alive()
    assert [type(error) for error in raised] == [concurrent.futures.CancelledError]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_batch_longer_than_the_timeout_is_confirmed(
    queue: Queue, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """``timeout`` bounds each confirm, not the batch: a batch that takes
    longer than it on a healthy broker is confirmed whole (no message's
    wait starts while thousands are queued before it).

    The batch is sized from the broker's own pace, so that it outlasts the
    timeout on a fast machine while the timeout keeps room for a slow
    machine's confirms (a quorum queue's fsync under load)."""
    timeout = 2.5
    plugin = make_plugin(kind, routing_key=queue.name, timeout=timeout)
    sent, count = 0, 2_000
    for _ in range(3):
        batch = [envelope(str(sent + number)) for number in range(count)]
        started = time.monotonic()
        publish(plugin, batch)
        took = time.monotonic() - started
        sent += count
        if took > timeout:
            break
        count = min(int(count * 2 * timeout / took), 200_000)
    else:
        pytest.fail(f"no batch took longer than {timeout} s: the test proves nothing")
    assert queue.count() == sent


# -- failures -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unreachable_broker_fails_the_hook_and_the_outbox_keeps_the_event(
    queue: Queue,
    make_plugin: Callable[..., Plugin],
    tmp_path: Path,
    kind: str,
) -> None:
    """RabbitMQ down: the hook raises, audit_delivery_failed fires, the relay delivers later."""
    with broker_support.outbox_database(tmp_path, models=True) as database:
        url = dead_url()
        down = make_plugin(kind, url=url, routing_key=queue.name, timeout=1)
        envelopes, error = broker_support.fail_one_commit(database, down, "rabbitmq")
        assert isinstance(error, RabbitMQPublishError)
        assert isinstance(error.__cause__, ConnectionError)
        assert (error.envelopes, error.confirmed) == (envelopes, 0)
        assert str(envelopes[0].id) in str(error)
        assert url.replace("guest:guest", "guest:***") in str(error)
        assert queue.count() == 0

        up = make_plugin(kind, routing_key=queue.name)
        broker_support.relay_once(database, up, "rabbitmq", 1, backoff=0)
        assert [m.message_id for m in queue.take()] == [str(envelopes[0].id)]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_nacked_publish_raises_and_counts_what_was_confirmed(
    queue: Queue, make_plugin: Callable[..., Plugin], memory_engine: Engine, kind: str
) -> None:
    """A queue that refuses (x-overflow reject-publish, full) nacks: the hook raises."""
    # A classic durable queue: a quorum queue applies its limit a little late,
    # after messages already on their way.
    full = Queue(f"{queue.name}.full")
    full.declare(
        **{"x-queue-type": "classic", "x-max-length": 1, "x-overflow": "reject-publish"}
    )
    try:
        maker, recorder, failures = attach(
            memory_engine, make_plugin(kind, routing_key=full.name)
        )
        with maker() as session:
            for name in ("fits", "refused", "refused-too"):
                operation(session, name)
            session.commit()
        ((name, envelopes, error),) = failures.calls
        assert (name, envelopes) == ("rabbitmq", tuple(recorder.events))
        assert isinstance(error, RabbitMQPublishError)
        assert isinstance(error.__cause__, aiormq.exceptions.DeliveryError)
        assert error.confirmed == 1
        assert str(envelopes[1].id) in str(error)
        assert [m.message_id for m in full.take()] == [str(envelopes[0].id)]
    finally:
        full.delete()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_missing_exchange_raises_and_the_next_publish_reconnects(
    queue: Queue, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """An exchange that does not exist closes the channel: the hook raises; once
    it exists, the next publish opens a new channel and succeeds."""
    name = f"access_audit_test.{uuid.uuid4().hex}"
    plugin = make_plugin(kind, exchange=name, routing_key=queue.name)
    lost = envelope("lost")
    with pytest.raises(RabbitMQPublishError, match="NOT_FOUND") as raised:
        publish(plugin, [lost])
    assert raised.value.confirmed == 0

    async def declare(channel: AbstractChannel) -> None:
        exchange = await channel.declare_exchange(
            name, aio_pika.ExchangeType.DIRECT, auto_delete=True
        )
        bound = await channel.get_queue(queue.name, ensure=False)
        await bound.bind(exchange, routing_key=queue.name)

    admin(declare)
    kept = envelope("kept")
    publish(plugin, [kept])
    assert [m.message_id for m in queue.take()] == [str(kept.id)]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unconfirmed_publish_raises_after_the_timeout(
    queue: Queue, make_plugin: Callable[..., Plugin], proxy: FreezingProxy, kind: str
) -> None:
    """The broker goes silent after the connection is open: the confirm never
    comes, and publish raises once timeout has passed, not before."""
    plugin = make_plugin(kind, url=proxy.url, routing_key=queue.name, timeout=1)
    if isinstance(plugin, AsyncRabbitMQPlugin):

        async def main() -> float:
            await plugin.publish([envelope("through")])  # the connection opens
            proxy.freeze()
            started = time.monotonic()
            try:
                with pytest.raises(RabbitMQPublishError) as raised:
                    await plugin.publish([envelope("stuck")])
                assert isinstance(raised.value.__cause__, asyncio.TimeoutError)
                return time.monotonic() - started
            finally:
                await plugin.aclose()

        elapsed = asyncio.run(main())
    else:
        plugin.publish([envelope("through")])
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(RabbitMQPublishError) as raised:
            plugin.publish([envelope("stuck")])
        elapsed = time.monotonic() - started
        assert isinstance(raised.value.__cause__, asyncio.TimeoutError)
    assert 1 <= elapsed < 3.5
