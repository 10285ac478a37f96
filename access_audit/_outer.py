"""Commits of sessions joined to an outer transaction wait for that transaction.

A session bound to a connection that was in a transaction already joins it
(``Session(bind=connection)``, two sessions sharing a connection): its own
``commit()`` only releases a SAVEPOINT or does nothing, and whoever began the
connection's transaction still decides whether anything commits. Its events
wait here, keyed to the DBAPI connection, until that transaction ends.

SQLAlchemy's connection ``commit`` event fires *before* COMMIT, so a commit
counts only once it is known to have gone through: at the connection's next
``begin``, or when it goes back to the pool. A COMMIT that fails instead
(``handle_error`` during the commit), a rollback, or the connection returned
or invalidated without a COMMIT ends the wait as rolled back.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, event

__all__ = ["wait_for_outer"]

Settle = Callable[[bool], None]
"""Called once: True when the outer transaction committed, else False."""

_KEY = "access_audit.outer"
"""Key of the waiting commits in the DBAPI connection's pool ``info``."""


class _Waiting:
    """The commits waiting on one DBAPI connection's outer transaction."""

    __slots__ = ("committing", "settles")

    def __init__(self) -> None:
        self.settles: list[Settle] = []
        self.committing = False
        """Set by the ``commit`` event: COMMIT is under way."""


def wait_for_outer(connections: list[Connection], settle: Settle) -> None:
    """Call *settle* once every connection's outer transaction has ended.

    ``settle(True)`` once all of them committed; ``settle(False)`` as soon
    as one of them did not. Called in the thread that ends the transaction.
    """
    if len(connections) > 1:
        settle = _all_of(len(connections), settle)
    for connection in connections:
        _listen(connection.engine)
        info: dict[Any, Any] = connection.info
        waiting = info.get(_KEY)
        if waiting is None:
            waiting = info[_KEY] = _Waiting()
        waiting.settles.append(settle)


def _all_of(count: int, settle: Settle) -> Settle:
    """A settle that waits for *count* commits, or one rollback."""
    remaining = [count]

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

    return one


def _end(info: dict[Any, Any] | None, committed: bool) -> None:
    waiting: _Waiting | None = None if info is None else info.pop(_KEY, None)
    if waiting is not None:
        for settle in waiting.settles:
            settle(committed)


def _info(connection: Connection) -> dict[Any, Any] | None:
    try:
        info: dict[Any, Any] = connection.info
    except Exception:  # invalidated: the pool's checkin has settled it
        return None
    return info


def _waiting(connection: Connection) -> _Waiting | None:
    info = _info(connection)
    return None if info is None else info.get(_KEY)


def _on_commit(connection: Connection) -> None:
    waiting = _waiting(connection)
    if waiting is not None:
        waiting.committing = True


def _on_begin(connection: Connection) -> None:
    # A new transaction: the previous one's COMMIT went through.
    waiting = _waiting(connection)
    if waiting is not None and waiting.committing:
        _end(_info(connection), True)


def _on_rollback(connection: Connection) -> None:
    _end(_info(connection), False)


def _on_error(context: Any) -> None:
    connection = context.connection
    if connection is not None:
        waiting = _waiting(connection)
        if waiting is not None and waiting.committing:
            _end(_info(connection), False)  # the COMMIT itself failed


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        info = record.info
        waiting: _Waiting | None = info.get(_KEY)
        if waiting is not None:
            _end(info, waiting.committing)


_listening: weakref.WeakSet[Engine] = weakref.WeakSet()
_listening_lock = threading.Lock()

_LISTENERS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("begin", _on_begin),
    ("commit", _on_commit),
    ("rollback", _on_rollback),
    ("handle_error", _on_error),
    ("checkin", _on_checkin),
)


def _listen(engine: Engine) -> None:
    """Install the listeners on *engine* (and its pool) the first time."""
    with _listening_lock:
        if engine in _listening:
            return
        for name, function in _LISTENERS:
            event.listen(engine, name, function)
        _listening.add(engine)
