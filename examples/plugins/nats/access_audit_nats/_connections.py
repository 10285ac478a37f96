"""One NATS connection per running event loop, made when that loop first publishes.

A nats-py connection belongs to the loop it was made on: its reader, writer
and ping tasks run there, and awaiting it from another loop fails. The
plugin's hook is ``async def``, so it runs on whichever loop the emitter
awaits it on: the application's own (an ``AsyncSession`` commit) or the
emitter's (a sync ``Session``, the background worker, a relay). So each
loop gets a connection of its own, and :meth:`PerLoop.aclose_all` closes each one
on its own loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import TYPE_CHECKING

import nats.aio.client

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = ["Connection", "PerLoop"]


class Connection:
    """A loop's NATS state: the client and its JetStream context, once connected.

    :ivar lock: held while connecting, so concurrent publishes on the loop
        make one connection, not one each.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.client: nats.aio.client.Client | None = None
        self.jetstream: JetStreamContext | None = None

    async def close(self, timeout: float) -> None:
        """Drain (flush what is buffered), then close; on the connection's loop."""
        client, self.client, self.jetstream = self.client, None, None
        if client is None or client.is_closed:
            return
        try:
            await asyncio.wait_for(client.drain(), timeout)
        finally:
            if not client.is_closed:
                await client.close()


class PerLoop:
    """The :class:`Connection` of each event loop, made on the loop's first use.

    Thread-safe: loops in different threads look their connection up at
    once. Entries of loops that were closed are dropped when another loop
    makes its connection (a closed loop's tasks are gone already). A forked
    child starts with none: the parent's sockets are not its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[asyncio.AbstractEventLoop, Connection] = {}
        if hasattr(os, "register_at_fork"):
            reference = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget(reference))

    def __len__(self) -> int:
        """How many loops hold a connection (closed loops' not counted)."""
        with self._lock:
            return sum(not loop.is_closed() for loop in self._connections)

    def current(self) -> Connection:
        """The running loop's connection state, made if it has none.

        :raises RuntimeError: no event loop is running in this thread.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            connection = self._connections.get(loop)
            if connection is None:
                for stale in [k for k in self._connections if k.is_closed()]:
                    del self._connections[stale]
                connection = self._connections[loop] = Connection()
            return connection

    async def aclose_all(self, timeout: float) -> None:
        """Close every loop's connection, each on its own loop; from a running loop.

        The running loop's is drained here; one on a loop running in another
        thread (the emitter's) is drained there, awaited without blocking this
        loop; one on a loop that no longer runs is dropped (its tasks cannot
        run). A later publish makes new connections. Errors are raised after
        every connection was tried, the first one.
        """
        current = asyncio.get_running_loop()
        errors: list[BaseException] = []
        for loop, connection in self._take_all():
            try:
                if loop is current:
                    await connection.close(timeout)
                elif loop.is_running():
                    await asyncio.wrap_future(
                        asyncio.run_coroutine_threadsafe(
                            connection.close(timeout), loop
                        )
                    )
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def close_all(self, timeout: float) -> None:
        """:meth:`aclose_all` for synchronous callers, which it blocks.

        :raises RuntimeError: called on a running loop that holds a
            connection (blocking would stop the loop that must drain it): use
            :meth:`aclose_all` there. Nothing is closed then.
        """
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is not None and self.has(current):
            raise RuntimeError(
                "JetStreamPublisher.close() was called inside the event loop its "
                "connection runs on; use 'await publisher.aclose()' there"
            )
        errors: list[BaseException] = []
        for loop, connection in self._take_all():
            try:
                if loop.is_running():
                    future = asyncio.run_coroutine_threadsafe(
                        connection.close(timeout), loop
                    )
                    future.result(timeout + 1.0)
                elif not loop.is_closed() and current is None:
                    # A loop between run_until_complete() calls.
                    loop.run_until_complete(connection.close(timeout))
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def _take_all(self) -> list[tuple[asyncio.AbstractEventLoop, Connection]]:
        with self._lock:
            taken = list(self._connections.items())
            self._connections.clear()
        return taken

    def has(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether *loop* holds a connection."""
        with self._lock:
            return loop in self._connections


def _forget(reference: weakref.ref[PerLoop]) -> None:
    owner = reference()
    if owner is not None:
        owner._lock = threading.Lock()
        owner._connections = {}
