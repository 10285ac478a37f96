"""Transactions the database rolls back at COMMIT, whatever it is asked.

PostgreSQL aborts a transaction at its first failed statement: every later
one fails until a ROLLBACK (or a ROLLBACK TO SAVEPOINT opened before the
failure), and a COMMIT ends it with a ROLLBACK that the driver reports as
success. SQLAlchemy's session insists on a rollback only after a failed
flush, so an application that catches an error from ``session.execute()``
(an ``IntegrityError`` it expected, say) and commits has all its changes
rolled back, silently. Their events must not be sent.
"""

from __future__ import annotations

from sqlalchemy import Connection

__all__ = ["rolls_back_at_commit"]

_INERROR = 3
"""libpq's ``PQTRANS_INERROR``: psycopg's and psycopg2's
``connection.info.transaction_status`` of an aborted transaction."""


def rolls_back_at_commit(connection: Connection) -> bool:
    """Whether COMMIT on *connection* will roll its transaction back.

    Known for PostgreSQL through psycopg and psycopg2 (their connection
    ``info``); asyncpg does not tell, and other databases go on after a
    failed statement.
    """
    if connection.dialect.name != "postgresql" or connection.invalidated:
        return False
    info = getattr(connection.connection.dbapi_connection, "info", None)
    return getattr(info, "transaction_status", None) == _INERROR
