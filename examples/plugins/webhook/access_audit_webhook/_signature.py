"""Request signing per the Standard Webhooks specification (https://www.standardwebhooks.com/).

Each request carries ``webhook-id`` (the envelope id; the transaction id for a
batch), ``webhook-timestamp`` (unix seconds when this attempt was sent) and,
with a secret, ``webhook-signature: v1,<base64>``: the HMAC-SHA256, keyed
with the secret's bytes, of ``f"{id}.{timestamp}.".encode() + body``. The id
and the timestamp are signed with the body, so a receiver can refuse a
replayed request and de-duplicate by ``webhook-id``. Receivers verify with
any Standard Webhooks library, e.g. ``standardwebhooks.Webhook(secret).verify``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["SECRET_PREFIX", "secret_key", "sign"]

SECRET_PREFIX = "whsec_"
"""What a Standard Webhooks secret given as text starts with; base64 follows."""


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of *secret*: ``whsec_<base64>`` (or bare base64) text, or raw bytes.

    :raises ValueError: the text is not base64, or the key is empty.
    """
    if isinstance(secret, str):
        text = secret.removeprefix(SECRET_PREFIX).rstrip("=")
        try:
            # Padding optional, as standardwebhooks' own Webhook takes it.
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "secret must be 'whsec_' followed by base64 (the Standard Webhooks "
                "form), or raw bytes"
            ) from None
    elif isinstance(secret, bytes):
        key = secret
    else:
        raise ValueError(f"secret must be str or bytes, got {type(secret).__name__}")
    if not key:
        # Anyone can compute an HMAC with an empty key.
        raise ValueError("secret must not be empty")
    return key


def sign(secret: str | bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``webhook-signature`` value for *body* sent as *msg_id* at *timestamp*.

    :param secret: as :func:`secret_key` takes it.
    :raises ValueError: *secret* is invalid.
    """
    message = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")
