"""``stage_event``: check, copy and park an event on its transaction boundary."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from time import time_ns
from typing import TYPE_CHECKING, Any

from ._context import SYSTEM_ACTOR, Actor, check_actor_fields, current_context, to_actor
from ._envelope import utc_datetime
from ._pending import park
from ._registry import emitter_for, sync_session_of
from ._uuid import as_uuid, uuid7_int
from ._values import (
    EMPTY,
    NO_RULES,
    PayloadRules,
    call_lazy,
    check_text,
    freeze_json,
    freeze_payload,
    int_text,
    resolve_lazy,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session, scoped_session

    from ._emitter import AuditEmitter

__all__ = ["StagedEvent", "stage_event"]

# Dot-separated non-empty tokens: each becomes a NATS subject token, say.
_EVENT_TYPE_FORM = r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*"
_EVENT_TYPE = re.compile(_EVENT_TYPE_FORM + r"\Z")
_MAX_NAME = 128

TargetId = str | int | uuid.UUID


@dataclasses.dataclass(slots=True, eq=False)
class StagedEvent:
    """An event waiting for its transaction to commit.

    This is what :data:`~access_audit.signals.audit_event_discarded` receivers
    get when an event is dropped. ``target_id``, ``target_name`` and values in
    ``payload`` may still be the zero-argument callables they were staged
    with: those are resolved only when the transaction commits, never for one
    that rolls back.
    """

    id_int: int
    """The event's id as a 128-bit int (:attr:`id` is the UUID)."""
    event_type: str
    staged_ns: int
    """When :func:`stage_event` ran, in nanoseconds since the Unix epoch
    (:attr:`staged_at` as a number: reading the clock is cheaper than
    making a datetime, which waits until it is needed)."""
    actor_id: str
    actor_email: str | None
    target_type: str
    target_id: str | Callable[[], TargetId]
    target_name: str | Callable[[], str | None] | None
    action: str
    reason: str | None
    payload: Mapping[str, Any]
    metadata: Mapping[str, Any]
    lazy: bool
    """Whether some value is still an unresolved callable."""
    _rules: PayloadRules = dataclasses.field(default=NO_RULES, repr=False)

    @property
    def id(self) -> uuid.UUID:
        """The event's UUIDv7, as its envelope will carry it."""
        return as_uuid(self.id_int)

    @property
    def staged_at(self) -> datetime:
        """When :func:`stage_event` ran (UTC, aware, microseconds)."""
        return utc_datetime(self.staged_ns)

    def _resolve(self) -> None:
        """Call the lazy values and check what they return, at most once.

        Only the library calls this, before COMMIT of a committing transaction.

        :raises ValueError, TypeError: a lazy value raised or returned
            something unusable; the message names the event and the field.
        """
        if not self.lazy:
            return
        where = f"event {self.event_type!r}: "
        if callable(self.target_id):
            self.target_id = _target_id(
                call_lazy(self.target_id, where + "target_id"), where + "target_id"
            )
        if callable(self.target_name):
            self.target_name = _optional_str(
                call_lazy(self.target_name, where + "target_name"),
                where + "target_name",
            )
        self.payload = resolve_lazy(self.payload, where + "payload", self._rules)
        self._rules.check_size(self.payload, self.event_type)
        self.lazy = False


def stage_event(
    session: Session | scoped_session[Any] | AsyncSession,
    event_type: str,
    *,
    target_type: str,
    target_id: TargetId | Callable[[], TargetId],
    action: str,
    target_name: str | Callable[[], str | None] | None = None,
    actor_id: str | None = None,
    actor_email: str | None = None,
    reason: str | None = None,
    payload: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Stage an audit event on the session's current transaction.

    The event belongs to the innermost transaction boundary open now (the
    outermost transaction or a SAVEPOINT). It reaches plugins only if that
    boundary, and every one enclosing it, commits; it is dropped when any of
    them rolls back or ends unreleased. With no transaction open, one is begun
    as :meth:`Session.add <sqlalchemy.orm.Session.add>` would.

    ``target_id``, ``target_name`` and payload values may be zero-argument
    callables (``lambda: group.id``), resolved after the commit's final flush
    and before COMMIT. The actor is, in order: ``actor_id``/``actor_email``,
    the innermost :func:`~access_audit.audit_context`, the emitter's
    ``actor_resolver``, then ``"system"``. Metadata merges the emitter's
    ``metadata_provider``, then the audit context, then ``metadata``.

    :raises ValueError: ``event_type``, ``target_type`` or ``action`` is empty
        or malformed, or another field has an unusable value: an int of more
        than 4,300 digits (pass it as a str), text holding a lone surrogate.
    :raises TypeError: a value of the wrong type, or not JSON-serialisable.
    :raises AuditConfigurationError: no emitter is attached to the session.
    :raises RuntimeError: the session is dispatching its own commit, or its
        transaction has already been prepared or committed.
    """
    sync_session = sync_session_of(session)
    emitter = emitter_for(sync_session)
    if event_type not in _good_event_types:
        _check_event_type(event_type)
    if target_type not in _good_names:
        _check_name(target_type, "target_type")
    if action not in _good_names:
        _check_name(action, "action")
    if actor_id is None and actor_email is not None:
        raise ValueError("actor_email was given without actor_id; pass both")
    lazy = False
    if type(target_id) is not str or not target_id or not target_id.isascii():
        if callable(target_id):
            lazy = True
        else:
            target_id = _target_id(target_id, "target_id")
    if target_name is not None and (
        type(target_name) is not str or not target_name.isascii()
    ):
        if callable(target_name):
            lazy = True
        else:
            target_name = _optional_str(target_name, "target_name")
    if reason is not None and (type(reason) is not str or not reason.isascii()):
        reason = _optional_str(reason, "reason")
    rules = emitter._payload_rules
    if (
        payload is not None
        and type(payload) is not dict
        and not isinstance(payload, Mapping)
    ):
        raise TypeError(f"payload must be a mapping, got {type(payload).__name__}")
    if not payload:
        frozen_payload: Mapping[str, Any] = EMPTY
    else:
        frozen_payload, payload_lazy = freeze_payload(payload, rules)
        if payload_lazy:
            lazy = True
        else:
            rules.check_size(frozen_payload, event_type)

    context = current_context()
    if actor_id is not None:
        check_actor_fields(actor_id, actor_email, "stage_event")
        actor = Actor(actor_id, actor_email)
    elif context.actor is not None:
        actor = context.actor
    elif emitter.actor_resolver is not None:
        actor = to_actor(emitter.actor_resolver(), "actor_resolver") or SYSTEM_ACTOR
    else:
        actor = SYSTEM_ACTOR
    context_metadata = context.metadata
    if metadata is None and not context_metadata and emitter.metadata_provider is None:
        merged_metadata: Mapping[str, Any] = EMPTY
    else:
        merged_metadata = _merge_metadata(emitter, context_metadata, metadata, rules)

    now_ns = time_ns()
    event = StagedEvent(
        uuid7_int(now_ns),
        event_type,
        now_ns,
        actor.id,
        actor.email,
        target_type,
        target_id,
        target_name,
        action,
        reason,
        frozen_payload,
        merged_metadata,
        lazy,
        rules,
    )
    park(sync_session, emitter, event)


# Names that passed their checks already: most applications stage a few
# dozen event types over and over. Bounded, in case names are generated.
_good_event_types: set[str] = set()
_good_names: set[str] = set()
_MAX_REMEMBERED = 4096


def _remember(good: set[str], value: str) -> None:
    if len(good) >= _MAX_REMEMBERED:
        good.clear()
    good.add(value)


def _check_event_type(event_type: object) -> None:
    if not isinstance(event_type, str):
        raise TypeError(f"event_type must be a str, got {type(event_type).__name__}")
    if not _EVENT_TYPE.match(event_type) or len(event_type) > _MAX_NAME:
        raise ValueError(
            f"event_type {event_type!r} is malformed: it must be at most "
            f"{_MAX_NAME} characters of dot-separated, non-empty tokens of "
            "a-z, 0-9 and _, starting with a letter (group.member_added), "
            f"matching {_EVENT_TYPE_FORM}"
        )
    if type(event_type) is str:
        _remember(_good_event_types, event_type)


def _check_name(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    if not value or value != value.strip() or not value.isprintable():
        raise ValueError(
            f"{field} {value!r} is empty or malformed: it must be non-empty, "
            "printable, without leading or trailing whitespace"
        )
    if len(value) > _MAX_NAME:
        raise ValueError(f"{field} is longer than {_MAX_NAME} characters")
    if type(value) is str:
        _remember(_good_names, value)


def _target_id(value: object, field: str) -> str:
    if type(value) is int:  # the usual id that is not a str: a database key
        return int_text(value, field)
    if isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)):
        raise TypeError(
            f"{field} must be a str, int or UUID (or a callable returning one), "
            f"got {type(value).__name__}"
        )
    # int() first: before Python 3.11, str() of an IntEnum member is its name.
    if isinstance(value, int):
        return int_text(int(value), field)
    if isinstance(value, uuid.UUID):
        return str(value)
    text = str.__str__(value)
    if not text:
        raise ValueError(f"{field} must not be empty")
    check_text(text, field)
    return text


def _optional_str(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str or None, got {type(value).__name__}")
    text = str.__str__(value)
    check_text(text, field)
    return text


def _merge_metadata(
    emitter: AuditEmitter,
    context_metadata: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    rules: PayloadRules,
) -> Mapping[str, Any]:
    merged: dict[str, Any] = {}
    if emitter.metadata_provider is not None:
        provided = emitter.metadata_provider()
        if provided is not None and not isinstance(provided, Mapping):
            raise TypeError(
                "metadata_provider must return a mapping or None, "
                f"got {type(provided).__name__}"
            )
        merged.update(provided or {})
    merged.update(context_metadata)
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(
                f"metadata must be a mapping, got {type(metadata).__name__}"
            )
        merged.update(metadata)
    frozen: Mapping[str, Any] = freeze_json(merged, "metadata", rules=rules)
    return frozen
