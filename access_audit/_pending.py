"""The events a session holds until its transaction ends, per boundary.

Staged events are parked in ``session.info`` per transaction *boundary*: the
outermost :class:`~sqlalchemy.orm.SessionTransaction` or a SAVEPOINT (the
internal subtransactions a flush opens are not boundaries). Nothing of ours
stays in ``session.info`` once the outermost transaction has ended.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from time import time_ns
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionState

from ._envelope import AuditEventEnvelope, utc_datetime
from ._errors import AuditConfigurationError
from ._sqla import (
    checked_engine_options,
    connection_entry,
    encloses_foreign_savepoint,
    ends_outer_transaction,
    has_connections,
    is_autocommit,
    session_connections,
)
from ._uuid import as_uuid, with_inverted_tail

if TYPE_CHECKING:
    from sqlalchemy.engine import Transaction

    from ._emitter import AuditEmitter
    from ._staging import StagedEvent

__all__ = ["PENDING_KEY", "Pending", "committing_root", "park", "prepare_commit"]

PENDING_KEY = "access_audit.pending"
"""``session.info`` key holding a :class:`Pending` while events wait."""
DISPATCHING_KEY = "access_audit.dispatching"
"""``session.info`` key present while the session dispatches its commit."""

DETACHED = "detached"
CLOSE = "close"

_trusted = AuditEventEnvelope._trusted

# A two-phase transaction is PREPARED between prepare() and commit(): its
# outbox rows and lazy values were settled by prepare().
_PAST_STAGING = (SessionTransactionState.PREPARED, SessionTransactionState.COMMITTED)
_DEFAULT_GET_BIND = Session.get_bind


class Pending:
    """One session's parked events, by boundary, and what happened to them."""

    __slots__ = (
        "built",
        "checked",
        "emitter",
        "ended",
        "first_id",
        "lazy",
        "levels",
        "outbox_bind",
        "outer",
        "stamp",
    )

    def __init__(
        self, emitter: AuditEmitter, boundary: SessionTransaction, first: StagedEvent
    ) -> None:
        # Made for every transaction that stages an event: plain literals.
        self.emitter = emitter
        self.levels: dict[SessionTransaction, list[StagedEvent]] = {boundary: [first]}
        self.ended: dict[SessionTransaction, bool] = {}
        """Boundaries that committed (True) or rolled back (False), until
        their ``after_transaction_end``."""
        self.lazy: list[StagedEvent] = [first] if first.lazy else []
        """Staged events whose lazy values are not resolved yet."""
        self.built: list[AuditEventEnvelope] = []
        """Envelopes of the commit's events, in order, as they are built: in
        ``after_commit``, or before COMMIT when they go to an outbox."""
        self.first_id = first.id_int
        """The id of the first event staged in this transaction (even one a
        rolled-back SAVEPOINT drops later), which the commit's id comes from."""
        self.stamp: tuple[datetime, uuid.UUID] | None = None
        """The commit's timestamp and id, made with its first envelope."""
        self.outbox_bind: Engine | Connection | None = None
        """Where the outbox rows of this commit were written, to mark them later."""
        self.outer: list[Connection] | None = None
        """Connections of the session joined to an outer transaction that
        the session does not end: its commit waits for them
        (``joined_transactions="outer"``). Found when staging begins and as
        the session connects."""
        self.checked: object | None = None
        """The execution options of the engine that staging checked, when
        the session's connection will come from it: a connection that still
        has exactly these needs no check of its own. None: a connection
        acquired later gets the full check."""

    def settle(self) -> None:
        """Mark the Pending as taken out of its session by the listeners.

        From now on its events are the listeners' to deliver or discard;
        collecting it reports nothing.
        """
        # Switching to the base class drops __del__: a settled Pending is
        # collected after every commit, and a Python-level __del__ call for
        # nothing is a cost every audited commit would pay.
        self.__class__ = Pending

    def work_before_commit(self) -> bool:
        """Whether the commit has work before COMMIT: lazy values to resolve
        or outbox rows to write. Without either, nothing is due until COMMIT
        has succeeded."""
        return bool(self.lazy) or self.emitter.outbox is not None

    def forget(self, events: list[StagedEvent]) -> None:
        """Drop *events* from the lazy ones still to resolve."""
        if self.lazy:
            dropped = set(events)
            self.lazy = [staged for staged in self.lazy if staged not in dropped]

    def withdraw(self, events: list[StagedEvent] | None) -> list[StagedEvent]:
        """Take *events* (all if None) out of every level; returns them in order.

        :raises ValueError: one of *events* is not waiting here.
        """
        waiting = [staged for level in self.levels.values() for staged in level]
        if events is None:
            chosen = waiting
        else:
            present = set(waiting)
            for staged in events:
                if staged not in present:
                    raise ValueError(
                        f"event {staged.id} ({staged.event_type}) is not staged "
                        "on this session's transaction; it was sent, discarded "
                        "or staged on another session"
                    )
            chosen = [staged for staged in waiting if staged in set(events)]
        gone = set(chosen)
        for level in self.levels.values():
            level[:] = [staged for staged in level if staged not in gone]
        self.forget(chosen)
        return chosen

    def in_commit_order(self, session: Session) -> list[StagedEvent]:
        """The events of every open boundary, in the order the commit sends them.

        SAVEPOINTs still open when the outermost transaction commits are
        released into it innermost-last, so their events follow the outer ones.
        """
        chain = []
        transaction = session._transaction
        while transaction is not None:
            if transaction.nested or transaction.parent is None:
                chain.append(transaction)
            transaction = transaction.parent
        events: list[StagedEvent] = []
        for boundary in reversed(chain):
            events.extend(self.levels.get(boundary, ()))
        return events

    def build(self, events: list[StagedEvent]) -> None:
        """Make envelopes for the events not yet built, appending to :attr:`built`."""
        built = self.built
        start = len(built)
        if start < len(events):
            stamp = self.stamp
            if stamp is None:
                # The timestamp: the clock and the conversion staged_at used
                # (the same code, still in the CPU's caches for the events'
                # own). The id: the first event's with its random bits
                # inverted; ids never repeat a (time, counter) pair, so no
                # event or other commit has it, and it sorts just before or
                # among its events.
                stamp = self.stamp = (
                    utc_datetime(time_ns()),
                    as_uuid(with_inverted_tail(self.first_id)),
                )
            timestamp, transaction_id = stamp
            for sequence in range(start, len(events)):
                built.append(
                    _trusted(events[sequence], timestamp, transaction_id, sequence)
                )

    def resolve(self) -> None:
        """Resolve the lazy values staged so far (they raise to the caller).

        An event resolved before a later one raised is not called again: its
        values are plain now.
        """
        for staged in self.lazy:
            staged._resolve()
        self.lazy.clear()


class UnsettledPending(Pending):
    """A :class:`Pending` still in its session: reports its events if collected.

    The last resort of "never lost silently": the session was dropped with
    its transaction open, or its listeners were removed (``detach()``)
    before the transaction ended. Either way nothing was committed, and the
    events are discarded with reason ``"close"``.
    """

    __slots__ = ()

    def __del__(self) -> None:
        if not self.levels:
            return
        try:
            events = [staged for level in self.levels.values() for staged in level]
            self.emitter._discarded(events, CLOSE)
        except Exception:  # pragma: no cover - during interpreter shutdown
            pass


def committing_root(session: Session) -> SessionTransaction | None:
    """The outermost transaction while it is inside ``commit()`` before COMMIT.

    ``before_commit`` fires for RELEASE SAVEPOINT too, and the outermost
    commit may still have SAVEPOINTs open when it starts, so neither
    ``in_nested_transaction()`` nor the event itself tells them apart; the
    state change the transaction is running does (SQLAlchemy records it as
    ``_current_fn``; ``tests/test_semantics.py`` pins this on every database).
    """
    root = session.get_transaction()
    return root if root is not None and _preparing(root) else None


def _preparing(root: SessionTransaction) -> bool:
    running = getattr(root, "_current_fn", None)
    return getattr(running, "__name__", None) == "_prepare_impl"


def prepare_commit(session: Session, pending: Pending) -> None:
    """Resolve lazy values and write outbox rows: the work due before COMMIT.

    Called before the outermost commit's final flush, after each flush in
    it, and for each event staged during it; each call handles what is new.
    """
    pending.resolve()
    outbox = pending.emitter.outbox
    if outbox is None:
        return
    written = len(pending.built)
    pending.build(pending.in_commit_order(session))
    new = pending.built[written:]
    if new:
        from ._dispatch import delivering_plugins
        from .outbox._store import write

        write(session, outbox, new, delivering_plugins(pending.emitter.plugin_manager))
        pending.outbox_bind = session.get_bind(clause=outbox.table)


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
    boundary = root = session._transaction
    if root is not None and root._parent is not None:
        # Inside a SAVEPOINT or a flush: the innermost SAVEPOINT, else the root.
        root = session.get_transaction()
        boundary = session.get_nested_transaction() or root
    if boundary is None:
        # Begin as Session.add() does: no connection yet, and the same
        # InvalidRequestError when the session has autobegin=False.
        root = boundary = session._autobegin_t()
    elif boundary._state in _PAST_STAGING:
        raise RuntimeError(
            "stage_event() was called after this transaction was prepared or "
            "committed (from an after_commit hook?); its events are being sent "
            "already. Stage before the commit, or in the next transaction"
        )
    pending: Pending | None = info.get(PENDING_KEY)
    if pending is None:
        # The first event of this transaction: check where it will commit.
        assert root is not None  # begun above, if it was not
        bind = session.bind
        if (
            type(bind) is Engine
            and not has_connections(root)
            and not session.binds
            and type(session).get_bind is _DEFAULT_GET_BIND
        ):
            # The common case, kept to a few lookups: an unconnected session
            # that will take its one connection from its engine.
            options = checked_engine_options(bind)
            if options is None:
                _refuse(session, bind, None, True, emitter)
            pending = info[PENDING_KEY] = UnsettledPending(emitter, boundary, staged)
            pending.checked = options
        else:
            outer = _check_binds(session, root, emitter)
            pending = info[PENDING_KEY] = UnsettledPending(emitter, boundary, staged)
            pending.outer = outer
            emitter._watch_connections(session)
    else:
        if pending.emitter is not emitter:
            _change_owner(session, pending, emitter)
        level = pending.levels.get(boundary)
        if level is None:
            pending.levels[boundary] = [staged]
        else:
            level.append(staged)
        if staged.lazy:
            pending.lazy.append(staged)
    if (
        pending.work_before_commit()
        and not session._flushing
        and root is not None
        and _preparing(root)
    ):
        # Staged by a before_commit hook (or a SAVEPOINT released by this
        # commit) after our own preparation ran: prepare it now, keys first.
        session.flush()
        prepare_commit(session, pending)


def _check_binds(
    session: Session, root: SessionTransaction, emitter: AuditEmitter
) -> list[Connection] | None:
    """Refuse staging where the transaction's ending cannot be trusted.

    Checks the connections the session holds; before it has one, the bind
    it will use. Returns the connections whose outer transaction the commit
    must wait for, or None. A connection the session acquires later gets the
    full check of :func:`check_connection`: it may come from another bind
    than the one checked, or join a transaction begun since.

    :raises AuditConfigurationError: as :func:`_refuse`.
    """
    outer = None
    connected = False
    for connection, transaction, commits in session_connections(root):
        connected = True
        if _refuse(session, connection, transaction, commits, emitter):
            outer = [*(outer or ()), connection]
    bind = session.bind
    if not connected and bind is not None:
        _refuse(session, bind, None, True, emitter)
    return outer


def check_connection(
    session: Session,
    root: SessionTransaction,
    connection: Connection,
    pending: Pending,
) -> None:
    """Check a connection the session acquired after staging began.

    When staging checked the engine the connection comes from, only the
    connection's own isolation level is left to check.

    :raises AuditConfigurationError: as :func:`_refuse`.
    """
    if pending.checked is not None:
        if is_autocommit(connection):
            _refuse(session, connection, None, True, pending.emitter)
        return
    entry = connection_entry(root, connection)
    if entry is not None and _refuse(
        session, connection, entry[0], entry[1], pending.emitter
    ):
        pending.outer = [*(pending.outer or ()), connection]


def _refuse(
    session: Session,
    bind: Engine | Connection,
    transaction: Transaction | None,
    commits: bool,
    emitter: AuditEmitter,
) -> bool:
    """Raise if events on *bind* could outlive, or die without, their change.

    Returns whether the session's commit must wait for an outer transaction
    on *bind* (``joined_transactions="outer"``, a session joined to a
    transaction it does not end).

    :raises AuditConfigurationError: *bind* runs in ``AUTOCOMMIT`` isolation
        (each statement commits on its own, so a rollback that drops the
        event keeps the change), or, with ``joined_transactions="outer"``,
        the session's transaction sits in a SAVEPOINT the session did not
        open, whose rollback access_audit cannot observe.
    """
    if is_autocommit(bind):
        raise AuditConfigurationError(
            f"stage_event() refused: the session's {type(bind).__name__} runs in "
            "AUTOCOMMIT isolation, where each statement commits on its own and "
            "no rollback can undo it, so its audit events could be dropped for "
            "changes that stay. Use a transactional isolation level for audited "
            "sessions, e.g. engine.execution_options(isolation_level="
            "'READ COMMITTED')"
        )
    if emitter.joined_transactions != "outer" or not isinstance(bind, Connection):
        return False
    if transaction is None:
        foreign = bind.in_nested_transaction()  # the session will join inside it
    else:
        foreign = encloses_foreign_savepoint(transaction, session.join_transaction_mode)
    if foreign:
        raise AuditConfigurationError(
            "stage_event() refused: the session is joined to a connection whose "
            "transaction is inside a SAVEPOINT that the session did not open; "
            "a rollback to it would undo the change without access_audit "
            "seeing it. Bind the session where no outside SAVEPOINT encloses "
            "it, or create the emitter with joined_transactions='session' to "
            "deliver on session.commit() (for rollback-per-test suites)"
        )
    return transaction is not None and not ends_outer_transaction(transaction, commits)


def _change_owner(session: Session, pending: Pending, emitter: AuditEmitter) -> None:
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
        dropped = pending.levels.pop(stale)
        pending.forget(dropped)
        previous._discarded(dropped, DETACHED)
    for stale in [t for t in pending.ended if t not in open_transactions]:
        del pending.ended[stale]
