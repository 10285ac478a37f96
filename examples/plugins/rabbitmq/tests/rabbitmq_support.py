"""What the access-audit-rabbitmq tests share: the broker, a queue, a proxy.

The broker is ``ACCESS_AUDIT_TEST_RABBITMQ_URL``
(``amqp://guest:guest@127.0.0.1:5672/``). If it cannot be reached the tests
that need it skip, except under ``CI=true``, where they fail. Each test
publishes to a quorum queue of its own (through the default exchange),
deleted afterwards, so runs may overlap.

A module with a name no other package uses, and no conftest.py: the core
suite's modules import ``conftest`` by name, and would get whichever
conftest.py pytest loaded last. The test modules make their fixtures
from these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel
from support import reach

RABBITMQ_URL = os.environ.get(
    "ACCESS_AUDIT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"
)
T = TypeVar("T")


def admin(operation: Callable[[AbstractChannel], Awaitable[T]]) -> T:
    """Run one operation on a short-lived connection and channel of the test's own."""

    async def main() -> T:
        connection = await aio_pika.connect(RABBITMQ_URL, timeout=3)
        try:
            async with connection.channel() as channel:
                return await operation(channel)
        finally:
            await connection.close()

    return asyncio.run(main())


@dataclasses.dataclass(frozen=True)
class Received:
    """A message as a consumer got it."""

    message_id: str | None
    body: bytes
    delivery_mode: int | None
    content_type: str | None
    type: str | None
    app_id: str | None
    headers: dict[str, Any]
    routing_key: str | None
    redelivered: bool | None


@dataclasses.dataclass
class Queue:
    """A quorum queue of the test's own (durable, as quorum queues are)."""

    name: str

    def declare(self, **arguments: Any) -> None:
        async def declare(channel: AbstractChannel) -> None:
            await channel.declare_queue(
                self.name,
                durable=True,
                arguments={"x-queue-type": "quorum", **arguments},
            )

        admin(declare)

    def delete(self) -> None:
        async def delete(channel: AbstractChannel) -> None:
            await channel.queue_delete(self.name)

        admin(delete)

    def count(self) -> int:
        """Messages ready in the queue."""

        async def count(channel: AbstractChannel) -> int:
            queue = await channel.declare_queue(self.name, passive=True)
            assert queue.declaration_result.message_count is not None
            return queue.declaration_result.message_count

        return admin(count)

    def take(self) -> list[Received]:
        """Consume (and acknowledge) every message ready, in queue order."""

        async def take(channel: AbstractChannel) -> list[Received]:
            queue = await channel.get_queue(self.name, ensure=False)
            taken: list[Received] = []
            while (message := await queue.get(fail=False, timeout=5)) is not None:
                taken.append(received(message))
                await message.ack()
            return taken

        return admin(take)


def received(message: aio_pika.abc.AbstractIncomingMessage) -> Received:
    return Received(
        message_id=message.message_id,
        body=message.body,
        delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
        content_type=message.content_type,
        type=message.type,
        app_id=message.app_id,
        headers=dict(message.headers),
        routing_key=message.routing_key,
        redelivered=message.redelivered,
    )


class FreezingProxy:
    """A TCP proxy to the broker that can stop passing bytes, both ways.

    Frozen, it reads and drops what either side sends: connections stay up,
    and nothing (a confirm, a heartbeat) gets through. ``url`` is the
    broker's URL with the proxy's address.
    """

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                pump = threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True
                )
                self._threads.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(data)
        except OSError:
            pass


async def _declare_nothing(channel: AbstractChannel) -> str:
    await channel.declare_queue(exclusive=True)  # the broker answers
    return "ok"


def reach_broker() -> str:
    """The broker's URL; skips the test (fails it under CI) without RabbitMQ."""
    reach(f"RabbitMQ at {RABBITMQ_URL}", lambda: admin(_declare_nothing))
    return RABBITMQ_URL


@contextlib.contextmanager
def fresh_queue() -> Iterator[Queue]:
    """A quorum queue of its own on the test broker, deleted afterwards."""
    reach_broker()
    created = Queue(f"access_audit_test.{uuid.uuid4().hex}")
    created.declare()
    try:
        yield created
    finally:
        created.delete()


def dead_url() -> str:
    """An AMQP URL on a local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/"
