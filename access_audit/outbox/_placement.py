"""Where a commit's outbox rows go: into the database its changes are in.

Rows commit together with the changes they record only in the same
database. A session may work in several (``Session(binds=...)``,
Flask-SQLAlchemy's ``SQLALCHEMY_BINDS``): the rows then go to the one
database the transaction wrote to (:mod:`access_audit._written`), when it
has the outbox table, and a relay of that database delivers them. Otherwise
they go to the outbox table's own bind, as when the transaction wrote
nowhere else or only read elsewhere (a reporting database, a read replica):
never a refusal, so that no working application breaks, but a warning where
the rows commit apart from the changes.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .._logging import logger
from .._sqla import bind_of, connection_entry, ends_outer_transaction, sole_connection
from .._written import record_of, written

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, SessionTransaction

    from ._table import Outbox

__all__ = ["connection_for_rows", "refusal", "refused"]


def connection_for_rows(
    session: Session, outbox: Outbox
) -> tuple[Connection, Engine | Connection, bool]:
    """The session's connection to write the commit's rows on, its bind
    (where the record of their delivery goes after COMMIT), and whether
    these are the commit's first rows and go to another database than the
    outbox table's (see :func:`refused`). All of a commit's rows go to one
    database: a later flush of the commit that stages more puts them where
    the first went."""
    table_bind = session.get_bind(clause=outbox.table)
    root = session.get_transaction()
    only = sole_connection(root)
    if only is not None and (only is table_bind or only.engine is table_bind):
        # One database: the usual commit. In a SAVEPOINT (opened by a
        # before_commit listener), through it: SQLAlchemy begins one on the
        # connection only as it is used there, and its rollback must take
        # the rows along.
        if session.get_nested_transaction() is not None:
            only = session.connection(bind_arguments={"bind": table_bind})
        return only, table_bind, False
    record = written(session)
    placed = None if record is None else record.placed
    if placed is not None:  # a later batch of the commit: with the first
        return session.connection(bind_arguments={"bind": placed}), placed, False
    placed = _place(session, outbox, table_bind)
    if root is not None:
        record_of(session, root).placed = placed
    connection = session.connection(bind_arguments={"bind": placed})
    return connection, placed, placed is not table_bind


def refusal(error: DBAPIError) -> bool:
    """Whether the database refused the rows themselves (a read-only
    database, a trigger, privileges), rather than ended the transaction or
    the connection (a disconnect, a deadlock, a serialization failure):
    only then may they go elsewhere. A transient failure fails the commit,
    as it would have without the outbox."""
    if error.connection_invalidated:
        return False
    original = error.orig
    state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    if isinstance(state, str) and state.startswith("40"):
        return False  # transaction rollback: serialization, deadlock
    arguments = getattr(original, "args", ())
    return not (
        arguments and isinstance(arguments[0], int) and arguments[0] in _MYSQL_TRANSIENT
    )


_MYSQL_TRANSIENT = frozenset((1205, 1213))
"""MariaDB and MySQL: a lock wait timeout, a deadlock."""


def refused(
    session: Session, outbox: Outbox, bind: Engine | Connection, error: Exception
) -> tuple[Connection, Engine | Connection]:
    """The database of the changes refused the rows (*error*): the
    connection and bind of the outbox table's database, where this commit's
    rows go now, apart from the changes (a warning says so, once)."""
    table_bind = session.get_bind(clause=outbox.table)
    if _first_time(_engine_of(bind), outbox, "refused"):
        logger.warning(
            "outbox rows of a transaction that changed %r go to %r, apart "
            "from the changes: %r refused them (%s)",
            _engine_of(bind),
            _engine_of(table_bind),
            _engine_of(bind),
            _first_line(getattr(error, "orig", error)),
        )
    root = session.get_transaction()
    if root is not None:
        record_of(session, root).placed = table_bind
    return session.connection(bind_arguments={"bind": table_bind}), table_bind


def _place(
    session: Session, outbox: Outbox, table_bind: Engine | Connection
) -> Engine | Connection:
    """The bind of the database the rows go to (see the module's docstring)."""
    record = written(session)
    databases = [] if record is None else record.databases()
    if not databases:  # wrote nowhere noted, or cannot tell where
        return table_bind
    root = session.get_transaction()
    held = (bind_of(root, table_bind) if root is not None else None) or table_bind
    others = [bind for bind in databases if bind is not held]
    if not others:
        return table_bind
    if root is not None and _joined_to_outer(session, root, held):
        # Its events wait for the caller's transaction, and are discarded
        # if that rolls back: so do its rows.
        if _first_time(_engine_of(held), outbox, "joined"):
            logger.warning(
                "a session joined to an outer transaction changed %s: its "
                "outbox rows stay in that transaction (its events wait for "
                "it), apart from those changes",
                ", ".join(repr(_engine_of(bind)) for bind in others),
            )
        return table_bind
    apart = not session.twophase
    if len(databases) == 1:
        (other,) = others
        connection = session.connection(bind_arguments={"bind": other})
        if not _began(connection):
            return table_bind  # nothing was written there after all
        if _has_tables(connection, outbox):
            return other
        if apart and _first_time(connection.engine, outbox, "no table"):
            logger.warning(
                "outbox rows of a transaction that changed %r go to %r, apart "
                "from the changes: %r has no table %s (create it there, e.g. "
                "access-audit relay --create-table --database-url URL, and "
                "relay that database too)",
                connection.engine,
                _engine_of(table_bind),
                connection.engine,
                outbox.table.fullname,
            )
        return table_bind
    if apart and _first_time(_engine_of(table_bind), outbox, "several"):
        logger.warning(
            "a transaction changed several databases (%s): its outbox rows go "
            "to %r and commit apart from the changes in the others, unless "
            "the session commits them together (twophase=True)",
            ", ".join(repr(_engine_of(bind)) for bind in databases),
            _engine_of(table_bind),
        )
    return table_bind


def _joined_to_outer(
    session: Session, root: SessionTransaction, bind: Engine | Connection
) -> bool:
    """Whether *bind* is a connection the session was given and does not
    end the transaction of (a session joined to its caller's): the session
    joins it as it takes it, here if it had not yet."""
    if not isinstance(bind, Connection):
        return False
    session.connection(bind_arguments={"bind": bind})
    entry = connection_entry(root, bind)
    return entry is not None and not ends_outer_transaction(*entry)


def _began(connection: Connection) -> bool:
    """False where the driver says no transaction began: pysqlite's own
    transaction handling (SQLAlchemy's default) sends BEGIN only before the
    first write, so a statement noted before it ran that then failed wrote
    nothing, and a SAVEPOINT there would be the outermost, its RELEASE a
    COMMIT of the rows alone. Other drivers: True."""
    in_transaction = getattr(
        connection.connection.dbapi_connection, "in_transaction", True
    )
    return in_transaction is not False


def _has_tables(connection: Connection, outbox: Outbox) -> bool:
    """Whether *connection*'s database has *outbox*'s tables (the rows' and
    the delivery state's): asked on each such commit, in its transaction,
    since a test suite or a migration may drop them any time, and a commit
    must not fail for a table that is gone."""
    dialect = connection.dialect
    return all(
        dialect.has_table(
            connection,
            table.name,
            # The schema the connection translates it to, as the INSERT's.
            schema=connection.schema_for_object(table),
        )
        for table in (outbox.table, outbox.delivery_table)
    )


def _first_time(engine: Engine, outbox: Outbox, what: str) -> bool:
    """Whether *what* is news about *engine* for *outbox* (a warning,
    logged once)."""
    seen = _warned.setdefault(outbox, weakref.WeakKeyDictionary()).setdefault(
        engine, set()
    )
    if what in seen:
        return False
    seen.add(what)
    return True


def _first_line(error: BaseException) -> str:
    """The database's own words, without what follows them (PostgreSQL's
    DETAIL lists the row's values: target ids, the payload's start)."""
    return str(error).strip().split("\n", 1)[0][:200]


def _engine_of(bind: Engine | Connection) -> Engine:
    return bind if isinstance(bind, Engine) else bind.engine


_warned: weakref.WeakKeyDictionary[
    Outbox, weakref.WeakKeyDictionary[Engine, set[str]]
] = weakref.WeakKeyDictionary()
"""Per outbox, per engine: the warnings logged about it already."""
