"""Where a transaction will commit, and refusing what cannot be trusted.

Staging is refused on a bind in ``AUTOCOMMIT`` isolation (each statement
commits on its own, so a rollback that drops the event keeps the change) and
inside a SAVEPOINT the session did not open (begun on its connection, or by
whoever began the transaction it joined): a rollback to it would undo the
change unseen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from ._errors import AuditConfigurationError
from ._sqla import (
    encloses_foreign_savepoint,
    ends_outer_transaction,
    is_autocommit,
    mapper_binds,
    nested_transactions,
    session_connections,
    sets_connection_options,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Transaction
    from sqlalchemy.orm import SessionTransaction

    from ._owner import Owner

__all__ = [
    "DEFAULT_GET_BIND",
    "FOREIGN_SAVEPOINT",
    "check_binds",
    "foreign_savepoint_open",
    "refuse",
    "refuse_foreign_savepoints",
    "session_binds",
]

DEFAULT_GET_BIND = Session.get_bind
"""``Session.get_bind`` itself: a session class that overrides it (as
Flask-SQLAlchemy's does) may choose another bind per statement."""


def check_binds(
    session: Session, root: SessionTransaction, owner: Owner
) -> tuple[list[Connection] | None, bool]:
    """Refuse staging where the transaction's ending cannot be trusted.

    Checks the connections the session holds; before it has one, the bind
    it will use. Returns the connections whose outer transaction the commit
    must wait for (or None), and whether a connection the session acquires
    later needs the full check of :meth:`~access_audit._lifecycle.Lifecycle.connected` (it may come
    from another bind than the one checked, join a transaction begun since,
    or get options of its own from the engine's ``engine_connect``
    listeners).

    :raises AuditConfigurationError: as :func:`_refuse`.
    """
    outer = None
    connected = False
    for connection, transaction, commits in session_connections(root):
        connected = True
        if refuse(session, connection, transaction, commits, owner):
            outer = [*(outer or ()), connection]
    bind = session.bind
    if not connected and bind is not None:
        refuse(session, bind, None, True, owner)
        if (
            isinstance(bind, Connection)
            and bind.in_transaction()
            and owner.joined_transactions == "outer"
        ):
            # Its transaction is someone else's: even a commit with no SQL
            # of its own is decided by that transaction.
            outer = [bind]
    watch = (
        bool(mapper_binds(session))
        or type(session).get_bind is not DEFAULT_GET_BIND
        or (not connected and (bind is None or isinstance(bind, Connection)))
        or (
            not connected and isinstance(bind, Engine) and sets_connection_options(bind)
        )
    )
    return outer, watch


def session_binds(
    session: Session, root: SessionTransaction
) -> list[Engine | Connection]:
    """What *session* is connected to or bound to: the connections its
    transaction holds, its ``bind`` and its per-mapper ``binds`` (a
    ``get_bind`` of its own may choose others, checked as it connects)."""
    binds: list[Engine | Connection] = [
        connection for connection, _transaction, _commits in session_connections(root)
    ]
    if session.bind is not None:
        binds.append(session.bind)
    binds.extend(
        bind
        for bind in mapper_binds(session).values()
        if isinstance(bind, (Engine, Connection))
    )
    return binds


def refuse(
    session: Session,
    bind: Engine | Connection,
    transaction: Transaction | None,
    commits: bool,
    owner: Owner,
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
    if not isinstance(bind, Connection):
        return False
    outer = owner.joined_transactions == "outer"
    if transaction is None:
        # The session will join inside it.
        foreign = outer and bind.in_nested_transaction()
    else:
        foreign = foreign_savepoint_open(session, bind) or (
            _watched(owner, transaction, commits)
            and encloses_foreign_savepoint(transaction, session.join_transaction_mode)
        )
    if foreign:
        raise AuditConfigurationError(FOREIGN_SAVEPOINT)
    return (
        outer
        and transaction is not None
        and not ends_outer_transaction(transaction, commits)
    )


def refuse_foreign_savepoints(session: Session, root: SessionTransaction) -> None:
    """Raise if a connection of the session's transaction *root* is inside a
    SAVEPOINT the session did not open (see :func:`refuse`).

    Checked again for every event staged after a transaction's first, and
    after every flush of a transaction with events staged, where
    :func:`~access_audit._sqla.in_savepoint` says a SAVEPOINT is open: such a SAVEPOINT
    may be begun at any moment, on the session's own connection
    (``session.connection().begin_nested()``) as well as by the caller of a
    joined session, and its rollback would undo what the session staged or
    flushed in it unseen.

    :raises AuditConfigurationError: such a SAVEPOINT is open.
    """
    for connection, _transaction, _commits in session_connections(root):
        if foreign_savepoint_open(session, connection):
            raise AuditConfigurationError(FOREIGN_SAVEPOINT)


def _watched(owner: Owner, transaction: Transaction, commits: bool) -> bool:
    """Whether a SAVEPOINT that the session did not open and that encloses
    *transaction* (the one the session joined) is refused: always where the
    session's commit ends the transaction, and on a joined one unless the
    emitter delivers on the session's own commit
    (``joined_transactions="session"``, whose suites roll an enclosing
    SAVEPOINT back by design). One begun inside the session's transaction,
    after it joined, is refused in every mode."""
    return owner.joined_transactions == "outer" or ends_outer_transaction(
        transaction, commits
    )


FOREIGN_SAVEPOINT = (
    "access_audit refused: the session's connection is inside a SAVEPOINT "
    "that the session did not open (begun on the connection, as "
    "session.connection().begin_nested() does, or by whoever began the "
    "transaction the session joined); a rollback to it would undo the "
    "session's changes without access_audit seeing it. Open SAVEPOINTs with "
    "session.begin_nested(); bind a joined session where no outside "
    "SAVEPOINT encloses it, or create the emitter with "
    "joined_transactions='session' to deliver on session.commit() (for "
    "rollback-per-test suites)"
)


def foreign_savepoint_open(session: Session, connection: Connection) -> bool:
    """Whether *connection*'s innermost SAVEPOINT is one the session did not open."""
    innermost = connection.get_nested_transaction()
    if innermost is None:
        return False
    return innermost not in nested_transactions(session, connection)
