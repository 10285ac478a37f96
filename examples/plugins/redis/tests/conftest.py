"""Fixtures of the access-audit-redis tests: the server, a stream per test.

The server is ``ACCESS_AUDIT_TEST_REDIS_URL`` (``redis://127.0.0.1:6379/0``).
If it cannot be reached the tests that need it skip, except under
``CI=true``, where they fail. Each test appends to a stream key of its own,
deleted afterwards, so runs may overlap.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis_support import REDIS_URL, Stream, connect
from support import reach


@pytest.fixture
def admin() -> redis.Redis:
    """The test's own client (decoded replies); skips or fails without Redis."""
    return reach(f"Redis at {REDIS_URL}", connect)


@pytest.fixture
def stream(admin: redis.Redis) -> Iterator[Stream]:
    """A fresh stream key, deleted after the test."""
    created = Stream(f"access_audit_test:{uuid.uuid4().hex}", admin)
    yield created
    admin.delete(created.key)


@pytest.fixture
def dead_url() -> str:
    """A Redis URL on a local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers.

    The kernel completes the handshake for a listening socket that nobody
    accepts on, so a client connects, sends, and waits for its timeout.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
