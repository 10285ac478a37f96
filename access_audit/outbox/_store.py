"""Reading and writing the outbox tables."""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Text,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from .._envelope import AuditEventEnvelope, stored_envelope, stored_json
from ._placement import connection_for_rows, refusal, refused

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.orm import Session

    from .._dispatch import DeliveryReport
    from ._table import Outbox

__all__ = [
    "DEAD",
    "DELIVERED",
    "PARKED",
    "PENDING",
    "Dispatched",
    "OutboxRow",
    "PluginState",
    "chunks",
    "delete_ids",
    "dispatched",
    "error_text",
    "forget",
    "in_joined",
    "one_of",
    "settle_dispatched",
    "transaction",
    "write",
]


def _parse_json(text: str) -> Any:
    """``json.loads``, through orjson when it is installed (the ``fast``
    extra) and the text holds no number orjson would change: it reads an
    integer beyond 64 bits as a float, where ``json`` keeps it whole."""
    if _fast_loads is None:
        return json.loads(text)
    encoded = text.encode("utf-8", "surrogatepass")
    # Such a number has 19 digits or more in a row; so may a string, which
    # then only costs the slower parse. (A regular expression searching for
    # them cost more than json.loads itself.)
    if _LONG_RUN in encoded.translate(_DIGITS_AS_ZERO):
        return json.loads(text)
    try:
        return _fast_loads(encoded)
    except ValueError:  # what json reads and orjson refuses: a lone surrogate
        return json.loads(text)


_fast_loads: Callable[[bytes], Any] | None
try:  # binary wheels: no compiler needed
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


PENDING = "pending"
"""Some plugin has yet to take the event (a delivery state: to be retried)."""
DELIVERED = "delivered"
"""The plugin took the event (a delivery state, kept while another has not)."""
DEAD = "dead"
"""The plugin gave up on the event after ``max_attempts``."""

CHUNK = 1000
"""Ids per ``IN`` list: well under every driver's parameter limit (psycopg's
is 65,535), whatever the size of the transaction being relayed."""

_SQLITE_CHUNK = 900
"""Ids per ``IN`` list where SQLite binds each id as a parameter of its own
(a build without JSON): with the statement's other parameters, under the 999
it takes before 3.32."""

PARKED = ""
"""The delivery-table plugin name that marks an event no plugin waits for
any more, kept because some plugin gave up on it (no plugin has this name:
pluggy names an unnamed plugin by its class)."""


def one_of(
    connection: Connection, column: ColumnElement[Any], ids: Sequence[str]
) -> ColumnElement[bool]:
    """``column IN (ids)`` for event ids, as one text parameter where the
    database can split it: on PostgreSQL ``column =
    ANY(string_to_array(:ids, ','))``, on an SQLite with JSON ``column IN
    (SELECT value FROM json_each(:ids))``. A parameter per id cost more than
    the statement itself: psycopg converts every one (and every element of
    an array parameter), SQLAlchemy renders and processes every one."""
    if connection.dialect.name == "postgresql":
        return in_joined(column, bindparam(None, ",".join(ids), type_=Text()))
    if _sqlite_json(connection):
        listed = func.json_each(bindparam(None, json.dumps(list(ids)), type_=Text()))
        return column.in_(select(listed.table_valued("value").c.value))
    return column.in_(ids)


def delete_ids(
    connection: Connection, column: ColumnElement[Any], ids: Sequence[str]
) -> None:
    """Delete the rows of *column*'s table whose *column* is one of *ids*
    (at most :data:`CHUNK`).

    On MariaDB and MySQL the ids are looked up one by one, by key: an
    outbox drained by relays is small, and the optimizer then reads
    ``column IN (...)`` by scanning the whole table, where a DELETE waits
    for every row another relay has locked, and two relays deadlock (and
    deliver their batches again). ``JSON_TABLE`` (MariaDB 10.6, MySQL 8,
    which ``SKIP LOCKED`` needs anyway) joined first with ``STRAIGHT_JOIN``
    touches only the rows named.
    """
    table = column.table
    if connection.dialect.name not in ("mysql", "mariadb"):
        connection.execute(delete(table).where(one_of(connection, column, ids)))
        return
    quote = connection.dialect.identifier_preparer
    name = quote.quote(table.name)
    # The text is the connection's to render: the schema it translates to.
    translate = connection.get_execution_options().get("schema_translate_map")
    schema = translate.get(table.schema, table.schema) if translate else table.schema
    if schema is not None:
        name = f"{quote.quote_schema(schema)}.{name}"
    statement = text(
        "DELETE t FROM JSON_TABLE(:ids, '$[*]' COLUMNS (id VARCHAR(36) PATH '$')) "
        f"AS j STRAIGHT_JOIN {name} AS t "
        f"ON t.{quote.quote(column.name)} = j.id"
    )
    connection.execute(statement, {"ids": json.dumps(list(ids))})


def _sqlite_json(connection: Connection) -> bool:
    """Whether *connection* is to an SQLite that has ``json_each``: built in
    since 3.38 and in most builds before, missing from one built without
    JSON. Asked once per engine (its dialect), through the DB-API
    connection, so a refusal never reaches the engine's error handling.

    The question is ``json_valid`` (the same JSON functions): a statement
    that reads no table takes no lock, where one reading ``json_each``
    would hold a shared lock in a deferred transaction, and the writer
    that comes first make its DELETE fail as "database is locked"."""
    dialect = connection.dialect
    if dialect.name != "sqlite":
        return False
    known = _JSON_EACH.get(dialect)
    if known is None:
        cursor = connection.connection.cursor()
        try:
            cursor.execute("SELECT json_valid('[]')")
            cursor.fetchall()
            known = True
        except dialect.loaded_dbapi.Error:
            known = False
        finally:
            cursor.close()
        _JSON_EACH[dialect] = known
    return known


_JSON_EACH: weakref.WeakKeyDictionary[Dialect, bool] = weakref.WeakKeyDictionary()
"""Per SQLite dialect (one per engine): whether its SQLite has ``json_each``."""


def in_joined(
    column: ColumnElement[Any], joined: BindParameter[str]
) -> ColumnElement[bool]:
    """PostgreSQL's ``column = ANY(string_to_array(joined, ','))``: *column*
    is one of the comma-separated ids of the text parameter *joined*."""
    return column == any_(func.string_to_array(joined, ","))


def chunks(connection: Connection, ids: Sequence[str]) -> Iterator[Sequence[str]]:
    """*ids* in slices that :func:`one_of` takes in one statement on
    *connection*: of :data:`CHUNK` ids, fewer on an SQLite without JSON."""
    no_json = connection.dialect.name == "sqlite" and not _sqlite_json(connection)
    size = _SQLITE_CHUNK if no_json else CHUNK
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def write(
    session: Session,
    outbox: Outbox,
    envelopes: Sequence[AuditEventEnvelope],
    recipients: Iterable[str],
) -> Engine | Connection:
    """Insert rows for *envelopes* in the session's transaction (before
    COMMIT), in the database of its changes (:mod:`._placement`); returns
    the bind they went to.

    *recipients* are the plugins each event is for: a relay that lacks one of
    them leaves the event pending for a relay that has it. The payload is
    the envelope's JSON as UTF-8 (what ``max_payload_bytes`` counts).
    """
    if not envelopes:
        bind: Engine | Connection = session.get_bind(clause=outbox.table)
        return bind
    connection, bind, elsewhere = connection_for_rows(session, outbox)
    names = _recipients_text(frozenset(recipients))
    # A value for each column of the outbox table, in its order.
    rows = [
        (
            str(envelope.id),
            envelope.target_type,
            envelope.target_id,
            envelope.event_type,
            stored_json(envelope),
            envelope.timestamp,
            str(envelope.transaction_id),
            envelope.sequence,
            names,
        )
        for envelope in envelopes
    ]
    if elsewhere:
        # The commit's first rows in another database than the outbox
        # table's, which may refuse what its catalog allows (a replica that
        # took only a temporary table's rows): in a SAVEPOINT, so that a
        # refusal fails no commit.
        savepoint = connection.begin_nested()
        try:
            _insert(connection, outbox, rows)
        except DBAPIError as error:
            if not refusal(error):
                raise  # the transaction's end, not the rows': fail the commit
            # Raises, failing the commit, if the database ended the
            # transaction (and the SAVEPOINT with it).
            savepoint.rollback()
            connection, bind = refused(session, outbox, bind, error)
        else:
            savepoint.commit()
            return bind
    _insert(connection, outbox, rows)
    return bind


def _insert(
    connection: Connection, outbox: Outbox, rows: list[tuple[Any, ...]]
) -> None:
    """Send the INSERT of *rows* (a value for each column, in order)."""
    # On the session's connection: the ORM's session.execute() path costs
    # as much again per commit.
    if connection.get_execution_options().get("schema_translate_map"):
        # Core renders the schema this connection translates to; the
        # statement compiled once names none.
        keys = outbox.table.columns.keys()
        connection.execute(
            insert(outbox.table),
            [dict(zip(keys, row, strict=True)) for row in rows],
        )
        return
    prepared = outbox._insert_for(connection.dialect)
    parameters = [prepared.parameters(row) for row in rows]
    # One row (the usual commit) as a plain execute: the executemany
    # path costs more per statement.
    connection.exec_driver_sql(
        prepared.sql, parameters[0] if len(parameters) == 1 else parameters
    )


@contextmanager
def transaction(
    bind: Engine | Connection, *, read_committed: bool = False
) -> Iterator[Connection]:
    """A connection in a transaction of its own, or the joined caller's one.

    A session bound to a Connection (the rollback-per-test recipe) already
    runs inside the caller's transaction: outbox changes go there too.

    *read_committed*: a transaction of its own on a server database runs in
    READ COMMITTED, whatever the engine's default (MariaDB's is REPEATABLE
    READ): each statement reads what other relays committed before it
    started. SQLite has one writer at a time.
    """
    if isinstance(bind, Connection):
        yield bind
        return
    with bind.begin() as connection:
        if read_committed and bind.dialect.name != "sqlite":
            level = (
                connection.get_execution_options().get("isolation_level")
                or connection.dialect.default_isolation_level
            )
            if level != "READ COMMITTED":
                # For this transaction only: the first statement in it.
                connection.exec_driver_sql(
                    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED"
                )
        yield connection


@dataclasses.dataclass(frozen=True, slots=True)
class Dispatched:
    """What the dispatch right after COMMIT did with a batch of outbox rows.

    Made on the commit path, written later (:func:`settle_dispatched`): it
    keeps the ids as they are, made into text when written.
    """

    taken: tuple[uuid.UUID, ...]
    """Ids of the events every plugin took: they leave the outbox."""
    partial: tuple[tuple[str, dict[str, str | None]], ...]
    """(id, {plugin: None if it took the event, else the error}) for the
    others: their state is kept and the failed plugins are due at once."""


def dispatched(
    envelopes: Sequence[AuditEventEnvelope],
    plugins: Collection[str],
    report: DeliveryReport,
) -> Dispatched:
    """Sum up *report* for the outbox, as :class:`Dispatched`."""
    if not report.failed:  # every plugin took every event: the usual commit
        return Dispatched(tuple([envelope.id for envelope in envelopes]), ())
    failed: dict[Any, dict[str, str | None]] = {}
    for name, errors in report.failed.items():
        for event_id, error in errors.items():
            failed.setdefault(event_id, {})[name] = error_text(error)
    taken = tuple([e.id for e in envelopes if e.id not in failed])
    partial = tuple(
        (str(event_id), {name: errors.get(name) for name in plugins})
        for event_id, errors in failed.items()
    )
    return Dispatched(taken, partial)


def error_text(error: BaseException) -> str:
    """How a plugin's *error* is stored: its ``repr()``, at most 500
    characters, as text every database takes (a NUL or a lone surrogate
    escaped with a backslash), or its type's name when ``repr()`` itself
    fails. Never raises: a plugin's error may be anything."""
    try:
        text = repr(error)
    except Exception:
        text = f"<{type(error).__qualname__}: repr() failed>"
    if not text.isprintable():  # rare: only then look closer
        text = text.replace("\x00", "\\x00")
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:500]


def settle_dispatched(
    connection: Connection, outbox: Outbox, batches: Iterable[Dispatched]
) -> None:
    """Apply :class:`Dispatched` records: delete the events all plugins took,
    keep the state of the others (each failed plugin due at once)."""
    taken: list[str] = []
    states: list[dict[str, Any]] = []
    now = datetime.now(timezone.utc)
    for batch in batches:
        taken.extend([str(event_id) for event_id in batch.taken])
        for event_id, outcome in batch.partial:
            for name, error in outcome.items():
                states.append(
                    {
                        "event_id": event_id,
                        "plugin": name,
                        "state": DELIVERED if error is None else PENDING,
                        "attempts": 0 if error is None else 1,
                        "error": error,
                        "next_attempt_at": None if error is None else now,
                        "updated_at": now,
                    }
                )
    forget(connection, outbox, taken)
    if states:
        connection.execute(insert(outbox.delivery_table), states)


def forget(
    connection: Connection,
    outbox: Outbox,
    ids: Sequence[str],
    stateful: Collection[str] | None = None,
) -> None:
    """Delete events *ids* from the outbox, and their delivery state.

    :param stateful: the ids among *ids* that have delivery state, when
        the caller knows (the rest have none); by default, any may have.
    """
    table, state = outbox.table, outbox.delivery_table
    with_state = list(ids) if stateful is None else [i for i in ids if i in stateful]
    for part in chunks(connection, with_state):
        delete_ids(connection, state.c.event_id, part)
    for part in chunks(connection, ids):
        delete_ids(connection, table.c.id, part)


@dataclasses.dataclass(slots=True)
class PluginState:
    """One plugin's delivery state for one event."""

    state: str
    attempts: int = 0
    error: str | None = None
    next_attempt_at: datetime | None = None


@functools.lru_cache(maxsize=64)
def _recipients_text(names: frozenset[str]) -> str:
    """The ``recipients`` column of rows written for plugins *names*."""
    return json.dumps(sorted(names))


@functools.lru_cache(maxsize=256)
def _recipients(text: str) -> frozenset[str]:
    """A row's ``recipients`` column, parsed (rows share a few values)."""
    return frozenset(json.loads(text))


class OutboxRow:
    """One outbox row and its delivery state, as the relay sees them."""

    __slots__ = (
        "created_at",
        "has_state",
        "id",
        "payload",
        "recipients",
        "sequence",
        "states",
        "target",
        "transaction_id",
    )

    @staticmethod
    def columns(
        outbox: Outbox, has_state: ColumnElement[bool]
    ) -> tuple[ColumnElement[Any], ...]:
        """What to select for an :class:`OutboxRow`, in the order it reads
        a result row; *has_state*: whether the row has delivery state."""
        table = outbox.table
        return (
            table.c.id,
            table.c.aggregatetype,
            table.c.aggregateid,
            table.c.recipients,
            has_state,
            table.c.created_at,
            table.c.transaction_id,
            table.c.sequence,
        )

    def __init__(self, row: Sequence[Any]) -> None:
        """From a result row of :meth:`columns`, unpacked by position (reading
        a SQLAlchemy row's fields by name cost seven times as much)."""
        self.id: str
        self.created_at: datetime
        self.transaction_id: str
        self.sequence: int
        (
            self.id,
            kind,
            ident,
            recipients,
            has_state,
            self.created_at,
            self.transaction_id,
            self.sequence,
        ) = row
        self.has_state: bool = bool(has_state)
        self.target: tuple[str, str] = (kind, ident)
        self.recipients: frozenset[str] = _recipients(recipients)
        self.states: dict[str, PluginState] = {}
        self.payload: str | None = None

    def waiting(self) -> frozenset[str]:
        """The plugin names this event is for that have neither taken it nor
        given up on it, whether the asking relay has them or not."""
        states = self.states
        if not states:
            return self.recipients
        return frozenset(
            name
            for name in self.recipients
            if name not in states or states[name].state == PENDING
        )

    def due_at(self, name: str, relay_after: timedelta) -> datetime:
        """When a relay may deliver this event to plugin *name* (waiting for it).

        A fresh row is left to the dispatch after its COMMIT for
        *relay_after*; once that dispatch recorded anything, a plugin without
        a state of its own is due at once (it was added since, say).
        """
        state = self.states.get(name)
        if state is not None and state.next_attempt_at is not None:
            return state.next_attempt_at
        if not self.states:
            return self.created_at + relay_after
        return self.created_at

    def dead(self) -> bool:
        """Whether some plugin gave up on this event."""
        return any(state.state == DEAD for state in self.states.values())

    def envelope(self) -> AuditEventEnvelope:
        assert self.payload is not None
        return stored_envelope(_parse_json(self.payload))
