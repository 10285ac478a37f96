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
    :param reason: ``"rollback"`` (its transaction rolled back, or the
        outer transaction a joined session waited for did),
        ``"savepoint_rollback"`` (its SAVEPOINT rolled back), ``"close"`` (its
        transaction ended without commit or rollback: ``close()``, ``reset()``,
        ``invalidate()``, the session garbage-collected with it open),
        ``"lazy_value_failed"`` (a lazy value failed after COMMIT, see
        :func:`~access_audit.stage_event`), ``"detached"`` (its
        transaction ended while its emitter was detached), or ``"unstaged"``
        (withdrawn by :func:`~access_audit.discard_staged`).
    """,
)
