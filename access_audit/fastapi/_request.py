"""The request being served, kept in a context variable while it runs, and the
metadata events staged during it carry (read when an event is staged: the
request may be gone by the time the transaction commits)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from starlette.types import Scope

from .._request_metadata import REQUEST_ID_HEADER
from .._request_metadata import request_metadata as metadata_of

__all__ = [
    "ID_HEADER_KEY",
    "LiveMetadata",
    "RequestState",
    "current_request",
    "request_metadata",
]

ID_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestState:
    """One HTTP request as the middleware saw it: its scope and its id."""

    __slots__ = ("_fixed", "request_id", "scope")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.request_id = _request_id(scope)
        """The sent ``X-Request-ID`` if it is 1 to 128 characters of
        ``[A-Za-z0-9._:-]``, else a new one: the same for all the request's events."""
        client = scope.get("client")
        # Fixed for the request's life; only the route is found later.
        self._fixed = metadata_of(
            ip_address=client[0] if client else None,
            user_agent=_header(scope, b"user-agent"),
            request_id=self.request_id,
            method=scope["method"],
            path=scope["path"],
            endpoint=None,
        )

    def metadata(self) -> dict[str, Any]:
        """The request's metadata now: ``endpoint`` is the matched route's path
        template (``/groups/{group_id}``), None before routing or without a match."""
        return {**self._fixed, "endpoint": self.endpoint()}

    def endpoint(self) -> str | None:
        """The matched route's path template, or None."""
        # Starlette's router sets scope["route"] in the scope dict it was
        # given, which is this one: a pure ASGI middleware passes it on as is.
        # Newer FastAPI routes a request for an included router to the
        # router's own APIRoute (its path lacks the include's prefix) and
        # keeps the prefixed one as the "effective route context".
        fastapi_state = self.scope.get("fastapi")
        effective = (
            fastapi_state.get("effective_route_context")
            if isinstance(fastapi_state, dict)
            else None
        )
        for route in (effective, self.scope.get("route")):
            path = getattr(route, "path_format", None)
            if isinstance(path, str):
                return path
        return None


current_request: ContextVar[RequestState | None] = ContextVar(
    "access_audit_fastapi_request", default=None
)
"""The request being served here; None outside one (set by the middleware)."""


def request_metadata() -> dict[str, Any] | None:
    """The current request's metadata, or None outside a request."""
    state = current_request.get()
    return None if state is None else state.metadata()


class LiveMetadata(Mapping[str, Any]):
    """Ambient metadata for a request: the enclosing context's, then the
    request's, with ``endpoint`` read each time it is looked up (so at stage time)."""

    __slots__ = ("_fixed", "_state")

    def __init__(self, enclosing: Mapping[str, Any], state: RequestState) -> None:
        self._fixed = {**enclosing, **state.metadata()}
        self._state = state

    def __getitem__(self, key: str) -> Any:
        if key == "endpoint":
            return self._state.endpoint()
        return self._fixed[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fixed)

    def __len__(self) -> int:
        return len(self._fixed)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _request_id(scope: Scope) -> str:
    sent = _header(scope, ID_HEADER_KEY)
    if sent is not None and _SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex
