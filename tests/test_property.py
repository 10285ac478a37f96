"""Random sequences of transaction operations against a model of nested levels.

A Hypothesis state machine runs random sequences of operations (stage,
SAVEPOINT begin/release/rollback, a flush error inside a SAVEPOINT, commit,
rollback, close) on a real session of each database. A pure-Python model
keeps one list of staged names per open level; after every commit, rollback
and close the events the plugin received, the batches, the discarded events
and the rows in the database must be exactly what the model says.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, String, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    SessionTransaction,
    mapped_column,
    sessionmaker,
)
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


class TransactionMachine(RuleBasedStateMachine):
    """One session per example; every rule acts on it and on the model."""

    engine: ClassVar[Engine]

    def __init__(self) -> None:
        super().__init__()
        with self.engine.begin() as connection:
            connection.execute(delete(PropItem))
            connection.execute(insert(PropItem), [{"name": DUPLICATE}])
        self.recorder = Recorder()
        self.emitter = AuditEmitter([self.recorder], load_entrypoints=False)
        self.maker = sessionmaker(self.engine)
        self.emitter.attach(self.maker)
        self.discarded: list[tuple[str, str]] = []
        signals.audit_event_discarded.connect(self.on_discarded, sender=self.emitter)
        self.model = Model()
        self.session = self.maker()

    def on_discarded(self, sender: Any, event: StagedEvent, reason: str) -> None:
        assert isinstance(event.target_id, str)
        self.discarded.append((event.target_id, reason))

    def nested(self) -> bool:
        return len(self.model.levels) >= 2

    def check(self) -> None:
        check(self.engine, self.recorder, self.discarded, self.model)

    def savepoint(self) -> SessionTransaction:
        savepoint = self.session.get_nested_transaction()
        assert savepoint is not None
        return savepoint

    @rule(count=st.integers(1, 3))
    def stage(self, count: int) -> None:
        for _ in range(count):
            name = f"p{next(_names)}"
            operation(self.session, name)
            self.model.begin()
            self.model.levels[-1].append(name)

    @rule()
    def begin_nested(self) -> None:
        self.session.begin_nested()
        self.model.begin()
        self.model.levels.append([])

    @precondition(nested)
    @rule()
    def release(self) -> None:
        self.savepoint().commit()
        released = self.model.levels.pop()
        self.model.levels[-1].extend(released)

    @precondition(nested)
    @rule()
    def savepoint_rollback(self) -> None:
        self.savepoint().rollback()
        self.model.drop(self.model.levels.pop(), SAVEPOINT_REASONS)

    @precondition(nested)
    @rule()
    def flush_error_in_savepoint(self) -> None:
        """A flush error in the open SAVEPOINT, which the caller rolls back."""
        savepoint = self.savepoint()
        name = f"p{next(_names)}"
        operation(self.session, name)
        self.model.levels[-1].append(name)
        fail_flush(self.session)
        savepoint.rollback()
        self.model.drop(self.model.levels.pop(), FLUSH_ERROR_REASONS)

    @rule()
    def flush_error_block(self) -> None:
        """The usual idiom: a flush error leaves a `with begin_nested():` block."""
        name = f"p{next(_names)}"
        with pytest.raises(IntegrityError), self.session.begin_nested():
            operation(self.session, name)
            self.session.add(PropItem(name=DUPLICATE))
            self.session.flush()
        self.model.begin()
        self.model.drop([name], FLUSH_ERROR_REASONS)

    @rule()
    def commit(self) -> None:
        self.session.commit()
        events = [name for level in self.model.levels for name in level]
        if events:
            self.model.batches.append(events)
            self.model.committed.extend(events)
        self.model.levels = []
        self.check()

    @rule()
    def rollback(self) -> None:
        self.session.rollback()
        if self.model.levels:
            self.model.drop(self.model.levels[0], ROLLBACK_REASONS)
            for level in self.model.levels[1:]:
                self.model.drop(level, NESTED_ROLLBACK_REASONS)
        self.model.levels = []
        self.check()

    @rule()
    def close(self) -> None:
        self.session.close()
        for level in self.model.levels:
            self.model.drop(level, CLOSE_REASONS)
        self.model.levels = []
        self.check()

    def teardown(self) -> None:
        # No checks here: a failed step would be reported a second time.
        try:
            self.session.close()
        finally:
            signals.audit_event_discarded.disconnect(
                self.on_discarded, sender=self.emitter
            )
            self.emitter.detach(self.maker)


@pytest.fixture
def prop_engine(engine: Engine) -> Iterator[Engine]:
    """``engine`` with this file's own table created."""
    PropBase.metadata.drop_all(engine)
    PropBase.metadata.create_all(engine)
    yield engine
    PropBase.metadata.drop_all(engine)


def test_random_sequences_emit_exactly_the_committed_events(
    prop_engine: Engine,
) -> None:
    """Any sequence of nested operations emits exactly the committed events."""
    machine = type("TransactionMachine", (TransactionMachine,), {"engine": prop_engine})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None),
    )
