"""The request metadata the web integrations (Flask, FastAPI) add to events.

One place for the key names, so that an event looks the same whichever
framework served the request, and for how they merge with an emitter's own
``metadata_provider``. Nothing here imports a web framework.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._context import MetadataProvider

__all__ = ["REQUEST_ID_HEADER", "provide_request_metadata", "request_metadata"]

REQUEST_ID_HEADER = "X-Request-ID"
"""The header a request id is read from (and, by the ASGI middleware, echoed on)."""


def request_metadata(
    *,
    ip_address: str | None,
    user_agent: str | None,
    request_id: str,
    method: str,
    path: str,
    endpoint: str | None,
) -> dict[str, Any]:
    """The metadata of one request, under the keys every integration uses."""
    return {
        "ip_address": ip_address,
        "user_agent": user_agent,
        "request_id": request_id,
        "method": method,
        "path": path,
        "endpoint": endpoint,
    }


def provide_request_metadata(
    current: Callable[[], Mapping[str, Any] | None],
    provider: MetadataProvider | None,
) -> Mapping[str, Any] | None:
    """An emitter's ``metadata_provider``: *current* request's metadata (None
    outside a request), under what the emitter's own *provider* returns."""
    found = current()
    extra = None if provider is None else provider()
    if extra is None:
        return found
    return {**(found or {}), **extra}
