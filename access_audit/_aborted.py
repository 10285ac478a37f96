"""Transactions the database rolls back on its own, while the session goes on.

SQLAlchemy's session insists on a rollback only after a failed flush, so an
application that catches an error from ``session.execute()`` and goes on may
be working in a transaction the database has already given up:

- PostgreSQL aborts a transaction at its first failed statement: every later
  one fails until a ROLLBACK (or a ROLLBACK TO SAVEPOINT opened before the
  failure), and a COMMIT ends it with a ROLLBACK that the driver reports as
  success (:func:`rolls_back_at_commit`, asked before the commit's flushes,
  after each, and by :func:`watch_server_rollbacks` as the connection
  commits, after every ``before_commit`` listener);
- MariaDB and MySQL roll the whole transaction back when it is chosen as a
  deadlock's victim (error 1213), SAVEPOINTs and all, and the statements
  that follow (an application retrying the one that failed) run in a new
  transaction (:func:`watch_server_rollbacks`, told as the error is raised).

The events staged before then describe changes that were rolled back.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, event


class Victim(Protocol):
    """What :func:`watch_server_rollbacks` tells (a session's transaction
    lifecycle)."""

    def rolled_back_by_server(self, connection: Connection, why: str) -> None:
        """The database rolled back the transaction on *connection*, if it
        is this one's; *why* says how, for a warning."""


__all__ = [
    "AT_COMMIT",
    "DEADLOCK_VICTIM",
    "rolls_back_at_commit",
    "watch_server_rollbacks",
]

DEADLOCK_VICTIM = (
    "the database rolled this transaction back (a deadlock's victim): events "
    "%s are discarded. What the session does next goes into a new "
    "transaction; retry the whole transaction after session.rollback() instead"
)
AT_COMMIT = (
    "a statement of this transaction failed and it was not rolled back: "
    "PostgreSQL rolls it back at COMMIT, so events %s are discarded. Roll "
    "back after an error (or run a statement that may fail in a SAVEPOINT: "
    "session.begin_nested())"
)
"""The warnings of :meth:`Victim.rolled_back_by_server` (``%s``: the ids)."""

_INERROR = 3
"""libpq's ``PQTRANS_INERROR``: the transaction status psycopg and psycopg2
report for an aborted transaction."""


def rolls_back_at_commit(connection: Connection) -> bool:
    """Whether COMMIT on *connection* will roll its transaction back.

    Known for PostgreSQL through psycopg and psycopg2 (libpq's transaction
    status); asyncpg does not tell, and other databases go on after a
    failed statement.
    """
    if connection.dialect.name != "postgresql" or connection.invalidated:
        return False
    dbapi = connection.connection.dbapi_connection
    # psycopg's pgconn and psycopg2's method read libpq's status directly
    # (its connection.info builds an object per call, on every commit).
    pgconn = getattr(dbapi, "pgconn", None)
    if pgconn is not None:
        return bool(pgconn.transaction_status == _INERROR)
    status = getattr(dbapi, "get_transaction_status", None)
    if status is not None:
        return bool(status() == _INERROR)
    # SQLAlchemy's adapter of psycopg's async connection passes info on.
    info = getattr(dbapi, "info", None)
    return bool(getattr(info, "transaction_status", None) == _INERROR)


_DEADLOCK = 1213
"""``ER_LOCK_DEADLOCK``: InnoDB rolled the victim's whole transaction back.
(A lock wait timeout, 1205, does so only with ``innodb_rollback_on_timeout``,
off by default; otherwise it undoes the statement alone.)"""

_watched: weakref.WeakKeyDictionary[Engine, weakref.WeakSet[Victim]] = (
    weakref.WeakKeyDictionary()
)
"""PostgreSQL, MariaDB and MySQL engines, each with the lifecycles staging on it."""
_watched_lock = threading.Lock()


def watch_server_rollbacks(bind: Engine | Connection, lifecycle: Victim) -> None:
    """Have *lifecycle* told when the database rolls back its transaction on
    *bind*'s engine while SQLAlchemy goes on (:meth:`Victim.rolled_back_by_server`):

    - PostgreSQL: at the connection's COMMIT, after every ``before_commit``
      listener and the last flush, when a failed statement was caught (one
      an application's own listener ran after access_audit's included);
    - MariaDB and MySQL: as a deadlock's victim.

    The engine's listener is installed the first time; other databases
    have none.
    """
    engine = bind.engine
    listener = _LISTENERS.get(engine.dialect.name)
    if listener is None:
        return
    with _watched_lock:
        lifecycles = _watched.get(engine)
        if lifecycles is None:
            lifecycles = _watched[engine] = weakref.WeakSet()
            event.listen(engine, *listener)
        lifecycles.add(lifecycle)


def _tell(connection: Connection, why: str) -> None:
    with _watched_lock:
        lifecycles = list(_watched.get(connection.engine, ()))
    for lifecycle in lifecycles:
        lifecycle.rolled_back_by_server(connection, why)


def _on_error(context: Any) -> None:
    connection = context.connection
    error = context.original_exception
    args = getattr(error, "args", ())
    if connection is not None and args and args[0] == _DEADLOCK:
        _tell(connection, DEADLOCK_VICTIM)


def _on_commit(connection: Connection) -> None:
    if rolls_back_at_commit(connection):
        _tell(connection, AT_COMMIT)


_LISTENERS: dict[str, tuple[str, Callable[..., None]]] = {
    "postgresql": ("commit", _on_commit),
    "mysql": ("handle_error", _on_error),
    "mariadb": ("handle_error", _on_error),
}
"""Per dialect name: the engine event that tells, and its listener."""
