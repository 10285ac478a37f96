"""Many threads committing and rolling back on one emitter, on PostgreSQL.

Each thread has its own sessions from one sessionmaker with the emitter
attached; the plugin and the signal receivers are shared. Nothing may leak
from one thread's transaction into another's batch, and the events emitted
must be exactly the rows committed.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from support import Recorder

from access_audit import AuditEmitter, StagedEvent, signals, stage_event

THREADS = 8
TRANSACTIONS = 200
KINDS = ("commit", "rollback", "savepoint_rollback", "savepoint_release")


class ConcBase(DeclarativeBase):
    pass


class ConcItem(ConcBase):
    """A row per staged operation; its own table so parallel runs do not clash."""

    __tablename__ = "audit_conc_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


def operation(session: Session, name: str) -> None:
    """Add a row and stage the event that records it."""
    session.add(ConcItem(name=name))
    stage_event(
        session, "item_created", target_type="item", target_id=name, action="create"
    )


def thread_of(name: str) -> int:
    """The thread number encoded in a row name ``t<thread>-<txn>-<k>``."""
    return int(name.split("-", 1)[0][1:])


@pytest.fixture
def pool_engine(engine: Engine) -> Iterator[Engine]:
    """A dedicated engine on ``engine``'s server, with a connection per thread."""
    dedicated = create_engine(engine.url, pool_size=THREADS + 2, max_overflow=0)
    ConcBase.metadata.drop_all(dedicated)
    ConcBase.metadata.create_all(dedicated)
    yield dedicated
    ConcBase.metadata.drop_all(dedicated)
    dedicated.dispose()


@dataclasses.dataclass
class Outcome:
    """What one thread expects: its committed batches and its dropped events."""

    batches: list[list[str]] = dataclasses.field(default_factory=list)
    discarded: dict[str, str] = dataclasses.field(default_factory=dict)
    """Dropped name -> the discard reason."""


def work(
    maker: sessionmaker[Session], thread: int, start: threading.Barrier
) -> Outcome:
    """Run this thread's random transactions; return what should have happened."""
    rng = random.Random(thread)
    outcome = Outcome()
    start.wait()
    for txn in range(TRANSACTIONS):
        kind = rng.choice(KINDS)
        names = [f"t{thread}-{txn}-{k}" for k in range(rng.randint(1, 3))]
        with maker() as session:
            for name in names:
                operation(session, name)
            if kind == "rollback":
                session.rollback()
                outcome.discarded.update(dict.fromkeys(names, "rollback"))
                continue
            if kind != "commit":
                inner = f"t{thread}-{txn}-sp"
                savepoint = session.begin_nested()
                operation(session, inner)
                if kind == "savepoint_rollback":
                    savepoint.rollback()
                    outcome.discarded[inner] = "savepoint_rollback"
                else:
                    savepoint.commit()
                    names.append(inner)
            session.commit()
            outcome.batches.append(names)
    return outcome


@pytest.mark.parametrize("engine", ["postgresql"], ids=["postgresql"], indirect=True)
def test_threads_emit_exactly_their_committed_events(pool_engine: Engine) -> None:
    """Concurrent sessions emit each committed event once, in per-transaction batches."""
    recorder = Recorder()  # list.append is atomic: safe to share between threads
    emitter = AuditEmitter([recorder], load_entrypoints=False)
    maker = sessionmaker(pool_engine)
    emitter.attach(maker)
    discarded: list[tuple[str, str]] = []

    def on_discarded(sender: Any, event: StagedEvent, reason: str) -> None:
        assert isinstance(event.target_id, str)
        discarded.append((event.target_id, reason))

    signals.audit_event_discarded.connect(on_discarded, sender=emitter)
    start = threading.Barrier(THREADS)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(work, maker, n, start) for n in range(THREADS)]
            expected = {n: future.result() for n, future in enumerate(futures)}
    finally:
        signals.audit_event_discarded.disconnect(on_discarded, sender=emitter)
        emitter.detach(maker)

    with pool_engine.connect() as connection:
        stored = set(connection.scalars(select(ConcItem.name)))
    emitted = recorder.names
    assert len(emitted) == len(set(emitted)), "an event was emitted twice"
    assert set(emitted) == stored
    committed = {
        name for outcome in expected.values() for b in outcome.batches for name in b
    }
    assert stored == committed

    ids = [envelope.id for envelope in recorder.events]
    assert len(ids) == len(set(ids))
    transaction_ids = [batch[0].transaction_id for batch in recorder.batches]
    assert len(transaction_ids) == len(set(transaction_ids))
    for batch in recorder.batches:
        assert len({thread_of(envelope.target_id) for envelope in batch}) == 1
        assert len({envelope.transaction_id for envelope in batch}) == 1
        assert [envelope.sequence for envelope in batch] == list(range(len(batch)))

    for thread, outcome in expected.items():
        mine = [b for b in recorder.batches if thread_of(b[0].target_id) == thread]
        assert [[e.target_id for e in b] for b in mine] == outcome.batches
        events = [e for e in recorder.events if thread_of(e.target_id) == thread]
        assert events == [e for b in mine for e in b]
        # UUIDv7 ids sort in staging order within a thread.
        assert [e.id for e in events] == sorted(e.id for e in events)

    assert len(discarded) == len(dict(discarded)), "an event was discarded twice"
    assert dict(discarded) == {
        name: reason
        for outcome in expected.values()
        for name, reason in outcome.discarded.items()
    }
