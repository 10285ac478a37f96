"""An event ``stage_event`` accepted never makes the commit fail in outbox mode.

Each value the outbox cannot store is refused at stage time, naming the
field, and everything else is stored whole, on SQLite, PostgreSQL and
MariaDB (the ``engine`` fixture): long target ids (lazy ones included),
non-ASCII text of any plane, payloads up to the outbox's limit counted as
they are stored. Rows are read with ``dispatch="relay"``, which leaves them
in the outbox for the relay.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session
from support import Base, Recorder, operation, outbox_rows, stored_names

from access_audit import AuditEmitter, AuditEventEnvelope, stage_event
from access_audit.outbox import Outbox


def keeping_emitter(outbox: Outbox, **options: Any) -> AuditEmitter:
    """An emitter that only writes the outbox, for one plugin named "sink"."""
    emitter = AuditEmitter(
        load_entrypoints=False, outbox=outbox, dispatch="relay", **options
    )

    class Sink:
        from access_audit import hookimpl

        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            pass

    emitter.register(Sink(), name="sink")
    return emitter


def commit_event(
    engine: Engine, emitter: AuditEmitter, name: str = "kept", **fields: Any
) -> None:
    """Commit an item *name* (its ``item_created`` event) and one
    ``item.tagged`` event staged with *fields*."""
    with Session(engine) as session:
        emitter.attach(session)
        operation(session, name)
        stage_event(
            session,
            "item.tagged",
            target_type="item",
            target_id=fields.pop("target_id", name),
            action="tag",
            **fields,
        )
        session.commit()


def stored_envelope(engine: Engine, outbox: Outbox) -> AuditEventEnvelope:
    [row] = [r for r in outbox_rows(engine, outbox) if r["type"] == "item.tagged"]
    envelope = AuditEventEnvelope.from_dict(json.loads(row["payload"]))
    assert row["aggregateid"] == envelope.target_id
    return envelope


def refused_at_stage_time(
    engine: Engine, emitter: AuditEmitter, match: str, **fields: Any
) -> None:
    """Stage an ``item.tagged`` event with *fields* beside an audited item:
    ``stage_event`` raises ValueError matching *match*; the item commits."""
    with Session(engine) as session:
        emitter.attach(session)
        operation(session, "kept")
        with pytest.raises(ValueError, match=match):
            stage_event(
                session, "item.tagged", target_type="item", action="tag",
                **{"target_id": "kept", **fields},
            )  # fmt: skip
        session.commit()


def types(engine: Engine, outbox: Outbox) -> list[str]:
    """The event types of the outbox rows, in commit order."""
    return [row["type"] for row in outbox_rows(engine, outbox)]


def test_relay_after_that_is_not_a_timedelta_is_refused_naming_it() -> None:
    """``relay_after=60`` (seconds, as the CLI's ``--relay-after`` takes):
    a TypeError that says what to pass, not a failed comparison."""
    with pytest.raises(TypeError, match=r"relay_after must be a timedelta"):
        Outbox(relay_after=60)  # type: ignore[arg-type]


def test_a_plugin_name_longer_than_the_outbox_stores_is_refused_at_register() -> None:
    """The delivery table stores plugin names of up to 255 characters: a
    longer one is refused when registered, naming the limit (registered,
    its deliveries could never be recorded nor given up on, and were sent
    again on every relay run)."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=Outbox())
    with pytest.raises(ValueError, match="the outbox stores names of up to 255"):
        emitter.register(Recorder(), name="n" * 256)
    assert emitter.register(Recorder(), name="n" * 255) == "n" * 255
    plain = AuditEmitter(load_entrypoints=False)  # no outbox: no limit
    assert plain.register(Recorder(), name="n" * 300) == "n" * 300


@pytest.mark.parametrize("store", [None, Outbox()], ids=["plain", "outbox"])
@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "must not be empty"),
        ("siem\x00", "NUL"),
        ("siem\ud800", "lone surrogate"),
        (7, "must be a str"),
    ],
    ids=["empty", "nul", "lone-surrogate", "not-a-str"],
)
def test_a_plugin_name_no_database_stores_is_refused_at_register(
    store: Outbox | None, name: Any, error: str
) -> None:
    """A plugin name is its key in the outbox's delivery table and in logs:
    an empty one was registered as the plugin's ``id()`` (another in every
    process, so a relay elsewhere never delivered its rows), and a NUL or a
    lone surrogate made every relay run raise once the plugin failed."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=store)
    plugin = Recorder()
    with pytest.raises((ValueError, TypeError), match=error):
        emitter.register(plugin, name=name)
    assert not emitter.plugin_manager.is_registered(plugin)


@pytest.mark.parametrize("length", [256, 100_000])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_a_long_target_id_is_stored_whole(
    engine: Engine, outbox: Outbox, length: int, lazy: bool
) -> None:
    """Target ids longer than any VARCHAR, lazy ones too, are stored whole."""
    target_id = "x" * (length - 3) + "end"
    value: str | Callable[[], str] = (lambda: target_id) if lazy else target_id
    commit_event(engine, keeping_emitter(outbox), target_id=value)
    assert stored_envelope(engine, outbox).target_id == target_id
    assert stored_names(engine) == ["kept"]


def test_text_of_every_plane_is_stored_as_sent(engine: Engine, outbox: Outbox) -> None:
    """CJK, emoji (four UTF-8 bytes) and an escaped NUL in payload text round-trip."""
    fields = {
        "target_id": "群組-🔐",
        "target_name": "管理者 🛡️",
        "reason": "line\nbreak and a NUL \x00 in free text",
        "payload": {"名前": "値" * 10, "emoji": "😀", "nul": "a\x00b"},
    }
    commit_event(engine, keeping_emitter(outbox), **dict(fields))
    envelope = stored_envelope(engine, outbox)
    assert envelope.target_id == fields["target_id"]
    assert envelope.target_name == fields["target_name"]
    assert envelope.reason == fields["reason"]
    assert envelope.payload == fields["payload"]


def test_a_payload_under_max_payload_bytes_is_stored_whatever_its_script(
    engine: Engine, outbox: Outbox
) -> None:
    """max_payload_bytes counts the payload as stored: 45 KB of CJK under a
    60,000-byte limit commits (MariaDB's TEXT and \\u escapes once broke it)."""
    payload = {"text": "漢" * 15_000}  # 45,000 bytes of UTF-8
    commit_event(
        engine, keeping_emitter(outbox, max_payload_bytes=60_000), payload=payload
    )
    assert stored_envelope(engine, outbox).payload == payload


def test_a_payload_just_under_the_outbox_limit_is_stored(
    engine: Engine, outbox: Outbox
) -> None:
    """The default limit (1 MiB as stored) is within every database's reach."""
    payload = {"blob": "b" * (outbox.max_payload_bytes - 20)}
    commit_event(engine, keeping_emitter(outbox), payload=payload)
    assert stored_envelope(engine, outbox).payload == payload


def test_a_row_with_every_field_at_the_limit_in_quotes_is_stored(
    engine: Engine, outbox: Outbox
) -> None:
    """The worst row the default limit lets through: every field just under
    it, each character one the driver escapes (pymysql doubles a quote, so
    the statement is twice the row). At 1 MiB a field that went over
    MariaDB's default 16 MiB ``max_allowed_packet`` and failed the commit."""
    quotes = "'" * (outbox.max_payload_bytes - 20)
    texts = {field: quotes for field in ("target_name", "reason", "actor_id")}
    commit_event(
        engine, keeping_emitter(outbox), target_id=quotes, actor_email=quotes,
        payload={"q": quotes}, metadata={"q": quotes}, **texts,
    )  # fmt: skip
    envelope = stored_envelope(engine, outbox)
    assert (envelope.target_id, envelope.reason, envelope.payload["q"]) == (
        quotes, quotes, quotes
    )  # fmt: skip


def test_a_row_for_many_plugins_with_long_names_is_stored(
    engine: Engine, outbox: Outbox
) -> None:
    """Each row lists the plugins it was written for: forty names of 255
    emoji, which register() takes, are 120 KB of JSON, over the 64 KiB
    ``TEXT`` MariaDB gave that column, and failed the commit."""
    emitter = keeping_emitter(outbox)
    names = [f"{n:02}" + "\N{GRINNING FACE}" * 253 for n in range(40)]
    for name in names:
        emitter.register(Recorder(), name=name)
    commit_event(engine, emitter)
    with engine.connect() as connection:
        stored = connection.scalars(select(outbox.table.c.recipients)).first()
    assert stored is not None and set(json.loads(stored)) == {"sink", *names}


@pytest.mark.parametrize("own_limit", [None, 10_000_000], ids=["no-own", "higher-own"])
def test_a_payload_over_the_outbox_limit_is_refused_at_stage_time(
    engine: Engine, own_limit: int | None
) -> None:
    """The outbox's limit applies at stage time, even under a higher emitter
    limit; the refused event leaves the rest of the transaction to commit."""
    outbox = Outbox(max_payload_bytes=1_000)
    outbox.drop(engine)
    outbox.create(engine)
    try:
        emitter = keeping_emitter(outbox, max_payload_bytes=own_limit)
        refused_at_stage_time(
            engine, emitter, r"payload is \d+ bytes.*1000", payload={"blob": "é" * 600}
        )
        assert types(engine, outbox) == ["item_created"]
        assert stored_names(engine) == ["kept"]
    finally:
        outbox.drop(engine)


FIELDS = [
    *[(field, False) for field in ("target_id", "target_name", "reason")],
    *[(field, False) for field in ("actor_id", "metadata")],
    ("target_id", True),
    ("target_name", True),
]


@pytest.mark.parametrize(
    ("field", "lazy"),
    FIELDS,
    ids=[f"{field}-{'lazy' if lazy else 'eager'}" for field, lazy in FIELDS],
)
def test_every_other_field_over_the_outbox_limit_is_refused_before_commit(
    engine: Engine, field: str, lazy: bool
) -> None:
    """A row holds the target id twice, and the target name, reason, actor
    and metadata once each, besides the payload: each is bounded by the
    outbox's limit too, so the row fits one statement. Over it: refused at
    stage time, naming the field (a lazy value, as the commit resolves it:
    before COMMIT, as any bad lazy value). At the limit: stored."""
    limit = 1_000
    outbox = Outbox(max_payload_bytes=limit)
    outbox.drop(engine)
    outbox.create(engine)

    def fields(text: str) -> dict[str, Any]:
        value: Any = {"note": text} if field == "metadata" else text
        if field == "actor_id":
            return {"actor_id": value, "actor_email": "a@example.com"}
        return {field: (lambda: value) if lazy else value}

    try:
        emitter = keeping_emitter(outbox)
        too_long = "é" * (limit // 2 + 1)  # two bytes each as UTF-8
        if lazy:
            with pytest.raises(ValueError, match=rf"{field} is \d+ bytes.*1000"):
                commit_event(engine, emitter, **fields(too_long))
            assert types(engine, outbox) == []
        else:
            refused_at_stage_time(
                engine, emitter, rf"{field} is \d+ bytes.*1000", **fields(too_long)
            )
            assert types(engine, outbox) == ["item_created"]
        fitting = "é" * (limit // 2 - 8)  # with its quotes and key, under
        commit_event(engine, emitter, name="fits", **fields(fitting))
        assert "item.tagged" in types(engine, outbox)
    finally:
        outbox.drop(engine)


@pytest.mark.parametrize(
    "field", ["target_id", "target_name", "reason", "actor_id", "actor_email"]
)
def test_a_field_over_the_outbox_limit_by_its_quotes_is_refused(
    engine: Engine, field: str
) -> None:
    """Control characters take six bytes each as JSON, and the quotes two
    more: 100 of them are 602 bytes, over a limit of 600."""
    outbox = Outbox(max_payload_bytes=600)
    outbox.drop(engine)
    outbox.create(engine)
    fields: dict[str, Any] = {field: "\x01" * 100}
    if field == "actor_email":
        fields["actor_id"] = "a"
    try:
        refused_at_stage_time(
            engine, keeping_emitter(outbox), rf"{field} is 602 bytes.*600", **fields
        )
        assert types(engine, outbox) == ["item_created"]
    finally:
        outbox.drop(engine)


def test_a_lazy_value_does_not_defer_the_other_fields_checks(engine: Engine) -> None:
    """With a lazy target id, an oversized reason is still refused at stage
    time: only the lazy value waits for the commit to be checked."""
    outbox = Outbox(max_payload_bytes=1_000)
    outbox.drop(engine)
    outbox.create(engine)
    try:
        refused_at_stage_time(
            engine, keeping_emitter(outbox), r"reason is \d+ bytes.*1000",
            target_id=lambda: "kept", reason="r" * 2_000,
        )  # fmt: skip
        assert types(engine, outbox) == ["item_created"]
    finally:
        outbox.drop(engine)


def test_a_nul_in_a_target_id_is_refused_at_stage_time(
    engine: Engine, outbox: Outbox
) -> None:
    """PostgreSQL cannot store a NUL in text: staging refuses it, naming the field."""
    emitter = keeping_emitter(outbox)
    with Session(engine) as session:
        emitter.attach(session)
        operation(session, "kept")
        with pytest.raises(ValueError, match="target_id holds a NUL"):
            stage_event(
                session, "item.tagged", target_type="item", target_id="a\x00b",
                action="tag",
            )  # fmt: skip
        session.commit()
    assert types(engine, outbox) == ["item_created"]
    assert stored_names(engine) == ["kept"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1000"])
def test_an_outbox_limit_that_is_not_a_positive_int_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="max_payload_bytes"):
        Outbox(max_payload_bytes=bad)  # type: ignore[arg-type]


@pytest.fixture
def tenant(engine: Engine, tmp_path: Path) -> Iterator[str]:
    """The name of a schema made for the test on *engine* (an attached file
    on SQLite, a database on MariaDB)."""
    name = f"tenant_{uuid.uuid4().hex[:8]}"
    if engine.dialect.name == "sqlite":
        path = str(tmp_path / "tenant.db").replace("'", "''")

        @event.listens_for(engine, "connect")
        def attach(dbapi_connection: Any, record: object) -> None:
            dbapi_connection.execute(f"ATTACH DATABASE '{path}' AS {name}")

        engine.dispose()  # connections made from now on attach it
        yield name
        engine.dispose()
        return
    kind = "SCHEMA" if engine.dialect.name == "postgresql" else "DATABASE"
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE {kind} {name}")
    try:
        yield name
    finally:
        engine.dispose()
        with engine.begin() as connection:
            drop = f"DROP {kind} {name}"
            connection.exec_driver_sql(drop + (" CASCADE" if kind == "SCHEMA" else ""))


def test_rows_go_to_the_schema_the_connection_translates_to(
    engine: Engine, tenant: str
) -> None:
    """An application choosing its schema per connection with
    ``schema_translate_map`` gets the outbox tables (and on PostgreSQL the
    NOTIFY trigger) in that schema, the rows there, where its relay reads
    them, and none in the default one; either outbox drops without the
    other."""
    tenant_engine = engine.execution_options(schema_translate_map={None: tenant})
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(tenant_engine)
    outbox.create(engine)
    Base.metadata.create_all(tenant_engine)
    try:
        writer = keeping_emitter(outbox)
        with Session(tenant_engine) as session:
            writer.attach(session)
            operation(session, "tenant-one")
            session.commit()
        assert outbox_rows(engine, outbox) == []
        assert [row["aggregateid"] for row in outbox_rows(tenant_engine, outbox)] == [
            "tenant-one"
        ]
        relay = keeping_emitter(outbox)
        assert relay.relay(tenant_engine).delivered == 1
        assert outbox_rows(tenant_engine, outbox) == []
        if engine.dialect.name == "postgresql":
            with engine.connect() as connection:
                triggers = connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal "
                    f"AND tgrelid = '{tenant}.access_audit_outbox'::regclass"
                ).scalar()
            assert triggers == 1
        Base.metadata.drop_all(tenant_engine)
        outbox.drop(tenant_engine)
        # The default schema's outbox (and on PostgreSQL its trigger's
        # function) is still there.
        with Session(engine) as session:
            writer.attach(session)
            operation(session, "default-one")
            session.commit()
        assert [row["aggregateid"] for row in outbox_rows(engine, outbox)] == [
            "default-one"
        ]
    finally:
        Base.metadata.drop_all(tenant_engine)
        outbox.drop(tenant_engine)
        outbox.drop(engine)


@pytest.mark.parametrize(
    "moment",
    [
        "0001-01-01T00:00:00+00:00",
        "2024-05-01T12:00:00+00:00",
        "2024-05-01T07:00:00.000001-05:00",
        "2024-12-31T23:30:00.5+02:00",
        "9999-12-31T23:59:59.999999+00:00",
    ],
)
def test_a_time_is_bound_on_sqlite_as_sqlalchemy_stores_it(moment: str) -> None:
    """The outbox's times, bound on SQLite in one step, are the very text
    SQLAlchemy's ``DATETIME`` stores for them in UTC (what the relay's
    comparisons and its reading of the rows expect)."""
    from datetime import datetime

    from sqlalchemy.dialects import sqlite
    from sqlalchemy.types import TypeDecorator

    from access_audit.outbox._table import UtcDateTime

    dialect = sqlite.dialect()
    utc_time = UtcDateTime().dialect_impl(dialect)
    both_steps = TypeDecorator.bind_processor(utc_time, dialect)
    one_step = utc_time.bind_processor(dialect)
    assert one_step is not None and both_steps is not None
    value = datetime.fromisoformat(moment)
    assert one_step(value) == both_steps(value)
    assert one_step(None) is None


@pytest.mark.parametrize(
    "dialect_name",
    ["sqlite", "sqlite-numeric", "postgresql+psycopg", "mariadb+pymysql"],
)
def test_a_row_goes_to_the_driver_as_its_columns_by_name_or_in_its_order(
    dialect_name: str,
) -> None:
    """The outbox's INSERT takes a row as the table's columns in order and
    hands each driver its parameters: by name, or in the order the
    statement binds them, each value processed as its column's type does."""
    from datetime import datetime, timezone

    from sqlalchemy.dialects import mysql, postgresql, sqlite

    dialects = {
        "sqlite": sqlite.dialect(),
        "sqlite-numeric": sqlite.dialect(paramstyle="numeric"),
        "postgresql+psycopg": postgresql.psycopg.dialect(),
        "mariadb+pymysql": mysql.pymysql.dialect(is_mariadb=True),
    }
    dialect = dialects[dialect_name]
    outbox = Outbox()
    prepared = outbox._insert_for(dialect)
    keys = list(outbox.table.columns.keys())
    moment = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=timezone.utc)
    row = [moment if key == "created_at" else f"{key}-value" for key in keys]
    parameters = prepared.parameters(row)
    by_name = (
        parameters
        if isinstance(parameters, dict)
        else dict(zip(prepared.columns, parameters, strict=True))
    )
    assert sorted(by_name) == sorted(keys)
    for key in keys:
        if key != "created_at":
            assert by_name[key] == f"{key}-value"
    created_at = outbox.table.c.created_at.type
    expected = created_at.dialect_impl(dialect).bind_processor(dialect)
    assert by_name["created_at"] == (expected(moment) if expected else moment)
