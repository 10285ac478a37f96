"""Random sequences of transaction operations against a model of nested levels.

Hypothesis draws a list of operations (stage, SAVEPOINT begin/release/rollback,
a flush error inside a SAVEPOINT, commit, rollback, close) and runs it on a
real session of each database. A pure-Python model keeps one list of staged
names per open level; after every commit, rollback and close the events the
plugin received, the batches, the discarded events and the rows in the
database must be exactly what the model says.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, String, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from support import Recorder

from access_audit import AuditEmitter, StagedEvent, signals, stage_event


class PropBase(DeclarativeBase):
    pass


class PropItem(PropBase):
    """A row per staged operation; its own table so parallel runs do not clash."""

    __tablename__ = "audit_prop_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


DUPLICATE = "duplicate"
"""A committed row whose name every flush error inserts again."""

_names = itertools.count()


class Op(enum.Enum):
    STAGE = "stage"
    BEGIN_NESTED = "begin_nested"
    RELEASE = "release"
    SAVEPOINT_ROLLBACK = "savepoint_rollback"
    FLUSH_ERROR_IN_SAVEPOINT = "flush_error_in_savepoint"
    FLUSH_ERROR_BLOCK = "flush_error_block"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    CLOSE = "close"


# Staging and opening SAVEPOINTs are drawn more often, so that sequences nest.
OPERATIONS = st.lists(
    st.sampled_from([Op.STAGE, Op.STAGE, Op.BEGIN_NESTED, *Op]),
    min_size=1,
    max_size=30,
)

ROLLBACK_REASONS = frozenset({"rollback"})
SAVEPOINT_REASONS = frozenset({"savepoint_rollback"})
# A SAVEPOINT still open when the whole transaction rolls back is rolled back
# with it; a SAVEPOINT a flush error closed may be reported either way.
NESTED_ROLLBACK_REASONS = frozenset({"savepoint_rollback", "rollback"})
FLUSH_ERROR_REASONS = frozenset({"savepoint_rollback", "close"})
CLOSE_REASONS = frozenset({"close"})


@dataclasses.dataclass
class Model:
    """What should happen: staged names per open level, innermost last."""

    levels: list[list[str]] = dataclasses.field(default_factory=list)
    """Empty when no transaction is open; ``levels[0]`` is the outermost."""
    committed: list[str] = dataclasses.field(default_factory=list)
    batches: list[list[str]] = dataclasses.field(default_factory=list)
    discarded: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    """Dropped name -> the discard reasons allowed for it."""

    def begin(self) -> None:
        if not self.levels:
            self.levels.append([])

    def drop(self, names: list[str], reasons: frozenset[str]) -> None:
        for name in names:
            self.discarded[name] = reasons


def operation(session: Session, name: str) -> None:
    """Add a row and stage the event that records it."""
    session.add(PropItem(name=name))
    stage_event(
        session, "item_created", target_type="item", target_id=name, action="create"
    )


def fail_flush(session: Session) -> None:
    """Insert the committed name again: the flush fails with IntegrityError."""
    session.add(PropItem(name=DUPLICATE))
    with pytest.raises(IntegrityError):
        session.flush()


def run(session: Session, model: Model, op: Op) -> bool:
    """Apply *op* to the session and the model; False if it does not apply now."""
    nested = len(model.levels) >= 2
    if op is Op.STAGE:
        name = f"p{next(_names)}"
        operation(session, name)
        model.begin()
        model.levels[-1].append(name)
    elif op is Op.BEGIN_NESTED:
        session.begin_nested()
        model.begin()
        model.levels.append([])
    elif op is Op.RELEASE:
        if not nested:
            return False
        savepoint = session.get_nested_transaction()
        assert savepoint is not None
        savepoint.commit()
        released = model.levels.pop()
        model.levels[-1].extend(released)
    elif op is Op.SAVEPOINT_ROLLBACK:
        if not nested:
            return False
        savepoint = session.get_nested_transaction()
        assert savepoint is not None
        savepoint.rollback()
        model.drop(model.levels.pop(), SAVEPOINT_REASONS)
    elif op is Op.FLUSH_ERROR_IN_SAVEPOINT:
        # A flush error in the open SAVEPOINT; the caller then rolls it back.
        if not nested:
            return False
        savepoint = session.get_nested_transaction()
        assert savepoint is not None
        name = f"p{next(_names)}"
        operation(session, name)
        model.levels[-1].append(name)
        fail_flush(session)
        savepoint.rollback()
        model.drop(model.levels.pop(), FLUSH_ERROR_REASONS)
    elif op is Op.FLUSH_ERROR_BLOCK:
        # The usual idiom: a `with begin_nested():` block that a flush error
        # leaves; only that block's events go.
        name = f"p{next(_names)}"
        with pytest.raises(IntegrityError), session.begin_nested():
            operation(session, name)
            session.add(PropItem(name=DUPLICATE))
            session.flush()
        model.begin()
        model.drop([name], FLUSH_ERROR_REASONS)
    elif op is Op.COMMIT:
        session.commit()
        events = [name for level in model.levels for name in level]
        if events:
            model.batches.append(events)
            model.committed.extend(events)
        model.levels = []
    elif op is Op.ROLLBACK:
        session.rollback()
        if model.levels:
            model.drop(model.levels[0], ROLLBACK_REASONS)
            for level in model.levels[1:]:
                model.drop(level, NESTED_ROLLBACK_REASONS)
        model.levels = []
    elif op is Op.CLOSE:
        session.close()
        for level in model.levels:
            model.drop(level, CLOSE_REASONS)
        model.levels = []
    return True


def check(
    engine: Engine,
    recorder: Recorder,
    discarded: list[tuple[str, str]],
    model: Model,
) -> None:
    """The plugin, the discard signal and the database agree with the model."""
    assert recorder.names == model.committed
    assert [[e.target_id for e in batch] for batch in recorder.batches] == model.batches
    for batch in recorder.batches:
        assert len({envelope.transaction_id for envelope in batch}) == 1
        assert [envelope.sequence for envelope in batch] == list(range(len(batch)))
    assert [e for batch in recorder.batches for e in batch] == recorder.events
    ids = [envelope.id for envelope in recorder.events]
    assert len(set(ids)) == len(ids)

    names = [name for name, _ in discarded]
    assert len(set(names)) == len(names), f"discarded twice: {discarded}"
    assert set(names) == set(model.discarded)
    for name, reason in discarded:
        assert reason in model.discarded[name], (name, reason, model.discarded[name])

    with engine.connect() as connection:
        stored = sorted(connection.scalars(select(PropItem.name)))
    assert stored == sorted([DUPLICATE, *model.committed])


@pytest.fixture
def prop_engine(engine: Engine) -> Iterator[Engine]:
    """``engine`` with this file's own table created."""
    PropBase.metadata.drop_all(engine)
    PropBase.metadata.create_all(engine)
    yield engine
    PropBase.metadata.drop_all(engine)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPERATIONS)
def test_random_sequences_emit_exactly_the_committed_events(
    prop_engine: Engine, ops: list[Op]
) -> None:
    """Any sequence of nested operations emits exactly the committed events."""
    engine = prop_engine
    with engine.begin() as connection:
        connection.execute(delete(PropItem))
        connection.execute(insert(PropItem), [{"name": DUPLICATE}])

    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    discarded: list[tuple[str, str]] = []

    def on_discarded(sender: Any, event: StagedEvent, reason: str) -> None:
        assert isinstance(event.target_id, str)
        discarded.append((event.target_id, reason))

    signals.audit_event_discarded.connect(on_discarded, sender=emitter)
    model = Model()
    session = maker()
    try:
        for op in [*ops, Op.CLOSE]:
            if run(session, model, op) and op in (Op.COMMIT, Op.ROLLBACK, Op.CLOSE):
                check(engine, recorder, discarded, model)
    finally:
        session.close()
        signals.audit_event_discarded.disconnect(on_discarded, sender=emitter)
        emitter.detach(maker)
