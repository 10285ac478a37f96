"""What the access-audit-redis tests share: the server, a stream per test.

The server is ``ACCESS_AUDIT_TEST_REDIS_URL`` (``redis://127.0.0.1:6379/0``).
If it cannot be reached the tests that need it skip, except under
``CI=true``, where they fail. Each test appends to a stream key of its own,
deleted afterwards, so runs may overlap.

A module with a name no other package uses, and no conftest.py: the core
suite's modules import ``conftest`` by name, and would get whichever
conftest.py pytest loaded last. The test modules make their fixtures
from these helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import uuid
from collections.abc import Iterator

import redis
from support import reach

REDIS_URL = os.environ.get("ACCESS_AUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

Entry = tuple[str, dict[str, str]]


def connect() -> redis.Redis:
    """The tests' own client (decoded replies), checked with a PING."""
    client = redis.Redis.from_url(
        REDIS_URL, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
    )
    client.ping()
    return client


@dataclasses.dataclass
class Stream:
    """A stream key of the test's own, and the test's client to read it."""

    key: str
    client: redis.Redis

    def entries(self) -> list[Entry]:
        """Every entry, oldest first, as (entry id, fields)."""
        return [(entry_id, fields) for entry_id, fields in self.client.xrange(self.key)]

    def ids(self) -> list[str]:
        """The ``id`` field of every entry, oldest first."""
        return [fields["id"] for _, fields in self.entries()]


def reach_redis() -> redis.Redis:
    """The tests' client; skips the test (fails it under CI) without Redis."""
    return reach(f"Redis at {REDIS_URL}", connect)


@contextlib.contextmanager
def fresh_stream() -> Iterator[Stream]:
    """A stream key of its own on the test server, deleted afterwards."""
    client = reach_redis()
    created = Stream(f"access_audit_test:{uuid.uuid4().hex}", client)
    try:
        yield created
    finally:
        client.delete(created.key)


def dead_url() -> str:
    """A Redis URL on a local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers.

    The kernel completes the handshake for a listening socket that nobody
    accepts on, so a client connects, sends, and waits for its timeout.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
