"""Request metadata, captured when an event is staged (the request may be gone
by the time the transaction commits)."""

from __future__ import annotations

import uuid
from typing import Any

from flask import has_request_context, request

from .._request_metadata import REQUEST_ID_HEADER
from .._request_metadata import request_metadata as metadata_of

__all__ = ["request_metadata"]

_MAX_REQUEST_ID = 200
_ENVIRON_REQUEST_ID = "access_audit.request_id"


def request_metadata() -> dict[str, Any] | None:
    """The current request's metadata, or None outside a request.

    ``ip_address`` is ``request.remote_addr``: behind a proxy, apply werkzeug's
    ``ProxyFix`` so that it is the client's address. A raw ``X-Forwarded-For``
    header is sent by the client and is never read here.
    """
    if not has_request_context():
        return None
    return metadata_of(
        ip_address=request.remote_addr,
        user_agent=request.headers.get("User-Agent"),
        request_id=request_id(),
        method=request.method,
        path=request.path,
        endpoint=request.endpoint,
    )


def request_id() -> str:
    """The request's id: a sane ``X-Request-ID`` header, else one generated once.

    Every event of one request gets the same id.
    """
    # Kept in the WSGI environ: it is the request's own (an app context, and
    # so flask.g, may outlive several requests, in tests for one).
    environ = request.environ
    found: str | None = environ.get(_ENVIRON_REQUEST_ID)
    if found is None:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        if 0 < len(sent) <= _MAX_REQUEST_ID and sent.isprintable():
            found = sent
        else:
            found = uuid.uuid4().hex
        environ[_ENVIRON_REQUEST_ID] = found
    return found
