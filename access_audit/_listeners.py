"""The session event listeners: which staged events survive to the commit.

A boundary (the outermost transaction or a SAVEPOINT) that commits hands its
events to the enclosing boundary, or, at the outermost one, to dispatch; a
boundary that ends any other way drops them. Only ``after_transaction_end``
fires on every ending (commit, rollback, ``close()``, ``reset()``,
``invalidate()``, a SAVEPOINT closed by a flush error), so the decision is made
there. ``after_commit`` only marks a boundary as committed; it also fires for
RELEASE SAVEPOINT.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, SessionTransaction

from ._logging import logger
from ._outer import wait_for_outer
from ._pending import (
    DISPATCHING_KEY,
    PENDING_KEY,
    Pending,
    check_connection,
    committing_root,
    prepare_commit,
)
from ._sqla import inherits_options

if TYPE_CHECKING:
    from ._emitter import AuditEmitter
    from ._registry import ListenTarget
    from ._staging import StagedEvent

__all__ = ["SessionListeners"]

ROLLBACK = "rollback"
SAVEPOINT_ROLLBACK = "savepoint_rollback"
CLOSE = "close"
LAZY_VALUE_FAILED = "lazy_value_failed"


class SessionListeners:
    """The session event listeners of one emitter, attachable to many targets."""

    EVENTS = (
        "before_commit",
        "after_flush_postexec",
        "after_commit",
        "after_rollback",
        "after_transaction_end",
    )
    """The session events listened to; each by the method ``_`` + its name."""

    def __init__(self, emitter: AuditEmitter) -> None:
        self._emitter = emitter
        self._hooks: dict[str, Callable[..., None]] = {
            name: getattr(self, "_" + name) for name in self.EVENTS
        }
        # What listen() really installed. SQLAlchemy's own registry
        # (event.contains) is keyed by id(target) and keeps the keys of
        # collected classes, so a new sessionmaker's Session subclass that
        # lands at a collected one's address would look attached already.
        self._installed: weakref.WeakSet[ListenTarget] = weakref.WeakSet()
        self._watching: weakref.WeakSet[ListenTarget] = weakref.WeakSet()
        """Where ``after_begin`` is installed (see :meth:`watch_connections`)."""

    def listen(self, target: ListenTarget) -> None:
        """Install the listeners on *target*; a second call is a no-op."""
        if target in self._installed:
            return
        for name, function in self._hooks.items():
            event.listen(target, name, function)
        self._installed.add(target)

    def remove(self, target: ListenTarget) -> None:
        """Remove the listeners from *target*, if installed."""
        if target in self._watching:
            self._watching.discard(target)
            event.remove(target, "after_begin", self._after_begin)
        if target not in self._installed:
            return
        self._installed.discard(target)
        for name, function in self._hooks.items():
            event.remove(target, name, function)

    def watch_connections(self, session: Session, on_instance: bool) -> None:
        """Have ``after_begin`` check the connections *session* acquires.

        Needed only where staging could not check the connection the session
        will use (it had none yet, and its bind is not a plain Engine), so it
        is installed on the first such session of a class (or on the session
        itself, *on_instance*, when the emitter is attached to it alone):
        sessions of other classes never pay for the call.
        """
        target: ListenTarget = session if on_instance else type(session)
        if target not in self._watching:
            event.listen(target, "after_begin", self._after_begin)
            self._watching.add(target)

    # The hooks below run on every commit of every attached session, with or
    # without events. A Pending that another emitter owns (one attached to a
    # more specific target) is that emitter's to handle.

    def _after_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        """Check a connection the session acquires after staging began."""
        if transaction._parent is not None:
            return  # a SAVEPOINT: on a connection the outermost checked
        pending: Pending | None = session.info.get(PENDING_KEY)
        if (
            pending is not None
            and pending.emitter is self._emitter
            and (
                pending.checked is None
                or not inherits_options(connection, pending.checked)
            )
        ):
            # Events were staged before the session had this connection, and
            # staging could not check all of it.
            check_connection(session, transaction, connection, pending)

    def _due_before_commit(self, session: Session) -> Pending | None:
        """Our Pending, while the outermost commit has work due before COMMIT."""
        pending: Pending | None = session.info.get(PENDING_KEY)
        if (
            pending is None
            or pending.emitter is not self._emitter
            or not pending.work_before_commit()
            or committing_root(session) is None  # a RELEASE SAVEPOINT
        ):
            return None
        return pending

    def _before_commit(self, session: Session) -> None:
        pending = self._due_before_commit(session)
        if pending is not None:
            # Flush now (the commit would next) so database-generated keys
            # exist, then resolve and write the outbox. Events that ORM hooks
            # of a later flush in this commit stage are handled in
            # after_flush_postexec.
            session.flush()
            prepare_commit(session, pending)

    def _after_flush_postexec(self, session: Session, flush_context: Any) -> None:
        pending = self._due_before_commit(session)
        if pending is not None:
            prepare_commit(session, pending)

    def _after_commit(self, session: Session) -> None:
        pending: Pending | None = session.info.get(PENDING_KEY)
        if pending is None or pending.emitter is not self._emitter:
            return
        # The committing transaction is still the session's current one: it
        # closes (handing over to its parent) only after this event.
        boundary = session._transaction
        if boundary is None:  # pragma: no cover - SQLAlchemy always has one here
            return
        pending.ended[boundary] = True
        if boundary.nested:
            return
        events = pending.levels.get(boundary) or []
        if pending.work_before_commit():
            self._late_events(pending, events)
        else:
            pending.build(events)

    def _late_events(self, pending: Pending, events: list[StagedEvent]) -> None:
        """Build the envelopes of events staged after the last point before COMMIT.

        Such events were staged by an ``after_flush_postexec`` hook that ran
        after ours. COMMIT is done and objects are not expired yet; raising
        now would leave the session unusable, so a lazy value that fails drops
        its event, and the outbox has no row for them.
        """
        written = len(pending.built)
        if pending.lazy:
            failed = _resolve_or_drop(pending, events)
            if failed:
                self._emitter._discarded(failed, LAZY_VALUE_FAILED)
        pending.build(events)
        if self._emitter.outbox is not None and len(pending.built) > written:
            logger.error(
                "events %s were staged after this commit's outbox rows were "
                "written (by a hook that runs after access_audit's); they are "
                "dispatched, but the relay cannot re-deliver them",
                ", ".join(str(e.id) for e in pending.built[written:]),
            )

    def _after_rollback(self, session: Session) -> None:
        pending: Pending | None = session.info.get(PENDING_KEY)
        if pending is not None and pending.emitter is self._emitter:
            boundary = session.get_nested_transaction() or session.get_transaction()
            if boundary is not None:
                pending.ended[boundary] = False

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        parent = transaction._parent
        if parent is not None and not transaction.nested:
            return  # a flush's subtransaction: never a boundary
        info = session.info
        pending: Pending | None = info.get(PENDING_KEY)
        if pending is None or pending.emitter is not self._emitter:
            return
        if parent is None:
            # The outermost transaction ended, every SAVEPOINT in it before.
            del info[PENDING_KEY]
            pending.settle()
            ended = pending.ended.get(transaction)
            if ended:
                if pending.outer:
                    self._wait_for_outer(pending, pending.levels.get(transaction))
                elif pending.built:  # else every lazy value failed
                    # Staging on this session is refused while it dispatches.
                    info[DISPATCHING_KEY] = True
                    try:
                        self._emitter._committed(
                            tuple(pending.built), pending.outbox_bind
                        )
                    finally:
                        del info[DISPATCHING_KEY]
                return
            dropped = pending.levels.get(transaction)
            reason = ROLLBACK
        else:
            dropped = pending.levels.pop(transaction, None)
            ended = pending.ended.pop(transaction, None)
            if dropped and ended:
                # Released: its events join the enclosing boundary.
                outer = parent
                while not outer.nested and outer._parent is not None:
                    outer = outer._parent
                pending.levels.setdefault(outer, []).extend(dropped)
                dropped = None
            elif dropped:
                pending.forget(dropped)
            if not pending.levels:
                del info[PENDING_KEY]
                pending.settle()
            reason = SAVEPOINT_ROLLBACK
        if dropped:
            # Rolled back (False), or ended without either (None: close(),
            # a flush error, invalidate()).
            self._emitter._discarded(dropped, CLOSE if ended is None else reason)

    def _wait_for_outer(
        self, pending: Pending, events: list[StagedEvent] | None
    ) -> None:
        """Hold a joined session's committed batch until its outer transaction ends."""
        envelopes = tuple(pending.built)
        staged = list(events or ())
        emitter = self._emitter
        outbox_bind = pending.outbox_bind
        if outbox_bind is not None:
            # Mark the rows through a connection of its own: the joined one
            # is the caller's, and may be in its next transaction by then.
            outbox_bind = outbox_bind.engine

        def settle(committed: bool) -> None:
            if not committed:
                emitter._discarded(staged, ROLLBACK)
            elif envelopes:
                emitter._committed(envelopes, outbox_bind)

        wait_for_outer(pending.outer or [], settle)


def _resolve_or_drop(pending: Pending, events: list[StagedEvent]) -> list[StagedEvent]:
    failed = []
    for staged in pending.lazy:
        try:
            staged._resolve()
        except (TypeError, ValueError):
            logger.exception(
                "dropping committed event %s (%s)", staged.id, staged.event_type
            )
            failed.append(staged)
    pending.lazy = []
    if failed:
        events[:] = [staged for staged in events if staged not in failed]
    return failed
