"""``StagedEvent``: an event waiting for its transaction, as staging made it."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from ._clock import utc_datetime
from ._ids import as_uuid
from ._values import (
    NO_RULES,
    PayloadRules,
    call_lazy,
    check_text,
    int_text,
    resolve_lazy,
)

__all__ = ["StagedEvent", "TargetId", "optional_text", "target_id_text"]

TargetId = str | int | uuid.UUID
"""What a target id may be staged as; envelopes carry it as ``str``."""


@dataclasses.dataclass(slots=True, eq=False)
class StagedEvent:
    """An event waiting for its transaction to commit.

    This is what :data:`~access_audit.signals.audit_event_discarded` receivers
    get when an event is dropped. ``target_id``, ``target_name`` and values in
    ``payload`` may still be the zero-argument callables they were staged
    with: those are resolved only when the transaction commits, never for one
    that rolls back.
    """

    _id_int: int = dataclasses.field(repr=False)
    """The id as a 128-bit int: the UUID object is made only when needed."""
    event_type: str
    _staged_ns: int = dataclasses.field(repr=False)
    """The clock reading of staging, in nanoseconds since the Unix epoch:
    reading the clock is cheaper than making a datetime, which waits."""
    actor_id: str
    actor_email: str | None
    target_type: str
    target_id: str | Callable[[], TargetId]
    target_name: str | Callable[[], str | None] | None
    action: str
    reason: str | None
    payload: Mapping[str, Any]
    metadata: Mapping[str, Any]
    _lazy: bool = dataclasses.field(repr=False)
    """Whether some value is still an unresolved callable."""
    _rules: PayloadRules = dataclasses.field(default=NO_RULES, repr=False)

    @property
    def id(self) -> uuid.UUID:
        """The event's UUIDv7, as its envelope will carry it."""
        return as_uuid(self._id_int)

    @property
    def staged_at(self) -> datetime:
        """When :func:`~access_audit.stage_event` ran (UTC, aware, microseconds)."""
        return utc_datetime(self._staged_ns)

    def _resolve(self) -> None:
        """Call the lazy values and check what they return, at most once.

        Only the library calls this, before COMMIT of a committing transaction.

        :raises ValueError, TypeError: a lazy value raised or returned
            something unusable; the message names the event and the field.
        """
        if not self._lazy:
            return
        where = f"event {self.event_type!r}: "
        if callable(self.target_id):
            self.target_id = target_id_text(
                call_lazy(self.target_id, where + "target_id"), where + "target_id"
            )
        if callable(self.target_name):
            self.target_name = optional_text(
                call_lazy(self.target_name, where + "target_name"),
                where + "target_name",
            )
        self.payload = resolve_lazy(self.payload, where + "payload", self._rules)
        self._rules.check_size(self.payload, self.event_type)
        self._check_fields()
        self._lazy = False

    def _check_fields(self) -> None:
        """Check the sizes of the fields an outbox row stores besides the
        payload (see :meth:`PayloadRules.check_fields`)."""
        self._rules.check_fields(
            self.event_type,
            (
                ("target_id", self.target_id),
                ("target_name", self.target_name),
                ("reason", self.reason),
                ("actor_id", self.actor_id),
                ("actor_email", self.actor_email),
            ),
            self.metadata,
        )


def target_id_text(value: object, field: str) -> str:
    """A target id as the text an envelope carries: str, int or UUID.

    :raises TypeError: another type; ``field`` names it.
    :raises ValueError: empty, an int of too many digits, unencodable text.
    """
    if type(value) is int:  # the usual id that is not a str: a database key
        return int_text(value, field)
    if isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)):
        raise TypeError(
            f"{field} must be a str, int or UUID (or a callable returning one), "
            f"got {type(value).__name__}"
        )
    # The base type's own conversions, never a subclass's (which may raise);
    # int first: before Python 3.11, str() of an IntEnum member is its name.
    if isinstance(value, int):
        return int_text(int.__int__(value), field)
    if isinstance(value, uuid.UUID):
        return uuid.UUID.__str__(value)
    text = str.__str__(value)
    if not text:
        raise ValueError(f"{field} must not be empty")
    if "\x00" in text:
        raise ValueError(
            f"{field} holds a NUL character (index {text.index(chr(0))}), which "
            "PostgreSQL cannot store in text"
        )
    check_text(text, field)
    return text


def optional_text(value: object, field: str) -> str | None:
    """A str (or None) as an envelope carries it; subclasses become str.

    :raises TypeError: another type; ``field`` names it.
    :raises ValueError: text UTF-8 cannot encode.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str or None, got {type(value).__name__}")
    text = str.__str__(value)
    check_text(text, field)
    return text
