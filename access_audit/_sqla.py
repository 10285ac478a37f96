"""What access_audit reads of SQLAlchemy beyond its public API, in one place.

Each function here reads one piece of SQLAlchemy's private state, names it,
and says why no public API serves. ``tests/test_sqla_shim.py`` checks each of
them against the installed SQLAlchemy, so an upgrade that moves one fails
there, loudly.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import NestedTransaction, Transaction
from sqlalchemy.orm import SessionTransaction

__all__ = [
    "checked_engine_options",
    "connection_entry",
    "connection_is_autocommit",
    "encloses_foreign_savepoint",
    "ends_outer_transaction",
    "engine_is_autocommit",
    "has_connections",
    "inherits_options",
    "is_autocommit",
    "session_connections",
]


def session_connections(
    root: SessionTransaction,
) -> Iterator[tuple[Connection, Transaction, bool]]:
    """Each connection the session's outermost transaction holds, once.

    Yields ``(connection, transaction, commits)``: the connection-level
    transaction the session runs in, and whether the session's own commit
    commits it. SQLAlchemy keeps this as ``SessionTransaction._connections``
    (keyed by both the connection and its engine); no public API tells
    whether the session joined a transaction it does not end.
    """
    seen: set[int] = set()
    for connection, transaction, commits, _autoclose in root._connections.values():
        if id(connection) not in seen:
            seen.add(id(connection))
            yield connection, transaction, commits


def has_connections(root: SessionTransaction) -> bool:
    """Whether the session's outermost transaction holds a connection yet."""
    return bool(root._connections)


def connection_entry(
    root: SessionTransaction, connection: Connection
) -> tuple[Transaction, bool] | None:
    """:func:`session_connections`' ``(transaction, commits)`` for one connection."""
    entry = root._connections.get(connection)
    return None if entry is None else (entry[1], entry[2])


def ends_outer_transaction(transaction: Transaction, commits: bool) -> bool:
    """Whether committing the session commits *transaction* for good.

    False for a session joined to a transaction it does not end: a SAVEPOINT
    it opened on a connection that was in a transaction already
    (``join_transaction_mode="create_savepoint"``), or a transaction it only
    rolls back (``"rollback_only"``, the ``"conditional_savepoint"``
    default's choice when the connection has no SAVEPOINT open).
    """
    return commits and not isinstance(transaction, NestedTransaction)


def encloses_foreign_savepoint(transaction: Transaction, join_mode: str) -> bool:
    """Whether a SAVEPOINT that the session did not open encloses *transaction*.

    A rollback to such a SAVEPOINT would undo the session's changes while the
    outermost transaction still commits. The session opens a SAVEPOINT of
    its own to join in the ``"create_savepoint"`` mode (and in
    ``"conditional_savepoint"`` when one is open already); then the one
    enclosing it is its ``_previous_nested`` (private: the connection's
    public ``get_nested_transaction()`` names only the innermost). In the
    other modes a SAVEPOINT it runs in is the caller's own.
    """
    if not isinstance(transaction, NestedTransaction):
        return False
    if join_mode in ("create_savepoint", "conditional_savepoint"):
        return transaction._previous_nested is not None
    return True


def is_autocommit(bind: Engine | Connection) -> bool:
    """Whether *bind* runs in ``AUTOCOMMIT`` isolation (each statement commits).

    Set per connection or engine through execution options, or for the
    engine's every connection by ``create_engine(isolation_level=...)``,
    which SQLAlchemy keeps as the dialect's ``_on_connect_isolation_level``;
    a connection's own test is ``Connection._is_autocommit_isolation()``.
    """
    if isinstance(bind, Connection):
        return connection_is_autocommit(bind)
    return engine_is_autocommit(bind)


def connection_is_autocommit(connection: Connection) -> bool:
    """:func:`is_autocommit` for a :class:`~sqlalchemy.engine.Connection`."""
    return connection._is_autocommit_isolation()


def engine_is_autocommit(engine: Engine) -> bool:
    """:func:`is_autocommit` for an :class:`~sqlalchemy.engine.Engine`."""
    return checked_engine_options(engine) is None


def checked_engine_options(engine: Engine) -> object | None:
    """The engine's execution options if it is not ``AUTOCOMMIT``, else None.

    A connection of the engine shares this very object until options are
    set on the connection itself (:func:`inherits_options`), so its
    isolation level is the engine's.
    """
    options = engine._execution_options
    level = options.get("isolation_level")
    if level is None:
        level = engine.dialect._on_connect_isolation_level
    return None if level == "AUTOCOMMIT" else options


def inherits_options(connection: Connection, options: object) -> bool:
    """Whether *connection* still runs with exactly the engine's *options*.

    SQLAlchemy gives a new connection its engine's execution options object
    and replaces it when options are set on the connection.
    """
    return connection._execution_options is options
