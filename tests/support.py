"""Models and small helpers shared by the tests (imported as ``support``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import ForeignKeyConstraint, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event
from access_audit.outbox import Outbox


class Base(DeclarativeBase):
    pass


class Item(Base):
    """A row per committed operation; names are unique so a flush can fail."""

    __tablename__ = "audit_test_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class Child(Base):
    """Its foreign key is checked only at COMMIT where the database can defer it."""

    __tablename__ = "audit_test_child"

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int]

    # MariaDB cannot defer a constraint, so it gets none (see test_semantics).
    __table_args__ = (
        ForeignKeyConstraint(
            ["item_id"], ["audit_test_item.id"], deferrable=True, initially="DEFERRED"
        ).ddl_if(dialect=("postgresql", "sqlite")),
    )


class Recorder:
    """A plugin that keeps every hook call it gets."""

    def __init__(self) -> None:
        self.events: list[AuditEventEnvelope] = []
        self.batches: list[tuple[AuditEventEnvelope, ...]] = []

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.events.append(envelope)

    @hookimpl
    def audit_events_committed(self, envelopes: tuple[AuditEventEnvelope, ...]) -> None:
        self.batches.append(envelopes)

    @property
    def names(self) -> list[str]:
        """The target ids of the events received, in order (the tests' handle)."""
        return [envelope.target_id for envelope in self.events]

    def clear(self) -> None:
        self.events.clear()
        self.batches.clear()


def operation(session: Session, name: str, **fields: Any) -> Item:
    """Add an Item and stage the event that records it: one audited operation."""
    item = Item(name=name)
    session.add(item)
    stage_event(
        session,
        "item_created",
        target_type="item",
        target_id=name,
        action="create",
        **fields,
    )
    return item


def stored_names(engine: Any) -> list[str]:
    """The names of the Items really in the database, sorted."""
    with Session(engine) as session:
        return sorted(session.scalars(select(Item.name)))


def iter_names(events: list[AuditEventEnvelope]) -> Iterator[str]:
    return (envelope.target_id for envelope in events)


def outbox_emitter(outbox: Outbox, **plugins: object) -> AuditEmitter:
    """An outbox emitter with *plugins* registered under their keyword names."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    for name, plugin in plugins.items():
        emitter.register(plugin, name=name)
    return emitter


def outbox_rows(engine: Any, outbox: Outbox) -> list[dict[str, Any]]:
    """Every outbox row, in commit order, as plain dicts."""
    table = outbox.table
    with Session(engine) as session:
        return [
            dict(row)
            for row in session.execute(
                select(table).order_by(
                    table.c.created_at, table.c.transaction_id, table.c.sequence
                )
            ).mappings()
        ]
