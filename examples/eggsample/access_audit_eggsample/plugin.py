"""The plugin object: this module itself, registered by its entry point.

It keeps what access_audit hands it in two module-level lists, so a test or a
script can look at what a plugin installed from outside the library received.
Clear them between uses with ``received.clear()`` and ``batches.clear()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from access_audit import hookimpl

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

received: list[AuditEventEnvelope] = []
"""Every envelope passed to ``audit_event_logged``, in the order received."""

batches: list[tuple[AuditEventEnvelope, ...]] = []
"""One tuple per ``audit_events_committed`` call: one per committed transaction."""


@hookimpl
def audit_event_logged(envelope: AuditEventEnvelope) -> None:
    """Record one committed event."""
    received.append(envelope)


@hookimpl
def audit_events_committed(envelopes: Sequence[AuditEventEnvelope]) -> None:
    """Record the batch of events one transaction committed."""
    batches.append(tuple(envelopes))
