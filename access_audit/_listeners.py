"""Session events -> the transaction lifecycle -> the owning emitter.

Each listener tells the session's :class:`~access_audit._lifecycle.Lifecycle`
what happened to a transaction boundary and hands the outcome it returns to
the emitter. Only ``after_transaction_end`` fires on every ending (commit,
rollback, ``close()``, ``reset()``, ``invalidate()``, a SAVEPOINT closed by a
flush error), so the decision is made there; ``after_commit`` only marks a
boundary as committed (it also fires for RELEASE SAVEPOINT).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, SessionTransaction

from ._lifecycle import PENDING_KEY, Lifecycle, committing_root, hand_over
from ._sqla import current_transaction, inherits_options, parent_of
from ._written import note_flush, note_statement

if TYPE_CHECKING:
    from ._owner import Owner
    from ._registry import ListenTarget

__all__ = ["SessionListeners"]


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

    ENDINGS = frozenset(("after_commit", "after_rollback", "after_transaction_end"))
    """Listened to ahead of the application's own listeners (``before_commit``
    and the flush events after them: they see what those listeners did)."""

    WRITE_EVENTS = ("after_flush", "do_orm_execute")
    """Also listened to with an outbox, where sessions may work in several
    databases: which databases a transaction wrote to, where its rows go
    (:mod:`~access_audit._written`). A session of one database never asks,
    and pays nothing: SQLAlchemy prepares every ORM statement for a
    ``do_orm_execute`` listener (5 µs a SELECT), and a flush's costs 1-2 µs."""

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        events: tuple[str, ...] = self.EVENTS
        if owner.outbox is not None:
            events += self.WRITE_EVENTS
        self._hooks: dict[str, Callable[..., Any]] = {
            name: getattr(self, "_" + name) for name in events
        }
        self._weak_targets: weakref.WeakSet[ListenTarget] = weakref.WeakSet()
        """Targets listened to through :func:`_weak_hook`: the listeners
        there do not keep this emitter alive."""
        # What listen() really installed. SQLAlchemy's own registry
        # (event.contains) is keyed by id(target) and keeps the keys of
        # collected classes, so a new sessionmaker's Session subclass that
        # lands at a collected one's address would look attached already.
        self._installed: weakref.WeakKeyDictionary[ListenTarget, list[str]] = (
            weakref.WeakKeyDictionary()
        )
        """Per target, the events installed there."""
        self._watching: weakref.WeakSet[ListenTarget] = weakref.WeakSet()
        """Where ``after_begin`` is installed (see :meth:`watch_connections`)."""
        self._endings: weakref.WeakKeyDictionary[ListenTarget, _Ending] = (
            weakref.WeakKeyDictionary()
        )
        """Per target, its ``after_transaction_end`` listener."""
        self._retired: weakref.WeakKeyDictionary[ListenTarget, _Ending] = (
            weakref.WeakKeyDictionary()
        )
        """Targets removed while a delivery ran (see :meth:`remove`): their
        ``after_transaction_end`` listener is still installed."""
        self._some_retired = False
        """Whether :attr:`_retired` holds any (read on every commit)."""

    def listen(
        self, target: ListenTarget, *, weakly: bool = False, several: bool = True
    ) -> None:
        """Install the listeners on *target*; a second call is a no-op.

        *weakly*: through hooks that hold this emitter weakly, for a class
        that many emitters share, each for a while (Flask-SQLAlchemy's
        session class, with an app per test): an emitter no longer used
        anywhere else is collected, and its hooks are removed the next time
        one is installed there (until then each returns at once).
        *several*: its sessions may work in several databases (then an
        outbox notes what they write, see :data:`WRITE_EVENTS`).
        """
        if target in self._installed:
            return
        # Removed while a delivery ran: its after_transaction_end listener
        # is there, and serves again if it is of the kind asked.
        retired = self._retired.pop(target, None)
        self._some_retired = bool(self._retired)
        kept = retired is not None and retired.weak == weakly
        if retired is not None:
            if kept:
                self._endings[target] = retired
            else:
                retired.remove_from(target, self._kept_for("after_transaction_end"))
        if weakly:
            _remove_hooks(target, lambda listeners: listeners is None)
            self._weak_targets.add(target)
        names = [
            name for name in self._hooks if several or name not in self.WRITE_EVENTS
        ]
        for name in names:
            if kept and name == "after_transaction_end":
                continue
            # The endings first: an application's listener that raises
            # stops the listeners after it, and an ending they miss goes
            # unheard (a COMMIT done, a SAVEPOINT released, a rollback).
            event.listen(
                target,
                name,
                self._hook(target, name),
                insert=name in self.ENDINGS,
            )
        self._installed[target] = names

    def listens_to(self, target: ListenTarget) -> bool:
        """Whether the listeners are installed on *target* (not removed), or,
        for a class, on a class it derives from (SQLAlchemy's class
        listeners reach subclasses: a sessionmaker's ``class_`` makes one)."""
        if isinstance(target, type):
            return any(base in self._installed for base in target.__mro__)
        return target in self._installed

    def _hook(self, target: ListenTarget, name: str) -> Callable[..., Any]:
        """The function to install on *target* for event *name*."""
        weak = target in self._weak_targets
        if weak:
            reference = weakref.ref(self)
            hook = _weak_hook(reference, "_" + name)
        else:
            hook = getattr(self, "_" + name)
        if name == "after_transaction_end":
            self._endings[target] = _Ending(hook, weak)
        if weak:
            _weak_hooks.setdefault(target, []).append((hook, name, reference))
        return hook

    def remove(self, target: ListenTarget) -> None:
        """Remove the listeners from *target*, if installed.

        While a delivery runs (in any thread: a plugin that detaches, a
        shutdown beside a commit), SQLAlchemy is going through the
        ``after_transaction_end`` listeners that deliver, and removing one
        would make that ``commit()`` raise: that one is left, ignoring the
        sessions no other target of these listeners covers, until the next
        :meth:`listen` or :meth:`remove` of *target* (then reused, or
        removed if no delivery runs; a target collected takes its listeners
        along). Not at another target's: this one's commit may still be
        going through the listeners after it.
        """
        retired = self._retired.pop(target, None)  # removed again
        if retired is not None:
            if _delivering:
                self._retired[target] = retired
            else:
                retired.remove_from(target, self._kept_for("after_transaction_end"))
                self._some_retired = bool(self._retired)
        ending = self._endings.pop(target, None)
        left = None
        if ending is not None and _delivering:
            left = self._retired[target] = ending
            self._some_retired = True
        if target in self._weak_targets:
            self._weak_targets.discard(target)
            _remove_hooks(
                target,
                lambda listeners: listeners is self,
                keep=None if left is None else left.hook,
            )
            self._watching.discard(target)
            self._installed.pop(target, None)
        else:
            if target in self._watching:
                self._watching.discard(target)
                _remove(
                    target, "after_begin", self._after_begin,
                    self._kept_for("after_begin"),
                )  # fmt: skip
            for name in self._installed.pop(target, None) or ():
                if name != "after_transaction_end":
                    _remove(target, name, self._hooks[name], self._kept_for(name))
                elif left is None and ending is not None:
                    _remove(target, name, ending.hook, self._kept_for(name))

    def _kept_for(self, name: str) -> Callable[[type], int]:
        """How many copies of this emitter's own (strong) *name* listener a
        class's listeners keep: one per class it is or derives from that is
        still listened to (SQLAlchemy copies a class's listeners into its
        subclasses', and they are the same bound method)."""
        if name == "after_begin":
            targets = list(self._watching)
        else:
            targets = [t for t, names in self._installed.items() if name in names]
            if name == "after_transaction_end":
                targets += [t for t, ending in self._retired.items() if not ending.weak]
        classes = [
            t for t in targets if isinstance(t, type) and t not in self._weak_targets
        ]
        return lambda cls: sum(1 for each in classes if issubclass(cls, each))

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
            event.listen(target, "after_begin", self._hook(target, "after_begin"))
            self._watching.add(target)

    # The hooks below run on every commit of every attached session, with or
    # without events, so each reads the session's lifecycle inline. One that
    # another emitter owns (one attached to a more specific target) is that
    # emitter's to handle.

    def _after_begin(
        self, session: Session, transaction: SessionTransaction, connection: Connection
    ) -> None:
        """Check a connection the session acquires after staging began."""
        if parent_of(transaction) is not None:
            return  # a SAVEPOINT: on a connection the outermost checked
        lifecycle: Lifecycle | None = session.info.get(PENDING_KEY)
        if (
            lifecycle is not None
            and lifecycle.owner is self._owner
            and (
                lifecycle.checked_engine is None
                or not inherits_options(
                    connection, lifecycle.checked_engine, lifecycle.checked
                )
            )
        ):
            lifecycle.connected(session, transaction, connection)

    _after_flush = staticmethod(note_flush)
    _do_orm_execute = staticmethod(note_statement)

    def _before_commit(self, session: Session) -> None:
        lifecycle: Lifecycle | None = session.info.get(PENDING_KEY)
        if lifecycle is None or lifecycle.owner is not self._owner:
            return
        if lifecycle.root is not session.get_transaction():
            # An earlier transaction's, whose end went unheard; this one
            # staged nothing (staging would have settled it).
            lifecycle.settle_unheard(session.info)
            return
        if lifecycle.may_abort and lifecycle.aborted(session):
            return
        if _due_before_commit(session, lifecycle):
            # Flush now (the commit would next) so database-generated keys
            # exist, then resolve and write the outbox. Events that ORM hooks
            # of a later flush in this commit stage are handled in
            # after_flush_postexec.
            session.flush()
            lifecycle.prepare(session)

    def _after_flush_postexec(self, session: Session, flush_context: Any) -> None:
        lifecycle: Lifecycle | None = session.info.get(PENDING_KEY)
        if lifecycle is None or lifecycle.owner is not self._owner:
            return
        lifecycle.check_savepoints(session)
        if (
            lifecycle.may_abort
            and committing_root(session) is not None
            and lifecycle.aborted(session)
        ):
            # A statement of the commit's own flush failed and was caught
            # (a mapper or flush hook's "best effort"): asked again here, as
            # before_commit asked before the flush.
            return
        if _due_before_commit(session, lifecycle):
            lifecycle.prepare(session)

    def _after_commit(self, session: Session) -> None:
        lifecycle: Lifecycle | None = session.info.get(PENDING_KEY)
        if lifecycle is None or lifecycle.owner is not self._owner:
            return
        # The committing transaction is still the session's current one: it
        # closes (handing over to its parent) only after this event.
        boundary = current_transaction(session)
        if boundary is not None:
            failed = lifecycle.committed(boundary)
            if failed is not None:
                hand_over(self._owner, session.info, failed)

    def _after_rollback(self, session: Session) -> None:
        lifecycle: Lifecycle | None = session.info.get(PENDING_KEY)
        if lifecycle is not None and lifecycle.owner is self._owner:
            boundary = session.get_nested_transaction() or session.get_transaction()
            if boundary is not None:
                lifecycle.rolled_back(boundary)

    def _after_transaction_end(
        self, session: Session, transaction: SessionTransaction
    ) -> None:
        parent = parent_of(transaction)
        if parent is not None and not transaction.nested:
            return  # a flush's subtransaction: never a boundary
        info = session.info
        lifecycle: Lifecycle | None = info.get(PENDING_KEY)
        if lifecycle is None or lifecycle.owner is not self._owner:
            return
        if self._some_retired and not (
            session in self._installed or self.listens_to(type(session))
        ):
            return  # heard through a listener left by remove() only
        outcome = lifecycle.ended(info, transaction, parent)
        if outcome is not None:
            # One item per delivery running: appended and popped (each
            # atomic), as deliveries of one thread interleave under asyncio.
            _delivering.append(None)
            try:
                hand_over(self._owner, info, outcome)
            finally:
                if _delivering:  # else cleared by a fork in the delivery
                    _delivering.pop()


_delivering: list[None] = []
"""An item per delivery (of any emitter, in any thread) running: while
there are any, no ``after_transaction_end`` listener is removed."""

if hasattr(os, "register_at_fork"):  # a child has none of its parent's threads
    os.register_at_fork(after_in_child=_delivering.clear)


class _Ending:
    """The ``after_transaction_end`` listener installed on one target.

    SQLAlchemy cannot remove a listener while it runs: one that must go
    then is left, and removed later (see :meth:`SessionListeners.remove`).
    """

    __slots__ = ("hook", "weak")

    def __init__(self, hook: Callable[..., Any], weak: bool) -> None:
        self.hook = hook
        self.weak = weak
        """Whether it holds its listeners weakly (see :func:`_weak_hook`)."""

    def remove_from(
        self, target: ListenTarget, kept: Callable[[type], int] = lambda cls: 0
    ) -> None:
        """Take the listener out of *target* (*kept*: as :func:`_remove`)."""
        _remove(target, "after_transaction_end", self.hook, kept)
        hooks = _weak_hooks.get(target)
        if hooks:
            hooks[:] = [entry for entry in hooks if entry[0] is not self.hook]


_weak_hooks: weakref.WeakKeyDictionary[
    ListenTarget,
    list[tuple[Callable[..., Any], str, weakref.ref[SessionListeners]]],
] = weakref.WeakKeyDictionary()
"""Per target, the weak hooks installed there, each with its event name and
the listeners it calls."""


def _weak_hook(
    listeners: weakref.ref[SessionListeners], method: str
) -> Callable[..., Any]:
    """A listener that calls *method* of *listeners* while they live, and
    returns what it returns (``do_orm_execute``'s result)."""

    def hook(*args: Any) -> Any:
        alive = listeners()
        return None if alive is None else getattr(alive, method)(*args)

    return hook


def _remove_hooks(
    target: ListenTarget,
    which: Callable[[SessionListeners | None], bool],
    keep: Callable[..., Any] | None = None,
) -> None:
    """Remove from *target* the weak hooks whose listeners *which* picks
    (None: collected), but *keep*."""
    hooks = _weak_hooks.get(target)
    if hooks:
        for entry in [entry for entry in hooks if which(entry[2]())]:
            if entry[0] is not keep:
                _remove(target, entry[1], entry[0])
                hooks.remove(entry)


def _remove(
    target: ListenTarget,
    name: str,
    hook: Callable[..., Any],
    kept: Callable[[type], int] = lambda cls: 0,
) -> None:
    """``event.remove``, then take *hook* out of *target*'s listeners if it
    is still there.

    SQLAlchemy's registry is keyed by ids and can keep the entry of a
    collected class whose listener had the same ids (a sessionmaker per
    test, an emitter per test): ``listen`` then installs ours but leaves
    that entry, and ``remove`` takes its dead function instead of ours.
    *kept*: for a class, how many copies of *hook* its listeners keep (of
    classes it derives from, still listened to).
    """
    event.remove(target, name, hook)
    listeners = getattr(target.dispatch, name)
    if isinstance(target, type):  # its own listeners and its subclasses'
        by_class = listeners._clslevel
        for cls, each in list(by_class.items()):
            if issubclass(cls, target):
                # Other classes' copies of the same bound method stay.
                while each.count(hook) > kept(cls):
                    each.remove(hook)
    else:  # a session instance: its own listeners, apart from its class's
        each = getattr(listeners, "listeners", ())
        while hook in each:
            each.remove(hook)


def _due_before_commit(session: Session, lifecycle: Lifecycle) -> bool:
    """Whether the outermost commit is under way with work due before COMMIT."""
    return (
        lifecycle.work_before_commit()
        and committing_root(session) is not None  # else a RELEASE SAVEPOINT
    )
