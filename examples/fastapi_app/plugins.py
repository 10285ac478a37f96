"""The app's plugin: an ``async def`` console printer.

access_audit awaits an ``async def`` hook on the app's own event loop before
``await session.commit()`` returns, each plugin in a task of its own, so a
slow or failing plugin neither blocks the loop nor stops the others.
"""

from __future__ import annotations

from access_audit import AuditEventEnvelope, hookimpl

__all__ = ["ConsolePrinter"]


class ConsolePrinter:
    """Prints each committed event as it arrives (what, who, which request), and keeps it.

    :param quiet: keep the events without printing them (for tests).
    """

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.envelopes: list[AuditEventEnvelope] = []

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        """Keep *envelope*; print its type, target, actor, reason and request."""
        self.envelopes.append(envelope)
        if self.quiet:
            return
        meta = envelope.metadata
        target = f"{envelope.target_type} {envelope.target_id}"
        if envelope.target_name:
            target += f" {envelope.target_name!r}"
        print(
            f"     event {len(self.envelopes):>2}  {envelope.event_type:<21} {target}"
            f"  by {envelope.actor_id} <{envelope.actor_email}>"
        )
        print(
            f"               reason: {envelope.reason!r}  request: "
            f"{meta.get('request_id')} {meta.get('method')} {meta.get('endpoint')}"
        )
