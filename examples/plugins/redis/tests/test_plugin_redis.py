"""examples/plugins/redis: the installed access-audit-redis package, against real Redis.

Delivery tests commit through a real SQLite session with a plugin attached,
then read the stream back (see conftest.py for the server and the stream).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import access_audit_redis
import broker_support
import pytest
import redis
from access_audit_redis import (
    AsyncRedisStreamPlugin,
    RedisStreamPlugin,
    RedisStreamPublishError,
    from_env,
)
from redis_support import REDIS_URL, Stream, dead_url, fresh_stream, silent_server
from sqlalchemy import Engine
from support import operation

from access_audit import AuditEventEnvelope

Plugin = RedisStreamPlugin | AsyncRedisStreamPlugin


@pytest.fixture
def stream() -> Iterator[Stream]:
    """A fresh stream key, deleted afterwards; skips (fails under CI) without Redis."""
    with fresh_stream() as created:
        yield created


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers."""
    with silent_server() as url:
        yield url


@pytest.fixture
def make_plugin() -> Iterator[Callable[..., Plugin]]:
    """Make plugins of either kind (``kind="sync"|"async"``); close them after."""
    with broker_support.plugin_maker(
        RedisStreamPlugin, AsyncRedisStreamPlugin, {"url": REDIS_URL}
    ) as make:
        yield make


# An emitter with a plugin as "redis", a recorder and a failure log.
attach = functools.partial(broker_support.attach, "redis")


async def publish_and_close(
    plugin: AsyncRedisStreamPlugin, batch: list[AuditEventEnvelope]
) -> list[str]:
    """Publish on a loop of the caller's, then close that loop's client."""
    try:
        return await plugin.publish(batch)
    finally:
        await plugin.aclose()


# A stand-alone envelope, as a relay rebuilds one from its row.
envelope = functools.partial(broker_support.envelope, event_type="group_member_added")


# -- the package and its entry point ------------------------------------------


def test_package_is_installed_and_its_entry_point_is_loaded() -> None:
    """access-audit-redis is installed and AuditEmitter() registers its plugin as "redis"."""
    broker_support.assert_entry_point_is_loaded(
        "access-audit-redis", "redis", access_audit_redis
    )


@pytest.mark.skipif(
    "ACCESS_AUDIT_REDIS_URL" in os.environ,
    reason="ACCESS_AUDIT_REDIS_URL is set: the entry-point plugin is configured",
)
def test_unconfigured_entry_point_has_no_hook_and_is_no_outbox_recipient(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without ACCESS_AUDIT_REDIS_URL the plugin implements nothing: rows are not for it."""
    broker_support.assert_unconfigured_entry_point_is_no_outbox_recipient(
        caplog,
        "redis",
        access_audit_redis,
        "ACCESS_AUDIT_REDIS_URL is not set: access_audit_redis publishes nothing",
        "ACCESS_AUDIT_REDIS_URL is unset",
    )


def test_from_env_reads_every_variable() -> None:
    """from_env maps ACCESS_AUDIT_REDIS_* onto the constructor's arguments."""
    plugin = from_env(
        {
            "ACCESS_AUDIT_REDIS_URL": "redis://user:s3cret@cache:6380/2",
            "ACCESS_AUDIT_REDIS_STREAM": "prod:audit",
            "ACCESS_AUDIT_REDIS_MAXLEN": "100000",
            "ACCESS_AUDIT_REDIS_TIMEOUT": "2.5",
        }
    )
    assert isinstance(plugin, RedisStreamPlugin)
    assert (plugin.url, plugin.stream) == (
        "redis://user:s3cret@cache:6380/2",
        "prod:audit",
    )
    assert (plugin.maxlen, plugin.approximate, plugin.timeout) == (100000, True, 2.5)
    assert "s3cret" not in repr(plugin)
    assert "redis://***@cache:6380/2" in repr(plugin)
    defaults = from_env({"ACCESS_AUDIT_REDIS_URL": "redis://cache"})
    assert isinstance(defaults, RedisStreamPlugin)
    assert (defaults.stream, defaults.maxlen, defaults.timeout) == ("audit", None, 5.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ACCESS_AUDIT_REDIS_URL", "http://cache:6379"),
        ("ACCESS_AUDIT_REDIS_STREAM", ""),
        ("ACCESS_AUDIT_REDIS_MAXLEN", "many"),
        ("ACCESS_AUDIT_REDIS_MAXLEN", "0"),
        ("ACCESS_AUDIT_REDIS_TIMEOUT", "soon"),
        ("ACCESS_AUDIT_REDIS_TIMEOUT", "-1"),
    ],
    ids=[
        "url-scheme",
        "stream-empty",
        "maxlen-text",
        "maxlen-zero",
        "timeout-text",
        "timeout-negative",
    ],
)
def test_from_env_rejects_invalid_values(variable: str, value: str) -> None:
    """An invalid variable raises ValueError naming it."""
    environ = {"ACCESS_AUDIT_REDIS_URL": REDIS_URL, variable: value}
    with pytest.raises(ValueError, match=f"^{variable}"):
        from_env(environ)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "options",
    [
        {"url": "localhost:6379"},
        {"url": "http://user:s3cret@cache"},
        {"stream": ""},
        {"maxlen": 0},
        {"maxlen": True},
        {"timeout": 0},
        {"timeout": "5"},
    ],
    ids=[
        "url-no-scheme",
        "url-http",
        "stream-empty",
        "maxlen-zero",
        "maxlen-bool",
        "timeout-zero",
        "timeout-text",
    ],
)
def test_constructor_rejects_invalid_arguments(
    kind: str, options: dict[str, Any]
) -> None:
    """Invalid arguments raise ValueError naming the argument, hiding a password."""
    (name,) = options
    cls = AsyncRedisStreamPlugin if kind == "async" else RedisStreamPlugin
    with pytest.raises(ValueError, match=name) as raised:
        cls(**{"url": REDIS_URL, **options})
    assert "s3cret" not in str(raised.value)


# -- delivery -------------------------------------------------------------------


def test_commits_are_appended_once_in_order_with_id_key_type_body(
    stream: Stream, make_plugin: Callable[..., Plugin], memory_engine: Engine
) -> None:
    """Each committed event is one entry: id = envelope id, key, type, body = JSON."""
    maker, recorder, failures = attach(memory_engine, make_plugin(stream=stream.key))
    broker_support.commit_three_and_roll_back_one(maker)
    committed = recorder.events
    assert [e.target_id for e in committed] == ["alpha", "admins", "beta"]
    entries = stream.entries()
    assert [fields["id"] for _, fields in entries] == [str(e.id) for e in committed]
    assert [fields["key"] for _, fields in entries] == [
        "item:alpha",
        "group:admins",
        "item:beta",
    ]
    assert [fields["type"] for _, fields in entries] == [
        "item_created",
        "group_member_added",
        "item_created",
    ]
    for (_, fields), sent in zip(entries, committed, strict=True):
        assert set(fields) == {"id", "key", "type", "body"}
        assert AuditEventEnvelope.from_dict(json.loads(fields["body"])) == sent
    assert failures.calls == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_concurrent_batches_are_appended_whole_and_never_interleave(
    stream: Stream, make_plugin: Callable[..., Plugin], kind: str
) -> None:
    """publish() returns the entry ids; concurrent batches (threads, or tasks on
    one loop) each land as one contiguous run (MULTI/EXEC)."""
    plugin = make_plugin(kind, stream=stream.key)
    # Large enough (about 250 kB each) that Redis reads each batch in several
    # pieces, which a plain pipeline would let interleave.
    batches = [[envelope(f"w{w}-{n}") for n in range(500)] for w in range(4)]
    if isinstance(plugin, AsyncRedisStreamPlugin):

        async def publish_all() -> list[list[str]]:
            try:
                return list(await asyncio.gather(*map(plugin.publish, batches)))
            finally:
                await plugin.aclose()

        results = asyncio.run(publish_all())
    else:
        found: dict[int, list[str]] = {}
        workers = [
            threading.Thread(
                target=lambda w=w: found.update({w: plugin.publish(batches[w])})
            )
            for w in range(4)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        results = [found[w] for w in range(4)]
        assert plugin.publish([]) == []
    entries = stream.entries()
    assert len(entries) == 2000
    sent = [fields["id"] for _, fields in entries]
    for batch, entry_ids in zip(batches, results, strict=True):
        start = sent.index(str(batch[0].id))
        assert sent[start : start + 500] == [str(e.id) for e in batch]
        assert [entry_id for entry_id, _ in entries[start : start + 500]] == entry_ids


def test_maxlen_trims_exactly_or_approximately(
    stream: Stream, make_plugin: Callable[..., Plugin]
) -> None:
    """maxlen with approximate=False keeps exactly the newest; ~ keeps about as many."""
    exact = make_plugin(stream=stream.key, maxlen=3, approximate=False)
    sent = [envelope(str(n)) for n in range(10)]
    exact.publish(sent)
    assert stream.ids() == [str(e.id) for e in sent[-3:]]
    stream.client.delete(stream.key)
    # "MAXLEN ~" trims whole radix-tree nodes (stream-node-max-entries, 100
    # by default): the stream keeps at least maxlen entries, and at most
    # about a node more.
    about = make_plugin(stream=stream.key, maxlen=100)
    for start in range(0, 1000, 250):
        about.publish([envelope(str(n)) for n in range(start, start + 250)])
    assert 100 <= stream.client.xlen(stream.key) < 400


def test_async_session_commits_publish_on_the_applications_loop(
    stream: Stream, make_plugin: Callable[..., Plugin]
) -> None:
    """AsyncSession commits append once each, on the app's loop, with one client."""
    plugin = make_plugin("async", stream=stream.key)
    assert isinstance(plugin, AsyncRedisStreamPlugin)
    recorder = broker_support.commit_twice_on_the_applications_loop(
        plugin, "redis", lambda: plugin.clients, (0, 1, 0)
    )
    assert stream.ids() == [str(e.id) for e in recorder.events]


def test_async_plugin_from_a_sync_session_uses_the_emitters_loop(
    stream: Stream, make_plugin: Callable[..., Plugin], memory_engine: Engine
) -> None:
    """A sync commit awaits the async hook on the emitter's loop; aclose reaches it."""
    plugin = make_plugin("async", stream=stream.key)
    assert isinstance(plugin, AsyncRedisStreamPlugin)
    maker, recorder, failures = attach(memory_engine, plugin)
    with maker() as session:
        operation(session, "sync")
        session.commit()
    assert plugin.clients == 1
    asyncio.run(plugin.aclose())  # closes the client on the emitter's loop
    assert plugin.clients == 0
    with maker() as session:
        operation(session, "again")
        session.commit()
    assert failures.calls == []
    assert stream.ids() == [str(e.id) for e in recorder.events]


# -- failures -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unreachable_server_fails_the_hook_and_the_outbox_keeps_the_event(
    stream: Stream,
    make_plugin: Callable[..., Plugin],
    tmp_path: Any,
    kind: str,
) -> None:
    """Redis down: the hook raises, audit_delivery_failed fires, the relay delivers later."""
    with broker_support.outbox_database(tmp_path, models=True) as database:
        url = dead_url()
        down = make_plugin(kind, url=url, stream=stream.key, timeout=1)
        envelopes, error = broker_support.fail_one_commit(database, down, "redis")
        assert isinstance(error, RedisStreamPublishError)
        assert isinstance(error.__cause__, redis.ConnectionError)
        assert error.envelopes == envelopes
        assert str(envelopes[0].id) in str(error)
        assert url in str(error)
        assert stream.entries() == []

        up = make_plugin(kind, stream=stream.key)
        broker_support.relay_once(database, up, "redis", 1, backoff=0)
        assert stream.ids() == [str(envelopes[0].id)]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unanswered_append_raises_after_the_timeout(
    make_plugin: Callable[..., Plugin], silent_url: str, kind: str
) -> None:
    """A server that never answers: publish raises once timeout has passed, not before."""
    plugin = make_plugin(kind, url=silent_url, timeout=0.5)
    sent = [envelope()]
    started = time.monotonic()
    with pytest.raises(RedisStreamPublishError) as raised:
        if isinstance(plugin, AsyncRedisStreamPlugin):
            asyncio.run(publish_and_close(plugin, sent))
        else:
            plugin.publish(sent)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 2.5
    assert isinstance(raised.value.__cause__, redis.TimeoutError)
    assert raised.value.envelopes == tuple(sent)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_refused_append_raises_and_nothing_is_appended(
    stream: Stream, make_plugin: Callable[..., Plugin], memory_engine: Engine, kind: str
) -> None:
    """An error reply (the key holds a string: WRONGTYPE) fails the whole batch."""
    stream.client.set(stream.key, "not a stream")
    maker, recorder, failures = attach(
        memory_engine, make_plugin(kind, stream=stream.key)
    )
    with maker() as session:
        operation(session, "one")
        operation(session, "two")
        session.commit()
    ((name, envelopes, error),) = failures.calls
    assert (name, envelopes) == ("redis", tuple(recorder.events))
    assert isinstance(error, RedisStreamPublishError)
    assert isinstance(error.__cause__, redis.ResponseError)
    assert "WRONGTYPE" in str(error)
    assert error.stream == stream.key
    assert stream.client.get(stream.key) == "not a stream"
