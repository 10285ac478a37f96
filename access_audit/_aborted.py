"""Transactions the database rolls back on its own, while the session goes on.

SQLAlchemy's session insists on a rollback only after a failed flush, so an
application that catches an error from ``session.execute()`` and goes on may
be working in a transaction the database has already given up:

- PostgreSQL aborts a transaction at its first failed statement: every later
  one fails until a ROLLBACK (or a ROLLBACK TO SAVEPOINT opened before the
  failure), and a COMMIT ends it with a ROLLBACK that the driver reports as
  success (:func:`rolls_back_at_commit`, asked before COMMIT);
- MariaDB and MySQL roll the whole transaction back when it is chosen as a
  deadlock's victim (error 1213), SAVEPOINTs and all, and the statements
  that follow (an application retrying the one that failed) run in a new
  transaction (:func:`watch_deadlocks`, told as the error is raised).

The events staged before then describe changes that were rolled back.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, event


class Victim(Protocol):
    """What :func:`watch_deadlocks` tells (a session's transaction lifecycle)."""

    def rolled_back_by_server(self, connection: Connection) -> None:
        """The database rolled back the transaction on *connection*, if it
        is this one's."""


__all__ = ["rolls_back_at_commit", "watch_deadlocks"]

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
"""MariaDB and MySQL engines, each with the lifecycles staging on it."""
_watched_lock = threading.Lock()


def watch_deadlocks(bind: Engine | Connection, lifecycle: Victim) -> None:
    """Have *lifecycle* told when its transaction on *bind*'s engine is
    rolled back as a deadlock's victim (:meth:`Victim.rolled_back_by_server`).

    Only for MariaDB and MySQL; the engine's ``handle_error`` listener is
    installed the first time.
    """
    engine = bind.engine
    if engine.dialect.name not in ("mysql", "mariadb"):
        return
    with _watched_lock:
        lifecycles = _watched.get(engine)
        if lifecycles is None:
            lifecycles = _watched[engine] = weakref.WeakSet()
            event.listen(engine, "handle_error", _on_error)
        lifecycles.add(lifecycle)


def _on_error(context: Any) -> None:
    connection = context.connection
    error = context.original_exception
    args = getattr(error, "args", ())
    if connection is None or not args or args[0] != _DEADLOCK:
        return
    with _watched_lock:
        lifecycles = list(_watched.get(connection.engine, ()))
    for lifecycle in lifecycles:
        lifecycle.rolled_back_by_server(connection)
