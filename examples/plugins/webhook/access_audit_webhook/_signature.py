"""The request signature: made by the plugin, checked by the receiver.

``X-Audit-Signature: sha256=<hex>`` is the HMAC-SHA256, keyed with the shared
secret, of ``f"{timestamp}.".encode() + body``: the ``X-Audit-Timestamp``
header value (unix seconds, ASCII digits), a dot, and the raw request body
bytes exactly as sent. Signing the timestamp with the body lets a receiver
refuse a captured request replayed later. No other header is signed, so a
receiver de-duplicates by the event ``id`` inside the body, never by
``X-Audit-Event-Id``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

__all__ = ["SIGNATURE_PREFIX", "sign", "verify_signature"]

SIGNATURE_PREFIX = "sha256="
"""What the ``X-Audit-Signature`` value starts with; the hex digest follows."""

# The sender writes 10 digits until the year 2286; at most 15 keep int() and
# the float arithmetic on a timestamp exact, and clear of int()'s digit limit.
_TIMESTAMP_DIGITS = 15


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _key(secret: str | bytes) -> bytes:
    key = _as_bytes(secret)
    if not key:
        # Anyone can compute an HMAC with an empty key.
        raise ValueError("secret must not be empty")
    return key


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _utf8(value: object) -> bytes | None:
    """*value* as bytes (a ``str`` encoded as UTF-8), or None if it cannot be."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return None
    return None


def _ascii(value: object) -> str | None:
    """A header value (``str`` or ``bytes``) as text, or None if it is not ASCII."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and value.isascii() else None


def _timestamp(value: object) -> str | None:
    """The timestamp as the sender writes it, ASCII digits, or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value) if 0 <= value < 10**_TIMESTAMP_DIGITS else None
    text = _ascii(value)
    # Only what the sender writes: int() would also take "+1", " 1", "1_0".
    if text is None or not text.isdigit() or len(text) > _TIMESTAMP_DIGITS:
        return None
    return text


def _hex_digest(signature: object) -> bytes | None:
    """The lowercased part after ``sha256=``, or None if there is no such part."""
    text = _ascii(signature)
    if text is None or not text.startswith(SIGNATURE_PREFIX):
        return None
    return text[len(SIGNATURE_PREFIX) :].lower().encode("ascii")


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
    timestamp: int | str | bytes | None,
    body: bytes | str,
    signature: str | bytes | None,
    tolerance: float = 300,
    *,
    now: float | None = None,
) -> bool:
    """Check a request's signature on the receiving side; True if it is genuine.

    Pass the ``X-Audit-Timestamp`` and ``X-Audit-Signature`` header values
    (``str`` or ``bytes``, as your framework gives them; None for a missing
    header) and the raw body bytes as received, before parsing the JSON (a
    re-serialised body does not match). The digests are compared in constant
    time (:func:`hmac.compare_digest`).

    Returns False, and never raises, for whatever the request carries: a
    missing header, a value of any other type, a timestamp that is not ASCII
    digits (at most 15), a signature without the ``sha256=`` prefix or that
    is not ASCII, a timestamp more than *tolerance* seconds away from *now*
    (either way: a replayed request, or a clock too far off), a digest that
    does not match. A *secret* or *body* of another type, or a ``str`` one
    that UTF-8 cannot encode, is refused with False too.

    A True covers the timestamp and the body only: headers such as
    ``X-Audit-Event-Id`` are not signed. Within *tolerance* a captured
    request can be replayed, and a genuine one may arrive twice (a retry
    after a timeout), so de-duplicate by the ``id`` inside the body.

    :param secret: the shared secret (a ``str`` is encoded as UTF-8).
    :param tolerance: the largest accepted age of the timestamp, in seconds.
    :param now: the current unix time; defaults to :func:`time.time`.
    :raises ValueError: only for the receiver's own mistakes, under which no
        answer would mean anything: an empty *secret* (anyone can compute an
        HMAC keyed with nothing), a *tolerance* that is not a number >= 0, or
        a *now* that is not a finite number.
    """
    if isinstance(secret, (str, bytes)) and not secret:
        raise ValueError("secret must not be empty")
    if not (_is_number(tolerance) and tolerance >= 0):  # NaN fails too
        raise ValueError(
            f"tolerance must be a number of seconds >= 0, got {tolerance!r}"
        )
    if now is not None and not (_is_number(now) and math.isfinite(now)):
        raise ValueError(f"now must be a finite unix time, got {now!r}")
    key, message_body = _utf8(secret), _utf8(body)
    sent_at, given = _timestamp(timestamp), _hex_digest(signature)
    if key is None or message_body is None or sent_at is None or given is None:
        return False
    if abs((time.time() if now is None else now) - int(sent_at)) > tolerance:
        return False
    message = f"{sent_at}.".encode("ascii") + message_body
    expected = hmac.new(key, message, hashlib.sha256).hexdigest().encode("ascii")
    return hmac.compare_digest(expected, given)
