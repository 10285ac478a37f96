"""The request signature: made by the plugin, checked by the receiver.

``X-Audit-Signature: sha256=<hex>`` is the HMAC-SHA256, keyed with the shared
secret, of ``f"{timestamp}.".encode() + body``: the ``X-Audit-Timestamp``
header value (unix seconds, ASCII digits), a dot, and the raw request body
bytes exactly as sent. Signing the timestamp with the body lets a receiver
refuse a captured request replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_PREFIX", "sign", "verify_signature"]

SIGNATURE_PREFIX = "sha256="
"""What the ``X-Audit-Signature`` value starts with; the hex digest follows."""


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _key(secret: str | bytes) -> bytes:
    key = _as_bytes(secret)
    if not key:
        # Anyone can compute an HMAC with an empty key.
        raise ValueError("secret must not be empty")
    return key


def sign(secret: str | bytes, timestamp: int | str, body: bytes | str) -> str:
    """Return the ``X-Audit-Signature`` value for *body* sent at *timestamp*.

    :param secret: the shared secret (a ``str`` is encoded as UTF-8).
    :param timestamp: the ``X-Audit-Timestamp`` value, unix seconds.
    :param body: the request body (a ``str`` is encoded as UTF-8).
    :raises ValueError: *secret* is empty.
    """
    message = f"{timestamp}.".encode("ascii") + _as_bytes(body)
    digest = hmac.new(_key(secret), message, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify_signature(
    secret: str | bytes,
    timestamp: int | str,
    body: bytes | str,
    signature: str,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Check a request's signature on the receiving side; True if it is genuine.

    Pass the ``X-Audit-Timestamp`` and ``X-Audit-Signature`` header values and
    the raw body bytes as received, before parsing the JSON (a re-serialised
    body does not match). Returns False, never raises, for a signature or
    timestamp that is malformed, a timestamp more than *tolerance* seconds
    away from *now* (either way: a replayed request, or a clock too far off),
    or a digest that does not match; the digests are compared in constant
    time (:func:`hmac.compare_digest`). A genuine request may still arrive
    twice (a retry after a timeout): de-duplicate by ``X-Audit-Event-Id``.

    :param secret: the shared secret (a ``str`` is encoded as UTF-8).
    :param tolerance: the largest accepted age of the timestamp, in seconds.
    :param now: the current unix time; defaults to :func:`time.time`.
    :raises ValueError: *secret* is empty, or *tolerance* is negative.
    """
    key = _key(secret)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 seconds, got {tolerance!r}")
    if isinstance(timestamp, bool):
        return False
    if isinstance(timestamp, int):
        timestamp = str(timestamp)
    # Only what the sender writes: ASCII digits (int() would also take
    # "+1", " 1", "1_0" and non-ASCII digits).
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    if not signature.startswith(SIGNATURE_PREFIX):
        return False
    try:
        given = signature[len(SIGNATURE_PREFIX) :].lower().encode("ascii")
    except UnicodeEncodeError:
        return False
    message = f"{timestamp}.".encode("ascii") + _as_bytes(body)
    expected = hmac.new(key, message, hashlib.sha256).hexdigest().encode("ascii")
    return hmac.compare_digest(expected, given)
