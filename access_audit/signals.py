"""Blinker signals sent for committed and discarded audit events.

Receivers are called one by one: a receiver that raises is logged on the
``access_audit`` logger and the others still run; the commit is never failed
by a receiver (unless the emitter has ``raise_plugin_errors``, which then
raises the first error after everything ran). Connect with ``signal.connect(receiver)`` for every emitter, or
``signal.connect(receiver, sender=emitter)`` for one.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["audit_event_committed", "audit_event_discarded"]

_signals = Namespace()

audit_event_committed = _signals.signal(
    "audit-event-committed",
    doc="""Sent once per committed event, after the plugins saw it.

    :param sender: the :class:`~access_audit.AuditEmitter`.
    :param envelope: the :class:`~access_audit.AuditEventEnvelope`.
    """,
)

audit_event_discarded = _signals.signal(
    "audit-event-discarded",
    doc="""Sent once per staged event that will never be emitted.

    :param sender: the :class:`~access_audit.AuditEmitter`.
    :param event: the :class:`~access_audit.StagedEvent` (lazy values unresolved).
    :param reason: why, a :data:`~access_audit.DiscardReason`: ``"rollback"``,
        ``"savepoint_rollback"``, ``"close"``, ``"lazy_value_failed"``,
        ``"detached"``, ``"unstaged"`` or ``"refused"``.
    """,
)
