"""The few exception types that are access_audit's own."""

from __future__ import annotations


class AuditConfigurationError(RuntimeError):
    """The library is not set up for what was asked of it.

    Raised, for example, by :func:`~access_audit.stage_event` on a session that no
    :class:`~access_audit.AuditEmitter` is attached to: an event is never dropped
    silently because a session was not configured.
    """
