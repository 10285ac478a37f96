"""Transaction bookkeeping: which staged events survive to the commit.

Staged events are parked in ``session.info`` per transaction *boundary*: the
outermost :class:`~sqlalchemy.orm.SessionTransaction` or a SAVEPOINT (the
internal subtransactions a flush opens are not boundaries). A boundary that
commits hands its events to the enclosing boundary, or, at the outermost one,
to dispatch; a boundary that ends any other way drops them.

Only ``after_transaction_end`` fires on every ending (commit, rollback,
``close()``, ``reset()``, ``invalidate()``, a SAVEPOINT closed by a flush
error), so the decision is made there. ``after_commit`` only marks a boundary
as committed; it also fires for RELEASE SAVEPOINT.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.orm import Session, SessionTransaction

from ._envelope import AuditEventEnvelope
from ._logging import logger
from ._uuid import uuid7

if TYPE_CHECKING:
    from ._emitter import AuditEmitter
    from ._registry import ListenTarget
    from ._staging import StagedEvent

__all__ = ["SessionListeners", "park"]

PENDING_KEY = "access_audit.pending"
"""``session.info`` key holding a :class:`_Pending` while events wait."""
DISPATCHING_KEY = "access_audit.dispatching"
"""``session.info`` key present while the session dispatches its commit."""

ROLLBACK = "rollback"
SAVEPOINT_ROLLBACK = "savepoint_rollback"
CLOSE = "close"
LAZY_VALUE_FAILED = "lazy_value_failed"
DETACHED = "detached"


@dataclasses.dataclass(slots=True, eq=False)
class _Pending:
    """One session's parked events, by boundary, and what happened to them."""

    emitter: AuditEmitter
    levels: dict[SessionTransaction, list[StagedEvent]] = dataclasses.field(
        default_factory=dict
    )
    committed: set[SessionTransaction] = dataclasses.field(default_factory=set)
    rolled_back: set[SessionTransaction] = dataclasses.field(default_factory=set)
    committing: bool = False
    """The outermost boundary is inside ``commit()``, past ``before_commit``."""
    built: list[AuditEventEnvelope] = dataclasses.field(default_factory=list)
    """Envelopes of the outermost boundary's events, in order, as they are built:
    in ``after_commit``, or before COMMIT when they go to an outbox."""
    transaction_id: uuid.UUID | None = None
    committed_at: datetime | None = None
    outbox_bind: Engine | Connection | None = None
    """Where the outbox rows of this commit were written, to mark them later."""
    envelopes: tuple[AuditEventEnvelope, ...] = ()
    """The finished batch, from ``after_commit`` until the transaction ends."""

    def build(self, events: list[StagedEvent]) -> list[AuditEventEnvelope]:
        """Make envelopes for the events not yet built; return the new ones."""
        start = len(self.built)
        if start == len(events):
            return []
        if self.transaction_id is None:
            self.transaction_id = uuid7()
            self.committed_at = datetime.now(timezone.utc)
        new = _envelopes(events[start:], start, self.transaction_id, self.committed_at)
        self.built.extend(new)
        return new

    def reset_commit(self) -> None:
        """Forget the per-commit state once the outermost transaction ended."""
        self.committing = False
        self.built = []
        self.transaction_id = self.committed_at = self.outbox_bind = None


def _boundary(session: Session) -> SessionTransaction | None:
    """The innermost SAVEPOINT, else the outermost transaction, else None."""
    return session.get_nested_transaction() or session.get_transaction()


def _enclosing_boundary(transaction: SessionTransaction) -> SessionTransaction | None:
    parent = transaction.parent
    while parent is not None and not parent.nested and parent.parent is not None:
        parent = parent.parent
    return parent


def park(session: Session, emitter: AuditEmitter, staged: StagedEvent) -> None:
    """Add a checked event to the session's innermost boundary.

    :raises RuntimeError: the session is dispatching its own commit, or its
        transaction has committed already and is only closing.
    """
    info = session.info
    if DISPATCHING_KEY in info:
        raise RuntimeError(
            "stage_event() was called on a session while it dispatches its own "
            "commit; stage on another session (its events are emitted when it "
            "commits), or stage before committing"
        )
    boundary = _boundary(session)
    if boundary is None:
        # Begin as Session.add() does: no connection yet, and the same
        # InvalidRequestError when the session has autobegin=False.
        boundary = session._autobegin_t()
    pending: _Pending | None = info.get(PENDING_KEY)
    if pending is None:
        pending = info[PENDING_KEY] = _Pending(emitter)
    elif pending.emitter is not emitter:
        _change_owner(session, pending, emitter)
    if boundary in pending.committed:
        raise RuntimeError(
            "stage_event() was called after this transaction committed (from an "
            "after_commit hook?); its events have been sent already. Stage "
            "before the commit, or in the next transaction"
        )
    level = pending.levels.get(boundary)
    if level is None:
        level = pending.levels[boundary] = []
    level.append(staged)
    if pending.committing and not session._flushing:
        staged.resolve()


def _change_owner(session: Session, pending: _Pending, emitter: AuditEmitter) -> None:
    """Hand a session's parked events to the emitter that owns it now.

    The emitter attached when the transaction ends sends all of its events
    (one attached to the session itself after staging began takes over).
    Levels of transactions that ended while no emitter was listening (after
    ``detach()``) are dropped here, as ``detach()`` documents.
    """
    previous = pending.emitter
    pending.emitter = emitter
    open_transactions = set()
    transaction = session._transaction
    while transaction is not None:
        open_transactions.add(transaction)
        transaction = transaction.parent
    for stale in [t for t in pending.levels if t not in open_transactions]:
        previous._discarded(pending.levels.pop(stale), DETACHED)
    pending.committed &= open_transactions
    pending.rolled_back &= open_transactions


class SessionListeners:
    """The session event listeners of one emitter, attachable to many targets."""

    def __init__(self, emitter: AuditEmitter) -> None:
        self._emitter = emitter
        self._hooks: dict[str, Callable[..., None]] = {
            "before_commit": self._before_commit,
            "after_flush_postexec": self._after_flush_postexec,
            "after_commit": self._after_commit,
            "after_rollback": self._after_rollback,
            "after_transaction_end": self._after_transaction_end,
        }

    def listen(self, target: ListenTarget) -> None:
        """Install the listeners on *target*; a second call is a no-op."""
        for name, function in self._hooks.items():
            if not event.contains(target, name, function):
                event.listen(target, name, function)

    def remove(self, target: ListenTarget) -> None:
        """Remove the listeners from *target*, if installed."""
        for name, function in self._hooks.items():
            if event.contains(target, name, function):
                event.remove(target, name, function)

    def _mine(self, session: Session) -> _Pending | None:
        pending: _Pending | None = session.info.get(PENDING_KEY)
        if pending is None or pending.emitter is not self._emitter:
            return None
        return pending

    def _before_commit(self, session: Session) -> None:
        pending = self._mine(session)
        # before_commit also fires for RELEASE SAVEPOINT: lazy values wait for
        # the outermost commit.
        if session.get_nested_transaction() is not None:
            return
        if pending is None:
            if self._emitter.outbox is None or PENDING_KEY in session.info:
                return
            # ORM hooks of the commit's own flush may stage the first events;
            # with an outbox they must be written before COMMIT too.
            pending = session.info[PENDING_KEY] = _Pending(self._emitter)
        pending.committing = True
        # Flush now (the commit would next) so database-generated keys exist,
        # then resolve. Events staged by ORM hooks of a later flush in this
        # commit are resolved in after_flush_postexec.
        try:
            session.flush()
            _resolve(pending.levels.values())
            self._write_outbox(session, pending)
        except BaseException:
            # The commit fails before COMMIT; the transaction stays open for
            # the caller's rollback() and is not committing any more.
            pending.committing = False
            raise

    def _after_flush_postexec(self, session: Session, flush_context: Any) -> None:
        pending = self._mine(session)
        if pending is not None and pending.committing:
            _resolve(pending.levels.values())
            self._write_outbox(session, pending)

    def _write_outbox(self, session: Session, pending: _Pending) -> None:
        outbox = self._emitter.outbox
        root = session.get_transaction()
        if outbox is None or root is None:
            return
        from .outbox._store import write

        new = pending.build(pending.levels.get(root, []))
        if new:
            write(session, outbox, new)
            pending.outbox_bind = session.get_bind(clause=outbox.table)

    def _after_commit(self, session: Session) -> None:
        pending = self._mine(session)
        if pending is None:
            return
        boundary = _boundary(session)
        if boundary is None:  # pragma: no cover - SQLAlchemy always has one here
            return
        pending.committed.add(boundary)
        if session.get_nested_transaction() is None:
            pending.committing = False
            events = pending.levels.get(boundary, [])
            # Only events merged in by a SAVEPOINT that this commit released
            # (root.commit() with a SAVEPOINT open) can be unresolved here.
            # COMMIT is done and objects are not expired yet; raising now would
            # leave the session unusable, so a failing value drops its event.
            failed = _resolve_or_drop(events)
            if failed:
                self._emitter._discarded(failed, LAZY_VALUE_FAILED)
            written = len(pending.built)
            pending.build(events)
            if pending.outbox_bind is not None and len(pending.built) > written:
                logger.warning(
                    "events %s joined the commit after its outbox rows were "
                    "written (a SAVEPOINT released by root.commit()); they are "
                    "dispatched, but the relay cannot re-deliver them",
                    ", ".join(str(e.id) for e in pending.built[written:]),
                )
            pending.envelopes = tuple(pending.built)

    def _after_rollback(self, session: Session) -> None:
        pending = self._mine(session)
        if pending is not None:
            boundary = _boundary(session)
            if boundary is not None:
                pending.rolled_back.add(boundary)

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        pending = self._mine(session)
        if pending is None:
            return
        events = pending.levels.pop(transaction, None)
        committed = transaction in pending.committed
        pending.committed.discard(transaction)
        rolled_back = transaction in pending.rolled_back
        pending.rolled_back.discard(transaction)
        outer = _enclosing_boundary(transaction)
        envelopes: tuple[AuditEventEnvelope, ...] = ()
        outbox_bind = pending.outbox_bind
        if committed and outer is None:
            envelopes, pending.envelopes = pending.envelopes, ()
        elif committed and events and outer is not None:
            pending.levels.setdefault(outer, []).extend(events)
            events = None
        if transaction.parent is None:
            pending.reset_commit()
        if not pending.levels and not pending.envelopes:
            del session.info[PENDING_KEY]
        if events and not committed:
            if rolled_back:
                reason = SAVEPOINT_ROLLBACK if transaction.nested else ROLLBACK
            else:
                reason = CLOSE
            self._emitter._discarded(events, reason)
        if envelopes:
            session.info[DISPATCHING_KEY] = True
            try:
                self._emitter._committed(envelopes, outbox_bind)
            finally:
                del session.info[DISPATCHING_KEY]


def _resolve(levels: Any) -> None:
    for events in levels:
        for staged in events:
            staged.resolve()


def _resolve_or_drop(events: list[StagedEvent]) -> list[StagedEvent]:
    failed = []
    for staged in events:
        try:
            staged.resolve()
        except (TypeError, ValueError):
            logger.exception(
                "dropping committed event %s (%s)", staged.id, staged.event_type
            )
            failed.append(staged)
    events[:] = [staged for staged in events if staged not in failed]
    return failed


def _envelopes(
    events: list[StagedEvent],
    first_sequence: int,
    transaction_id: uuid.UUID,
    committed_at: datetime | None,
) -> list[AuditEventEnvelope]:
    assert committed_at is not None
    return [
        AuditEventEnvelope(
            id=staged.id,
            event_type=staged.event_type,
            timestamp=committed_at,
            staged_at=staged.staged_at,
            actor_id=staged.actor_id,
            actor_email=staged.actor_email,
            target_type=staged.target_type,
            target_id=staged.target_id,  # type: ignore[arg-type]
            target_name=staged.target_name,  # type: ignore[arg-type]
            action=staged.action,
            reason=staged.reason,
            payload=staged.payload,
            metadata=staged.metadata,
            transaction_id=transaction_id,
            sequence=sequence,
        )
        for sequence, staged in enumerate(events, start=first_sequence)
    ]
