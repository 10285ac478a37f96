"""The model, engines, plugin and staging call that every workload shares."""

from __future__ import annotations

import os
from time import perf_counter_ns
from typing import Any

from sqlalchemy import Engine, String, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event

__all__ = [
    "DATABASES",
    "Base",
    "BenchItem",
    "NoOpPlugin",
    "database_url",
    "make_emitter",
    "make_engine",
    "server_version",
    "stage_one",
    "timed_commits",
]

DATABASES = ("sqlite", "postgresql")
"""The databases the benchmark knows, in the order it runs them."""

POSTGRESQL_URL = os.environ.get(
    "ACCESS_AUDIT_TEST_POSTGRESQL_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)


class Base(DeclarativeBase):
    """The benchmark's tables; every name starts with ``bench_``."""


class BenchItem(Base):
    """One row per audited operation."""

    __tablename__ = "bench_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))


class NoOpPlugin:
    """A plugin that receives every committed event and does nothing with it."""

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        """Ignore the event: the benchmark measures access_audit, not a sink."""


def make_emitter(**options: Any) -> AuditEmitter:
    """An emitter with one no-op plugin and no entry-point plugins."""
    return AuditEmitter([NoOpPlugin()], load_entrypoints=False, **options)


def stage_one(session: Any, name: str) -> None:
    """Stage the event one audited operation records."""
    stage_event(
        session,
        "item_created",
        target_type="item",
        target_id=name,
        action="create",
        payload={"name": name},
    )


def timed_commits(session: Any, ops: int, stage: bool) -> int:
    """Insert a row and commit *ops* times; with ``stage``, audit each. Returns ns."""
    start = perf_counter_ns()
    for number in range(ops):
        name = f"item-{number}"
        session.add(BenchItem(name=name))
        if stage:
            stage_one(session, name)
        session.commit()
    return perf_counter_ns() - start


def database_url(database: str) -> str:
    """The URL of *database*: SQLite in memory, or the PostgreSQL test server."""
    if database == "sqlite":
        return "sqlite://"
    if database == "postgresql":
        return POSTGRESQL_URL
    raise ValueError(f"unknown database {database!r}; choose from {DATABASES}")


def make_engine(database: str, *, savepoints: bool = False) -> Engine:
    """An engine on *database*.

    With ``savepoints`` on SQLite, pysqlite's own transaction handling (which
    breaks SAVEPOINT) is turned off and SQLAlchemy emits BEGIN itself, as the
    SQLAlchemy documentation recommends. Without it the driver's cheaper
    implicit BEGIN is kept, so the commit workloads measure against the
    cheapest commit there is.
    """
    engine = create_engine(database_url(database))
    if savepoints and engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, record: object) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN")

    return engine


def server_version(engine: Engine) -> str:
    """Connect once (raising if the server is down) and name the server."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            version = connection.execute(text("select sqlite_version()")).scalar()
        else:
            version = connection.execute(text("select version()")).scalar()
    return f"{engine.dialect.name} {version}"
