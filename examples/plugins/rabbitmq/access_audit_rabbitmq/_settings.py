"""What both plugins share: their settings, the message, the error.

One AMQP message per committed event:

- body: the envelope's JSON (``AuditEventEnvelope.to_json()``),
  ``content_type`` ``application/json``;
- ``message_id``: the envelope id, the de-duplication key;
- ``delivery_mode`` 2 (persistent): a durable or quorum queue keeps it
  across a broker restart;
- ``type``: the event type; ``timestamp``: the commit's; ``app_id``
  ``access_audit``;
- header ``key``: ``target_type:target_id``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aio_pika

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["DEFAULT_URL", "PublisherSettings", "RabbitMQPublishError"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"

_PLACEHOLDERS = {"event_type", "target_type"}


class RabbitMQPublishError(Exception):
    """Events of a batch were not confirmed by the broker.

    :ivar envelopes: the batch.
    :ivar confirmed: how many of its events, from the first, the broker
        confirmed before the first that it did not (nacked, returned as
        unroutable, not confirmed within the timeout, or never sent).
    """

    def __init__(
        self, message: str, envelopes: Sequence[AuditEventEnvelope], confirmed: int
    ) -> None:
        super().__init__(message)
        self.envelopes = tuple(envelopes)
        self.confirmed = confirmed


class PublisherSettings:
    """Where and how to publish: checked once, at construction.

    :param url: an AMQP URL (``amqp://user:password@host:5672/vhost``,
        ``amqps://`` for TLS); URL query options such as ``heartbeat`` are
        aio-pika's.
    :param exchange: the exchange to publish to; ``""`` (the default
        exchange) routes by queue name. The plugin declares nothing:
        declare the exchange, queues and bindings beforehand.
    :param routing_key: the routing key, with ``{event_type}`` and
        ``{target_type}`` replaced per event (``"audit.{event_type}"`` for a
        topic exchange); with the default exchange, the queue's name.
    :param timeout: seconds to wait for connecting, and for each confirm.
    :raises ValueError: an argument is invalid; the message names it.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        exchange: str = "",
        routing_key: str = "audit",
        timeout: float = 5.0,
    ) -> None:
        self.url = check_url(url)
        self.exchange = check_exchange(exchange)
        self.routing_key = check_routing_key(routing_key)
        self.timeout = check_timeout(timeout)
        self._setup()

    def _setup(self) -> None:
        """Called once the settings are checked: a plugin's own state, unconnected."""

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} url={without_password(self.url)!r} "
            f"exchange={self.exchange!r} routing_key={self.routing_key!r}>"
        )

    def routing_key_for(self, envelope: AuditEventEnvelope) -> str:
        """The routing key of *envelope*'s message (placeholders filled in)."""
        return self.routing_key.format(
            event_type=envelope.event_type, target_type=envelope.target_type
        )

    @staticmethod
    def message_for(envelope: AuditEventEnvelope) -> aio_pika.Message:
        """The persistent message for *envelope*; ``message_id`` is its id."""
        return aio_pika.Message(
            envelope.to_json().encode(),
            message_id=str(envelope.id),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            type=envelope.event_type,
            timestamp=envelope.timestamp,
            app_id="access_audit",
            headers={"key": f"{envelope.target_type}:{envelope.target_id}"},
        )

    def error(
        self,
        envelopes: Sequence[AuditEventEnvelope],
        confirmed: int,
        cause: BaseException,
    ) -> RabbitMQPublishError:
        """The error the hook raises: the first unconfirmed event, and why."""
        failed = envelopes[confirmed]
        text = str(cause)
        reason = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
        return RabbitMQPublishError(
            f"audit event {failed.id} was not confirmed by RabbitMQ at "
            f"{without_password(self.url)} (exchange {self.exchange!r}, routing "
            f"key {self.routing_key_for(failed)!r}; {confirmed} of "
            f"{len(envelopes)} events of its batch were): {reason}",
            envelopes,
            confirmed,
        )


def check_url(url: str) -> str:
    if not isinstance(url, str):
        raise ValueError(f"url must be a string, got {url!r}")
    if urlsplit(url).scheme not in ("amqp", "amqps"):
        raise ValueError(
            f"url must be an amqp:// or amqps:// URL, e.g. {DEFAULT_URL!r}, "
            f"got {without_password(url)!r}"
        )
    return url


def check_exchange(exchange: str) -> str:
    if not isinstance(exchange, str) or len(exchange.encode()) > 255:
        raise ValueError(
            f"exchange must be a name of at most 255 bytes, got {exchange!r}"
        )
    return exchange


def check_routing_key(routing_key: str) -> str:
    if not isinstance(routing_key, str):
        raise ValueError(f"routing_key must be a string, got {routing_key!r}")
    try:
        parsed = list(string.Formatter().parse(routing_key))
    except ValueError:  # an unmatched brace
        parsed = [("", "?", "", None)]
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in _PLACEHOLDERS or spec or conversion):
            raise ValueError(
                "routing_key may only use the placeholders {event_type} and "
                f"{{target_type}}, got {routing_key!r}"
            )
    return routing_key


def check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def without_password(url: str) -> str:
    """*url* with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
