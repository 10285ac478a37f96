"""What an operation raises when it cannot be done; the API maps each to a status."""

from __future__ import annotations

__all__ = [
    "Conflict",
    "Forbidden",
    "GroupLocked",
    "InvalidInput",
    "NotFound",
    "OperationError",
]


class OperationError(Exception):
    """An operation refused: nothing it did may be committed.

    The API rolls the request's transaction back and answers with
    :attr:`status` and the message.
    """

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(OperationError):
    """A value is missing or malformed."""

    status = 400


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
    """A role was assigned to a locked group."""
