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

from .._logging import logger
from .._sqla import bind_of, sole_connection
from .._written import record_of, written

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ._table import Outbox

__all__ = ["connection_for_rows", "refused"]


def connection_for_rows(
    session: Session, outbox: Outbox
) -> tuple[Connection, Engine | Connection, bool]:
    """The session's connection to write the commit's rows on, its bind
    (where the record of their delivery goes after COMMIT), and whether
    that is another database than the outbox table's. All of a commit's
    rows go to one database: a later flush of the commit that stages more
    puts them where the first went."""
    table_bind = session.get_bind(clause=outbox.table)
    root = session.get_transaction()
    only = sole_connection(root)
    if only is not None and (only is table_bind or only.engine is table_bind):
        return only, table_bind, False  # one database: the usual commit
    record = written(session)
    placed = None if record is None else record.placed
    if placed is None:
        placed = _place(session, outbox, table_bind)
        if root is not None:
            record_of(session, root).placed = placed
    connection = session.connection(bind_arguments={"bind": placed})
    return connection, placed, placed is not table_bind


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
            getattr(error, "orig", error),  # the database's words, not the rows
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
    apart = not session.twophase
    if len(databases) == 1:
        (other,) = others
        connection = session.connection(bind_arguments={"bind": other})
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


def _engine_of(bind: Engine | Connection) -> Engine:
    return bind if isinstance(bind, Engine) else bind.engine


_warned: weakref.WeakKeyDictionary[
    Outbox, weakref.WeakKeyDictionary[Engine, set[str]]
] = weakref.WeakKeyDictionary()
"""Per outbox, per engine: the warnings logged about it already."""
