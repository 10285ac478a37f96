"""The recorder behind ``capture_audit_events()`` and the ``audit_events`` fixture."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from .. import signals
from .._background import flush_every
from .._emitter import raising_plugin_errors
from .._envelope import AuditEventEnvelope
from .._ids import uuid7_int
from .._outer import waiting_for_outer
from .._staged import StagedEvent
from .._types import DiscardReason

__all__ = ["AuditEventRecorder", "DiscardedEvent", "capture_audit_events"]

_FIELDS = frozenset(field.name for field in dataclasses.fields(AuditEventEnvelope))

_REASONS: dict[DiscardReason, str] = {
    "rollback": "a rollback",
    "savepoint_rollback": "a savepoint rollback",
    "close": "the session closing without a commit",
    "lazy_value_failed": "a lazy value that failed",
    "detached": "its emitter being detached",
    "unstaged": "discard_staged()",
    "refused": "a connection access_audit refused",
}
"""How a failure message names each discard reason (every one has a line)."""

SETTLE_SECONDS = 10.0
"""How long the recorder's queries, and the end of recording, wait for
background dispatch to deliver what was committed before them."""


@dataclasses.dataclass(frozen=True, slots=True)
class DiscardedEvent:
    """A staged event that will never be emitted, and why."""

    event: StagedEvent
    reason: DiscardReason
    """Why: see :data:`~access_audit.DiscardReason`."""

    @property
    def event_type(self) -> str:
        return self.event.event_type


class AuditEventRecorder:
    """Committed and discarded audit events, in the order they happened.

    Filters compare envelope attributes by equality, except that
    ``payload=`` and ``metadata=`` match as subsets (nested mappings too),
    ``target_id`` also matches an ``int`` or ``UUID`` by its ``str``, and a
    callable value is a predicate called with the attribute.
    """

    def __init__(self) -> None:
        self.events: list[AuditEventEnvelope] = []
        """Committed envelopes, in the order delivered, from every emitter:
        those staged while recording (an event an earlier test committed
        may be delivered later: by asyncio dispatch, or once the outer
        transaction of a joined session is known to have committed)."""
        self.discarded: list[DiscardedEvent] = []
        """Staged events that were dropped, with the reason: those staged
        while recording (an event staged before, by an earlier test, may be
        discarded whenever the garbage collector gets to its session)."""
        self._since = uuid7_int(time.time_ns())
        """Event ids are ordered within the process: later events' are
        greater, even under a clock set back (a test's frozen time)."""

    def __repr__(self) -> str:
        return (
            f"<AuditEventRecorder events={len(self.events)} "
            f"discarded={len(self.discarded)}>"
        )

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.events.clear()
        self.discarded.clear()

    def filter(
        self, event_type: str | None = None, **fields: Any
    ) -> list[AuditEventEnvelope]:
        """The recorded envelopes that match, in order.

        Waits first (up to :data:`SETTLE_SECONDS`) for background dispatch
        to deliver what was committed before the call.

        :raises TypeError: a field name that envelopes do not have.
        """
        _check_fields(fields)
        flush_every(SETTLE_SECONDS)
        return [
            envelope
            for envelope in self.events
            if (event_type is None or envelope.event_type == event_type)
            and all(_matches(envelope, name, value) for name, value in fields.items())
        ]

    def assert_emitted(self, event_type: str, **fields: Any) -> AuditEventEnvelope:
        """Return the first committed envelope that matches, or fail.

        The failure message lists what was emitted and says whether an event
        of this type was staged and then discarded (and why).
        """
        __tracebackhide__ = True
        found = self.filter(event_type, **fields)
        if found:
            return found[0]
        wanted = _describe(event_type, fields)
        raise AssertionError(f"no {wanted} was emitted.\n{self._report(event_type)}")

    def assert_not_emitted(self, event_type: str | None = None, **fields: Any) -> None:
        """Fail if any committed envelope matches."""
        __tracebackhide__ = True
        found = self.filter(event_type, **fields)
        if found:
            wanted = _describe(event_type, fields)
            raise AssertionError(
                f"expected no {wanted}, but {len(found)} matched:\n{_table(found)}"
            )

    def _report(self, event_type: str | None) -> str:
        lines = [f"Emitted events ({len(self.events)}):", _table(self.events)]
        dropped = [d for d in self.discarded if d.event_type == event_type]
        if dropped:
            reasons = sorted({_REASONS.get(d.reason, d.reason) for d in dropped})
            lines.append(
                f"{event_type!r} was staged, then discarded by {' and '.join(reasons)} "
                f"({len(dropped)} event{'s' if len(dropped) != 1 else ''})."
            )
        waiting = waiting_for_outer()
        if waiting:
            lines.append(
                f"The events of {waiting} committed session transaction"
                f"{'s' if waiting != 1 else ''} wait for the outer transaction "
                "of the connection the session joined (joined_transactions="
                "'outer'): sent when it commits, discarded when it rolls back. "
                "A suite that rolls each test back sets "
                "emitter.joined_transactions = 'session'."
            )
        return "\n".join(lines)

    def _on_committed(self, sender: object, envelope: AuditEventEnvelope) -> None:
        if envelope.id.int > self._since:
            self.events.append(envelope)

    def _on_discarded(
        self, sender: object, event: StagedEvent, reason: DiscardReason
    ) -> None:
        if event._id_int > self._since:
            self.discarded.append(DiscardedEvent(event, reason))


@contextlib.contextmanager
def capture_audit_events(
    *, raise_plugin_errors: bool = False
) -> Iterator[AuditEventRecorder]:
    """Record audit events from every emitter while the block runs.

    Recording adds signal receivers; the plugins keep receiving as before.
    With ``dispatch="background"``, the queries (:meth:`~AuditEventRecorder.filter`,
    the assertions) and the block's end first wait for the worker to deliver
    what was committed before them; read ``.events`` after ``emitter.flush()``.
    With ``raise_plugin_errors``, every emitter behaves as if created with
    ``raise_plugin_errors=True`` inside the block, so a plugin bug fails the
    test instead of only being logged.
    """
    recorder = AuditEventRecorder()
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            signals.audit_event_committed.connected_to(recorder._on_committed)
        )
        stack.enter_context(
            signals.audit_event_discarded.connected_to(recorder._on_discarded)
        )
        unraised = (
            stack.enter_context(raising_plugin_errors()) if raise_plugin_errors else []
        )
        try:
            yield recorder
        finally:
            # What the block committed is delivered while it still records
            # (not in whatever records next).
            flush_every(SETTLE_SECONDS)
        if unraised:
            first = unraised[0]
            if hasattr(first, "add_note"):  # Python 3.11+
                first.add_note(
                    "access_audit: raised by a plugin in background or asyncio "
                    "dispatch, after the commit had returned"
                )
            raise first


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise TypeError(
            f"unknown envelope field(s) {unknown}; filter on {sorted(_FIELDS)}"
        )


def _matches(envelope: AuditEventEnvelope, name: str, wanted: Any) -> bool:
    actual = getattr(envelope, name)
    if callable(wanted) and not isinstance(wanted, type):
        return bool(wanted(actual))
    if name in ("payload", "metadata"):
        return isinstance(wanted, Mapping) and _is_subset(wanted, actual)
    if name == "target_id" and isinstance(wanted, (int, uuid.UUID)):
        wanted = str(wanted)
    return bool(actual == wanted)


def _is_subset(wanted: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    for key, value in wanted.items():
        if key not in actual:
            return False
        if isinstance(value, Mapping) and isinstance(actual[key], Mapping):
            if not _is_subset(value, actual[key]):
                return False
        elif not _equal(actual[key], value):
            return False
    return True


def _equal(actual: Any, wanted: Any) -> bool:
    """Equality, with a tuple (as staged) equal to the list it is stored as."""
    if isinstance(wanted, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(wanted) and all(map(_equal, actual, wanted))
    return bool(actual == wanted)


def _describe(event_type: str | None, fields: Mapping[str, Any]) -> str:
    what = f"{event_type!r} event" if event_type else "event"
    if fields:
        what += " with " + ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return what


def _table(envelopes: list[AuditEventEnvelope]) -> str:
    if not envelopes:
        return "  (none)"
    rows = [("#", "event_type", "target", "actor", "action")]
    for index, envelope in enumerate(envelopes):
        target = f"{envelope.target_type}/{envelope.target_id}"
        if envelope.target_name:
            target += f" ({envelope.target_name})"
        actor = envelope.actor_id
        rows.append((str(index), envelope.event_type, target, actor, envelope.action))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    return "\n".join(
        "  "
        + "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )
