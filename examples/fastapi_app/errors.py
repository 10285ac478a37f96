"""What an operation raises when it cannot be done; the API maps each to a status.

The Flask example's ``access_app.errors`` is the same idea, but importing
anything from ``access_app`` imports Flask; this app needs only FastAPI.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "Forbidden",
    "GroupLocked",
    "NotFound",
    "OperationError",
    "Unauthorized",
]


class OperationError(Exception):
    """An operation refused: nothing it did may be committed.

    The API answers with :attr:`status` and the message; the request's
    session is closed without a commit, so what it staged is discarded.
    """

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthorized(OperationError):
    """No acting user: the ``X-User-Id`` header is missing or names nobody."""

    status = 401


class NotFound(OperationError):
    """A referenced row does not exist."""

    status = 404


class Forbidden(OperationError):
    """The acting user may not do this."""

    status = 403


class Conflict(OperationError):
    """The current state forbids it (a duplicate name, a request already decided)."""

    status = 409


class GroupLocked(Conflict):
    """A locked group was given a new member (raised when the membership is flushed)."""
