"""``staged_events`` and ``discard_staged``: what waits on a transaction, and withdrawing it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._lifecycle import PENDING_KEY, Lifecycle
from ._registry import sync_session_of

if TYPE_CHECKING:
    from ._staged import StagedEvent

__all__ = ["discard_staged", "staged_events"]


def staged_events(session: Any) -> tuple[StagedEvent, ...]:
    """The events staged in the session's current transaction, in commit order.

    Every level is included: the outermost transaction's events first, then
    each open SAVEPOINT's, innermost last, as a commit now would send them.
    Events of a SAVEPOINT that rolled back, or of a transaction that ended,
    are not. *session* is a Session, scoped_session or AsyncSession.
    """
    sync = sync_session_of(session)
    pending: Lifecycle | None = sync.info.get(PENDING_KEY)
    if pending is None:
        return ()
    return tuple(pending.in_commit_order(sync))


def discard_staged(session: Any, events: Iterable[StagedEvent] | None = None) -> None:
    """Withdraw staged events (all of them if *events* is None) from the session.

    For an operation that staged events and then returns without finishing:
    they would otherwise be sent by whoever commits the session next. Each
    withdrawn event is sent on
    :data:`~access_audit.signals.audit_event_discarded` with reason
    ``"unstaged"``. The database changes made alongside them are not
    touched: roll those back (or leave them) as the operation requires.

    :raises ValueError: an event in *events* is not staged on this session's
        current transaction (then nothing is withdrawn).
    :raises RuntimeError: the session is committing and its events are
        being sent already.
    """
    sync = sync_session_of(session)
    pending: Lifecycle | None = sync.info.get(PENDING_KEY)
    chosen = None if events is None else list(events)
    if pending is None:
        if chosen:
            pending_free = chosen[0]
            raise ValueError(
                f"event {pending_free.id} ({pending_free.event_type}) is not "
                "staged on this session: nothing is"
            )
        return
    if pending.built:
        raise RuntimeError(
            "discard_staged() was called while the session commits; its events "
            "are being sent already"
        )
    withdrawn = pending.withdraw(chosen)
    if withdrawn:
        pending.owner._discarded(withdrawn, "unstaged")
