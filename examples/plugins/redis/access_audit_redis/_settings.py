"""What both plugins share: their settings, the entry's fields, the error.

One stream entry per committed event, with four fields:

``id``
    the envelope id: the de-duplication key.
``key``
    ``target_type:target_id``, the key a consumer shards or orders by.
``type``
    the event type.
``body``
    the envelope's JSON (``AuditEventEnvelope.to_json()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio.client
import redis.client
from redis.backoff import NoBackoff
from redis.typing import EncodableT, FieldT

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = [
    "DEFAULT_URL",
    "RedisStreamPublishError",
    "StreamSettings",
    "client_options",
]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class RedisStreamPublishError(Exception):
    """A batch was not appended to the stream (or not known to be).

    :ivar envelopes: the batch: none of it, or (a connection lost while
        Redis answered) all of it, was appended; a re-delivery is safe as
        consumers de-duplicate by ``id``.
    :ivar stream: the stream's key.
    """

    def __init__(
        self, message: str, envelopes: Sequence[AuditEventEnvelope], stream: str
    ) -> None:
        super().__init__(message)
        self.envelopes = tuple(envelopes)
        self.stream = stream


class StreamSettings:
    """Where and how to append: checked once, at construction.

    :param url: a redis-py URL (``redis://[[user]:password@]host:port/db``,
        ``rediss://`` for TLS, ``unix:///path``).
    :param stream: the stream's key.
    :param maxlen: trim the stream to about this many entries at each append
        (``XADD ... MAXLEN ~ maxlen``); ``None`` keeps every entry. Trimming
        drops the oldest entries whether or not a consumer group read them.
    :param approximate: ``MAXLEN ~`` (Redis trims whole nodes, cheaply: the
        stream may hold somewhat more); false trims exactly (``MAXLEN =``).
    :param timeout: seconds to wait for connecting, and for Redis's answer.
    :raises ValueError: an argument is invalid; the message names it.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        stream: str = "audit",
        maxlen: int | None = None,
        approximate: bool = True,
        timeout: float = 5.0,
    ) -> None:
        self.url = check_url(url)
        self.stream = check_stream(stream)
        self.maxlen = None if maxlen is None else check_maxlen(maxlen)
        self.approximate = bool(approximate)
        self.timeout = check_timeout(timeout)
        self._setup()

    def _setup(self) -> None:
        """Called once the settings are checked: a plugin's own state, unconnected."""

    def __repr__(self) -> str:
        trim = ""
        if self.maxlen is not None:
            trim = f" maxlen={'~' if self.approximate else '='}{self.maxlen}"
        return (
            f"<{type(self).__name__} url={without_password(self.url)!r} "
            f"stream={self.stream!r}{trim}>"
        )

    @staticmethod
    def fields_for(envelope: AuditEventEnvelope) -> dict[FieldT, EncodableT]:
        """The stream entry's fields for *envelope* (``id``, ``key``, ``type``, ``body``)."""
        return {
            "id": str(envelope.id),
            "key": f"{envelope.target_type}:{envelope.target_id}",
            "type": envelope.event_type,
            "body": envelope.to_json(),
        }

    def _append(
        self,
        pipeline: redis.client.Pipeline | redis.asyncio.client.Pipeline,
        envelopes: Sequence[AuditEventEnvelope],
    ) -> None:
        """Queue one ``XADD`` per envelope on *pipeline*, in order."""
        for envelope in envelopes:
            pipeline.xadd(
                self.stream,
                self.fields_for(envelope),
                maxlen=self.maxlen,
                approximate=self.approximate,
            )

    def error(
        self, envelopes: Sequence[AuditEventEnvelope], cause: BaseException
    ) -> RedisStreamPublishError:
        """The error the hook raises for *envelopes*, saying why."""
        first = envelopes[0]
        text = str(cause)
        reason = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
        return RedisStreamPublishError(
            f"{len(envelopes)} audit event(s) from {first.id} on were not appended "
            f"to the Redis stream {self.stream!r} at {without_password(self.url)}: "
            f"{reason}",
            envelopes,
            self.stream,
        )


def client_options(timeout: float, retry: Callable[..., object]) -> dict[str, Any]:
    """What both clients are made with: bounded waits, one retry on a stale socket.

    A pooled connection that the server closed (a restart, an idle timeout)
    fails at its next use: one immediate retry on a new connection covers
    that. A timeout is not retried: it already cost ``timeout``, and the
    outbox's relay is the retry. *retry* is the client's own ``Retry``
    class (redis.asyncio has one of its own).
    """
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        "decode_responses": True,
    }


def check_url(url: str) -> str:
    if not isinstance(url, str):
        raise ValueError(f"url must be a string, got {url!r}")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            "url must be a redis://, rediss:// or unix:// URL, "
            f"e.g. {DEFAULT_URL!r}, got {without_password(url)!r}"
        )
    return url


def check_stream(stream: str) -> str:
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty key name, got {stream!r}")
    return stream


def check_maxlen(maxlen: int) -> int:
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
        raise ValueError(f"maxlen must be a positive int or None, got {maxlen!r}")
    return maxlen


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def without_password(url: str) -> str:
    """*url* with its user information, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
