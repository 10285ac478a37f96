"""``WebhookPlugin``: POST committed events to an HTTP(S) endpoint, signed.

:class:`WebhookPlugin` sends with :mod:`urllib.request` from a plain ``def``
hook, in the committing thread; :class:`AsyncWebhookPlugin` (in
``_async_plugin``) sends with a pooled ``httpx.AsyncClient`` from an
``async def`` hook. Both build, sign and retry requests with the code of
:class:`_Webhook` here; each hook returns once the endpoint has answered 2xx
for every request, and raises :class:`WebhookDeliveryError` otherwise, so
access_audit logs the failure and reports it through
``audit_delivery_failed``.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import os
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from time import sleep, time
from typing import IO, TYPE_CHECKING, TypeVar

from access_audit import hookimpl

from ._signature import secret_key, sign

if TYPE_CHECKING:
    from email.message import Message

    from access_audit import AuditEventEnvelope

__all__ = [
    "DEFAULT_SOURCE",
    "ENVIRONMENT_VARIABLES",
    "EnvironmentWebhookPlugin",
    "WebhookDeliveryError",
    "WebhookPlugin",
]

logger = logging.getLogger("access_audit.webhook")

DEFAULT_SOURCE = "/access_audit"
"""The CloudEvents ``source`` when none is configured."""

ENVIRONMENT_VARIABLES = (
    "ACCESS_AUDIT_WEBHOOK_URL",
    "ACCESS_AUDIT_WEBHOOK_SECRET",
    "ACCESS_AUDIT_WEBHOOK_TIMEOUT",
    "ACCESS_AUDIT_WEBHOOK_ATTEMPTS",
    "ACCESS_AUDIT_WEBHOOK_BACKOFF",
    "ACCESS_AUDIT_WEBHOOK_JITTER",
    "ACCESS_AUDIT_WEBHOOK_CLOUDEVENTS",
    "ACCESS_AUDIT_WEBHOOK_SOURCE",
    "ACCESS_AUDIT_WEBHOOK_BATCH",
)
"""What :meth:`WebhookPlugin.from_env` reads; an empty value counts as unset."""

_USER_AGENT = "access-audit-webhook"
_W = TypeVar("_W", bound="_Webhook")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_BOOLEAN = "a boolean (1/true/yes/on or 0/false/no/off)"


class WebhookDeliveryError(Exception):
    """A request was not answered 2xx: retries ran out, or it was refused.

    Raised from the hook, ``from`` the last error (the
    :class:`urllib.error.HTTPError`, the timeout, the connection error).

    :ivar url: the endpoint, without its query string.
    :ivar attempts: how many times the failing request was sent.
    :ivar status: the last HTTP status received, or None (no response).
    :ivar delivered: the envelopes of the batch the endpoint accepted (per-event
        mode: those before the failing one).
    :ivar undelivered: the others: the failing one and those after it, which
        were not sent.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        attempts: int,
        status: int | None,
        delivered: tuple[AuditEventEnvelope, ...],
        undelivered: tuple[AuditEventEnvelope, ...],
    ) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts
        self.status = status
        self.delivered = delivered
        self.undelivered = undelivered


@dataclasses.dataclass(frozen=True)
class _Request:
    """One POST to make: its body, its ``webhook-id``, its unsigned headers,
    and what the batch has delivered if it succeeds or not if it fails."""

    body: bytes
    msg_id: str
    headers: dict[str, str]
    delivered: tuple[AuditEventEnvelope, ...]
    undelivered: tuple[AuditEventEnvelope, ...]


@dataclasses.dataclass(frozen=True)
class _Failure:
    attempts: int
    status: int | None
    error: BaseException
    reason: str


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # urllib follows a 301/302/303 answer to a POST with a GET *without the
    # body*: the final 200 would report an event as delivered that never was.
    # Returning None makes the 3xx an HTTPError, a refusal like a 4xx.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


# Shared by every WebhookPlugin: an OpenerDirector keeps no per-request state.
_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _display_url(url: str) -> str:
    # Query strings often carry tokens: keep them out of logs and messages.
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class _Webhook:
    """What both plugins share: settings, the requests to make, signing, retries.

    **What is sent.** By default one ``POST`` per event, in staging order, its
    body the envelope's :meth:`~access_audit.AuditEventEnvelope.to_json`
    (``Content-Type: application/json``). With ``batch=True``, one ``POST``
    per committed transaction whose body is a JSON array of those objects.
    With ``cloudevents=True`` each object is instead the CloudEvents 1.0
    structured-mode event of
    :meth:`~access_audit.AuditEventEnvelope.to_cloudevent` with *source*
    (``Content-Type: application/cloudevents+json``, or
    ``application/cloudevents-batch+json`` for a batch). Headers, per the
    Standard Webhooks specification:

    - ``webhook-id``: the envelope id (per event), or the transaction id (a
      batch: de-duplicate by each element's ``id``). The same on every
      retry and every re-delivery, and signed: the de-duplication key;
    - ``webhook-timestamp``: unix seconds when this attempt was sent;
    - ``webhook-signature: v1,<base64>`` when a *secret* is set: the
      HMAC-SHA256 of ``"{id}.{timestamp}.{body}"`` (see
      :func:`~access_audit_webhook.sign`). Each attempt is signed afresh, so
      a retry carries a current timestamp;
    - ``X-Audit-Transaction-Id``: the id shared by the commit's events (not
      signed; for routing and logs).

    **Guarantees.** The hook returns only after the endpoint answered 2xx to
    every request. A connection error, a timeout, a 5xx or a 429 is retried
    up to *attempts* sends in all, waiting ``backoff * 2 ** (n - 1)`` seconds
    after the n-th failure (with *jitter*, a random time up to that). Any
    other answer (3xx: redirects are not followed; 4xx) fails at once. When
    a request fails, the events after it in the batch are not sent (the
    endpoint is presumably down), and the hook raises
    :class:`WebhookDeliveryError` naming what was and was not delivered.
    A request that timed out may still have been processed, so a retry can
    deliver an event twice: receivers de-duplicate by ``webhook-id``.

    When the endpoint is down a delivery takes up to about
    ``attempts * timeout`` plus the waits (16.5 s with the defaults).
    Proxies are taken from the usual ``*_proxy`` environment variables;
    HTTPS certificates are verified against the default trust store
    (``SSL_CERT_FILE`` changes it). Instances are safe to share between
    threads.

    :param url: the endpoint, ``http://`` or ``https://``.
    :param secret: the signing secret, ``whsec_<base64>`` text (the Standard
        Webhooks form; bare base64 too) or the raw key bytes; without one,
        requests are unsigned and the endpoint must authenticate them some
        other way.
    :param timeout: seconds per socket operation (connect, each read).
    :param attempts: how many times a request is sent at most (1: no retry).
    :param backoff: the first wait between attempts, in seconds.
    :param jitter: wait a uniformly random time up to each computed wait.
    :param cloudevents: send CloudEvents structured JSON.
    :param source: the CloudEvents ``source`` attribute.
    :param batch: one request per committed transaction, a JSON array.
    :raises ValueError: a setting is invalid; the message names it.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | bytes | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
        jitter: bool = False,
        cloudevents: bool = False,
        source: str = DEFAULT_SOURCE,
        batch: bool = False,
    ) -> None:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"url {url!r} names no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "url must not carry credentials (user:password@): they would be "
                "logged; authenticate requests with secret= (the signature)"
            )
        if secret is not None:
            if not secret:
                raise ValueError("secret must not be empty; pass None to send unsigned")
            secret_key(secret)  # refuses what is not whsec_<base64> or bytes
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")
        if not (backoff >= 0 and math.isfinite(backoff)):
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        if not isinstance(source, str) or not source:
            raise ValueError("source must be a non-empty URI-reference string")
        self.url = url
        self.timeout = float(timeout)
        self.attempts = attempts
        self.backoff = float(backoff)
        self.jitter = jitter
        self.cloudevents = cloudevents
        self.source = source
        self.batch = batch
        self._secret = secret
        self._display_url = _display_url(url)
        self._start()

    def _start(self) -> None:
        """Set up a subclass's own state, at the end of construction."""

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} url={self._display_url!r} "
            f"signed={self._secret is not None} cloudevents={self.cloudevents} "
            f"batch={self.batch}>"
        )

    @classmethod
    def from_env(cls: type[_W], environ: Mapping[str, str] | None = None) -> _W | None:
        """Build a plugin from the ``ACCESS_AUDIT_WEBHOOK_*`` variables.

        Returns None when ``ACCESS_AUDIT_WEBHOOK_URL`` is unset or empty. Each
        other variable, when set, gives the constructor argument of the same
        name (``..._TIMEOUT`` is ``timeout``); booleans are
        ``1/true/yes/on`` or ``0/false/no/off``.

        :param environ: defaults to :data:`os.environ`.
        :raises ValueError: a variable's value is invalid; the message names it.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(f"ACCESS_AUDIT_WEBHOOK_{name}") or None

        url = get("URL")
        if url is None:
            return None
        options: dict[str, object] = {}
        for name, parse, expected in (
            ("SECRET", str, ""),
            ("TIMEOUT", float, "a number of seconds"),
            ("ATTEMPTS", int, "a whole number"),
            ("BACKOFF", float, "a number of seconds"),
            ("JITTER", _boolean, _BOOLEAN),
            ("CLOUDEVENTS", _boolean, _BOOLEAN),
            ("SOURCE", str, ""),
            ("BATCH", _boolean, _BOOLEAN),
        ):
            value = get(name)
            if value is not None:
                try:
                    options[name.lower()] = parse(value)
                except ValueError:
                    raise ValueError(
                        f"ACCESS_AUDIT_WEBHOOK_{name}={value!r} is not {expected}"
                    ) from None
        try:
            return cls(url, **options)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"ACCESS_AUDIT_WEBHOOK_*: {error}") from error

    def _requests(self, envelopes: Sequence[AuditEventEnvelope]) -> Iterator[_Request]:
        """The POSTs for a committed batch, in order: one, or one per event."""
        batch = tuple(envelopes)
        if not batch:
            return
        common = {
            "User-Agent": _USER_AGENT,
            "X-Audit-Transaction-Id": str(batch[0].transaction_id),
        }
        if self.batch:
            if self.cloudevents:
                items = [envelope.to_cloudevent(self.source) for envelope in batch]
                body = json.dumps(items, separators=(",", ":"))
                content_type = "application/cloudevents-batch+json"
            else:
                body = "[" + ",".join(envelope.to_json() for envelope in batch) + "]"
                content_type = "application/json"
            headers = {**common, "Content-Type": content_type}
            msg_id = str(batch[0].transaction_id)
            if batch[0].sequence:
                # A slice after the first (the relay's, of a transaction
                # larger than its batch): another body, so another id.
                msg_id += f"-{batch[0].sequence}"
            yield _Request(body.encode(), msg_id, headers, (), batch)
            return
        content_type = (
            "application/cloudevents+json" if self.cloudevents else "application/json"
        )
        for index, envelope in enumerate(batch):
            if self.cloudevents:
                body = json.dumps(
                    envelope.to_cloudevent(self.source), separators=(",", ":")
                )
            else:
                body = envelope.to_json()
            yield _Request(
                body.encode(),
                str(envelope.id),
                {**common, "Content-Type": content_type},
                batch[:index],
                batch[index:],
            )

    def _attempt_headers(self, request: _Request) -> dict[str, str]:
        """*request*'s headers for one attempt: stamped now, and signed."""
        timestamp = str(int(time()))
        headers = {
            **request.headers,
            "webhook-id": request.msg_id,
            "webhook-timestamp": timestamp,
        }
        if self._secret is not None:
            headers["webhook-signature"] = sign(
                self._secret, request.msg_id, timestamp, request.body
            )
        return headers

    def _retry_delay(self, failure: _Failure, retry: bool) -> float | None:
        """Seconds to wait before the next attempt, or None: give up (logged)."""
        if not retry or failure.attempts >= self.attempts:
            return None
        delay: float = self.backoff * 2 ** (failure.attempts - 1)
        if self.jitter:
            delay = random.uniform(0, delay)
        logger.warning(
            "POST %s attempt %d of %d failed (%s); retrying in %.3f s",
            self._display_url,
            failure.attempts,
            self.attempts,
            failure.reason,
            delay,
        )
        return delay

    def _error(self, request: _Request, failure: _Failure) -> WebhookDeliveryError:
        delivered, undelivered = request.delivered, request.undelivered
        error = WebhookDeliveryError(
            f"POST {self._display_url} failed after {failure.attempts} "
            f"attempt{'s' if failure.attempts > 1 else ''} ({failure.reason}); "
            f"{len(undelivered)} of {len(delivered) + len(undelivered)} events "
            "not delivered",
            url=self._display_url,
            attempts=failure.attempts,
            status=failure.status,
            delivered=delivered,
            undelivered=undelivered,
        )
        error.__cause__ = failure.error
        return error


def retryable_status(status: int) -> bool:
    """Whether an HTTP answer is worth sending again: 429 and 5xx."""
    return status == 429 or 500 <= status <= 599


class WebhookPlugin(_Webhook):
    """POST each committed event (or batch) with :mod:`urllib.request`, from a sync hook.

    For synchronous applications: the hook is a plain ``def`` and runs in
    the committing thread (or the background worker), which it holds until
    the endpoint has answered; a connection is opened per request. What is
    sent, how it is signed and retried: see :class:`_Webhook` (the same for
    :class:`~access_audit_webhook.AsyncWebhookPlugin`, the pooled ``async
    def`` one for asyncio applications).
    """

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """POST *envelopes*: one request each, or one for all with ``batch``.

        :raises WebhookDeliveryError: a request was not answered 2xx.
        """
        for request in self._requests(envelopes):
            failure = self._send(request)
            if failure is not None:
                raise self._error(request, failure)

    def _send(self, request: _Request) -> _Failure | None:
        """POST *request* until a 2xx, a refusal, or the last attempt; None on 2xx."""
        attempt = 0
        while True:
            attempt += 1
            sent = urllib.request.Request(
                self.url,
                data=request.body,
                headers=self._attempt_headers(request),
                method="POST",
            )
            status: int | None = None
            try:
                with _OPENER.open(sent, timeout=self.timeout):
                    pass
                return None
            except urllib.error.HTTPError as error:
                error.close()
                status = error.code
                retry = retryable_status(status)
                failed: BaseException = error
                reason = f"HTTP {status} {error.reason}"
            except (OSError, http.client.HTTPException) as error:
                # URLError (refused, DNS, connect timeout), TimeoutError on a
                # read, RemoteDisconnected, a malformed status line.
                retry = True
                failed = error
                cause = getattr(error, "reason", None)
                reason = repr(cause if isinstance(cause, BaseException) else error)
            failure = _Failure(attempt, status, failed, reason)
            delay = self._retry_delay(failure, retry)
            if delay is None:
                return failure
            sleep(delay)


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)


class EnvironmentWebhookPlugin:
    """The entry-point plugin: a :class:`WebhookPlugin` built from the environment.

    The ``ACCESS_AUDIT_WEBHOOK_*`` variables are read at each commit (the
    plugin is rebuilt only when they changed), so a process may set them
    after import. With ``ACCESS_AUDIT_WEBHOOK_URL`` unset or empty the
    plugin is inert: it sends nothing, raises nothing, and logs one debug
    line per batch. An invalid value raises :class:`ValueError` from the hook
    at every commit, so misconfiguration is reported, never ignored.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._cached: tuple[tuple[str | None, ...], WebhookPlugin | None] | None = None

    def __repr__(self) -> str:
        return "<EnvironmentWebhookPlugin ACCESS_AUDIT_WEBHOOK_*>"

    def configured(self) -> WebhookPlugin | None:
        """The plugin the variables describe now, or None when no URL is set.

        :raises ValueError: a variable's value is invalid.
        """
        env = os.environ if self._environ is None else self._environ
        key = tuple(env.get(name) for name in ENVIRONMENT_VARIABLES)
        cached = self._cached
        if cached is None or cached[0] != key:
            cached = (key, WebhookPlugin.from_env(env))
            # One assignment: threads see the old pair or the new one.
            self._cached = cached
        return cached[1]

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Deliver like :class:`WebhookPlugin`, or return at once when unset."""
        plugin = self.configured()
        if plugin is None:
            logger.debug("ACCESS_AUDIT_WEBHOOK_URL is not set: nothing sent")
            return
        plugin.audit_events_committed(envelopes)
