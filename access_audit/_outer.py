"""Commits of sessions joined to an outer transaction wait for that transaction.

A session bound to a connection that was in a transaction already joins it
(``Session(bind=connection)``, two sessions sharing a connection): its own
``commit()`` only releases a SAVEPOINT or does nothing, and whoever began the
connection's transaction still decides whether anything commits. The session
watches that outer transaction from the moment it joins
(:func:`watch_outer`), so an outer transaction that ends before the session
commits is seen too; its committed events then wait here, keyed to the DBAPI
connection, until the outer transaction's fate is known.

SQLAlchemy's connection ``commit`` event fires *before* COMMIT, so a commit
counts only once it is known to have gone through: at the connection's next
``begin``, when it goes back to the pool (or, never given back, an async
pool drops it as garbage), or at interpreter exit. A COMMIT
that fails instead (``handle_error`` during the commit), a rollback, or the
connection returned or invalidated without a COMMIT ends the watch as rolled
back. Two-phase commits count the same way.

A session still in its transaction when the outer one commits and the
connection begins the next goes on in that next one (its ``commit()`` does
not end it): its watch moves on to the new transaction instead of settling.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, event

from ._aborted import rolls_back_at_commit
from ._logging import logger

__all__ = ["OuterWatch", "then_all", "waiting_for_outer", "watch_outer"]

Settle = Callable[[bool], None]
"""Called once: True when the outer transaction committed, else False."""

_KEY = "access_audit.outer"
"""Key of the watches in the DBAPI connection's pool ``info``."""


class OuterWatch:
    """One session transaction's view of a connection's outer transaction."""

    __slots__ = ("going", "moved", "settle", "state")

    def __init__(self) -> None:
        self.state: bool | None = None
        """None while the outer transaction is open; then whether it committed."""
        self.settle: Settle | None = None
        self.going = True
        """Whether the session transaction that watches is still going. If
        so when the outer transaction commits and the connection begins
        another, the session may work on in that one (nobody commits it for
        the session), so the watch moves on to it."""
        self.moved = False
        """Whether the watch moved on already (warned about once)."""

    def then(self, settle: Settle) -> None:
        """Call *settle* with the outcome: now if it is known, else when it is."""
        self.going = False
        if self.state is None:
            self.settle = settle
        else:
            settle(self.state)

    def stop(self) -> None:
        """The session transaction ended without waiting for the outcome."""
        self.going = False


class _Watches:
    """The watches on one DBAPI connection's outer transaction."""

    __slots__ = ("__weakref__", "committing", "watches")

    def __init__(self) -> None:
        self.watches: list[OuterWatch] = []
        self.committing = False
        """Set by the ``commit`` event: COMMIT is under way."""


_live: weakref.WeakSet[_Watches] = weakref.WeakSet()
"""Every connection's open watches, for interpreter exit."""


def watch_outer(connection: Connection) -> OuterWatch:
    """Start watching *connection*'s current outer transaction."""
    _listen(connection.engine)
    info: dict[Any, Any] = connection.info
    watches = info.get(_KEY)
    if watches is None:
        watches = info[_KEY] = _Watches()
        _live.add(watches)
    watch = OuterWatch()
    watches.watches.append(watch)
    return watch


def waiting_for_outer() -> int:
    """How many committed session transactions wait for their outer one now."""
    return sum(
        1
        for watches in list(_live)
        for watch in list(watches.watches)
        if watch.settle is not None and watch.state is None
    )


def then_all(watches: list[OuterWatch], settle: Settle) -> None:
    """Call *settle* once: True when every watch's transaction committed,
    False as soon as one did not."""
    remaining = [len(watches)]

    def one(committed: bool) -> None:
        if remaining[0] <= 0:
            return
        if not committed:
            remaining[0] = 0
            settle(False)
            return
        remaining[0] -= 1
        if remaining[0] == 0:
            settle(True)

    for watch in watches:
        watch.then(one)


def _end(watches: _Watches | None, committed: bool) -> None:
    """The outer transaction ended: settle every watch, each on its own.

    Runs inside SQLAlchemy's connection and pool events, which must not be
    left by an exception (the pool would never get the connection back):
    an error from one settle is logged, and the others still run. A task
    cancelled while a settle awaits its ``async def`` plugins leaves them
    running (their failures reported as they end) and is not cancelled by
    it: the connection's ``close()`` or ``begin()`` that runs the settle
    cannot stop halfway, and a cancellation raised later would reach the
    task outside the timeout that sent it.
    """
    if watches is None:
        return
    interrupt: BaseException | None = None
    for watch in watches.watches:
        watch.state = committed
        settle = watch.settle
        if settle is None:
            continue
        watch.settle = None
        try:
            settle(committed)
        except (KeyboardInterrupt, SystemExit) as error:
            interrupt = error
        except asyncio.CancelledError:
            logger.debug(
                "a task was cancelled while a joined session's async plugins "
                "ran; they go on"
            )
        except BaseException:
            logger.exception("delivering the events of a joined session failed")
    watches.watches.clear()
    _live.discard(watches)
    if interrupt is not None:
        raise interrupt


def _info(connection: Connection) -> dict[Any, Any] | None:
    try:
        info: dict[Any, Any] = connection.info
    except Exception:  # invalidated: the pool's checkin has settled it
        return None
    return info


def _watches(connection: Connection) -> _Watches | None:
    info = _info(connection)
    return None if info is None else info.get(_KEY)


def _pop(connection: Connection) -> _Watches | None:
    info = _info(connection)
    return None if info is None else info.pop(_KEY, None)


def _on_commit(connection: Connection, *args: Any) -> None:
    watches = _watches(connection)
    if watches is not None:
        if rolls_back_at_commit(connection):
            _end(_pop(connection), False)  # PostgreSQL rolls it back instead
        else:
            watches.committing = True


def _on_begin(connection: Connection) -> None:
    # A new transaction: the previous one's COMMIT went through.
    watches = _watches(connection)
    if watches is not None and watches.committing:
        ended = _pop(connection)
        assert ended is not None
        going = [watch for watch in ended.watches if watch.going]
        if going:
            _move_on(connection, ended, going)
        _end(ended, True)


def _move_on(connection: Connection, ended: _Watches, going: list[OuterWatch]) -> None:
    """Have *going* watch the transaction *connection* begins now.

    Their sessions are still in the transactions that joined the one that
    just committed: what they do from now on goes into this one, which no
    session commits for them. Their events wait for it too, all of them
    (which change went into which transaction cannot be told apart).
    """
    ended.watches = [watch for watch in ended.watches if not watch.going]
    moved = connection.info[_KEY] = _Watches()
    moved.watches = going
    _live.add(moved)
    if all(watch.moved for watch in going):
        return
    for watch in going:
        watch.moved = True
    logger.warning(
        "a session joined to a connection's transaction is still open after "
        "that transaction committed, and the connection began another: "
        "whatever the session does now goes into that one, which its own "
        "commit() does not commit, so its events wait for that one too. End "
        "joined sessions before the transaction they joined"
    )


def _on_rollback(connection: Connection, *args: Any) -> None:
    _end(_pop(connection), False)


def _on_error(context: Any) -> None:
    connection = context.connection
    if connection is not None:
        watches = _watches(connection)
        if watches is not None and watches.committing:
            _end(_pop(connection), False)  # the COMMIT itself failed


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        _end_with_record(record)


def _on_reset(dbapi_connection: Any, record: Any, state: Any) -> None:
    # An async pool's garbage collection of a connection never checked in
    # (no I/O is possible there: it is dropped or terminated, without a
    # checkin); SQLAlchemy says so with asyncio_safe=False.
    if record is not None and not getattr(state, "asyncio_safe", True):
        _end_with_record(record)


def _end_with_record(record: Any) -> None:
    """The pool is done with *record*'s connection: a COMMIT that was issued
    counts, an open transaction is the server's to roll back."""
    watches: _Watches | None = record.info.pop(_KEY, None)
    if watches is not None:
        _end(watches, watches.committing)


@atexit.register
def _at_exit() -> None:
    # Connections never closed: a COMMIT that was issued counts, an open
    # transaction is the server's to roll back.
    for watches in list(_live):
        _end(watches, watches.committing)


_listening: weakref.WeakSet[Engine] = weakref.WeakSet()
_listening_lock = threading.Lock()

_LISTENERS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("begin", _on_begin),
    ("commit", _on_commit),
    ("commit_twophase", _on_commit),
    ("rollback", _on_rollback),
    ("rollback_twophase", _on_rollback),
    ("handle_error", _on_error),
    ("checkin", _on_checkin),
    ("reset", _on_reset),
)


def _listen(engine: Engine) -> None:
    """Install the listeners on *engine* (and its pool) the first time."""
    with _listening_lock:
        if engine in _listening:
            return
        for name, function in _LISTENERS:
            event.listen(engine, name, function)
        _listening.add(engine)
