"""The hooks a plugin can implement, and the markers to declare them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._envelope import AuditEventEnvelope

__all__ = ["AuditEventsPluginSpec", "hookimpl", "hookspec"]

PROJECT_NAME = "access_audit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin's function or method as the implementation of a hook.

The function is named after a hook of :class:`AuditEventsPluginSpec` and may
take any subset of its arguments. ``tryfirst=True`` and ``trylast=True``
order the plain (``def``) implementations as in pluggy; ``async def`` ones
run side by side in tasks of their own, before the plain ones, whatever
their marks. ``wrapper=True`` and ``hookwrapper=True`` are refused at
registration.
"""


class AuditEventsPluginSpec:
    """Hook specifications for access_audit plugins.

    Every implementation is called on its own: one that raises is logged on
    the ``access_audit`` logger, reported through
    :meth:`audit_delivery_failed`, and does not stop the others or fail the
    caller's commit. Hooks run after COMMIT: in the thread that committed by
    default, in the emitter's worker thread with ``dispatch="background"``,
    as a task on the running loop with ``dispatch="asyncio"``, and in the
    relay's thread when it re-delivers. ``async def`` implementations are
    awaited: before ``await session.commit()`` returns (inline, on the
    application's loop), or on a loop the emitter owns for a synchronous
    ``Session``. Implementations may take any subset of a hook's arguments.
    Wrappers (``wrapper=True``/``hookwrapper=True``) are refused at
    registration: each implementation must be callable on its own.
    """

    @hookspec
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        """Called once per committed event, in staging order.

        :param envelope: the committed event; the same immutable object is
            passed to every plugin.
        """

    @hookspec
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Called once per committed transaction that carried events.

        Runs after :meth:`audit_event_logged` has run for each of them.

        :param envelopes: the whole batch, a tuple in staging order; the
            events share one ``transaction_id``.
        """

    @hookspec
    def audit_delivery_failed(
        self,
        plugin_name: str,
        envelopes: Sequence[AuditEventEnvelope],
        error: BaseException,
    ) -> None:
        """Called after an implementation of another hook raised.

        :param plugin_name: the name the failing plugin is registered under.
        :param envelopes: the events it was given: one for
            :meth:`audit_event_logged`, the batch for
            :meth:`audit_events_committed`.
        :param error: the exception it raised.

        An implementation of this hook that raises is logged and otherwise
        ignored.
        """
