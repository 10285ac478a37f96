"""The one owner of a session's staged events, per transaction boundary.

Staged events wait in ``session.info`` on a :class:`Lifecycle`, per transaction
*boundary*: the outermost :class:`~sqlalchemy.orm.SessionTransaction` or a
SAVEPOINT (the subtransactions a flush opens are not boundaries). Only this
module changes them. The session listeners tell it what happened to a
boundary (committed, rolled back, ended) and hand the :data:`Outcome` it
returns to the emitter: deliver these envelopes, wait for an outer
transaction, or discard these events for this reason. Nothing of ours stays
in ``session.info`` once the outermost transaction has ended.
"""

from __future__ import annotations

import atexit
import gc
import os
import uuid
from collections.abc import Sequence
from datetime import datetime
from time import time_ns
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

from ._aborted import (
    AT_COMMIT,
    rolls_back_at_commit,
    watch_server_rollbacks,
)
from ._binds import (
    DEFAULT_GET_BIND,
    check_binds,
    refuse,
    refuse_foreign_savepoints,
    session_binds,
)
from ._clock import utc_datetime
from ._envelope import AuditEventEnvelope, committed_envelope
from ._errors import AuditConfigurationError
from ._ids import as_uuid, with_inverted_tail
from ._logging import event_ids, logger
from ._outer import OuterWatch, then_all, watch_outer
from ._registry import emitter_for
from ._sqla import (
    autobegin,
    checked_engine_options,
    connection_entry,
    current_transaction,
    has_committed,
    has_connections,
    in_savepoint,
    is_autocommit,
    is_flushing,
    mapper_binds,
    parent_of,
    past_staging,
    preparing,
    sets_connection_options,
    transaction_connections,
)

if TYPE_CHECKING:
    from ._owner import Owner
    from ._staged import StagedEvent
    from ._types import DiscardReason

__all__ = [
    "DISPATCHING_KEY",
    "PENDING_KEY",
    "Deliver",
    "Discard",
    "Lifecycle",
    "Outcome",
    "WaitForOuter",
    "committing_root",
    "hand_over",
    "stage_on",
]

PENDING_KEY = "access_audit.pending"
"""``session.info`` key holding a :class:`Lifecycle` while events wait."""
DISPATCHING_KEY = "access_audit.dispatching"
"""``session.info`` key present while the session dispatches its commit."""


Deliver = tuple[tuple[AuditEventEnvelope, ...], "Engine | Connection | None"]
"""Outcome: the outermost transaction committed; deliver its envelopes.

The pair ``(envelopes, outbox_bind)``: the batch, and where the commit's
outbox rows went (or None). A plain tuple (one is made per commit); the
other outcomes are classes of their own.
"""


class WaitForOuter:
    """Outcome: a joined session committed; its outer transaction decides.

    Deliver the envelopes once every one of :attr:`watches` has seen its
    outer transaction commit; discard :attr:`staged` otherwise.
    """

    __slots__ = ("envelopes", "outbox_bind", "staged", "watches")

    def __init__(
        self,
        envelopes: tuple[AuditEventEnvelope, ...],
        outbox_bind: Engine | Connection | None,
        staged: list[StagedEvent],
        watches: list[OuterWatch],
    ) -> None:
        self.envelopes = envelopes
        self.outbox_bind = outbox_bind
        self.staged = staged
        self.watches = watches


class Discard:
    """Outcome: these events will never be emitted, for this reason."""

    __slots__ = ("events", "reason")

    def __init__(self, events: Sequence[StagedEvent], reason: DiscardReason) -> None:
        self.events = events
        self.reason: DiscardReason = reason


Outcome = Deliver | WaitForOuter | Discard
"""What a boundary's end means for its events."""


class Lifecycle:
    """One session transaction's staged events, by boundary, and their fate."""

    __slots__ = (
        "__weakref__",
        "built",
        "checked",
        "checked_engine",
        "finished",
        "first_id",
        "lazy",
        "levels",
        "marks",
        "may_abort",
        "outbox_bind",
        "outer",
        "owner",
        "process",
        "refusal",
        "root",
        "stamp",
        "unprepared",
    )

    def __init__(
        self,
        owner: Owner,
        root: SessionTransaction,
        boundary: SessionTransaction,
        first: StagedEvent,
    ) -> None:
        # Made for every transaction that stages an event: plain literals.
        self.owner = owner
        self.process = _process
        """The process (:data:`_process`) whose transaction this is."""
        self.root = root
        """The outermost transaction whose events these are."""
        self.levels: dict[SessionTransaction, list[StagedEvent]] = {boundary: [first]}
        self.finished: dict[SessionTransaction, bool] = {}
        """Boundaries that committed (True) or rolled back (False), until
        their ``after_transaction_end``."""
        self.lazy: list[StagedEvent] = [first] if first._lazy else []
        """Staged events whose lazy values are not resolved yet."""
        self.unprepared = True
        """Whether an event was staged since :meth:`prepare` last ran."""
        self.built: list[AuditEventEnvelope] = []
        """Envelopes of the commit's events, in order, as they are built: in
        ``after_commit``, or before COMMIT when they go to an outbox."""
        self.marks: dict[SessionTransaction, int] | None = None
        """Per open SAVEPOINT that outbox rows were written in (by a
        before_commit listener's SAVEPOINT, during the commit), how many
        envelopes were built before the first: its rollback takes the rows
        written since, the enclosing levels' too."""
        self.first_id = first._id_int
        """The id of the first event staged in this transaction (even one a
        rolled-back SAVEPOINT drops later), which the commit's id comes from."""
        self.stamp: tuple[datetime, uuid.UUID] | None = None
        """The commit's timestamp and id, made with its first envelope."""
        self.outbox_bind: Engine | Connection | None = None
        """Where the outbox rows of this commit were written, to record later."""
        self.outer: list[tuple[Connection, OuterWatch]] | None = None
        """Connections of the session joined to an outer transaction that
        the session does not end, each with the watch on that transaction:
        the commit waits for them (``joined_transactions="outer"``). Found
        when staging begins and as the session connects."""
        self.checked_engine: Engine | None = None
        self.checked: object | None = None
        """The engine that staging checked (:attr:`checked_engine`) and its
        execution options, when the session's connection will come from it:
        a connection of that engine that still has exactly these options
        needs no check of its own. None: a connection acquired later gets
        the full check."""
        self.refusal: str | None = None
        """Why a connection acquired after staging was refused: every later
        stage in this transaction is refused for the same reason."""
        self.may_abort = True
        """Whether the commit must ask :meth:`aborted`: False when the
        session's one connection comes from an engine whose database goes
        on after a failed statement."""

    # -- staging ---------------------------------------------------------

    def stage(self, boundary: SessionTransaction, staged: StagedEvent) -> None:
        """Add a checked event to *boundary*'s level."""
        level = self.levels.get(boundary)
        if level is None:
            self.levels[boundary] = [staged]
        else:
            level.append(staged)
        if staged._lazy:
            self.lazy.append(staged)
        self.unprepared = True

    def work_before_commit(self) -> bool:
        """Whether the commit has work before COMMIT: lazy values to resolve
        or outbox rows to write. Without either, nothing is due until COMMIT
        has succeeded."""
        return bool(self.lazy) or self.owner.outbox is not None

    def withdraw(self, events: list[StagedEvent] | None) -> list[StagedEvent]:
        """Take *events* (all if None) out of every level; returns them in order.

        :raises ValueError: one of *events* is not waiting here (then nothing
            is withdrawn).
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
            wanted = set(events)
            chosen = [staged for staged in waiting if staged in wanted]
        gone = set(chosen)
        for level in self.levels.values():
            level[:] = [staged for staged in level if staged not in gone]
        self._forget(chosen)
        return chosen

    def in_commit_order(self, session: Session) -> list[StagedEvent]:
        """The events of every open boundary, in the order the commit sends them.

        SAVEPOINTs still open when the outermost transaction commits are
        released into it innermost-last, so their events follow the outer ones.
        """
        chain = []
        transaction = current_transaction(session)
        while transaction is not None:
            if transaction.nested or transaction.parent is None:
                chain.append(transaction)
            transaction = transaction.parent
        events: list[StagedEvent] = []
        for boundary in reversed(chain):
            events.extend(self.levels.get(boundary, ()))
        return events

    def connected(
        self, session: Session, root: SessionTransaction, connection: Connection
    ) -> None:
        """Check a connection the session acquired after staging began.

        When staging checked the engine the connection comes from, only the
        connection's own isolation level is left to check. A refused
        connection stays the session's (SQLAlchemy holds it already), so the
        events staged so far are discarded (reason ``"refused"``) and every
        later stage in this transaction is refused too.

        :raises AuditConfigurationError: as :func:`~access_audit._binds.refuse`.
        """
        watch_server_rollbacks(connection, self)
        try:
            if self.checked is not None:
                if is_autocommit(connection):
                    refuse(session, connection, None, True, self.owner)
                return
            entry = connection_entry(root, connection)
            if entry is None:
                return
            joined = refuse(session, connection, entry[0], entry[1], self.owner)
            outer = self.outer or []
            watched = any(pair[0] is connection for pair in outer)
            if joined and not watched:
                self.outer = [*outer, (connection, watch_outer(connection))]
            elif watched and not joined:
                # Staging saw the connection in a transaction; the session
                # took it over ("control_fully"), so its own commit decides.
                for pair in outer:
                    if pair[0] is connection:
                        pair[1].stop()
                self.outer = [pair for pair in outer if pair[0] is not connection]
        except AuditConfigurationError as error:
            self.refusal = str(error)
            withdrawn = self.withdraw(None)
            if withdrawn:
                self.owner._discarded(withdrawn, "refused")
            raise

    def check_savepoints(self, session: Session) -> None:
        """After a flush, and before staging another event: refuse a
        SAVEPOINT the session did not open.

        A rollback to a SAVEPOINT begun on the session's connection (or by
        the caller of a joined session) would undo what was flushed or
        staged in it while the transaction still commits, where
        access_audit cannot see it. Costs one attribute per connection
        while no SAVEPOINT is open.

        :raises AuditConfigurationError: such a SAVEPOINT is open.
        """
        if in_savepoint(self.root):
            refuse_foreign_savepoints(session, self.root)

    # -- the commit ------------------------------------------------------

    def aborted(self, session: Session) -> bool:
        """Before the outermost COMMIT: discard every staged event (reason
        ``"rollback"``, with a warning) when a database will roll the
        transaction back instead (:func:`rolls_back_at_commit`)."""
        for connection in transaction_connections(self.root):
            if rolls_back_at_commit(connection):
                break
        else:
            return False
        if committing_root(session) is None:
            return False  # a RELEASE SAVEPOINT: it fails, and a rollback follows
        self._discard_all(AT_COMMIT)
        return True

    def prepare(self, session: Session) -> None:
        """Resolve lazy values and write outbox rows: the work due before COMMIT.

        Called before the outermost commit's final flush, after each flush in
        it, and for each event staged during it; each call handles what is
        new, and returns at once when nothing was staged since the last.
        Lazy values raise to the caller, failing the commit.
        """
        if not self.unprepared:
            return
        for staged in self.lazy:
            # One resolved before a later one raised is not called again:
            # its values are plain now.
            staged._resolve()
        self.lazy.clear()
        self.unprepared = False
        if self.owner.outbox is None:
            return
        written = len(self.built)
        self._build(self.in_commit_order(session))
        new = self.built[written:]
        if new:
            savepoint = session.get_nested_transaction()
            if savepoint is not None:
                if self.marks is None:
                    self.marks = {}
                self.marks.setdefault(savepoint, written)
            self.outbox_bind = self.owner._write_outbox(session, new)

    def committed(self, boundary: SessionTransaction) -> Discard | None:
        """*boundary* committed (``after_commit``, which RELEASE SAVEPOINT fires too).

        At the outermost one, COMMIT has succeeded: its envelopes are built.
        Events staged after the last point before COMMIT (by a flush hook
        that runs after ours) are built here too; raising now would leave the
        session unusable, so one whose lazy value fails is discarded (the
        outcome returned), and the outbox has no row for them.
        """
        self.finished[boundary] = True
        if boundary.nested:
            return None
        events = self.levels.get(boundary) or []
        if not self.work_before_commit():
            self._build(events)
            return None
        written = len(self.built)
        failed = self._resolve_or_drop(events) if self.lazy else None
        self._build(events)
        if self.owner.outbox is not None and len(self.built) > written:
            logger.error(
                "events %s were staged after this commit's outbox rows were "
                "written (by a hook that runs after access_audit's); they are "
                "dispatched, but the relay cannot re-deliver them",
                event_ids(self.built[written:]),
            )
        return Discard(failed, "lazy_value_failed") if failed else None

    def rolled_back(self, boundary: SessionTransaction) -> None:
        """*boundary* rolled back (``after_rollback``)."""
        self.finished[boundary] = False

    def ended(
        self,
        info: dict[Any, Any],
        transaction: SessionTransaction,
        parent: SessionTransaction | None,
    ) -> Outcome | None:
        """A boundary ended (``after_transaction_end``, on every ending).

        The outermost one takes the lifecycle out of the session (*info*):
        delivered if it committed, discarded if not. A SAVEPOINT released
        hands its events to the enclosing boundary; one that ended any other
        way drops them.
        """
        if parent is None:
            if transaction is not self.root:
                if transaction.session.get_transaction() is self.root:
                    # An earlier transaction, ending after an application's
                    # listener staged this one's first event: not ours.
                    return None
                # A later transaction of the session: this one's own end
                # went unheard.
                return self.unheard_end(info)
            # The outermost transaction ended, every SAVEPOINT in it before.
            del info[PENDING_KEY]
            self.__class__ = Lifecycle  # self.settle(), without the call
            committed = self.finished.get(transaction)
            if self.outer and not committed:
                self._stop_watching()
            if committed:
                if self.outer:
                    return WaitForOuter(
                        tuple(self.built),
                        self.outbox_bind,
                        list(self.levels.get(transaction) or ()),
                        [watch for _connection, watch in self.outer],
                    )
                if self.built:  # else every lazy value failed
                    bind = self.outbox_bind
                    if bind is not None and type(bind) is not Engine:
                        bind = _recording_bind(bind)
                    return (tuple(self.built), bind)
                return None
            dropped = self.levels.get(transaction)
            reason: DiscardReason = "rollback"
        else:
            dropped = self.levels.pop(transaction, None)
            committed = self.finished.pop(transaction, None)
            marks = self.marks
            mark = marks.pop(transaction, None) if marks else None
            if committed and (dropped or mark is not None):
                # Released: its events join the enclosing boundary, and
                # its rows are that boundary's now.
                outer = parent
                while not outer.nested:
                    up = parent_of(outer)
                    if up is None:
                        break
                    outer = up
                if dropped:
                    self.levels.setdefault(outer, []).extend(dropped)
                    dropped = None
                if marks is not None and mark is not None and outer.nested:
                    marks[outer] = min(marks.get(outer, mark), mark)
            elif not committed:
                if dropped:
                    self._forget(dropped)
                if mark is not None:
                    # The rows written in it are gone, the enclosing
                    # levels' too: those are built and written again by
                    # the commit's next prepare() (its before_commit, or
                    # a flush), as SQLAlchemy goes on committing.
                    del self.built[mark:]
                    self.unprepared = True
            if not self.levels:
                del info[PENDING_KEY]
                self.settle()
            reason = "savepoint_rollback"
        if not dropped:
            return None
        # Rolled back (False), or ended without either (None: close(), a
        # flush error, invalidate()).
        return Discard(dropped, "close" if committed is None else reason)

    def unheard_end(self, info: dict[Any, Any]) -> Outcome | None:
        """Settle a lifecycle whose outermost transaction ended without its
        ``after_transaction_end``, found as the session goes on (a later
        transaction ends, or stages).

        SQLAlchemy fires that event last, after giving the connection back
        to the pool; a ``BaseException`` raised there (an asyncio
        cancellation landing as an async driver resets the connection, a
        Ctrl-C) ends the transaction unheard, and so does ``detach()``.
        What ``after_commit`` or ``after_rollback`` heard decides: delivered
        if COMMIT succeeded, discarded (reason ``"rollback"``) if it rolled
        back; neither heard, the emitter was detached (``"detached"``).
        """
        committed = self.finished.get(self.root)
        if committed:  # its SAVEPOINTs ended, heard, before its COMMIT
            return self.ended(info, self.root, None)
        self.abandon(info, "rollback" if committed is False else "detached")
        return None

    def settle_unheard(self, info: dict[Any, Any]) -> None:
        """:meth:`unheard_end`, its outcome handed over to the emitter."""
        outcome = self.unheard_end(info)
        if outcome is not None:
            hand_over(self.owner, info, outcome)

    def settle(self) -> None:
        """Mark the lifecycle as taken out of its session.

        From now on its events are the listeners' to deliver or discard;
        collecting it reports nothing.
        """
        # Switching to the base class drops __del__: a settled lifecycle is
        # collected after every commit, and a Python-level __del__ call for
        # nothing is a cost every audited commit would pay.
        self.__class__ = Lifecycle
        if self.outer:
            self._stop_watching()

    def _stop_watching(self) -> None:
        """Tell the outer transactions' watches the session's transaction is over."""
        for _connection, watch in self.outer or ():
            watch.stop()

    def change_owner(self, session: Session, owner: Owner) -> None:
        """Hand the parked events to the emitter that owns the session now.

        The emitter attached when the transaction ends sends all of its events
        (one attached to the session itself after staging began takes over).
        Levels of transactions that ended while no emitter was listening
        (after ``detach()``) are discarded here, as ``detach()`` documents.
        """
        previous = self.owner
        self.owner = owner
        open_transactions = set()
        transaction = current_transaction(session)
        while transaction is not None:
            open_transactions.add(transaction)
            transaction = transaction.parent
        for stale in [t for t in self.levels if t not in open_transactions]:
            dropped = self.levels.pop(stale)
            self._forget(dropped)
            previous._discarded(dropped, "detached")
        for stale in [t for t in self.finished if t not in open_transactions]:
            del self.finished[stale]

    def abandon(self, info: dict[Any, Any], reason: DiscardReason = "detached") -> int:
        """Drop a lifecycle whose transaction ended unobserved (its listeners
        were removed by ``detach()``), or will not end (the process exits):
        its events are discarded for *reason*, and the session (*info*)
        starts afresh, so a later close() or commit() there finds nothing.
        Returns how many events were discarded."""
        if info.get(PENDING_KEY) is self:
            del info[PENDING_KEY]
        self.settle()
        events = [staged for level in self.levels.values() for staged in level]
        if events:
            self.owner._discarded(events, reason)
        return len(events)

    # -- helpers ---------------------------------------------------------

    def _forget(self, events: list[StagedEvent]) -> None:
        """Drop *events* from the lazy ones still to resolve."""
        if self.lazy:
            dropped = set(events)
            self.lazy = [staged for staged in self.lazy if staged not in dropped]

    def rolled_back_by_server(self, connection: Connection, why: str) -> None:
        """The database rolled back the transaction on *connection* (as a
        deadlock's victim, or at its COMMIT after a caught failure), if it
        is this lifecycle's: discard every event staged so far (reason
        ``"rollback"``, with a warning). What a deadlock's victim does next
        goes into a new transaction, whose events its commit sends."""
        if self.levels and connection_entry(self.root, connection) is not None:
            self._discard_all(why)

    def _discard_all(self, why: str) -> None:
        """Discard every event staged so far (reason ``"rollback"``): the
        database rolled back what they describe. *why* (``%s``: their ids)
        is logged if there were any."""
        withdrawn = self.withdraw(None)
        # Envelopes built (and outbox rows written) for them before COMMIT
        # went with them: the rows with the transaction.
        self.built = []
        self.marks = None
        self.outbox_bind = None
        if withdrawn:
            logger.warning(why, event_ids(withdrawn))
            self.owner._discarded(withdrawn, "rollback")

    def _build(self, events: list[StagedEvent]) -> None:
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
                    committed_envelope(
                        events[sequence], timestamp, transaction_id, sequence
                    )
                )

    def _resolve_or_drop(self, events: list[StagedEvent]) -> list[StagedEvent]:
        """Resolve lazy values after COMMIT; drop (and return) the events that fail."""
        failed = []
        for staged in self.lazy:
            try:
                staged._resolve()
            except (TypeError, ValueError):
                logger.exception(
                    "dropping committed event %s (%s)", staged.id, staged.event_type
                )
                failed.append(staged)
        self.lazy = []
        if failed:
            events[:] = [staged for staged in events if staged not in failed]
        return failed


class UnsettledLifecycle(Lifecycle):
    """A :class:`Lifecycle` still in its session: reports its events if collected.

    The last resort of "never lost silently": the session was dropped with
    its transaction open (nothing was committed), or its listeners were
    removed (``detach()``) before the transaction ended unobserved. The
    events are discarded with reason ``"close"``.
    """

    __slots__ = ()

    def __del__(self) -> None:
        if self.outer:
            self._stop_watching()
        if not self.levels or self.process != _process:
            return  # nothing staged, or a copy a fork inherited: not its own
        try:
            events = [staged for level in self.levels.values() for staged in level]
            self.owner._discarded(events, self.unheard_reason())
        except Exception:  # pragma: no cover - during interpreter shutdown
            pass

    def unheard_reason(self) -> DiscardReason:
        """Why events no listener will settle are discarded: ``"detached"``
        when the emitter no longer owns the session (its transaction may
        have ended under another, or none), else ``"close"``."""
        try:
            owner = emitter_for(self.root.session)
        except AuditConfigurationError:
            return "detached"
        except Exception:  # a selector that needs what is gone (an app context)
            return "close"
        return "close" if owner is self.owner else "detached"


_process = 0
"""Which process this is: counted up in each forked child. A transaction
another thread had open at the fork is copied into the child, which never
has it (it is the parent's to settle): the child reports none of its
copies discarded."""


def _forked() -> None:
    global _process
    _process += 1


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forked)


@atexit.register
def _discard_open_at_exit() -> None:
    """Discard the events of transactions still open as the process exits.

    No COMMIT will come for them, and the interpreter does not collect what
    a module or a thread-local registry still holds (a script that forgot to
    commit, a scoped session never removed), so :meth:`UnsettledLifecycle.__del__`
    would never report them. They are discarded with reason ``"close"``, and
    a warning. A transaction in the middle of its commit (a daemon thread's)
    is left to it.

    The lifecycles are found among the collector's objects, once, here:
    a registry of them would cost every audited transaction its upkeep.
    """
    count = 0
    for lifecycle in gc.get_objects():
        if type(lifecycle) is not UnsettledLifecycle or lifecycle.process != _process:
            continue
        root = lifecycle.root
        if (
            preparing(root) or past_staging(root)
        ) and root.session.get_transaction() is root:
            continue  # its commit is under way (in a daemon thread)
        # Out of its session: a later close() or commit() (another exit
        # handler's) finds nothing to discard again or to deliver.
        count += lifecycle.abandon(root.session.info, lifecycle.unheard_reason())
    if count:
        logger.warning(
            "%d staged event%s discarded at exit: the process ended before "
            "%s session transaction's end was seen (never committed, or "
            "ended after its emitter was detached)",
            count,
            "" if count == 1 else "s",
            "its" if count == 1 else "their",
        )


def hand_over(owner: Owner, info: dict[Any, Any], outcome: Outcome) -> None:
    """Give *owner* (the emitter) what a transaction's end decided: deliver
    a committed batch (staging on the session, *info*, is refused while it
    dispatches), hold it for an outer transaction, or discard."""
    if type(outcome) is tuple:  # Deliver, the common outcome
        envelopes, outbox_bind = outcome
        info[DISPATCHING_KEY] = True
        try:
            owner._committed(envelopes, outbox_bind)
        finally:
            del info[DISPATCHING_KEY]
    elif isinstance(outcome, WaitForOuter):
        _wait_for_outer(owner, outcome)
    elif isinstance(outcome, Discard):
        owner._discarded(outcome.events, outcome.reason)


def _wait_for_outer(owner: Owner, outcome: WaitForOuter) -> None:
    """Hold a joined session's committed batch until its outer transaction ends."""
    envelopes = outcome.envelopes
    staged = outcome.staged
    outbox_bind = outcome.outbox_bind
    if outbox_bind is not None:
        # Record deliveries through a connection of its own: the joined one
        # is the caller's, and may be in its next transaction by then.
        outbox_bind = outbox_bind.engine

    def settle(committed: bool) -> None:
        # Runs inside the connection's own begin or pool checkin.
        if not committed:
            owner._discarded(staged, "rollback")
        elif envelopes:
            owner._committed(envelopes, outbox_bind, record_apart=True)

    then_all(outcome.watches, settle)


def _recording_bind(bind: Engine | Connection) -> Engine | Connection:
    """Where to record the dispatch of a commit whose outbox rows went to
    *bind*. A connection that the session's commit ended (a session that
    controls its connection) is its caller's again, to use as it likes: the
    record goes through its engine, as any commit's. One still in a
    transaction (the caller's, under ``joined_transactions="session"``)
    holds the rows, uncommitted: the record goes there."""
    if isinstance(bind, Connection) and not bind.in_transaction():
        return bind.engine
    return bind


def committing_root(session: Session) -> SessionTransaction | None:
    """The outermost transaction while it is inside ``commit()`` before COMMIT.

    ``tests/test_semantics.py`` pins, on every database, that this tells the
    outermost commit from a RELEASE SAVEPOINT.
    """
    root = session.get_transaction()
    return root if root is not None and preparing(root) else None


def stage_on(session: Session, owner: Owner, staged: StagedEvent) -> None:
    """Park a checked event on the session's innermost boundary.

    :raises RuntimeError: the session is dispatching its own commit, or its
        transaction has committed already and is only closing.
    :raises AuditConfigurationError: the transaction's ending cannot be
        trusted (see :func:`_refuse`).
    """
    info = session.info
    if DISPATCHING_KEY in info:
        raise RuntimeError(
            "stage_event() was called on a session while it dispatches its own "
            "commit; stage on another session (its events are emitted when it "
            "commits), or stage before committing"
        )
    boundary = root = current_transaction(session)
    if root is not None and parent_of(root) is not None:
        # Inside a SAVEPOINT or a flush: the innermost SAVEPOINT, else the root.
        root = session.get_transaction()
        boundary = session.get_nested_transaction() or root
    if boundary is None:
        root = boundary = autobegin(session)
    elif past_staging(boundary):
        if has_committed(boundary):
            raise RuntimeError(
                "stage_event() was called after this transaction was "
                "committed (from an after_commit hook?); its events are being "
                "sent already. Stage before the commit, or in the next "
                "transaction"
            )
        raise RuntimeError(
            "stage_event() was called on a transaction whose commit began: "
            "its COMMIT, or a SAVEPOINT's RELEASE, failed (call "
            "session.rollback() first; its events are discarded then), or "
            "session.prepare() ran (only commit or rollback may follow)"
        )
    assert root is not None  # begun above, if it was not
    lifecycle: Lifecycle | None = info.get(PENDING_KEY)
    if lifecycle is not None and lifecycle.root is not root:
        # Its transaction ended while no listener of ours heard its end.
        lifecycle.settle_unheard(info)
        lifecycle = None
    if lifecycle is None:
        # The first event of this transaction: check where it will commit.
        bind = session.bind
        if (
            type(bind) is Engine
            and not has_connections(root)
            and not mapper_binds(session)
            and type(session).get_bind is DEFAULT_GET_BIND
            and not sets_connection_options(bind)
        ):
            # The common case, kept to a few lookups: an unconnected session
            # that will take its one connection from its engine.
            options = checked_engine_options(bind)
            if options is None:
                refuse(session, bind, None, True, owner)
            lifecycle = info[PENDING_KEY] = UnsettledLifecycle(
                owner, root, boundary, staged
            )
            lifecycle.checked_engine = bind
            lifecycle.checked = options
            lifecycle.may_abort = bind.dialect.name == "postgresql"
            watch_server_rollbacks(bind, lifecycle)
        else:
            outer, watch = check_binds(session, root, owner)
            lifecycle = info[PENDING_KEY] = UnsettledLifecycle(
                owner, root, boundary, staged
            )
            if outer:
                lifecycle.outer = [
                    (connection, watch_outer(connection)) for connection in outer
                ]
            for bind in session_binds(session, root):
                watch_server_rollbacks(bind, lifecycle)
            if watch:
                owner._watch_connections(session)
    else:
        if lifecycle.refusal is not None:
            raise AuditConfigurationError(lifecycle.refusal)
        if lifecycle.owner is not owner:
            lifecycle.change_owner(session, owner)
        lifecycle.check_savepoints(session)
        lifecycle.stage(boundary, staged)
    if lifecycle.work_before_commit() and not is_flushing(session) and preparing(root):
        # Staged by a before_commit hook (or a SAVEPOINT released by this
        # commit) after our own preparation ran: prepare it now, keys first.
        session.flush()
        lifecycle.prepare(session)
