"""``changes(obj)``: column diffs as a lazy payload value (docs/changes-and-tracing.md).

What a transaction changed in an object's columns, over all its flushes, for
updated, inserted and deleted objects and across SAVEPOINTs, on SQLite,
PostgreSQL and MariaDB; the checks that do not depend on the database run
on SQLite only.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Enum,
    Float,
    ForeignKey,
    LargeBinary,
    Numeric,
    String,
    Uuid,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    deferred,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.orm import Session as OrmSession
from support import Recorder, aiosqlite_engine

from access_audit import AuditEmitter, changes, stage_event
from access_audit._sqla import flushed_in_transaction


class Status(enum.Enum):
    ACTIVE = "active"
    ARCHIVED = "archived"


class ChangesBase(DeclarativeBase):
    pass


class Group(ChangesBase):
    __tablename__ = "audit_test_changes_group"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(200))
    budget: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2))
    status: Mapped[Status] = mapped_column(
        Enum(Status, name="audit_test_changes_status"), default=Status.ACTIVE
    )
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    review_at: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime.datetime] = mapped_column(
        DateTime, server_default=func.now()
    )
    settings: Mapped[dict[str, Any] | None] = mapped_column(
        MutableDict.as_mutable(JSON)
    )
    notes: Mapped[str | None] = deferred(mapped_column(String(200)))
    secret: Mapped[bytes | None] = mapped_column(LargeBinary(64))
    score: Mapped[float | None] = mapped_column(Float)
    members: Mapped[list[Member]] = relationship(back_populates="group")


class Member(ChangesBase):
    __tablename__ = "audit_test_changes_member"

    id: Mapped[int] = mapped_column(primary_key=True)
    login: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("audit_test_changes_group.id")
    )
    group: Mapped[Group | None] = relationship(back_populates="members")


Group.name_length = column_property(func.length(Group.name))  # type: ignore[attr-defined]


def audited(engine: Engine, emitter: AuditEmitter) -> Iterator[sessionmaker]:
    """This module's tables on *engine*, and a sessionmaker *emitter* audits;
    both undone when the generator is resumed."""
    ChangesBase.metadata.drop_all(engine)
    ChangesBase.metadata.create_all(engine)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    yield maker
    emitter.detach(maker)
    ChangesBase.metadata.drop_all(engine)


@pytest.fixture
def Session(engine: Engine, emitter: AuditEmitter) -> Iterator[sessionmaker]:
    """On each database."""
    yield from audited(engine, emitter)


@pytest.fixture
def SqliteSession(
    sqlite_file_engine: Engine, emitter: AuditEmitter
) -> Iterator[sessionmaker]:
    """For checks that do not depend on the database."""
    yield from audited(sqlite_file_engine, emitter)


def stage_changes(session: OrmSession, obj: Any, **options: Any) -> None:
    stage_event(
        session,
        "group.updated",
        target_type=type(obj).__name__.lower(),
        target_id=lambda: obj.id,
        action="update",
        payload={"changes": changes(obj, **options)},
    )


def diff(recorder: Recorder) -> dict[str, Any]:
    """The last event's changes, as plain dicts and lists."""
    found = recorder.events[-1].payload["changes"]
    return {key: list(value) if isinstance(value, list) else value
            for key, value in found.items()}  # fmt: skip


def existing(Session: sessionmaker, **values: Any) -> tuple[OrmSession, Group]:
    """A session (``expire_on_commit=False``) holding a committed Group, in no
    transaction; only its server-generated ``created_at`` is not loaded."""
    session = Session(expire_on_commit=False)
    group = Group(name="admins", **values)
    session.add(group)
    session.commit()
    return session, group


# -- updated, over several flushes --------------------------------------------


def test_changes_over_several_flushes_are_first_old_to_last_new(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """The value before the transaction against the value after the final
    flush, whatever flushed in between; untouched attributes are not reported."""
    session, group = existing(Session, description="old")
    with session.begin():
        stage_changes(session, group)
        group.name = "ops"
        session.flush()
        group.description = "new"
        session.flush()
        group.name = "operators"
        group.status = Status.ARCHIVED
    assert diff(recorder) == {
        "name": ["admins", "operators"],
        "description": ["old", "new"],
        "status": ["active", "archived"],
    }
    session.close()


def test_an_attribute_changed_back_is_not_reported(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Changed, flushed, and set back to where it started: no change, even
    though the database saw two UPDATEs."""
    session, group = existing(Session, description="kept")
    with session.begin():
        stage_changes(session, group)
        group.name = "temporary"
        group.description = None
        session.flush()
        group.name = "admins"
        session.flush()
        group.description = "kept"
    assert diff(recorder) == {}
    session.close()


# -- inserted and deleted ---------------------------------------------------


def test_an_inserted_object_reports_none_to_each_value(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Staged before the INSERT: [None, value] for every column that is not
    NULL, database-generated ones (key, server default) included."""
    with Session(expire_on_commit=False) as session, session.begin():
        group = Group(name="admins", budget=decimal.Decimal("10.50"))
        session.add(group)
        stage_changes(session, group)
        session.flush()
        group.description = "set after the INSERT"
    found = diff(recorder)
    created = found.pop("created_at")
    assert created[0] is None and datetime.datetime.fromisoformat(created[1])
    assert found == {
        "id": [None, group.id],
        "name": [None, "admins"],
        "description": [None, "set after the INSERT"],
        "budget": [None, "10.50"],
        "status": [None, "active"],
    }


def test_an_object_inserted_by_an_earlier_flush_counts_as_inserted(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """changes() after the INSERT was flushed still knows it is a new row."""
    with Session(expire_on_commit=False) as session, session.begin():
        group = Group(name="first")
        session.add(group)
        session.flush()
        group.name = "second"
        session.flush()
        stage_changes(session, group, include=["id", "name", "description"])
    assert diff(recorder) == {"id": [None, group.id], "name": [None, "second"]}


def test_a_deleted_object_reports_each_value_to_none(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """[old, None] for every column that was not NULL, deferred ones too."""
    session, group = existing(Session, budget=decimal.Decimal("3.25"))
    with session.begin():
        group.notes = "loaded by changes()"
        session.flush()
    with session.begin():
        stage_changes(session, group, exclude=["created_at"])
        group.name = "renamed before the delete"
        session.flush()
        session.delete(group)
    assert diff(recorder) == {
        "id": [group.id, None],
        "name": ["admins", None],
        "budget": ["3.25", None],
        "status": ["active", None],
        "notes": ["loaded by changes()", None],
    }
    session.close()


def test_an_object_inserted_and_deleted_reports_nothing(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A row that came and went inside the transaction changed nothing."""
    with Session(expire_on_commit=False) as session, session.begin():
        group = Group(name="fleeting")
        session.add(group)
        stage_event(
            session,
            "group.updated",
            target_type="group",
            target_id="fleeting",
            action="update",
            payload={"changes": changes(group)},
        )
        session.flush()
        session.delete(group)
    assert diff(recorder) == {}


# -- SAVEPOINTs ---------------------------------------------------------------


def test_changes_undone_by_a_rolled_back_savepoint_are_not_reported(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A rolled-back SAVEPOINT's changes are gone, a released one's count,
    and the outer level's count."""
    session, group = existing(Session, description="before")
    with session.begin():
        stage_changes(session, group)
        group.description = "outer"
        savepoint = session.begin_nested()
        group.name = "rolled back"
        group.status = Status.ARCHIVED
        session.flush()
        savepoint.rollback()
        with session.begin_nested():
            group.budget = decimal.Decimal("7.00")
    assert diff(recorder) == {
        "description": ["before", "outer"],
        "budget": [None, "7.00"],
    }
    assert session.scalar(select(Group.name)) == "admins"
    session.close()


def test_a_delete_rolled_back_with_its_savepoint_is_no_delete(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """The row is back after the SAVEPOINT's rollback: only real changes count."""
    session, group = existing(Session)
    with session.begin():
        stage_changes(session, group)
        savepoint = session.begin_nested()
        session.delete(group)
        session.flush()
        savepoint.rollback()
        group.description = "kept"
    assert diff(recorder) == {"description": [None, "kept"]}
    session.close()


def test_an_insert_rolled_back_with_its_savepoint_reports_nothing(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Staged outside, inserted in a SAVEPOINT that rolls back: no row, no change."""
    with Session(expire_on_commit=False) as session, session.begin():
        group = Group(name="never")
        stage_event(
            session,
            "group.updated",
            target_type="group",
            target_id="never",
            action="update",
            payload={"changes": changes(group)},
        )
        savepoint = session.begin_nested()
        session.add(group)
        session.flush()
        savepoint.rollback()
    assert diff(recorder) == {}
    with Session() as session:
        assert session.scalars(select(Group)).all() == []


def test_changes_may_follow_a_rolled_back_savepoint_that_wrote_the_object(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """The rollback restored the row, so its values are the old ones again:
    changes() is not refused there (a released SAVEPOINT's flush is)."""
    session, group = existing(Session)
    with session.begin():
        savepoint = session.begin_nested()
        group.name = "rolled back"
        session.flush()
        savepoint.rollback()
        stage_changes(session, group, include=["name"])
        group.name = "ops"
    assert diff(recorder) == {"name": ["admins", "ops"]}
    session.close()


# -- where the old values come from --------------------------------------------


def test_an_expired_object_takes_its_old_values_from_the_database(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """After a commit expired it, an attribute set before it was read back
    (whose old value SQLAlchemy never loaded) still shows where it started."""
    session, group = existing(Session, description="in the database")
    session.expire(group)
    with session.begin():
        group.description = "set while expired"
        stage_changes(session, group)
        group.name = "renamed"
    assert diff(recorder) == {
        "name": ["admins", "renamed"],
        "description": ["in the database", "set while expired"],
    }
    session.close()


def test_a_value_changed_in_place_keeps_its_old_value(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A mutable JSON value edited in place after changes() is compared with
    a copy of what it was."""
    session, group = existing(Session, settings={"mfa": False})
    with session.begin():
        stage_changes(session, group, include=["settings"])
        assert group.settings is not None
        group.settings["mfa"] = True
    assert diff(recorder) == {"settings": [{"mfa": False}, {"mfa": True}]}
    session.close()


def test_column_types_json_cannot_hold_become_text(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """datetime as ISO 8601, Decimal and UUID as str, an Enum as its value."""
    token = uuid.UUID("0b0e5d6a-6b5c-4f3e-9a52-3c1e2f5a7d90")
    review = datetime.datetime(2024, 5, 17, 9, 30)
    session, group = existing(Session, budget=decimal.Decimal("1.50"))
    with session.begin():
        stage_changes(session, group)
        group.budget = decimal.Decimal("1234.05")
        group.token = token
        group.review_at = review
        group.status = Status.ARCHIVED
    assert diff(recorder) == {
        "budget": ["1.50", "1234.05"],
        "status": ["active", "archived"],
        "token": [None, str(token)],
        "review_at": [None, "2024-05-17T09:30:00"],
    }
    session.close()


def test_an_untouched_nan_column_read_again_is_not_a_change(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """NaN is not equal to itself: a NaN column loaded again (an expired
    object) was reported changed, and the commit then failed, the changes
    being refused as NaN. Only PostgreSQL stores NaN in a float column."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores NaN as NULL; MariaDB refuses it")
    with Session() as session:
        group = Group(name="admins", score=float("nan"))
        session.add(group)
        session.commit()  # expires group: the next read loads it anew
        stage_changes(session, group)
        group.name = "owners"
        session.commit()
    assert diff(recorder) == {"name": ["admins", "owners"]}


def test_non_finite_floats_become_text(
    SqliteSession: sessionmaker, recorder: Recorder
) -> None:
    """A float column's NaN and infinities, which JSON has no number for,
    are reported as ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the
    commit failed on them); a NaN left alone is no change."""
    session, group = existing(SqliteSession, score=float("nan"))
    with session.begin():
        stage_changes(session, group)
        group.score = float("nan")  # another NaN object: no change
        group.name = "owners"
    assert diff(recorder) == {"name": ["admins", "owners"]}
    with session.begin():
        stage_changes(session, group)
        group.score = float("inf")
    with session.begin():
        stage_changes(session, group)
        group.score = -float("inf")
    assert [dict(event.payload["changes"]) for event in recorder.events[1:]] == [
        {"score": ["NaN", "Infinity"]},
        {"score": ["Infinity", "-Infinity"]},
    ]
    session.close()


def test_a_nan_inside_a_json_value_is_compared_and_reported_as_text(
    SqliteSession: sessionmaker, recorder: Recorder
) -> None:
    """A JSON value holding NaN, set to an equal one (another NaN object),
    is no change; one that changes reports its NaNs as ``"NaN"``. Both
    failed the commit on the raw NaN."""
    session, group = existing(SqliteSession, settings={"w": [1.0, float("nan")]})
    with session.begin():
        stage_changes(session, group)
        group.settings = {"w": [1.0, float("nan")]}
        group.name = "owners"
    assert diff(recorder) == {"name": ["admins", "owners"]}
    with session.begin():
        stage_changes(session, group)
        group.settings = {"w": [2.0, float("nan")]}
    assert diff(recorder) == {"settings": [{"w": [1.0, "NaN"]}, {"w": [2.0, "NaN"]}]}
    session.close()


# -- options and the payload's rules ---------------------------------------------


def test_include_and_exclude_choose_the_attributes(
    SqliteSession: sessionmaker, recorder: Recorder
) -> None:
    """include keeps only the named attributes, exclude leaves some out."""
    session, group = existing(SqliteSession)
    for options, expected in [
        ({"include": ["name"]}, {"name": ["admins", "x"]}),
        ({"exclude": ("name",)}, {"description": [None, "y"]}),
        ({"include": ["name", "description"], "exclude": ["name"]},
         {"description": [None, "y"]}),
    ]:  # fmt: skip
        with session.begin():
            stage_changes(session, group, **options)
            group.name, group.description = "x", "y"
        assert diff(recorder) == expected, options
        with session.begin():
            group.name, group.description = "admins", None
    session.close()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"include": ["nmae"]}, ValueError, "['nmae']"),
        ({"exclude": ["members"]}, ValueError, "['members']"),
        ({"include": ["name_length"]}, ValueError, "['name_length']"),
        ({"include": "name"}, TypeError, "not one string"),
    ],
    ids=["misspelt", "relationship", "sql-expression", "one-string"],
)
def test_naming_no_column_attribute_is_refused(
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    """A name that is not a column attribute fails at once, listing the real ones."""
    with pytest.raises(error, match=r"(?s).*" + message.replace("[", r"\[")):
        changes(Group(name="x"), **options)


def test_redact_keys_apply_to_attribute_names(
    sqlite_file_engine: Engine, recorder: Recorder
) -> None:
    """A redacted attribute's change is "[REDACTED]", never its values (even
    ones JSON could not hold)."""
    emitter = AuditEmitter([recorder], load_entrypoints=False, redact_keys=["SECRET"])
    maker = next(audited(sqlite_file_engine, emitter))
    session, group = existing(maker, secret=b"\x00old")
    with session.begin():
        stage_changes(session, group)
        group.secret = b"\x00new"
        group.name = "ops"
    assert diff(recorder) == {"name": ["admins", "ops"], "secret": "[REDACTED]"}
    session.close()


def test_max_payload_bytes_applies_to_the_resolved_changes(
    sqlite_file_engine: Engine, recorder: Recorder
) -> None:
    """A diff larger than max_payload_bytes fails the commit before COMMIT."""
    emitter = AuditEmitter([recorder], load_entrypoints=False, max_payload_bytes=100)
    maker = next(audited(sqlite_file_engine, emitter))
    session, group = existing(maker)
    session.begin()
    stage_changes(session, group)
    group.description = "x" * 150
    with pytest.raises(ValueError, match="max_payload_bytes=100"):
        session.commit()
    session.rollback()
    assert recorder.events == []
    assert session.scalar(select(Group.description)) is None
    session.close()


def test_a_value_json_cannot_hold_fails_the_commit_naming_the_attribute(
    SqliteSession: sessionmaker, recorder: Recorder
) -> None:
    """bytes are not converted: the commit fails before COMMIT, and the
    message names the attribute (exclude it, or redact it)."""
    session, group = existing(SqliteSession)
    session.begin()
    stage_changes(session, group)
    group.secret = b"\x01\x02"
    with pytest.raises(
        TypeError, match=r"payload\['changes'\]\['secret'\]\[1\] is a bytes"
    ):
        session.commit()
    session.rollback()
    assert recorder.events == []
    session.close()


# -- refused ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flushed",
    ["update", "delete", "relationship", "begin_nested", "released", "query"],
)
def test_changes_after_the_object_was_flushed_are_refused(
    SqliteSession: sessionmaker, flushed: str
) -> None:
    """Its old values are gone once a flush of this transaction wrote it: a
    RuntimeError says to call changes() before, rather than a wrong diff."""
    session, group = existing(SqliteSession)
    with session.begin():
        if flushed == "update":
            group.name = "ops"
            session.flush()
        elif flushed == "delete":
            session.delete(group)
            session.flush()
        elif flushed == "relationship":
            group.members.append(Member(login="ada"))
            session.flush()
        elif flushed == "begin_nested":
            group.name = "ops"
            session.begin_nested().commit()
        elif flushed == "released":
            with session.begin_nested():
                group.name = "ops"
        else:
            group.name = "ops"
            session.scalars(select(Group)).all()  # autoflushes
        with pytest.raises(RuntimeError, match="before the flush"):
            changes(group)
    session.close()


def test_a_detached_or_unmapped_object_is_refused(SqliteSession: sessionmaker) -> None:
    """Detached: ValueError; not an instance of a mapped class: TypeError."""
    session, group = existing(SqliteSession)
    session.close()
    with pytest.raises(ValueError, match="detached"):
        changes(group)
    with pytest.raises(TypeError, match="mapped class, got dict"):
        changes({"name": "x"})
    with pytest.raises(TypeError, match="mapped class, got"):
        changes(Group)


# -- staged from a hook, and asyncio ------------------------------------------


def test_staged_by_an_after_update_hook_of_the_final_flush(
    SqliteSession: sessionmaker, recorder: Recorder
) -> None:
    """The hook sees the flush's own history: what this UPDATE changed."""
    session, group = existing(SqliteSession)

    def audit_update(mapper: Any, connection: Any, target: Group) -> None:
        stage_changes(session, target, include=["name", "description"])

    event.listen(Group, "after_update", audit_update)
    try:
        with session.begin():
            group.name = "ops"
    finally:
        event.remove(Group, "after_update", audit_update)
    assert diff(recorder) == {"name": ["admins", "ops"]}
    session.close()


def test_on_an_async_session(tmp_path: Path) -> None:
    """Resolved in the commit's greenlet; old values the object has not
    loaded cannot be read outside it, which says what to do."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    async def main() -> tuple[dict[str, Any], str]:
        engine = aiosqlite_engine(tmp_path / "async.db")
        try:
            async with engine.begin() as connection:
                await connection.run_sync(ChangesBase.metadata.create_all)
            recorder = Recorder()
            maker = async_sessionmaker(engine, expire_on_commit=False)
            AuditEmitter([recorder], load_entrypoints=False).attach(maker)
            async with maker() as session:
                group = Group(name="admins")
                session.add(group)
                await session.commit()
                async with session.begin():
                    stage_changes(session, group, include=["name"])
                    group.name = "ops"
                found = dict(recorder.events[-1].payload["changes"])
                session.expire(group)
                refused = ""
                try:
                    changes(group)
                except ValueError as error:
                    refused = str(error)
                await session.rollback()
            return found, refused
        finally:
            await engine.dispose()

    found, refused = asyncio.run(main())
    assert found == {"name": ["admins", "ops"]}
    assert "AsyncSession" in refused and "await session.refresh" in refused


def test_the_shim_tells_what_a_flush_of_this_transaction_wrote(
    SqliteSession: sessionmaker,
) -> None:
    """``_sqla.flushed_in_transaction`` against the installed SQLAlchemy:
    inserted, written (updated or deleted), or not flushed; a rolled-back
    SAVEPOINT's writes are forgotten, a released one's kept."""
    session, group = existing(SqliteSession)
    state = inspect(group)
    with session.begin():
        assert flushed_in_transaction(session, state) is None
        savepoint = session.begin_nested()
        group.name = "in a savepoint"
        session.flush()
        assert flushed_in_transaction(session, state) == "written"
        savepoint.rollback()
        assert flushed_in_transaction(session, state) is None
        new = Group(name="new")
        session.add(new)
        with session.begin_nested():
            session.flush()
            new.name = "renamed"
        assert flushed_in_transaction(session, inspect(new)) == "inserted"
        session.delete(group)
        session.flush()
        assert flushed_in_transaction(session, state) == "written"
    session.close()
