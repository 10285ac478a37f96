"""``stage_event``: check, copy and park an event on its transaction boundary."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from time import time_ns
from typing import TYPE_CHECKING, Any

from ._context import (
    SYSTEM_ACTOR,
    Actor,
    AmbientContext,
    check_actor_fields,
    current_context,
    to_actor,
)
from ._errors import AuditConfigurationError
from ._ids import uuid7_int
from ._lifecycle import stage_on
from ._registry import emitter_for, sync_session_of
from ._staged import StagedEvent, TargetId, optional_text, target_id_text
from ._tracing import TRACE_KEYS, TRACE_MODULE, current_trace, loaded
from ._values import (
    EMPTY,
    PayloadRules,
    freeze_json,
    freeze_payload,
    refuse_async_lazy,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session, scoped_session

    from ._owner import Owner

__all__ = ["stage_event"]

# Dot-separated non-empty tokens: each becomes a NATS subject token, say.
_EVENT_TYPE_FORM = r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*"
_EVENT_TYPE = re.compile(_EVENT_TYPE_FORM + r"\Z")
_MAX_NAME = 128


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
    ``metadata_provider``, then the audit context, then ``metadata``; when
    an OpenTelemetry span is recording, its ``trace_id``, ``span_id`` and
    ``trace_flags`` are added unless one of those sets any of the three.

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
    if emitter._closed:
        raise AuditConfigurationError(
            f"stage_event() refused: {emitter!r} was closed (close() or aclose()), "
            "so nothing would deliver the event; flush() where you meant to "
            "wait for deliveries and go on"
        )
    # A name checked before is taken as it was remembered; a str subclass
    # (a str enum) is looked up by its plain text, never by its own
    # __hash__ and __eq__, which may raise or be case-blind.
    good = _good_event_types.get(
        event_type if type(event_type) is str else _key(event_type)
    )
    event_type = good if good is not None else _checked_event_type(event_type)
    good = _good_names.get(
        target_type if type(target_type) is str else _key(target_type)
    )
    target_type = (
        good if good is not None else _checked_name(target_type, "target_type")
    )
    good = _good_names.get(action if type(action) is str else _key(action))
    action = good if good is not None else _checked_name(action, "action")
    if actor_id is None and actor_email is not None:
        raise ValueError("actor_email was given without actor_id; pass both")
    lazy = False
    if (
        type(target_id) is not str
        or not target_id
        or not target_id.isascii()
        or "\x00" in target_id
    ):
        if callable(target_id):
            refuse_async_lazy(target_id, "target_id")
            lazy = True
        else:
            target_id = target_id_text(target_id, "target_id")
    if target_name is not None and (
        type(target_name) is not str or not target_name.isascii()
    ):
        if callable(target_name):
            refuse_async_lazy(target_name, "target_name")
            lazy = True
        else:
            target_name = optional_text(target_name, "target_name")
    if reason is not None and (type(reason) is not str or not reason.isascii()):
        reason = optional_text(reason, "reason")
    rules = emitter.payload_rules
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
    else:
        actor = _default_actor(emitter, context)
    context_metadata = context.metadata
    # The lookup current_trace() starts with, inline: without OpenTelemetry
    # imported, it is all that tracing costs.
    trace = current_trace() if TRACE_MODULE in loaded else None
    if (
        trace is None
        and metadata is None
        and not context_metadata
        and emitter.metadata_provider is None
    ):
        merged_metadata: Mapping[str, Any] = EMPTY
    else:
        merged_metadata = _merge_metadata(
            emitter, context_metadata, metadata, rules, trace
        )

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
    limit = rules.max_field_bytes
    if limit is not None and (
        # Only a value that could be over the limit (six bytes a character
        # at most, as JSON, and two quotes) is measured; what is lazy is
        # checked as the commit resolves it.
        merged_metadata
        or (type(target_id) is str and len(target_id) * 6 + 2 > limit)
        or (type(target_name) is str and len(target_name) * 6 + 2 > limit)
        or (reason is not None and len(reason) * 6 + 2 > limit)
        or len(actor.id) * 6 + 2 > limit
        or (actor.email is not None and len(actor.email) * 6 + 2 > limit)
    ):
        event._check_fields()
    stage_on(sync_session, emitter, event)


# Names that passed their checks already, each mapped to itself: most
# applications stage a few dozen event types over and over. Bounded, in
# case names are generated.
_good_event_types: dict[str, str] = {}
_good_names: dict[str, str] = {}
_MAX_REMEMBERED = 4096


def _key(value: object) -> str:
    """What a name that is not a plain str is looked up by: a str subclass's
    plain text (as ``str`` reads it); for another type, which the check
    refuses, the empty text (never remembered: no name is empty)."""
    return str.__str__(value) if isinstance(value, str) else ""


def _remember(good: dict[str, str], value: str) -> None:
    if len(good) >= _MAX_REMEMBERED:
        good.clear()
    good[value] = value


def _checked_event_type(event_type: object) -> str:
    """*event_type* as plain text, checked.

    :raises TypeError, ValueError: naming ``event_type``.
    """
    if not isinstance(event_type, str):
        raise TypeError(f"event_type must be a str, got {type(event_type).__name__}")
    event_type = str.__str__(event_type)
    if not _EVENT_TYPE.match(event_type) or len(event_type) > _MAX_NAME:
        raise ValueError(
            f"event_type {event_type!r} is malformed: it must be at most "
            f"{_MAX_NAME} characters of dot-separated, non-empty tokens of "
            "a-z, 0-9 and _, starting with a letter (group.member_added), "
            f"matching {_EVENT_TYPE_FORM}"
        )
    _remember(_good_event_types, event_type)
    return event_type


def _checked_name(value: object, field: str) -> str:
    """A ``target_type`` or ``action`` as plain text, checked.

    :raises TypeError, ValueError: naming *field*.
    """
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    value = str.__str__(value)
    if not value or value != value.strip() or not value.isprintable():
        raise ValueError(
            f"{field} {value!r} is empty or malformed: it must be non-empty, "
            "printable, without leading or trailing whitespace"
        )
    if len(value) > _MAX_NAME:
        raise ValueError(f"{field} is longer than {_MAX_NAME} characters")
    _remember(_good_names, value)
    return value


def _default_actor(emitter: Owner, context: AmbientContext) -> Actor:
    """The actor when the call names none: the innermost audit_context, the
    emitter's actor_resolver, else ``"system"``."""
    if context.actor is not None:
        return context.actor
    if emitter.actor_resolver is not None:
        return to_actor(emitter.actor_resolver(), "actor_resolver") or SYSTEM_ACTOR
    return SYSTEM_ACTOR


def _merge_metadata(
    emitter: Owner,
    context_metadata: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    rules: PayloadRules,
    trace: dict[str, str] | None,
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
    if trace is not None and TRACE_KEYS.isdisjoint(merged):
        merged.update(trace)
    frozen: Mapping[str, Any] = freeze_json(merged, "metadata", rules=rules)
    return frozen
