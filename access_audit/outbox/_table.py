"""The outbox tables: one row per committed event, written inside its
transaction, and the delivery state the relay keeps beside it."""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.types import TypeDecorator

from ._store import dispatched, settle_dispatched, transaction, write

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.engine import Dialect
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.orm import Session

    from .._dispatch import DeliveryReport
    from .._emitter import AuditEmitter
    from .._envelope import AuditEventEnvelope
    from ._recorder import Recorder
    from ._relay import RelayStats

__all__ = ["Outbox", "PreparedInsert"]

_LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
"""Text of any length a user (or a list of plugin names) may make: MariaDB's
``TEXT`` stops at 64 KiB."""

_UTF8MB4: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
"""MariaDB's table options: every character (a server may default to latin1),
compared exactly, as ids are."""


_ONE_CONNECTION_POOLS = (SingletonThreadPool, StaticPool)
"""Pools whose connection no thread but the committing one may write through."""


class PreparedInsert:
    """An INSERT of whole rows into *table*, compiled for one dialect (and
    no ``schema_translate_map``: the text names the table as it is).

    Run through :meth:`Connection.exec_driver_sql`, without compiling, or
    looking up the compiled form and processing parameters through it, on
    every commit (that cost more than the INSERT itself on SQLite): cursor
    events and engine logging see it, ``before_execute`` does not. The
    columns' bind processors are applied as the compiled statement would
    apply them.
    """

    __slots__ = ("_names", "_pick", "_processors", "columns", "sql")

    def __init__(self, table: Table, dialect: Dialect) -> None:
        compiled = insert(table).compile(dialect=dialect)
        self.sql: str = compiled.string
        """The statement, in the driver's parameter style."""
        keys = tuple(table.columns.keys())
        self.columns: tuple[str, ...] = (
            tuple(compiled.positiontup or ()) if compiled.positional else keys
        )
        """The column names, in the order of a positional driver's parameters."""
        self._names = None if compiled.positional else keys
        """The column names, for a driver that takes parameters by name."""
        self._pick = operator.itemgetter(*[keys.index(key) for key in self.columns])
        """A row's values in the positional driver's order, as a tuple."""
        self._processors = tuple(
            (index, processor)
            for index, column in enumerate(table.columns)
            if (processor := _bind_processor(column, dialect)) is not None
        )

    def parameters(self, row: Sequence[Any]) -> Any:
        """*row* (a value for each of the table's columns, in their order) as
        the driver takes it: processed as the column types do, in a tuple in
        the driver's order or a dict by name."""
        values = list(row)
        for index, processor in self._processors:
            values[index] = processor(values[index])
        if self._names is not None:
            return dict(zip(self._names, values, strict=True))
        return self._pick(values)


def _bind_processor(column: Column[Any], dialect: Dialect) -> Any:
    return column.type.dialect_impl(dialect).bind_processor(dialect)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes, stored as naive UTC with microseconds on every database."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def bind_processor(self, dialect: Dialect) -> Any:
        # On the commit path, on SQLite: one step instead of two.
        if dialect.name == "sqlite":
            return _sqlite_text
        return super().bind_processor(dialect)

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        result: datetime = value.replace(tzinfo=timezone.utc)
        return result


def _sqlite_text(value: datetime | None) -> str | None:
    """*value* in UTC as SQLAlchemy's SQLite ``DATETIME`` stores it (the
    text ``process_bind_param`` and then that type's processor make)."""
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat(" ", "microseconds")[:26]


class Outbox:
    """Where an emitter with ``outbox=`` writes its envelopes before COMMIT.

    Two tables. The outbox table itself only ever receives INSERTs (one row
    per committed event, inside its transaction) and DELETEs (once every
    plugin the event is for has taken it), so a change-data-capture reader
    such as Debezium's outbox event router can consume it as it is:

    =============== ========================================================
    id              the envelope id (UUIDv7 text): the idempotency key
    aggregatetype   ``target_type``
    aggregateid     ``target_id``, whole
    type            ``event_type``
    payload         the envelope as compact UTF-8 JSON: ``to_dict()``, which
                    reads back as ``AuditEventEnvelope.to_json`` does
    created_at      the envelope's ``timestamp``
    transaction_id  the envelope's ``transaction_id``
    sequence        the envelope's ``sequence``: with ``transaction_id``, the
                    commit order
    recipients      JSON list of the plugin names the event was written for:
                    the only ones a relay delivers it to
    =============== ========================================================

    Delivery state lives in ``<table_name>_delivery``, one row per (event,
    plugin) for events still in the outbox that some plugin took, failed on
    or gave up on: ``state`` (``delivered``, ``pending`` for a retry, or
    ``dead``), ``attempts``, ``error`` and ``next_attempt_at``. An event all
    of whose plugins took it leaves both tables; one that some plugin gave
    up on stays (marked by a row for the plugin name ``""``) until
    :func:`~access_audit.outbox.retry_dead` or
    :func:`~access_audit.outbox.prune`.

    :param metadata: the ``MetaData`` to define the tables on, so that
        ``metadata.create_all()`` and Alembic autogenerate see them; a
        private one by default (then call :meth:`create`).
    :param table_name: the outbox table's name; the delivery table's is
        this plus ``_delivery``.
    :param schema: the tables' schema, if not the default.
    :param relay_after: how long a relay leaves a fresh row to the dispatch
        that follows its COMMIT before it takes the row over itself (after a
        crash, say). Rows whose dispatch failed are due at once. A relay
        taking over a row that is still being dispatched sends it twice, so
        keep this above your slowest dispatch (or background queue wait).
    :param max_payload_bytes: the largest payload, in bytes of JSON as
        stored, that staging accepts for this outbox (an emitter's own
        ``max_payload_bytes`` can only lower it), and the largest target
        id, target name, reason, actor id or email and metadata, each on
        its own. Larger ones are refused by ``stage_event``, never by the
        application's commit: 1,000,000 by default, so that a row of eight
        such fields (the payload column holds seven) stays inside MariaDB's
        default 16 MiB ``max_allowed_packet`` even when the driver escapes
        every byte of it (a quote, say) as two.
    """

    max_plugin_name_length = 255
    """The longest plugin name the delivery table stores: an emitter with
    this outbox refuses to register a plugin under a longer one."""

    def __init__(
        self,
        metadata: MetaData | None = None,
        *,
        table_name: str = "access_audit_outbox",
        schema: str | None = None,
        relay_after: timedelta = timedelta(seconds=60),
        max_payload_bytes: int = 1_000_000,
    ) -> None:
        if not isinstance(relay_after, timedelta):
            raise TypeError(
                f"relay_after must be a timedelta (timedelta(seconds=60)), got "
                f"{relay_after!r}"
            )
        if relay_after < timedelta(0):
            raise ValueError("relay_after must not be negative")
        # Its exit handler now, before any emitter's background dispatcher
        # registers its own: handlers run last first, so the dispatcher
        # drains its queue (whose deliveries queue records) before the
        # records are written. Imported later, it wrote first, and a
        # script's last commits were delivered again by the relay.
        from . import _recorder  # noqa: F401

        if (
            isinstance(max_payload_bytes, bool)
            or not isinstance(max_payload_bytes, int)
            or max_payload_bytes <= 0
        ):
            raise ValueError(
                f"max_payload_bytes must be a positive int, got {max_payload_bytes!r}"
            )
        self.relay_after = relay_after
        self.max_payload_bytes = max_payload_bytes
        self.metadata = metadata if metadata is not None else MetaData()
        self.table = Table(
            table_name,
            self.metadata,
            Column("id", String(36), primary_key=True),
            Column("aggregatetype", String(128), nullable=False),
            Column("aggregateid", _LongText, nullable=False),
            Column("type", String(128), nullable=False),
            Column("payload", _LongText, nullable=False),
            Column("created_at", UtcDateTime, nullable=False),
            Column("transaction_id", String(36), nullable=False),
            Column("sequence", Integer, nullable=False),
            Column("recipients", _LongText, nullable=False),
            Index(f"ix_{table_name}_order", "created_at", "transaction_id", "sequence"),
            schema=schema,
            **_UTF8MB4,
        )
        from ._wake import add_notify_trigger

        add_notify_trigger(self.table)
        self.delivery_table = Table(
            f"{table_name}_delivery",
            self.metadata,
            Column("event_id", String(36), primary_key=True),
            Column("plugin", String(self.max_plugin_name_length), primary_key=True),
            Column("state", String(16), nullable=False),
            Column("attempts", Integer, nullable=False, default=0),
            Column("error", Text, nullable=True),
            Column("next_attempt_at", UtcDateTime, nullable=True),
            Column("updated_at", UtcDateTime, nullable=False),
            schema=schema,
            **_UTF8MB4,
        )

    def __repr__(self) -> str:
        return f"<Outbox table={self.table.fullname!r}>"

    def _insert_for(self, dialect: Dialect) -> PreparedInsert:
        """The INSERT run on every commit, compiled once per dialect."""
        prepared = self._inserts.get(dialect)
        if prepared is None:
            prepared = self._inserts[dialect] = PreparedInsert(self.table, dialect)
        return prepared

    @functools.cached_property
    def _inserts(self) -> weakref.WeakKeyDictionary[Dialect, PreparedInsert]:
        # Weak: an application (or a test suite) may make many engines.
        return weakref.WeakKeyDictionary()

    def create(self, bind: Any) -> None:
        """Create the tables if they do not exist (``bind``: Engine or Connection)."""
        self.metadata.create_all(
            bind, tables=[self.table, self.delivery_table], checkfirst=True
        )

    def drop(self, bind: Any) -> None:
        """Drop the tables if they exist (after the records queued for them)."""
        self.flush(timeout=5.0)
        self.metadata.drop_all(
            bind, tables=[self.table, self.delivery_table], checkfirst=True
        )

    # The emitter reaches the outbox only through the methods below (its
    # delivery-store interface), so the core never imports this package.

    def write(
        self,
        session: Session,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
    ) -> Engine | Connection:
        """Insert rows for *envelopes*, each for *plugins*, in *session*'s
        transaction (before COMMIT), in the database of its changes; returns
        the bind they went to."""
        return write(session, self, envelopes, plugins)

    def record(
        self,
        bind: Engine | Connection,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
        report: DeliveryReport,
        *,
        apart: bool = False,
    ) -> None:
        """Record which of *plugins* took *envelopes* after COMMIT (*report*).

        Through an Engine, the record is written later by a thread of the
        outbox's own, batched with other commits' (:meth:`flush` waits for
        it); through a Connection (a session joined to the caller's
        transaction) or an async engine's facade, here and now; through an
        engine whose pool gives each thread its own connection or every
        thread the same one (in-memory SQLite's ``SingletonThreadPool`` and
        ``StaticPool``), by this thread, with its later commits' records:
        another thread's COMMIT on a shared connection would commit whatever
        transaction the application has open on it. *apart* (from inside a
        connection's own events): kept there, never written then.
        """
        record = dispatched(envelopes, plugins, report)
        if isinstance(bind, Connection) or bind.dialect.is_async:
            with transaction(bind) as connection:
                settle_dispatched(connection, self, [record])
        elif isinstance(bind.pool, _ONE_CONNECTION_POOLS):
            self._recorder.defer(bind, record, write=not apart)
        else:
            self._recorder.submit(bind, record)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the records :meth:`record` queued so far are written;
        False if *timeout* seconds passed first."""
        if "_recorder" not in self.__dict__:
            return True
        return self._recorder.flush(timeout)

    @functools.cached_property
    def _recorder(self) -> Recorder:
        from ._recorder import Recorder

        return Recorder(self)

    def relay(
        self, emitter: AuditEmitter, bind: Engine | Connection, **options: Any
    ) -> RelayStats:
        """Run :func:`~access_audit.outbox.relay` for *emitter* on this outbox."""
        from ._relay import relay

        return relay(emitter, bind, self, **options)

    async def arelay(
        self,
        emitter: AuditEmitter,
        bind: AsyncEngine | AsyncConnection,
        **options: Any,
    ) -> RelayStats:
        """Await :func:`~access_audit.outbox.arelay` for *emitter* on this outbox."""
        from ._relay import arelay

        return await arelay(emitter, bind, self, **options)
