"""``JetStreamPublisher``: committed events to NATS JetStream subjects."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import nats.aio.client

from access_audit import hookimpl

from ._connections import PerLoop

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

    from access_audit import AuditEventEnvelope

__all__ = ["ENVIRONMENT_PREFIX", "JetStreamPublishError", "JetStreamPublisher"]

logger = logging.getLogger("access_audit_nats")

ENVIRONMENT_PREFIX = "ACCESS_AUDIT_NATS_"
"""Prefix of the environment variables :meth:`JetStreamPublisher.from_env` reads."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class JetStreamPublishError(Exception):
    """An event was not acknowledged by JetStream (not stored, or not known to be).

    :ivar envelope: the first event of the batch that was not acknowledged.
    :ivar subject: the subject it was published to.
    :ivar acknowledged: how many events of the batch, before it, were stored.
    """

    def __init__(
        self,
        message: str,
        envelope: AuditEventEnvelope,
        subject: str,
        acknowledged: int,
    ) -> None:
        super().__init__(message)
        self.envelope = envelope
        self.subject = subject
        self.acknowledged = acknowledged


class JetStreamPublisher:
    """Publish each committed event to NATS JetStream, acknowledged before returning.

    What is written where: each event becomes one message on the subject
    ``<subject_prefix>.<event_type>`` (``audit.group_member_added``), in
    staging order. The body is the envelope's
    :meth:`~access_audit.AuditEventEnvelope.to_json` (``Content-Type:
    application/json``), or with ``cloudevents=True`` its
    :meth:`~access_audit.AuditEventEnvelope.to_cloudevent` in structured mode
    (``Content-Type: application/cloudevents+json``). The ``Nats-Msg-Id``
    header is the envelope id.

    Guarantees:

    - The hook returns only after JetStream acknowledged every event of the
      batch: an event reported delivered is stored in a stream. The first
      event that is not acknowledged within ``timeout`` (or is refused, or
      no stream captures its subject) stops the batch and raises
      :class:`JetStreamPublishError`, so access_audit logs it and reports the
      batch through ``audit_delivery_failed``; the commit is not failed.
    - Re-publishing an event (an at-least-once relay delivering it again) is
      safe: JetStream drops a message whose ``Nats-Msg-Id`` it stored within
      the stream's ``duplicate_window`` (2 minutes by default), and
      acknowledges it with ``duplicate=True``.

    The plugin implements ``audit_events_committed``, publishing the batch's
    events one after the other: one hand-off to the connection per commit,
    and a server that cannot be reached costs a commit one ``timeout``, not
    one per event.

    The hook is ``async def``: access_audit awaits it on the application's
    own event loop inside ``await session.commit()`` of an ``AsyncSession``
    (the loop keeps running while JetStream acknowledges), and on the event
    loop the emitter owns for a sync ``Session``. A NATS connection belongs
    to the loop it was made on, so the plugin keeps one connection per
    loop, made at that loop's first publish (none at construction) and
    reconnecting by itself; while it is down, publishes time out and
    raise. :meth:`aclose` (in the application's loop, e.g. a lifespan's
    shutdown) or :meth:`close` (from synchronous code) drains every one of
    them on its own loop; a later commit opens new ones. Close the plugin
    before its loop ends: a connection left on a closed loop is dropped
    without draining. A forked child makes connections of its own.

    :param servers: a NATS URL, a comma-separated list of them, or a
        sequence (``nats://user:password@host:4222``, ``tls://...``). Empty:
        the plugin is inert (what :meth:`from_env` makes when
        ``ACCESS_AUDIT_NATS_URL`` is unset).
    :param subject_prefix: the subject's leading tokens (``"audit"``,
        ``"prod.audit"``); no wildcards, spaces or empty tokens.
    :param timeout: seconds to wait for each acknowledgement, and for
        connecting when a connection must be made first.
    :param cloudevents: publish CloudEvents 1.0 structured JSON instead of
        the envelope JSON.
    :param source: the CloudEvents ``source`` (a URI-reference naming your
        application); used when ``cloudevents`` is true.
    :param stream: if set, JetStream refuses events unless this stream
        captures them (the ``Nats-Expected-Stream`` header).
    :raises ValueError: a parameter is invalid; the message names it.
    """

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        subject_prefix: str = "audit",
        timeout: float = 5.0,
        cloudevents: bool = False,
        source: str = "/access_audit",
        stream: str | None = None,
    ) -> None:
        if isinstance(servers, str):
            servers = servers.split(",")
        self.servers: tuple[str, ...] = tuple(s.strip() for s in servers if s.strip())
        self.subject_prefix = _check_subject_prefix(subject_prefix)
        self.timeout = _check_timeout(timeout)
        self.cloudevents = bool(cloudevents)
        self.source = _check_source(source)
        self.stream = None if stream is None else _check_stream(stream)
        self._connections = PerLoop()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JetStreamPublisher:
        """Build a publisher from ``ACCESS_AUDIT_NATS_*`` variables.

        ``URL`` (servers, comma-separated; unset or empty: an inert
        publisher), ``SUBJECT_PREFIX``, ``TIMEOUT`` (seconds), ``CLOUDEVENTS``
        (``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``),
        ``SOURCE``, ``STREAM``; each unset variable keeps the constructor's
        default.

        :param environ: where to read them; :data:`os.environ` by default.
        :raises ValueError: a variable is invalid; the message names it.
        """
        env = os.environ if environ is None else environ
        servers = env.get(ENVIRONMENT_PREFIX + "URL", "")
        if not servers.strip():
            logger.debug(
                "%sURL is not set: access_audit_nats publishes nothing",
                ENVIRONMENT_PREFIX,
            )
        options: dict[str, Any] = {}
        for name, parse in (
            ("SUBJECT_PREFIX", _check_subject_prefix),
            ("TIMEOUT", lambda value: _check_timeout(float(value))),
            ("CLOUDEVENTS", _parse_bool),
            ("SOURCE", _check_source),
            ("STREAM", _check_stream),
        ):
            variable = ENVIRONMENT_PREFIX + name
            if variable in env:
                try:
                    options[name.lower()] = parse(env[variable])
                except ValueError as error:
                    raise ValueError(f"{variable}={env[variable]!r}: {error}") from None
        return cls(servers, **options)

    @property
    def enabled(self) -> bool:
        """Whether the plugin publishes (it has servers) or is inert."""
        return bool(self.servers)

    def __repr__(self) -> str:
        if not self.enabled:
            return "<JetStreamPublisher inert>"
        servers = ",".join(_without_password(server) for server in self.servers)
        return (
            f"<JetStreamPublisher servers={servers!r} "
            f"subject_prefix={self.subject_prefix!r} cloudevents={self.cloudevents}>"
        )

    def __enter__(self) -> JetStreamPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> JetStreamPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def connections(self) -> int:
        """How many event loops hold a connection of this publisher now."""
        return len(self._connections)

    def subject_for(self, envelope: AuditEventEnvelope) -> str:
        """The subject *envelope* is published to: ``<subject_prefix>.<event_type>``."""
        return f"{self.subject_prefix}.{envelope.event_type}"

    def body_for(self, envelope: AuditEventEnvelope) -> bytes:
        """The message body: envelope JSON, or CloudEvents structured JSON."""
        if self.cloudevents:
            event = envelope.to_cloudevent(source=self.source)
            return json.dumps(event, separators=(",", ":")).encode()
        return envelope.to_json().encode()

    @hookimpl
    async def audit_events_committed(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> None:
        """Publish the committed batch; return once JetStream stored every event."""
        if self.enabled:
            await self.publish(envelopes)

    async def publish(self, envelopes: Sequence[AuditEventEnvelope]) -> list[PubAck]:
        """Publish *envelopes* in order and return JetStream's acknowledgements.

        What the hook does, for relays and scripts that want the
        acknowledgements: ``ack.duplicate`` is true for an event the stream
        had already stored (then ``ack.seq`` is the stored message's). Runs
        on the running loop, with that loop's connection.

        :raises JetStreamPublishError: an event was not acknowledged; the
            events before it were.
        :raises RuntimeError: the publisher is inert (no servers).
        """
        if not self.enabled:
            raise RuntimeError(
                "this JetStreamPublisher has no servers; pass servers= or set "
                f"{ENVIRONMENT_PREFIX}URL"
            )
        batch = tuple(envelopes)
        if not batch:
            return []
        return await self._publish(batch)

    async def aclose(self) -> None:
        """Drain and close every loop's connection, each on its own loop.

        Idempotent. Await it in the application's loop at shutdown (a
        lifespan), before that loop ends; a commit after it opens a new
        connection. A connection on a loop that no longer runs is dropped.
        """
        await self._connections.aclose_all(self.timeout)

    def close(self) -> None:
        """:meth:`aclose` for synchronous code, which it blocks until drained.

        Idempotent; use it (or ``with JetStreamPublisher(...)``) where no
        loop of yours runs, e.g. with a sync ``Session`` only, whose
        connection is on the emitter's loop.

        :raises RuntimeError: called inside a loop that holds a connection:
            await :meth:`aclose` there.
        """
        self._connections.close_all(self.timeout)

    async def _publish(self, batch: tuple[AuditEventEnvelope, ...]) -> list[PubAck]:
        jetstream = await self._jetstream(batch[0])
        content_type = (
            "application/cloudevents+json" if self.cloudevents else "application/json"
        )
        acks: list[PubAck] = []
        for envelope in batch:
            subject = self.subject_for(envelope)
            headers = {"Nats-Msg-Id": str(envelope.id), "Content-Type": content_type}
            try:
                ack = await jetstream.publish(
                    subject,
                    self.body_for(envelope),
                    timeout=self.timeout,
                    stream=self.stream,
                    headers=headers,
                )
            except Exception as error:
                raise JetStreamPublishError(
                    f"audit event {envelope.id} was not acknowledged on {subject!r} "
                    f"({len(acks)} of {len(batch)} events of its batch were): "
                    f"{_describe(error)}",
                    envelope,
                    subject,
                    len(acks),
                ) from error
            if ack.duplicate:
                logger.debug("audit event %s was stored already", envelope.id)
            acks.append(ack)
        return acks

    async def _jetstream(self, first: AuditEventEnvelope) -> JetStreamContext:
        connection = self._connections.current()
        async with connection.lock:
            if connection.client is None or connection.client.is_closed:
                client = nats.aio.client.Client()

                async def disconnected() -> None:
                    # Also called by close(): only a lost connection is news.
                    if client.is_reconnecting:
                        logger.warning("lost the NATS connection; reconnecting")

                try:
                    # connect() retries by itself (waiting between attempts)
                    # and would outlast the timeout; bound it.
                    await asyncio.wait_for(
                        client.connect(
                            servers=list(self.servers),
                            name="access_audit_nats",
                            connect_timeout=max(1, round(self.timeout)),
                            error_cb=_connection_error,
                            disconnected_cb=disconnected,
                            reconnected_cb=_reconnected,
                        ),
                        self.timeout,
                    )
                except BaseException as error:
                    await client.close()
                    if not isinstance(error, Exception):  # cancelled: pass it on
                        raise
                    servers = ",".join(_without_password(s) for s in self.servers)
                    raise JetStreamPublishError(
                        f"audit event {first.id} was not published: could not "
                        f"connect to NATS at {servers} within {self.timeout} s: "
                        f"{_describe(error)}",
                        first,
                        self.subject_for(first),
                        0,
                    ) from error
                connection.client = client
                connection.jetstream = client.jetstream(timeout=self.timeout)
            assert connection.jetstream is not None
            return connection.jetstream


def _check_subject_prefix(prefix: str) -> str:
    if (
        not isinstance(prefix, str)
        or not prefix
        or any(token == "" for token in prefix.split("."))
        or any(c in prefix for c in "*> \t\r\n")
    ):
        raise ValueError(
            "subject_prefix must be one or more dot-separated NATS subject tokens "
            f"without wildcards or whitespace (e.g. 'audit'), got {prefix!r}"
        )
    return prefix


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def _check_source(source: str) -> str:
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"source must be a non-empty URI-reference string, got {source!r}"
        )
    return source


def _check_stream(stream: str) -> str:
    if not isinstance(stream, str) or not stream or any(c in stream for c in " .*>"):
        raise ValueError(
            "stream must be a JetStream stream name (no spaces, '.', '*' or '>'), "
            f"got {stream!r}"
        )
    return stream


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/true/yes/on or 0/false/no/off")


def _without_password(url: str) -> str:
    # A token is sent as the user name (nats://TOKEN@host): hide all userinfo.
    parts = urlsplit(url if "://" in url else "nats://" + url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _connection_error(error: Exception) -> None:
    logger.warning("NATS connection error: %s", _describe(error))


async def _reconnected() -> None:
    logger.info("reconnected to NATS")
