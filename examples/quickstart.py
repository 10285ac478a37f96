"""A plain-SQLAlchemy walk-through: events reach plugins only for what committed.

Run it with ``python examples/quickstart.py`` (after ``pip install -e .``). It uses an
in-memory SQLite database and prints each committed envelope as JSON.
"""

from __future__ import annotations

from sqlalchemy import String, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from access_audit import (
    AuditEmitter,
    AuditEventEnvelope,
    audit_context,
    hookimpl,
    signals,
    stage_event,
)


class Base(DeclarativeBase):
    pass


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)


class PrintPlugin:
    """A plugin: prints every committed event as one JSON line."""

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        print("  emitted:", envelope.to_json())


def make_engine() -> object:
    engine = create_engine("sqlite://")

    # pysqlite's own transaction handling breaks SAVEPOINT: SQLAlchemy's
    # documented workaround turns it off and emits BEGIN itself.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: object, record: object) -> None:
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(engine, "begin")
    def _begin(connection: object) -> None:
        connection.exec_driver_sql("BEGIN")  # type: ignore[attr-defined]

    return engine


def create_group(session: Session, name: str) -> Group:
    """An application operation: change data and stage the event describing it."""
    group = Group(name=name)
    session.add(group)
    stage_event(
        session,
        "group_create",
        target_type="group",
        target_id=lambda: group.id,  # database-generated: resolved at commit
        target_name=name,
        action="create",
        reason="quickstart",
    )
    return group


def main() -> None:
    engine = make_engine()
    Base.metadata.create_all(engine)
    emitter = AuditEmitter([PrintPlugin()], load_entrypoints=False)
    SessionLocal = sessionmaker(engine)
    emitter.attach(SessionLocal)
    signals.audit_event_discarded.connect(
        lambda sender, event, reason: print(
            f"  discarded: {event.event_type} ({reason})"
        ),
        weak=False,
    )

    with audit_context(
        actor_id="u-42", actor_email="ada@example.com", job="quickstart"
    ):
        print("1. create a group and commit: one event")
        with SessionLocal.begin() as session:
            create_group(session, "admins")

        print("2. create a group, then the operation fails: no event")
        try:
            with SessionLocal.begin() as session:
                create_group(session, "doomed")
                raise RuntimeError("a later step of the operation failed")
        except RuntimeError as error:
            print(f"  rolled back: {error}")

        print("3. two groups, the second in a SAVEPOINT that rolls back: one event")
        with SessionLocal.begin() as session:
            create_group(session, "auditors")
            savepoint = session.begin_nested()
            create_group(session, "temporary")
            savepoint.rollback()

    with SessionLocal() as session:
        names = sorted(
            session.scalars(Group.__table__.select().with_only_columns(Group.name))
        )
    print("groups in the database:", names)


if __name__ == "__main__":
    main()
