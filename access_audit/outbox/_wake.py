"""Waking a polling relay as soon as a commit writes outbox rows (PostgreSQL).

On PostgreSQL the outbox table gets a statement trigger that calls
``pg_notify`` on the table's channel; PostgreSQL delivers the notification
when the writing transaction commits, and never for one that rolls back.
The commit pays no extra round trip. A polling relay LISTENs on a connection
of its own and waits for a notification instead of sleeping the whole
interval. Elsewhere (and through drivers other than psycopg 3.2 or newer),
the relay polls as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import DDL, Engine, Table, event

from .._logging import logger

if TYPE_CHECKING:
    from ._table import Outbox

__all__ = ["Listener", "add_notify_trigger", "channel", "listen"]

_SLICE = 0.25
"""Seconds between checks of the stop flag while waiting."""

_RETRY_LISTEN = 5.0
"""Seconds of polling after a LISTEN connection fails, before another try."""


_CHANNEL_BYTES = 63
"""The longest channel name PostgreSQL takes (``NAMEDATALEN`` - 1, in bytes)."""


def channel(table: Table) -> str:
    """The notification channel of an outbox *table*: its full name, or, one
    too long for a channel, the start of it and a digest of the whole."""
    name = table.fullname
    encoded = name.encode()
    if len(encoded) <= _CHANNEL_BYTES:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    start = encoded[: _CHANNEL_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{start}_{digest}"


def add_notify_trigger(table: Table) -> None:
    """Create (and drop) the NOTIFY trigger with *table*, on PostgreSQL only.

    The trigger names the table as the DDL renders it (``%(fullname)s``), so
    a connection's ``schema_translate_map`` places it with the table. Its
    function is shared by the tables of that name in schemas so placed:
    dropping one table leaves the function while another's trigger uses it.
    """
    name = f"{table.name}_notify"
    qualified = f'"{table.schema}"."{name}"' if table.schema else f'"{name}"'
    notify = channel(table).replace("'", "''")
    for statement in (
        _ddl(
            f"CREATE OR REPLACE FUNCTION {qualified}() RETURNS trigger AS $$ "
            f"BEGIN PERFORM pg_notify('{notify}', ''); RETURN NULL; END $$ "
            "LANGUAGE plpgsql"
        ),
        _ddl(
            f"CREATE TRIGGER {name} AFTER INSERT ON ",
            "%(fullname)s",
            f" FOR EACH STATEMENT EXECUTE FUNCTION {qualified}()",
        ),
    ):
        event.listen(table, "after_create", statement)
    event.listen(
        table,
        "after_drop",
        _ddl(
            f"DO $$ BEGIN DROP FUNCTION IF EXISTS {qualified}(); "
            "EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END $$"
        ),
    )


def _ddl(*parts: str) -> Any:
    """*parts* joined as DDL run on PostgreSQL only; each odd one is a DDL
    substitution (``%(fullname)s``), the others text taken as it is."""
    text = "".join(
        part if index % 2 else part.replace("%", "%%")
        for index, part in enumerate(parts)
    )
    ddl: Any = DDL(text)  # type: ignore[no-untyped-call, unused-ignore]
    return ddl.execute_if(dialect="postgresql")


class Listener:
    """A LISTEN connection: :meth:`wait` returns early when a commit wrote rows."""

    def __init__(self, engine: Engine, outbox: Outbox) -> None:
        self._engine = engine
        self._channel = channel(outbox.table)
        self._due_after = outbox.relay_after.total_seconds()
        """A notified row is due for a relay this much later."""
        self._connection: Any = None
        self._pooled: Any = None
        self._retry_at = 0.0
        self._failing = False
        self._back = False
        """Listening again after a failure: what was notified meanwhile was
        missed, so the next wait returns at once, for a poll."""
        self._listened = False

    def wait(self, seconds: float, stopped: Callable[[], bool]) -> None:
        """Wait up to *seconds*, or until the rows of a commit notified
        meanwhile are due (``relay_after`` after it: at once for an outbox
        left to the relay), returning at once when *stopped* says so; sleeps
        instead while no LISTEN connection works.

        Later notifications never bring the wake-up closer: under a steady
        stream of commits a relay wakes once per ``relay_after`` (or
        interval), not once per commit.
        """
        deadline = time.monotonic() + seconds
        while not stopped():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            connection = self._connect()
            if connection is None:
                time.sleep(min(_SLICE, left))
                continue
            if self._back:
                self._back = False
                return
            try:
                for _ in connection.notifies(timeout=min(_SLICE, left), stop_after=1):
                    if self._due_after <= 0:
                        return
                    deadline = min(deadline, time.monotonic() + self._due_after)
            except Exception as error:
                self._lost(error)

    def _lost(self, error: Exception) -> None:
        """Close the connection; polling until a new one LISTENs, in a while."""
        if not self._failing:
            logger.warning(
                "relay: %s (%s); polling until it is back",
                "LISTEN connection lost" if self._listened else "cannot LISTEN",
                str(error).splitlines()[0],
            )
        self._failing = True
        self._retry_at = time.monotonic() + _RETRY_LISTEN
        self.close()

    def _connect(self) -> Any:
        if self._connection is None:
            if time.monotonic() < self._retry_at:
                return None
            try:
                # A connection of the pool's, never given back: invalidated
                # when done, as it stays in autocommit, listening.
                self._pooled = self._engine.raw_connection()
                dbapi = self._pooled.driver_connection
                dbapi.rollback()  # out of any transaction a connect hook began
                dbapi.autocommit = True
                quoted = self._channel.replace('"', '""')
                dbapi.execute(f'LISTEN "{quoted}"')
                self._connection = dbapi
            except Exception as error:
                self._lost(error)
                return None
            self._listened = True
            if self._failing:
                logger.warning("relay: LISTEN connection back")
                self._failing = False
                self._back = True
        return self._connection

    def close(self) -> None:
        """Close the LISTEN connection, if open."""
        pooled, self._pooled, self._connection = self._pooled, None, None
        if pooled is not None:
            with contextlib.suppress(Exception):  # already broken
                pooled.invalidate()


def listen(bind: Any, outbox: Outbox) -> Listener | None:
    """A :class:`Listener` for a relay through *bind*, already LISTENing (or
    retrying, when it cannot), or None where notifications are not available
    (not PostgreSQL through psycopg 3.2+).

    Call it before the relay's first poll: a commit between that poll and
    the first wait then wakes the wait instead of waiting out the interval.
    """
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql":
        return None
    if bind.dialect.driver != "psycopg" or bind.dialect.is_async:
        return None
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the dialect needs it
        return None
    if "timeout" not in psycopg.Connection.notifies.__code__.co_varnames:
        return None  # before psycopg 3.2
    listener = Listener(bind, outbox)
    listener._connect()  # before the first poll: a commit after it wakes the wait
    return listener
