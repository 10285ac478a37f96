"""``AccessAuditMiddleware``: request metadata on the events staged during a request."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._context import AmbientContext, current_context
from .._context import ambient as ambient_context
from .._emitter import AuditEmitter
from .._request_metadata import provide_request_metadata
from ._request import (
    ID_HEADER_KEY,
    LiveMetadata,
    RequestState,
    current_request,
    request_metadata,
)

__all__ = ["AccessAuditMiddleware"]


class AccessAuditMiddleware:
    """A pure ASGI middleware: events staged during an HTTP request carry its metadata.

    Add it with ``app.add_middleware(AccessAuditMiddleware)``. Each event
    staged while a request is served (in the endpoint or its dependencies)
    gets, captured when it is staged, the metadata keys of
    the Flask extension: ``ip_address`` (the ASGI scope's ``client``),
    ``user_agent``, ``request_id``, ``method``, ``path`` and ``endpoint`` (the
    matched route's path template, ``/groups/{group_id}``; None if no route
    matched). Outside a request these keys are absent. Each request keeps its
    own in a :class:`~contextvars.ContextVar`, so concurrent requests never see
    each other's.

    ``ip_address`` is the address the server saw: behind a reverse proxy,
    run uvicorn with ``--proxy-headers --forwarded-allow-ips`` naming the
    proxy (its ``ProxyHeadersMiddleware`` rewrites the scope's client). A
    raw ``X-Forwarded-For`` header is written by the client and is never read.

    ``request_id`` is the sent ``X-Request-ID`` if it is 1 to 128 characters
    of ``[A-Za-z0-9._:-]``, else one generated for the request; every event
    of the request carries the same, and the response's ``X-Request-ID``
    header is set to it.

    :param emitter: give the metadata to this emitter's events only, through
        its ``metadata_provider`` (under what that provider returns, as the
        Flask extension does). Without it, the metadata is ambient, as if the
        request ran inside :func:`~access_audit.audit_context`: every
        emitter's events get it, an inner ``audit_context`` and the call's
        own ``metadata=`` win over it, and it wins over a ``metadata_provider``.
    """

    def __init__(self, app: ASGIApp, *, emitter: AuditEmitter | None = None) -> None:
        self.app = app
        self.emitter = emitter
        if emitter is not None:
            _provide_to(emitter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI call; only ``http`` requests get metadata."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = RequestState(scope)
        echoed = state.request_id.encode("ascii")

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (key, value)
                    for key, value in message.get("headers", ())
                    if key.lower() != ID_HEADER_KEY
                ]
                headers.append((ID_HEADER_KEY, echoed))
                message = {**message, "headers": headers}
            await send(message)

        with _serving(state, ambient=self.emitter is None):
            await self.app(scope, receive, send_with_request_id)


@contextlib.contextmanager
def _serving(state: RequestState, *, ambient: bool) -> Iterator[None]:
    request_token = current_request.set(state)
    try:
        if ambient:
            # audit_context's own variable, with a mapping that reads the
            # route when an event is staged: it is found after this point.
            enclosing = current_context()
            live = LiveMetadata(enclosing.metadata, state)
            with ambient_context(AmbientContext(enclosing.actor, live)):
                yield
        else:
            yield
    finally:
        current_request.reset(request_token)


def _provide_to(emitter: AuditEmitter) -> None:
    provider = emitter.metadata_provider
    if (
        isinstance(provider, functools.partial)
        and provider.func is provide_request_metadata
        and provider.args[0] is request_metadata
    ):
        return  # another middleware (a second app) gave it already
    emitter.metadata_provider = functools.partial(
        provide_request_metadata, request_metadata, provider
    )
