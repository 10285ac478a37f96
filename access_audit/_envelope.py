"""The committed event as plugins receive it."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ._clock import utc_datetime
from ._ids import as_uuid
from ._tracing import traceparent
from ._values import (
    ReadOnlyDict,
    compact_json,
    fast_json,
    freeze_json,
    freeze_parsed,
    thaw,
)

if TYPE_CHECKING:
    from ._staged import StagedEvent

__all__ = [
    "AuditEventEnvelope",
    "committed_envelope",
    "json_fields",
    "stored_envelope",
    "stored_json",
]


_STR = (str,)
_OPTIONAL_STR = (str, type(None))
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "event_type": _STR,
    "actor_id": _STR,
    "actor_email": _OPTIONAL_STR,
    "target_type": _STR,
    "target_id": _STR,
    "target_name": _OPTIONAL_STR,
    "action": _STR,
    "reason": _OPTIONAL_STR,
    "payload": (Mapping,),
    "metadata": (Mapping,),
    "sequence": (int,),
}
"""What from_dict accepts for the fields it does not parse itself."""


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEventEnvelope:
    """One committed audit event: immutable, and the same object for every plugin.

    Envelopes are made only for a transaction that really committed.
    ``payload`` and ``metadata`` are read-only mappings of plain JSON types
    (they are ``dict``/``list`` subclasses that refuse changes, so
    ``json.dumps`` takes them as they are). ``id`` is a UUIDv7: ids sort in
    staging order within a process, and consumers de-duplicate by it.
    """

    id: uuid.UUID
    """UUIDv7 assigned at staging; the idempotency key."""
    event_type: str
    timestamp: datetime
    """When the transaction committed (UTC, aware)."""
    staged_at: datetime
    """When :func:`~access_audit.stage_event` ran (UTC, aware)."""
    actor_id: str
    actor_email: str | None
    target_type: str
    target_id: str
    target_name: str | None
    action: str
    reason: str | None
    payload: Mapping[str, Any]
    metadata: Mapping[str, Any]
    transaction_id: uuid.UUID
    """Shared by every event of one commit."""
    sequence: int
    """0-based position of the event within its commit."""

    def __post_init__(self) -> None:
        # Envelopes built by the library arrive frozen already; freeze what a
        # caller builds by hand (tests, from_dict) so the guarantee holds.
        for name in ("payload", "metadata"):
            value = getattr(self, name)
            if type(value) is not ReadOnlyDict:
                if not isinstance(value, Mapping):
                    raise TypeError(
                        f"{name} must be a mapping, got {type(value).__name__}"
                    )
                object.__setattr__(self, name, freeze_json(value, name))

    def __hash__(self) -> int:
        # The id identifies the event; payload and metadata are unhashable.
        return hash(self.id)

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-ready primitives: ISO 8601 times, ``str`` UUIDs, plain dicts."""
        return json_fields(self, thaw)

    def to_json(self, **dumps_options: Any) -> str:
        """Return :meth:`to_dict` as a JSON string; options go to :func:`json.dumps`."""
        if dumps_options.get("indent") is None:
            dumps_options.setdefault("separators", (",", ":"))
        return json.dumps(self.to_dict(), **dumps_options)

    def to_cloudevent(
        self, source: str, *, type_prefix: str = "access_audit."
    ) -> dict[str, Any]:
        """Return a CloudEvents 1.0 event in structured mode, as a JSON-ready dict.

        ``id`` is the envelope id, ``type`` is ``type_prefix + event_type``,
        ``subject`` is ``target_type/target_id``, ``time`` the commit time, and
        ``data`` holds everything else (the actor's e-mail address only there).
        The ``partitionkey`` extension (``target_type:target_id``) keeps one
        target's events in order on partitioned brokers; ``audittransaction``
        groups the events of one commit. When ``metadata`` holds a W3C
        ``trace_id`` and ``span_id`` (an OpenTelemetry span was recording at
        stage time, or the caller gave them), the distributed tracing
        extension's ``traceparent`` is added:
        ``00-<trace_id>-<span_id>-<trace_flags>`` (``trace_flags`` ``00``
        when the metadata has none).

        :param source: the CloudEvents ``source``, a URI-reference naming the
            producer (``"/services/access-app"``); must not be empty.
        """
        if not isinstance(source, str) or not source:
            raise ValueError("source must be a non-empty URI-reference string")
        subject = f"{self.target_type}/{self.target_id}"
        data = self.to_dict()
        del data["id"], data["timestamp"]  # they are the id and time attributes
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": str(self.id),
            "source": source,
            "type": f"{type_prefix}{self.event_type}",
            "subject": subject,
            "time": self.timestamp.isoformat(),
            "datacontenttype": "application/json",
            "partitionkey": f"{self.target_type}:{self.target_id}",
            "audittransaction": str(self.transaction_id),
            "data": data,
        }
        if self.metadata:
            parent = traceparent(self.metadata)
            if parent is not None:
                event["traceparent"] = parent
        return event

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEventEnvelope:
        """Rebuild an envelope from :meth:`to_dict` output (or its JSON, parsed).

        :raises ValueError: a field is missing, unknown, or not parseable; the
            message names it.
        """
        missing = [name for name in _FIELDS if name not in data]
        unknown = [name for name in data if name not in _FIELDS]
        if missing or unknown:
            raise ValueError(
                f"not an audit envelope: missing fields {missing}, "
                f"unknown fields {unknown}"
            )
        for name, kinds in _FIELD_TYPES.items():
            value = data[name]
            # No field takes a bool, although bool is an int.
            if not isinstance(value, kinds) or isinstance(value, bool):
                expected = " or ".join(
                    "None" if kind is type(None) else kind.__name__ for kind in kinds
                )
                raise ValueError(
                    f"{name} must be {expected}, got {type(value).__name__}"
                )
        values = dict(data)
        for name in ("id", "transaction_id"):
            values[name] = _parse(uuid.UUID, data[name], name)
        for name in ("timestamp", "staged_at"):
            moment = _parse(datetime.fromisoformat, data[name], name)
            if moment.tzinfo is None:
                raise ValueError(f"{name} must carry a UTC offset, got {data[name]!r}")
            values[name] = moment.astimezone(timezone.utc)
        return cls(**values)


_FIELDS = tuple(field.name for field in dataclasses.fields(AuditEventEnvelope))


def json_fields(
    envelope: AuditEventEnvelope, copy: Callable[[Any], Any] = lambda value: value
) -> dict[str, Any]:
    """:meth:`~AuditEventEnvelope.to_dict`, with ``payload`` and ``metadata``
    passed through *copy*: by default the read-only values themselves, which
    JSON encoders take as they are (the outbox's stored JSON)."""
    return {
        "id": str(envelope.id),
        "event_type": envelope.event_type,
        "timestamp": envelope.timestamp.isoformat(),
        "staged_at": envelope.staged_at.isoformat(),
        "actor_id": envelope.actor_id,
        "actor_email": envelope.actor_email,
        "target_type": envelope.target_type,
        "target_id": envelope.target_id,
        "target_name": envelope.target_name,
        "action": envelope.action,
        "reason": envelope.reason,
        "payload": copy(envelope.payload),
        "metadata": copy(envelope.metadata),
        "transaction_id": str(envelope.transaction_id),
        "sequence": envelope.sequence,
    }


def stored_json(envelope: AuditEventEnvelope) -> str:
    """The text of :meth:`~AuditEventEnvelope.to_dict` as compact JSON, as
    the outbox stores it.

    An envelope the library built (of this very class, its times in UTC)
    goes to orjson as it is, where orjson is installed: it writes the
    dataclass's fields in order, UUIDs and times as ``to_dict()`` does,
    without the dict of strings between. Any other goes through
    :func:`json_fields`: orjson would write a subclass's extra fields, and
    cut an offset with seconds to minutes.
    """
    if (
        type(envelope) is AuditEventEnvelope
        and envelope.timestamp.tzinfo is timezone.utc
        and envelope.staged_at.tzinfo is timezone.utc
    ):
        text = fast_json(envelope)
        if text is not None:
            return text
    return compact_json(json_fields(envelope))


def committed_envelope(
    staged: StagedEvent,
    timestamp: datetime,
    transaction_id: uuid.UUID,
    sequence: int,
) -> AuditEventEnvelope:
    """The envelope of a resolved staged event whose values are frozen already.

    Skips ``__init__``'s frozen-instance checks and ``__post_init__``: this
    runs once per committed event. ``tests/test_envelope.py`` checks that it
    sets every field.
    """
    # A speed-up: plain slot stores on a twin class of the same layout, then
    # the class switch, cost a third of the frozen dataclass's __init__.
    envelope: Any = _new(_Unfrozen)
    envelope.id = as_uuid(staged._id_int)
    envelope.event_type = staged.event_type
    envelope.timestamp = timestamp
    envelope.staged_at = utc_datetime(staged._staged_ns)
    envelope.actor_id = staged.actor_id
    envelope.actor_email = staged.actor_email
    envelope.target_type = staged.target_type
    envelope.target_id = staged.target_id
    envelope.target_name = staged.target_name
    envelope.action = staged.action
    envelope.reason = staged.reason
    envelope.payload = staged.payload
    envelope.metadata = staged.metadata
    envelope.transaction_id = transaction_id
    envelope.sequence = sequence
    envelope.__class__ = AuditEventEnvelope
    built: AuditEventEnvelope = envelope
    return built


def stored_envelope(data: dict[str, Any]) -> AuditEventEnvelope:
    """Rebuild an envelope from :meth:`~AuditEventEnvelope.to_dict` output
    that this library wrote itself (an outbox row's payload), cheaply.

    The fields are taken as they are, without :meth:`~AuditEventEnvelope.from_dict`'s
    checks; payload and metadata are still frozen. Anything else (a row
    edited by hand, say) goes through ``from_dict``, which names what is
    wrong.

    :raises ValueError: as ``from_dict`` does.
    """
    try:
        timestamp = _fromisoformat(data["timestamp"])
        staged_at = _fromisoformat(data["staged_at"])
        event_id, transaction_id = data["id"], data["transaction_id"]
        if (
            len(data) != len(_FIELDS)
            or timestamp.tzinfo is None
            or staged_at.tzinfo is None
            or len(event_id) != 36
            or len(transaction_id) != 36
            or type(data["sequence"]) is not int
            or not all(type(data[name]) is str for name in _TEXT_FIELDS)
            or not all(
                data[name] is None or type(data[name]) is str for name in _OPTIONAL_TEXT
            )
        ):
            return AuditEventEnvelope.from_dict(data)
        envelope: Any = _new(_Unfrozen)
        envelope.id = as_uuid(int(event_id.replace("-", ""), 16))
        envelope.event_type = data["event_type"]
        # The events of one commit share its timestamp and transaction id.
        last = _last_commit
        if data["timestamp"] == last[0]:
            envelope.timestamp = last[1]
        else:
            envelope.timestamp = timestamp.astimezone(timezone.utc)
        envelope.staged_at = staged_at.astimezone(timezone.utc)
        envelope.actor_id = data["actor_id"]
        envelope.actor_email = data["actor_email"]
        envelope.target_type = data["target_type"]
        envelope.target_id = data["target_id"]
        envelope.target_name = data["target_name"]
        envelope.action = data["action"]
        envelope.reason = data["reason"]
        payload, metadata = data["payload"], data["metadata"]
        if type(payload) is not dict or type(metadata) is not dict:
            return AuditEventEnvelope.from_dict(data)
        envelope.payload = freeze_parsed(payload)
        envelope.metadata = freeze_parsed(metadata)
        if transaction_id == last[2]:
            envelope.transaction_id = last[3]
        else:
            envelope.transaction_id = as_uuid(int(transaction_id.replace("-", ""), 16))
        envelope.sequence = data["sequence"]
    except (KeyError, AttributeError, TypeError, ValueError):
        return AuditEventEnvelope.from_dict(data)
    envelope.__class__ = AuditEventEnvelope
    _remember_commit(
        (data["timestamp"], envelope.timestamp, transaction_id, envelope.transaction_id)
    )
    built: AuditEventEnvelope = envelope
    return built


_fromisoformat = datetime.fromisoformat
_TEXT_FIELDS = ("event_type", "actor_id", "target_type", "target_id", "action")
_OPTIONAL_TEXT = ("actor_email", "target_name", "reason")
_last_commit: tuple[Any, ...] = (None, None, None, None)
"""The timestamp and transaction id of the last stored envelope rebuilt, as
text and as values: the next one is usually of the same commit. Replaced
whole and read once per envelope, so threads never mix two commits'."""


def _remember_commit(values: tuple[Any, ...]) -> None:
    global _last_commit
    _last_commit = values


class _Unfrozen:
    """An envelope under construction, for :func:`committed_envelope`.

    It has the envelope's slots in the same layout but not the frozen
    ``__setattr__``, so its fields are filled in with plain attribute stores;
    then its class becomes :class:`AuditEventEnvelope` (Python allows
    ``__class__`` assignment between classes whose layouts are the same).
    """

    __slots__ = AuditEventEnvelope.__slots__


_new = object.__new__


def _parse(parse: Any, value: Any, name: str) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    try:
        return parse(value)
    except ValueError as error:
        raise ValueError(f"{name} is not valid: {value!r}") from error
