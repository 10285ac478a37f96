"""What the access-audit-redis tests share: the server's URL, a stream handle.

A module of its own (not conftest.py, which every package's tests have) so
the tests can import it by a name no other package uses.
"""

from __future__ import annotations

import dataclasses
import os

import redis

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
