"""The outbox table: one row per committed event, written inside its transaction."""

from __future__ import annotations

import functools
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
    bindparam,
    insert,
    update,
)
from sqlalchemy.dialects import mysql

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.orm import Session

    from .._dispatch import DeliveryReport
    from .._emitter import AuditEmitter
    from .._envelope import AuditEventEnvelope
    from ._relay import RelayStats
from sqlalchemy.types import TypeDecorator

__all__ = ["DEAD", "DELIVERED", "PENDING", "Outbox"]

PENDING = "pending"
"""Some plugin has yet to take the event."""
DELIVERED = "delivered"
"""Every plugin took the event."""
DEAD = "dead"
"""Every plugin that has not taken the event gave up after ``max_attempts``."""


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

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        result: datetime = value.replace(tzinfo=timezone.utc)
        return result


class _Statements:
    """Outbox statements built once: constructing them costs more than running."""

    def __init__(self, table: Table) -> None:
        self.insert = insert(table)
        self.mark_delivered = (
            update(table)
            .where(table.c.id.in_(bindparam("ids", expanding=True)))
            .values(
                status=DELIVERED,
                delivered_to=bindparam("delivered_to"),
                delivered_at=bindparam("delivered_at"),
            )
        )


class Outbox:
    """Where an emitter with ``outbox=`` writes its envelopes before COMMIT.

    The table follows the common outbox/CDC conventions (Debezium's outbox
    event router reads ``id``, ``aggregatetype``, ``aggregateid``, ``type``
    and ``payload`` as they are), plus delivery state for the relay:

    =============== ========================================================
    id              the envelope id (UUIDv7 text): the idempotency key
    aggregatetype   ``target_type``
    aggregateid     ``target_id``
    type            ``event_type``
    payload         the envelope as JSON (``AuditEventEnvelope.to_json()``)
    created_at      the envelope's ``timestamp``
    transaction_id  the envelope's ``transaction_id``
    sequence        the envelope's ``sequence``: with ``transaction_id``, the
                    commit order
    status          ``pending``, ``delivered`` or ``dead``
    delivered_to    JSON list of the plugin names that took the event
    failures        JSON object: plugin name -> attempts, last error, dead
    next_attempt_at when the relay may try again
    delivered_at    when the last plugin took it (the relay prunes by it)
    recipients      JSON list of the plugin names the event was written for:
                    the only ones a relay delivers it to
    =============== ========================================================

    :param metadata: the ``MetaData`` to define the table on, so that
        ``metadata.create_all()`` and Alembic autogenerate see it; a private
        one by default (then call :meth:`create`).
    :param table_name: the table's name.
    :param schema: the table's schema, if not the default.
    :param relay_after: how long a relay leaves a fresh row to the dispatch
        that follows its COMMIT before it takes the row over itself (after a
        crash, say). Rows whose dispatch failed are due at once. A relay
        taking over a row that is still being dispatched sends it twice, so
        keep this above your slowest dispatch (or background queue wait).
    """

    def __init__(
        self,
        metadata: MetaData | None = None,
        *,
        table_name: str = "access_audit_outbox",
        schema: str | None = None,
        relay_after: timedelta = timedelta(seconds=60),
    ) -> None:
        if relay_after < timedelta(0):
            raise ValueError("relay_after must not be negative")
        self.relay_after = relay_after
        self.metadata = metadata if metadata is not None else MetaData()
        self.table = Table(
            table_name,
            self.metadata,
            Column("id", String(36), primary_key=True),
            Column("aggregatetype", String(128), nullable=False),
            Column("aggregateid", String(255), nullable=False),
            Column("type", String(128), nullable=False),
            Column("payload", Text, nullable=False),
            Column("created_at", UtcDateTime, nullable=False),
            Column("transaction_id", String(36), nullable=False),
            Column("sequence", Integer, nullable=False),
            Column("status", String(16), nullable=False, default=PENDING),
            Column("delivered_to", Text, nullable=False, default="[]"),
            Column("failures", Text, nullable=False, default="{}"),
            Column("next_attempt_at", UtcDateTime, nullable=False),
            Column("delivered_at", UtcDateTime, nullable=True),
            Column("recipients", Text, nullable=False, default="[]"),
            Index(f"ix_{table_name}_status_order", "status", "created_at"),
            Index(f"ix_{table_name}_target", "aggregatetype", "aggregateid"),
            Index(f"ix_{table_name}_transaction", "transaction_id"),
            schema=schema,
        )

    def __repr__(self) -> str:
        return f"<Outbox table={self.table.fullname!r}>"

    @functools.cached_property
    def statements(self) -> _Statements:
        """The statements run on every commit, built once."""
        return _Statements(self.table)

    def create(self, bind: Any) -> None:
        """Create the table if it does not exist (``bind``: Engine or Connection)."""
        self.table.create(bind, checkfirst=True)

    def drop(self, bind: Any) -> None:
        """Drop the table if it exists."""
        self.table.drop(bind, checkfirst=True)

    # The emitter reaches the outbox only through the methods below (its
    # delivery-store interface), so the core never imports this package.

    def write(
        self,
        session: Session,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
    ) -> Engine | Connection:
        """Insert rows for *envelopes*, each for *plugins*, in *session*'s
        transaction (before COMMIT); returns the bind they went to."""
        from ._store import write

        write(session, self, envelopes, plugins)
        bind: Engine | Connection = session.get_bind(clause=self.table)
        return bind

    def record(
        self,
        bind: Engine | Connection,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
        report: DeliveryReport,
    ) -> None:
        """Record which of *plugins* took *envelopes* after COMMIT (*report*)."""
        from ._store import mark_dispatched

        mark_dispatched(bind, self, envelopes, plugins, report)

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
