"""Fixtures of the access-audit-rabbitmq tests: the broker, a queue per test.

The broker is ``ACCESS_AUDIT_TEST_RABBITMQ_URL``
(``amqp://guest:guest@127.0.0.1:5672/``). If it cannot be reached the tests
that need it skip, except under ``CI=true``, where they fail. Each test
publishes to a quorum queue of its own (through the default exchange),
deleted afterwards, so runs may overlap.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
from aio_pika.abc import AbstractChannel
from rabbitmq_support import RABBITMQ_URL, FreezingProxy, Queue, admin
from support import reach


async def _version(channel: AbstractChannel) -> str:
    await channel.declare_queue(exclusive=True)  # the broker answers, and may declare
    return "ok"


@pytest.fixture
def broker() -> str:
    """The broker's URL; skips (or fails under CI) if it cannot be reached."""
    reach(f"RabbitMQ at {RABBITMQ_URL}", lambda: admin(_version))
    return RABBITMQ_URL


@pytest.fixture
def queue(broker: str) -> Iterator[Queue]:
    """A fresh quorum queue, deleted after the test."""
    created = Queue(f"access_audit_test.{uuid.uuid4().hex}")
    created.declare()
    yield created
    created.delete()


@pytest.fixture
def dead_url() -> str:
    """An AMQP URL on a local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/"


@pytest.fixture
def proxy(broker: str) -> Iterator[FreezingProxy]:
    """A proxy to the broker that the test can freeze."""
    created = FreezingProxy(broker)
    yield created
    created.close()
