"""Where a commit's outbox rows go when its session works in several
databases, on every database.

The rows go to the one database the transaction wrote to, when it has the
outbox table, so that they commit (or fail) with the changes they record;
otherwise to the outbox table's bind, with a warning when that is apart from
the changes. A database the transaction only read (a reporting database, a
read replica, which has the outbox table when it replicates the primary)
never gets them.

Here ``engine`` (each database in turn) holds the audited changes and
``elsewhere`` (an SQLite file) is the outbox table's own bind: the session's
default, as Flask-SQLAlchemy's default database is for a table without a
bind key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Engine,
    TextClause,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import UpdateBase
from support import (
    Base,
    Item,
    aiosqlite_engine,
    make_commit_fail,
    operation,
    outbox_rows,
    sqlite_engine,
    stored_names,
)
from test_outbox import Sink

from access_audit import AuditEmitter, stage_event
from access_audit.outbox import Outbox, count_pending


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Engine]:
    """The outbox table's own bind, an SQLite file with the outbox tables."""
    other = sqlite_engine(tmp_path / "elsewhere.db")
    yield other
    other.dispose()


def changes_on(engine: Engine, elsewhere: Engine) -> sessionmaker[Session]:
    """Sessions whose test tables are on *engine*, anything else (the outbox
    table among them) on *elsewhere*."""
    return sessionmaker(
        bind=elsewhere, binds={table: engine for table in Base.metadata.sorted_tables}
    )


def relayed_changes_on(
    engine: Engine, elsewhere: Engine, outbox: Outbox
) -> sessionmaker[Session]:
    """:func:`changes_on`'s sessions, attached to a :func:`relaying_emitter`."""
    maker = changes_on(engine, elsewhere)
    relaying_emitter(outbox, Sink()).attach(maker)
    return maker


def inline_changes_on(
    engine: Engine, elsewhere: Engine, outbox: Outbox, sink: Sink
) -> tuple[AuditEmitter, sessionmaker[Session]]:
    """:func:`changes_on`'s sessions, attached to an emitter that delivers
    to *sink* right after COMMIT (and records it)."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    emitter.register(sink, name="sink")
    maker = changes_on(engine, elsewhere)
    emitter.attach(maker)
    return emitter, maker


def relaying_emitter(outbox: Outbox, sink: Sink) -> AuditEmitter:
    """An emitter that leaves every event to the relay (the rows stay)."""
    outbox.relay_after = timedelta(0)
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="relay")
    emitter.register(sink, name="sink")
    return emitter


def stage(session: Any, target_id: str) -> None:
    """Stage an event on *target_id* (the rows' ``aggregateid``)."""
    stage_event(
        session, "item_changed", target_type="item", target_id=target_id,
        action="update",
    )  # fmt: skip


def sqlite_changes(
    tmp_path: Path, elsewhere: Engine, trigger: str = "", *, plain: bool = False
) -> tuple[Engine, Outbox]:
    """An SQLite database for the changes, with the test tables, the outbox
    tables (also in *elsewhere*) and the outbox *trigger*, if any; *plain*:
    with pysqlite's own transaction handling (SQLAlchemy's default)."""
    path = tmp_path / "changes.db"
    changes = create_engine(f"sqlite:///{path}") if plain else sqlite_engine(path)
    Base.metadata.create_all(changes)
    outbox = Outbox()
    for engine in (changes, elsewhere):
        outbox.create(engine)
    if trigger:
        with changes.begin() as connection:
            connection.exec_driver_sql(trigger)
    return changes, outbox


def aggregate_ids(engine: Engine, outbox: Outbox) -> list[str]:
    return [row["aggregateid"] for row in outbox_rows(engine, outbox)]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_rows_go_to_the_database_of_the_changes_and_fail_with_its_commit(
    engine: Engine, outbox: Outbox, elsewhere: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes in one database, the outbox table's bind another: the rows
    commit with the changes, and a failed COMMIT of the changes leaves no
    row anywhere for a relay to send."""
    outbox.create(elsewhere)
    sink = Sink()
    emitter = relaying_emitter(outbox, sink)
    maker = changes_on(engine, elsewhere)
    emitter.attach(maker)
    with maker() as session:
        operation(session, "kept")
        session.commit()
        for attempt in range(3):
            operation(session, f"doomed-{attempt}")
            session.flush()
            make_commit_fail(session, engine)
            with pytest.raises(DatabaseError):
                session.commit()
            session.rollback()
    assert aggregate_ids(engine, outbox) == ["kept"]
    assert aggregate_ids(elsewhere, outbox) == []
    assert emitter.relay(elsewhere).delivered == 0
    assert emitter.relay(engine).delivered == 1
    assert sink.names == ["kept"]
    assert warnings_of(caplog) == []
    outbox.drop(elsewhere)


def test_the_record_after_commit_goes_to_the_database_of_the_rows(
    engine: Engine, outbox: Outbox, elsewhere: Engine
) -> None:
    """Inline dispatch: the delivery state of rows written with the changes
    is recorded there (a plugin that failed leaves its row pending there),
    and the relay of that database delivers it."""
    outbox.create(elsewhere)
    sink = Sink(failing=True)
    outbox.relay_after = timedelta(0)
    emitter, maker = inline_changes_on(engine, elsewhere, outbox, sink)
    with maker() as session:
        operation(session, "a")
        session.commit()
    assert emitter.flush(timeout=10)
    assert [row["states"] for row in outbox_rows(engine, outbox)] == [
        {"sink": "pending"}
    ]
    assert count_pending(elsewhere, outbox) == 0
    sink.failing = False
    assert emitter.relay(engine, backoff=0).delivered == 1
    assert sink.names == ["a"]
    assert outbox_rows(engine, outbox) == []
    outbox.drop(elsewhere)


@pytest.mark.parametrize(
    "how", ["orm_update", "core_insert", "text_update", "commented_text"]
)
def test_changes_made_with_session_execute_count_as_the_transactions(
    engine: Engine, outbox: Outbox, elsewhere: Engine, how: str
) -> None:
    """A change made by a statement through ``Session.execute`` (no flush
    involved) puts the rows in its database too; the statement runs once,
    and its result is the caller's."""
    outbox.create(elsewhere)
    with Session(engine) as seeding:
        seeding.add(Item(name="seed"))
        seeding.commit()
    maker = relayed_changes_on(engine, elsewhere, outbox)
    with maker() as session:
        if how == "orm_update":
            result = session.execute(
                update(Item).where(Item.name == "seed").values(name="renamed")
            )
        elif how == "core_insert":  # twice would break the name's uniqueness
            result = session.execute(insert(Item.__table__).values(name="core"))
        else:
            comment = (
                "/* app: rename */\n-- and a line\n" if how != "text_update" else ""
            )
            result = session.execute(
                text(f"  {comment}UPDATE audit_test_item SET name = 'renamed'"),
                bind_arguments={"bind": engine},
            )
        if how != "core_insert":  # psycopg's insertmanyvalues reports -1
            assert result.rowcount == 1  # type: ignore[attr-defined]
        stage(session, how)
        session.commit()
    assert aggregate_ids(engine, outbox) == [how]
    assert aggregate_ids(elsewhere, outbox) == []
    outbox.drop(elsewhere)


def read_only_replica(tmp_path: Path, outbox: Outbox) -> Engine:
    """A read-only SQLite database with the test tables, one Item ("seed")
    and the outbox tables: a read replica of a primary that has them."""
    path = tmp_path / "replica.db"
    copy = sqlite_engine(path)
    Base.metadata.create_all(copy)
    outbox.create(copy)
    with Session(copy) as seeding:
        seeding.add(Item(name="seed"))
        seeding.commit()
    copy.dispose()
    replica = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")

    @event.listens_for(replica, "connect")
    def _connect(dbapi_connection: Any, record: object) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's SAVEPOINT recipe

    @event.listens_for(replica, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return replica


def test_a_replica_that_was_only_read_never_gets_the_rows(
    engine: Engine, outbox: Outbox, tmp_path: Path
) -> None:
    """A session that routes reads to a read-only replica (which has the
    outbox table, as a copy of the primary) and writes to the primary, the
    outbox table's bind: the rows go to the primary whether the transaction
    changed something there or only read the replica, and both commits go
    through."""
    with Session(engine) as seeding:
        seeding.add(Item(name="seed"))
        seeding.commit()
    replica = read_only_replica(tmp_path, outbox)
    table = outbox.table

    class Routed(Session):
        """Writes (and the outbox table) to the primary, reads to the replica."""

        def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
            clause = kw.get("clause")
            if self._flushing or isinstance(clause, UpdateBase) or clause is table:
                return engine
            return replica

    emitter = relaying_emitter(outbox, Sink())
    maker = sessionmaker(class_=Routed)
    emitter.attach(maker)
    with maker() as session:
        item = session.scalars(select(Item)).one()  # from the replica
        session.execute(text("SELECT 1"))  # read there too
        item.name = "renamed"
        stage(session, "renamed")
        session.commit()
        session.scalars(select(Item)).all()
        session.execute(text("WITH x AS (SELECT 1 AS n) SELECT n FROM x"))
        stage(session, "viewed")
        session.commit()
    assert aggregate_ids(engine, outbox) == ["renamed", "viewed"]
    with Session(engine) as check:
        assert check.scalars(select(Item.name)).all() == ["renamed"]
    replica.dispose()


def test_flushes_and_statements_that_wrote_nothing_leave_a_database_out(
    engine: Engine, outbox: Outbox, tmp_path: Path
) -> None:
    """Objects bound to a read-only replica that has the outbox tables: an
    attribute set to the value it had and an unchanged merge (flushed, with
    no statement), and an UPDATE that failed in a SAVEPOINT, wrote nothing
    there. The rows go to the outbox table's bind, and the commit goes
    through."""
    replica = read_only_replica(tmp_path, outbox)
    emitter = relaying_emitter(outbox, Sink())
    maker = sessionmaker(bind=engine, binds={Item: replica})
    emitter.attach(maker)
    with maker() as session:
        item = session.scalars(select(Item)).one()
        item.name = item.name
        session.merge(Item(id=item.id, name="seed"))
        session.flush()
        with pytest.raises(OperationalError), session.begin_nested():
            session.execute(update(Item).values(name="renamed"))
        stage(session, "seed")
        session.commit()
    assert aggregate_ids(engine, outbox) == ["seed"]
    replica.dispose()


def test_a_sharded_session_gets_its_rows_where_its_get_bind_says(
    tmp_path: Path,
) -> None:
    """A sharded session names a database only for an object or a shard id:
    plain, it is refused an outbox when attached (its commit would fail
    writing the rows). One whose ``get_bind`` names the outbox table's
    database commits, with a flush into two shards and a bulk UPDATE, which
    the session cannot name a database for again: where the changes went
    is unknown, so the rows go to the outbox table's database."""
    from sqlalchemy.ext.horizontal_shard import ShardedSession

    from access_audit import AuditConfigurationError

    shards = {name: sqlite_engine(tmp_path / f"{name}.db") for name in ("a", "b")}
    for shard in shards.values():
        Base.metadata.create_all(shard)
    outbox = Outbox()
    outbox.create(shards["a"])

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        return "a" if instance.name < "m" else "b"  # needs the object

    def every_shard(*args: Any, **kw: Any) -> list[str]:
        return ["a", "b"]

    class Sharded(ShardedSession):
        def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
            if kw.get("clause") is outbox.table:
                return shards["a"]
            return super().get_bind(mapper, **kw)

    options: dict[str, Any] = {
        "shards": shards,
        "shard_chooser": shard_chooser,
        "identity_chooser": every_shard,
        "execute_chooser": every_shard,
    }
    emitter = relaying_emitter(outbox, Sink())
    with pytest.raises(AuditConfigurationError, match="ShardedSession"):
        emitter.attach(sessionmaker(class_=ShardedSession, **options))
    maker = sessionmaker(class_=Sharded, **options)
    emitter.attach(maker)
    with maker() as session:
        session.add_all([Item(name="apple"), Item(name="zebra")])
        session.flush()
        session.execute(update(Item).values(name=Item.name + "s"))
        stage(session, "apple")
        session.commit()
    assert [stored_names(shards[name]) for name in "ab"] == [["apples"], ["zebras"]]
    assert aggregate_ids(shards["a"], outbox) == ["apple"]
    for shard in shards.values():
        shard.dispose()


def test_a_table_dropped_since_the_last_commit_does_not_fail_the_next(
    engine: Engine, outbox: Outbox, elsewhere: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The outbox tables of the changes' database dropped between two
    commits, through another engine (a test suite's fixture, a migration):
    the next commit goes through, its rows in the outbox table's bind."""
    outbox.create(elsewhere)
    maker = relayed_changes_on(engine, elsewhere, outbox)
    with maker() as session:
        operation(session, "a")
        session.commit()
        other = create_engine(engine.url)
        outbox.drop(other)
        other.dispose()
        operation(session, "b")
        session.commit()
    assert aggregate_ids(elsewhere, outbox) == ["b"]
    assert stored_names(engine) == ["a", "b"]
    (warning,) = warnings_of(caplog)
    assert "apart from the changes" in warning
    outbox.drop(elsewhere)
    outbox.create(engine)  # for the fixture's teardown


def test_rows_of_a_transaction_that_only_read_elsewhere_go_to_the_outbox_bind(
    engine: Engine, outbox: Outbox, elsewhere: Engine
) -> None:
    """A transaction whose one connection is to another database, which it
    only read (no outbox table there): its rows go to the outbox table's
    bind, and the commit and the event go through."""
    Base.metadata.create_all(elsewhere)
    emitter = relaying_emitter(outbox, Sink())
    maker = sessionmaker(bind=engine, binds={Item: elsewhere})
    emitter.attach(maker)
    with maker() as session:
        session.scalars(select(Item)).all()  # a read on the other database
        stage(session, "r1")
        session.commit()
    assert aggregate_ids(engine, outbox) == ["r1"]
    Base.metadata.drop_all(elsewhere)


def test_changes_in_a_database_without_the_outbox_table_warn_once(
    engine: Engine, outbox: Outbox, elsewhere: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """No outbox table where the changes are: the rows go to the table's
    bind, as before (never a refused commit), and a warning says once that
    they commit apart and how to put them with the changes."""
    outbox.drop(engine)
    outbox.create(elsewhere)
    maker = relayed_changes_on(engine, elsewhere, outbox)
    with maker() as session:
        for name in ("a", "b"):
            operation(session, name)
            session.commit()
    assert aggregate_ids(elsewhere, outbox) == ["a", "b"]
    (warning,) = warnings_of(caplog)
    assert "apart from the changes" in warning
    assert "--create-table" in warning
    assert engine.dialect.name in warning
    outbox.drop(elsewhere)
    outbox.create(engine)  # for the fixture's teardown


def test_changes_in_several_databases_go_to_the_table_bind_with_a_warning(
    engine: Engine, outbox: Outbox, elsewhere: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes in two databases: no one database commits with all of them,
    so the rows go to the table's bind, and a warning says so once."""
    outbox.create(elsewhere)
    with elsewhere.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (body TEXT)")
    maker = relayed_changes_on(engine, elsewhere, outbox)
    with maker() as session:
        for name in ("a", "b"):
            operation(session, name)
            session.execute(text("INSERT INTO notes VALUES ('x')"))
            session.commit()
    assert aggregate_ids(elsewhere, outbox) == ["a", "b"]
    assert aggregate_ids(engine, outbox) == []
    (warning,) = warnings_of(caplog)
    assert "several databases" in warning
    assert "twophase=True" in warning
    outbox.drop(elsewhere)


def test_an_async_session_puts_the_rows_with_its_changes(tmp_path: Path) -> None:
    """``AsyncSession(binds=...)``: the same placement, through the session
    it drives."""
    import asyncio

    changes = aiosqlite_engine(tmp_path / "changes.db")
    table_bind = aiosqlite_engine(tmp_path / "outbox.db")
    outbox = Outbox()
    emitter = relaying_emitter(outbox, Sink())

    async def main() -> None:
        async with changes.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        for engine in (changes, table_bind):
            async with engine.begin() as connection:
                await connection.run_sync(outbox.create)
        maker = async_sessionmaker(
            bind=table_bind, binds={Item: changes}, class_=AsyncSession
        )
        emitter.attach(maker)
        async with maker() as session:
            session.add(Item(name="a"))
            stage(session, "a")
            await session.commit()
        await changes.dispose()
        await table_bind.dispose()

    asyncio.run(main())
    for name, expected in (("changes.db", ["a"]), ("outbox.db", [])):
        reader = sqlite_engine(tmp_path / name)
        assert aggregate_ids(reader, outbox) == expected
        reader.dispose()


def test_statements_are_noted_only_where_sessions_may_span_databases(
    engine: Engine, outbox: Outbox, elsewhere: Engine, tmp_path: Path
) -> None:
    """SQLAlchemy prepares every ORM statement for a ``do_orm_execute``
    listener, so an outbox emitter installs its write listeners only where
    sessions may work in several databases: binds given, a session class
    with its own ``get_bind``, a Flask app with ``SQLALCHEMY_BINDS``."""
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from access_audit.flask import AccessAudit

    class Routing(Session):
        def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
            return engine

    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    one = sessionmaker(engine)
    several = [changes_on(engine, elsewhere), sessionmaker(class_=Routing)]
    for maker in [one, *several]:
        emitter.attach(maker)
    assert not one().dispatch.do_orm_execute
    assert not one().dispatch.after_flush
    assert all(maker().dispatch.do_orm_execute for maker in several)
    assert all(maker().dispatch.after_flush for maker in several)
    instance = Session(binds={Item: engine})
    emitter.attach(instance)
    assert instance.dispatch.do_orm_execute
    for binds in ({}, {"other": f"sqlite:///{tmp_path / 'other.db'}"}):
        app = Flask("binds" if binds else "plain")
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'app.db'}"
        app.config["SQLALCHEMY_BINDS"] = binds
        app.config["ACCESS_AUDIT_LOAD_ENTRYPOINTS"] = False
        db = SQLAlchemy(app)
        AccessAudit(app, db, outbox=Outbox(db.metadata))
        with app.app_context():
            assert bool(db.session().dispatch.do_orm_execute) == bool(binds)


REFUSE_INSERTS = {
    "sqlite": [
        "CREATE TRIGGER refuse_outbox BEFORE INSERT ON access_audit_outbox "
        "BEGIN SELECT RAISE(ABORT, 'read-only'); END"
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION refuse_outbox() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'read-only' USING DETAIL = 's3cr3t'; END $$ "
        "LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_outbox BEFORE INSERT ON access_audit_outbox "
        "FOR EACH ROW EXECUTE FUNCTION refuse_outbox()",
    ],
    "mysql": [
        "CREATE TRIGGER refuse_outbox BEFORE INSERT ON access_audit_outbox "
        "FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'read-only'"
    ],
}
"""A trigger that refuses every row of the outbox table, on each database
(as a read-only replica that took a temporary table's rows would)."""


def test_rows_the_database_of_the_changes_refuses_go_to_the_table_bind(
    engine: Engine, outbox: Outbox, elsewhere: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The database of the changes has the outbox tables but refuses the
    rows: the commit goes through, its rows in the outbox table's bind, and
    a warning says so once, in the database's first line (PostgreSQL's
    DETAIL may list the row's values)."""
    outbox.create(elsewhere)
    with engine.begin() as connection:
        for statement in REFUSE_INSERTS[engine.dialect.name]:
            connection.exec_driver_sql(statement)
    maker = relayed_changes_on(engine, elsewhere, outbox)
    with maker() as session:
        for name in ("a", "b"):
            operation(session, name, payload={"secret": "s3cr3t"})
            session.commit()
    assert stored_names(engine) == ["a", "b"]
    assert aggregate_ids(elsewhere, outbox) == ["a", "b"]
    (warning,) = warnings_of(caplog)
    assert "refused them" in warning and "read-only" in warning
    assert "s3cr3t" not in warning
    outbox.drop(elsewhere)
    if engine.dialect.name == "postgresql":  # the function outlives the table
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP FUNCTION refuse_outbox() CASCADE")


def test_a_routing_get_bind_of_mapper_and_clause_only_still_executes(
    engine: Engine, outbox: Outbox, elsewhere: Engine
) -> None:
    """SQLAlchemy's routing recipe declares ``get_bind(mapper, clause)``
    only, where SQLAlchemy passes a keyword of its own to a statement run
    again from a ``do_orm_execute`` listener: a bulk UPDATE runs once, as
    without the emitter, and the rows go to its database."""
    outbox.create(elsewhere)
    with Session(engine) as seeding:
        seeding.add(Item(name="seed"))
        seeding.commit()
    tables = set(Base.metadata.tables.values())

    class Vertical(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None) -> Any:  # type: ignore[override]
            if mapper is not None and mapper.local_table in tables:
                return engine
            if clause is not None and getattr(clause, "table", None) in tables:
                return engine
            return elsewhere

    maker = sessionmaker(class_=Vertical)
    relaying_emitter(outbox, Sink()).attach(maker)
    with maker() as session:
        result = session.execute(update(Item).values(name="renamed"))
        assert result.rowcount == 1  # type: ignore[attr-defined]
        stage(session, "renamed")
        session.commit()
    assert stored_names(engine) == ["renamed"]
    assert aggregate_ids(engine, outbox) == ["renamed"]
    outbox.drop(elsewhere)


def test_the_table_is_looked_for_in_the_schema_the_connection_translates_to(
    tmp_path: Path, elsewhere: Engine
) -> None:
    """Changes through an engine whose ``schema_translate_map`` sends them
    to another schema (an attached SQLite database here), which has the
    outbox tables where the untranslated one has none: the rows go there."""
    plain = sqlite_engine(tmp_path / "main.db")

    @event.listens_for(plain, "connect")
    def _attach(dbapi_connection: Any, record: object) -> None:
        dbapi_connection.execute(
            f"ATTACH DATABASE '{tmp_path / 'tenant.db'}' AS tenant"
        )

    tenant = plain.execution_options(schema_translate_map={None: "tenant"})
    outbox = Outbox()
    Base.metadata.create_all(tenant)
    outbox.create(tenant)
    outbox.create(elsewhere)
    maker = relayed_changes_on(tenant, elsewhere, outbox)  # type: ignore[arg-type]
    with maker() as session:
        operation(session, "a")
        session.commit()
    assert aggregate_ids(tenant, outbox) == ["a"]  # type: ignore[arg-type]
    assert aggregate_ids(elsewhere, outbox) == []
    plain.dispose()


@pytest.mark.parametrize(
    ("sql", "writes"),
    [
        ("  UPDATE t SET x = 1", True),
        ("/* app: rename */\n-- and a line\n( insert into t values (1))", True),
        ("replace into t values (1)", True),
        ("\ufeff# a MariaDB comment\r\nDELETE FROM t", True),
        ("INSERT_LOG()", False),
        ("SELECT 1", False),
        ("WITH a AS (SELECT 1) UPDATE t SET x = 1", False),
        ("/* never closed UPDATE", False),
        ("-- UPDATE", False),
        ("\n" + " " * 100_000 + ";UPDATE t SET x = 1", False),
        ("", False),
    ],
)
def test_text_that_writes_is_told_by_its_first_word(sql: str, writes: bool) -> None:
    """Text counts as a write when its first word, after space,
    parentheses and comments, is a writing keyword (a ``WITH`` may only
    read). Read in one pass: however long the space before a word that is
    not one."""
    from access_audit._written import _writes

    assert _writes(text(sql)) is writes


def test_a_database_that_ended_the_transaction_fails_the_commit(
    tmp_path: Path, elsewhere: Engine
) -> None:
    """The changes' database rolls the whole transaction back while taking
    the rows (SQLite's full disk or busy database, a deadlock's victim
    elsewhere): the SAVEPOINT went with it, so nothing is placed elsewhere;
    the commit fails, and no row anywhere tells of the lost change."""
    changes, outbox = sqlite_changes(
        tmp_path,
        elsewhere,
        "CREATE TRIGGER end_it BEFORE INSERT ON access_audit_outbox "
        "BEGIN SELECT RAISE(ROLLBACK, 'rolled back'); END",
    )
    maker = relayed_changes_on(changes, elsewhere, outbox)
    with maker() as session:
        operation(session, "lost")
        with pytest.raises(DatabaseError):
            session.commit()
        session.rollback()
    assert stored_names(changes) == []
    assert aggregate_ids(changes, outbox) == aggregate_ids(elsewhere, outbox) == []
    changes.dispose()


def test_a_write_that_never_began_on_pysqlite_leaves_the_database_out(
    tmp_path: Path, elsewhere: Engine
) -> None:
    """pysqlite's own transaction handling (SQLAlchemy's default) begins
    only before a write that runs: a routing session's write that failed
    (noted before it ran) began nothing there, so the rows go to the
    outbox table's bind, not into a SAVEPOINT that would be the outermost
    (its RELEASE a COMMIT of the rows alone)."""
    changes, outbox = sqlite_changes(tmp_path, elsewhere, plain=True)

    class Vertical(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None) -> Any:  # type: ignore[override]
            return changes if isinstance(clause, TextClause) else elsewhere

    maker = sessionmaker(class_=Vertical)
    relaying_emitter(outbox, Sink()).attach(maker)
    with maker() as session:
        with pytest.raises(DatabaseError):
            session.execute(text("UPDATE no_such_table SET x = 1"))
        stage(session, "viewed")
        session.commit()
    assert aggregate_ids(changes, outbox) == []
    assert aggregate_ids(elsewhere, outbox) == ["viewed"]
    changes.dispose()


def test_a_later_batch_refused_fails_the_commit_rather_than_split_it(
    tmp_path: Path, elsewhere: Engine
) -> None:
    """A commit whose first rows went to the changes' database and whose
    later one (an application's ``before_commit`` hook staged it) is
    refused there: a commit's rows are never split between two databases
    (the record after COMMIT goes to one, and the other's would be
    delivered again), so the commit fails and nothing is delivered."""
    changes, outbox = sqlite_changes(
        tmp_path,
        elsewhere,
        "CREATE TRIGGER refuse_b BEFORE INSERT ON access_audit_outbox "
        "WHEN NEW.aggregateid = 'b' BEGIN SELECT RAISE(ABORT, 'no b'); END",
    )
    sink = Sink()
    emitter, maker = inline_changes_on(changes, elsewhere, outbox, sink)
    with maker() as session:
        operation(session, "a")

        @event.listens_for(session, "before_commit")
        def stage_late(session: Session) -> None:
            if not session.info.get("late"):
                session.info["late"] = True
                stage(session, "b")

        with pytest.raises(DatabaseError):
            session.commit()
        session.rollback()
    assert emitter.flush(timeout=10)
    assert sink.names == []
    assert aggregate_ids(changes, outbox) == aggregate_ids(elsewhere, outbox) == []
    changes.dispose()


@pytest.mark.parametrize("outer_ends", ["rollback", "commit"])
def test_a_joined_session_keeps_its_rows_in_the_outer_transaction(
    engine: Engine,
    outbox: Outbox,
    elsewhere: Engine,
    caplog: pytest.LogCaptureFixture,
    outer_ends: str,
) -> None:
    """A session joined to its caller's transaction (on the outbox table's
    database) that changed another database, which has the outbox tables:
    its events wait for the caller's transaction, so its rows stay there.
    Rolled back, they are discarded with reason "rollback" and no row is
    left anywhere to deliver them; committed, the rows are there, and a
    warning says they are apart from the change."""
    from access_audit import signals

    outbox.create(elsewhere)
    discarded: list[str] = []

    def on_discarded(sender: object, event: Any, reason: str) -> None:
        discarded.append(reason)

    signals.audit_event_discarded.connect(on_discarded)
    emitter = relaying_emitter(outbox, Sink())
    tables = {table: engine for table in Base.metadata.sorted_tables}
    try:
        with elsewhere.connect() as connection:
            outer = connection.begin()
            session = Session(bind=connection, binds=tables)
            emitter.attach(session)
            operation(session, "a")
            session.commit()
            session.close()
            getattr(outer, outer_ends)()
    finally:
        signals.audit_event_discarded.disconnect(on_discarded)
    assert aggregate_ids(engine, outbox) == []
    if outer_ends == "rollback":
        assert discarded == ["rollback"]
        assert aggregate_ids(elsewhere, outbox) == []
    else:
        assert discarded == []
        assert aggregate_ids(elsewhere, outbox) == ["a"]
        (warning,) = warnings_of(caplog)
        assert "joined to an outer transaction" in warning
    outbox.drop(elsewhere)
