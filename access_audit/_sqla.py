"""What access_audit reads of SQLAlchemy beyond its public API, in one place.

Each function here reads one piece of SQLAlchemy's private state, names it,
and says why no public API serves. ``tests/test_sqla_shim.py`` checks each of
them against the installed SQLAlchemy, so an upgrade that moves one fails
there, loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import NestedTransaction, Transaction
from sqlalchemy.orm import InstanceState, Mapper, Session, SessionTransaction
from sqlalchemy.orm.session import SessionTransactionState
from sqlalchemy.util import await_only

try:  # SQLAlchemy 2.1 and later 2.0 releases
    from sqlalchemy.util.concurrency import in_greenlet as _in_greenlet
except ImportError:  # pragma: no cover - SQLAlchemy 2.0.22 and near it

    def _in_greenlet() -> bool:
        # What in_greenlet() tests there: the greenlet greenlet_spawn() made.
        try:
            from greenlet import getcurrent  # type: ignore[import-untyped,unused-ignore]
            from sqlalchemy.util._concurrency_py3k import (  # type: ignore[import-not-found,unused-ignore]
                _AsyncIoGreenlet,
            )
        except ImportError:  # no greenlet: no AsyncSession either
            return False
        return isinstance(getcurrent(), _AsyncIoGreenlet)


__all__ = [
    "autobegin",
    "await_only",
    "bind_of",
    "checked_engine_options",
    "connection_entry",
    "current_transaction",
    "encloses_foreign_savepoint",
    "ends_outer_transaction",
    "flushed_in_transaction",
    "flushed_mappers",
    "has_committed",
    "has_connections",
    "in_greenlet",
    "in_savepoint",
    "inherits_options",
    "is_autocommit",
    "is_flushing",
    "mapper_binds",
    "nested_transactions",
    "parent_of",
    "past_staging",
    "preparing",
    "session_connections",
    "sets_connection_options",
    "sole_connection",
    "transaction_connections",
]


# The hot path reads a few attributes per staged event and per commit;
# attrgetter objects are called in C, cheaper than a Python function each.

current_transaction: Callable[[Session], SessionTransaction | None] = attrgetter(
    "_transaction"
)
"""``Session._transaction``: the innermost transaction, a flush's included
(``get_transaction()`` walks up to the outermost; ``get_nested_transaction()``
skips a flush's)."""

parent_of: Callable[[SessionTransaction], SessionTransaction | None] = attrgetter(
    "_parent"
)
"""``SessionTransaction._parent``: what the public ``parent`` property returns,
without the property call."""

is_flushing: Callable[[Session], bool] = attrgetter("_flushing")
"""``Session._flushing``: whether the session is inside ``flush()``."""

mapper_binds: Callable[[Session], Mapping[object, object]] = attrgetter(
    # Session(binds=...)'s table: private (name-mangled) in SQLAlchemy 2.0,
    # the attribute ``binds`` from 2.1.
    "_Session__binds"
    if "_Session__binds" in Session.__init__.__code__.co_names
    else "binds"
)
"""The per-mapper and per-table binds a session was given (empty: none)."""

_state_of: Callable[[SessionTransaction], SessionTransactionState] = attrgetter(
    "_state"
)
_PAST_STAGING = (SessionTransactionState.PREPARED, SessionTransactionState.COMMITTED)


def in_greenlet() -> bool:
    """Whether this code runs inside the greenlet that an ``AsyncSession``
    (``greenlet_spawn``) runs the synchronous Session in, where
    :func:`await_only` awaits on the caller's event loop.

    ``in_greenlet`` is ``sqlalchemy.util.concurrency``'s (private before 2.1).
    Without greenlet installed (SQLAlchemy 2.1 no longer requires it) there
    is no such greenlet, and no ``AsyncSession`` either: SQLAlchemy's own
    check raises :class:`ImportError` there, this one says no.
    """
    try:
        return bool(_in_greenlet())
    except ImportError:
        return False


def past_staging(transaction: SessionTransaction) -> bool:
    """Whether *transaction* was prepared or committed already (it is closing).

    A two-phase transaction is ``PREPARED`` between ``prepare()`` and
    ``commit()``; ``SessionTransaction._state`` says so, no public API does.
    """
    return _state_of(transaction) in _PAST_STAGING


def has_committed(transaction: SessionTransaction) -> bool:
    """Whether *transaction*'s COMMIT went through (``_state`` is
    ``COMMITTED``); :func:`past_staging` is true of a prepared one too."""
    return _state_of(transaction) is SessionTransactionState.COMMITTED


def autobegin(session: Session) -> SessionTransaction:
    """Begin the session's transaction as ``Session.add()`` does.

    ``Session._autobegin_t()``: no connection yet, and SQLAlchemy's own
    ``InvalidRequestError`` when the session has ``autobegin=False``.
    """
    return session._autobegin_t()


def preparing(root: SessionTransaction) -> bool:
    """Whether the outermost transaction is inside ``commit()``, before COMMIT.

    ``before_commit`` fires for RELEASE SAVEPOINT too, and the outermost
    commit may still have SAVEPOINTs open when it starts, so neither
    ``in_nested_transaction()`` nor the event itself tells them apart; the
    state change the transaction is running does: SQLAlchemy records it as
    ``_current_fn``, here ``_prepare_impl``.
    """
    running = getattr(root, "_current_fn", None)
    return getattr(running, "__name__", None) == "_prepare_impl"


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


def transaction_connections(root: SessionTransaction) -> list[Connection]:
    """The connections of :func:`session_connections`, cheaply: some twice
    (the commit path asks each one a question whose answer repeats)."""
    return [entry[0] for entry in root._connections.values()]


def in_savepoint(root: SessionTransaction) -> bool:
    """Whether a connection of the session's transaction *root* is inside a
    connection-level SAVEPOINT (the session's own or another's), cheaply:
    asked after every flush."""
    for entry in root._connections.values():
        if entry[0]._nested_transaction is not None:
            return True
    return False


def sole_connection(root: SessionTransaction | None) -> Connection | None:
    """The one connection the session's transaction *root* holds; None if
    it holds none yet, or several (one per database it worked in)."""
    found: Connection | None = None
    for entry in root._connections.values() if root is not None else ():
        if found is None:
            found = entry[0]
        elif entry[0] is not found:
            return None
    return found


def bind_of(
    root: SessionTransaction, bind: Engine | Connection
) -> Engine | Connection | None:
    """How the session's transaction *root* holds its connection to *bind*'s
    database: the Engine it took the connection from, or the Connection
    the session was given as a bind (a joined session); None if it holds
    none. ``_connections`` is keyed by both the connection and its engine;
    each entry's last item says whether the session took the connection
    itself (and so closes it)."""
    entry = root._connections.get(bind)
    if entry is None:
        return None
    connection: Connection = entry[0]
    return connection.engine if entry[3] else connection


def has_connections(root: SessionTransaction) -> bool:
    """Whether the session's outermost transaction holds a connection yet."""
    return bool(root._connections)


def connection_entry(
    root: SessionTransaction, connection: Connection
) -> tuple[Transaction, bool] | None:
    """:func:`session_connections`' ``(transaction, commits)`` for one connection."""
    entry = root._connections.get(connection)
    return None if entry is None else (entry[1], entry[2])


def nested_transactions(session: Session, connection: Connection) -> set[Transaction]:
    """The connection-level SAVEPOINTs the session itself opened, still open.

    Each of its open transactions (``Session._transaction`` up its
    ``_parent`` chain) holds, per connection, the connection-level
    transaction it runs in (``SessionTransaction._connections``).
    """
    found: set[Transaction] = set()
    transaction = current_transaction(session)
    while transaction is not None:
        entry = transaction._connections.get(connection)
        if entry is not None and isinstance(entry[1], NestedTransaction):
            found.add(entry[1])
        transaction = parent_of(transaction)
    return found


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
        return bind._is_autocommit_isolation()
    return checked_engine_options(bind) is None


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


def sets_connection_options(engine: Engine) -> bool:
    """Whether *engine* has ``engine_connect`` listeners: they may set
    execution options (``AUTOCOMMIT``, say) on each connection it makes, so
    checking the engine says nothing of its connections."""
    return bool(engine.dispatch.engine_connect)


def inherits_options(connection: Connection, engine: Engine, options: object) -> bool:
    """Whether *connection* is *engine*'s, still with exactly its *options*.

    SQLAlchemy gives a new connection its engine's execution options object
    and replaces it when options are set on the connection (engines with no
    options share one empty object, hence the engine test).
    """
    return connection.engine is engine and connection._execution_options is options


def flushed_in_transaction(session: Session, state: InstanceState[Any]) -> str | None:
    """How the session's open transaction has written *state*'s row so far.

    ``"inserted"`` when a flush of this transaction inserted it,
    ``"written"`` when one updated or deleted it (or flushed it for a
    relationship's sake), None when none did. SQLAlchemy records these
    states to undo them on rollback, per transaction boundary:
    ``SessionTransaction._new``, ``_dirty`` and ``_deleted`` (a flush's
    subtransaction shares its parent's; a SAVEPOINT's are merged into the
    enclosing ones when it is released and dropped when it rolls back). No
    public API tells whether an object was flushed in this transaction.
    """
    chain = []
    transaction = current_transaction(session)
    while transaction is not None:
        chain.append(transaction)
        transaction = parent_of(transaction)
    # Inserted anywhere in the chain wins: a row inserted by this transaction
    # and updated in a SAVEPOINT since is still a new row.
    if any(state in level._new for level in chain):
        return "inserted"
    if any(state in level._dirty or state in level._deleted for level in chain):
        return "written"
    return None


def flushed_mappers(session: Session, flush_context: Any) -> set[Mapper[Any]]:
    """The base mappers of the objects a flush really wrote, read in
    ``after_flush``: inserted, deleted, or with a net change to an attribute
    or collection. SQLAlchemy flushes an object with no net change too (one
    set to the value it had, merged unchanged) and issues no statement for
    it; a relationship's object listed only for its sake counts neither.

    ``UOWTransaction.states`` maps each object of the flush to ``(isdelete,
    listonly)``; no public API lists them. The object's identity key is
    still None after its INSERT, and its history still the flush's, until
    the flush finishes.
    """
    found: set[Mapper[Any]] = set()
    for state, (isdelete, listonly) in flush_context.states.items():
        if listonly:
            continue
        base = state.mapper.base_mapper
        if base in found:
            continue
        if isdelete or state.key is None or session.is_modified(state.obj()):
            found.add(base)
    return found
