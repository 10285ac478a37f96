"""Models, recording plugins and small helpers shared by the tests.

Imported as ``support`` by the core suite in ``tests/`` and by the example
packages' own tests (the repository's root ``conftest.py`` puts this folder
on ``sys.path`` for them). Fixtures live in the two ``conftest.py`` files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import pytest
from sqlalchemy import (
    Engine,
    ForeignKeyConstraint,
    String,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event
from access_audit.outbox import Outbox

T = TypeVar("T")

# -- servers: skip locally, fail under CI --------------------------------------


def unavailable(what: str, error: BaseException) -> NoReturn:
    """Skip locally, fail under CI: a missing server must not pass CI silently."""
    message = f"{what} is not reachable: {type(error).__name__}: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true requires every server)", pytrace=False)
    pytest.skip(message)


_reached: dict[str, Any] = {}


def reach(what: str, connect: Callable[[], T]) -> T:
    """What ``connect()`` returned the first time a test needed *what*.

    Called once per run: if it raised, every test that needs *what* is
    :func:`unavailable` (without waiting for the server again).
    """
    if what not in _reached:
        try:
            _reached[what] = connect()
        except Exception as error:
            _reached[what] = error
    found = _reached[what]
    if isinstance(found, Exception):
        unavailable(what, found)
    return cast(T, found)


SCRIPT_PRELUDE = """
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from access_audit import AuditEmitter, hookimpl, signals, stage_event

class Printer:
    @hookimpl
    def audit_event_logged(self, envelope):
        print("delivered", envelope.target_id, flush=True)
"""
"""What :func:`run_script` runs first: the usual imports, and ``Printer``,
a plugin printing ``delivered <target_id>`` for each event."""


def run_script(body: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Run *body* (dedented), after :data:`SCRIPT_PRELUDE`, in a new
    interpreter with the command-line *options*; its outcome and output."""
    return subprocess.run(
        [sys.executable, *options, "-c", SCRIPT_PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll *condition* until it holds or *seconds* pass; return the last answer."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def lines_of(path: Path) -> int:
    """How many lines the file at *path* has (0 while it does not exist)."""
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- engines -------------------------------------------------------------------


def sqlite_engine(path: Path) -> Engine:
    """A file SQLite engine with the pysqlite SAVEPOINT workaround.

    pysqlite's own transaction handling breaks SAVEPOINT; SQLAlchemy's
    documented recipe turns it off and emits BEGIN itself.
    """
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: object) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def aiosqlite_engine(path: Path) -> AsyncEngine:
    """A file aiosqlite engine with the same SAVEPOINT recipe.

    The recipe goes on ``engine.sync_engine``: the driver's own transaction
    handling is turned off and BEGIN emitted by SQLAlchemy.
    """
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, record: object) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


# -- tables, recording plugins, audited operations ---------------------------


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

    # MariaDB cannot defer a constraint, so it gets none (see make_commit_fail).
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


class Failures:
    """A plugin that keeps every ``audit_delivery_failed`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[AuditEventEnvelope, ...], BaseException]] = []

    @hookimpl
    def audit_delivery_failed(
        self,
        plugin_name: str,
        envelopes: Sequence[AuditEventEnvelope],
        error: BaseException,
    ) -> None:
        self.calls.append((plugin_name, tuple(envelopes), error))

    def targets(self) -> list[tuple[str, list[str]]]:
        """(plugin name, target ids of its envelopes) for each call, in order."""
        return [
            (name, [envelope.target_id for envelope in envelopes])
            for name, envelopes, _ in self.calls
        ]

    def named(self, name: str) -> list[tuple[str, tuple[AuditEventEnvelope, ...]]]:
        """(plugin name, envelopes) of the calls about the plugin *name*."""
        return [
            (plugin, envelopes) for plugin, envelopes, _ in self.calls if plugin == name
        ]


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


def commit_one(maker: sessionmaker[Session], target: str) -> None:
    """A transaction that stages one event and runs no SQL."""
    with maker() as session:
        stage_event(
            session, "report_viewed", target_type="report", target_id=target,
            action="view",
        )  # fmt: skip
        session.commit()


def commit_two_events(emitter: AuditEmitter) -> list[str]:
    """Commit events for targets "x" and "y" through *emitter*; return their ids.

    The session is on a new in-memory SQLite engine and runs no SQL at all:
    the events are sent all the same.
    """
    engine = create_engine("sqlite://")
    maker = sessionmaker(engine)
    emitter.attach(maker)
    try:
        with maker() as session:
            for name in ("x", "y"):
                stage_event(
                    session,
                    "item_created",
                    target_type="item",
                    target_id=name,
                    action="a",
                )
            session.commit()
    finally:
        emitter.detach(maker)
        engine.dispose()
    return ["x", "y"]


def make_commit_fail(session: Session, engine: Engine) -> None:
    """Arrange for the next COMMIT itself to fail, the way each database can."""
    if engine.dialect.name == "mysql":
        # MariaDB cannot defer constraints: lose the connection instead, which
        # makes COMMIT fail just the same.
        connection_id = session.execute(
            text("SELECT CONNECTION_ID()"), bind_arguments={"bind": engine}
        ).scalar_one()
        with engine.connect() as killer:
            killer.execute(text(f"KILL {int(connection_id)}"))
    else:
        # A deferred foreign key is checked only at COMMIT.
        session.add(Child(item_id=999_999))
        session.flush()


def outbox_emitter(outbox: Outbox, **plugins: object) -> AuditEmitter:
    """An outbox emitter with *plugins* registered under their keyword names."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    for name, plugin in plugins.items():
        emitter.register(plugin, name=name)
    return emitter


def commit_shared_targets(
    session: Session, transactions: int, per_transaction: int, targets: int
) -> None:
    """Commit *transactions* of *per_transaction* events, numbered in commit
    order (``payload["n"]``), whose targets (``t0``, ``t1``, ...) take turns:
    transactions share targets, so relays running at once must keep them
    in order."""
    for number in range(transactions * per_transaction):
        stage_event(
            session, "item_updated", target_type="item",
            target_id=f"t{number % targets}", action="update",
            payload={"n": number},
        )  # fmt: skip
        if number % per_transaction == per_transaction - 1:
            session.commit()


def outbox_rows(engine: Any, outbox: Outbox) -> list[dict[str, Any]]:
    """Every outbox row, in commit order, as plain dicts, each with its
    delivery state: ``states`` maps a plugin name to its state
    (``"delivered"``, ``"pending"`` or ``"dead"``) and ``attempts`` to the
    attempts counted (plugins with no state of their own are left out), and
    ``parked`` says whether no plugin waits for the row any more.

    Rows every plugin took are gone (the outbox keeps only what some plugin
    still waits for, or gave up on): flush the emitter before looking.
    """
    table, state = outbox.table, outbox.delivery_table
    with Session(engine) as session:
        rows = [
            dict(row)
            for row in session.execute(
                select(table).order_by(
                    table.c.created_at, table.c.transaction_id, table.c.sequence
                )
            ).mappings()
        ]
        states: dict[str, list[Any]] = {}
        for found in session.execute(select(state)):
            states.setdefault(found.event_id, []).append(found)
    for row in rows:
        found = states.get(row["id"], [])
        row["states"] = {s.plugin: s.state for s in found if s.plugin}
        row["attempts"] = {s.plugin: s.attempts for s in found if s.plugin}
        row["errors"] = {s.plugin: s.error for s in found if s.plugin and s.error}
        row["parked"] = any(not s.plugin for s in found)
    return rows


def deletes_from(clause: Any, table: Any) -> bool:
    """Whether *clause* (as ``before_execute`` sees it) deletes rows of
    *table*: a Core ``delete()``, or the text of MariaDB's delete by key."""
    if getattr(clause, "is_delete", False):
        return clause.table is table
    text = str(clause)
    named = (f"{table.name} AS t", f"`{table.name}` AS t")
    return text.startswith("DELETE t FROM JSON_TABLE") and any(
        name in text for name in named
    )
