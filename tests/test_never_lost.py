"""Every staged event ends delivered, discarded with a reason, or refused.

The ways adopters lose events without noticing: an app factory or test
fixture that makes a new sessionmaker each time (whose Session class may land
at a collected one's address), a session dropped with its transaction open,
an emitter detached while events wait.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from support import Base, Recorder, operation, run_script, stored_names

from access_audit import AuditEmitter, stage_event
from access_audit.testing import capture_audit_events

ROUNDS = 200
"""The most makers a reuse test makes; CPython reuses an id within a few."""


@pytest.mark.parametrize("detach", [False, True], ids=["kept", "detached"])
def test_new_sessionmaker_per_round_delivers_every_event(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, detach: bool
) -> None:
    """A fresh sessionmaker per round (gc between) delivers, even at a reused id()."""
    seen: set[int] = set()
    reused = rounds = 0
    while reused < 3 and rounds < ROUNDS:
        maker = sessionmaker(engine)
        if id(maker.class_) in seen:
            reused += 1
        seen.add(id(maker.class_))
        emitter.attach(maker)
        with maker() as session:
            operation(session, f"round-{rounds}")
            session.commit()
        if detach:
            emitter.detach(maker)
        rounds += 1
        del maker, session
        gc.collect()
    assert reused == 3, "no Session class landed at a collected one's id()"
    assert recorder.names == [f"round-{n}" for n in range(rounds)]
    assert len(stored_names(engine)) == rounds


def test_new_async_sessionmaker_per_round_delivers_every_event(
    tmp_path: Path, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A fresh async_sessionmaker per round (gc between) delivers every event."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    async def run() -> int:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        seen: set[int] = set()
        reused = rounds = 0
        while reused < 3 and rounds < ROUNDS:
            maker = async_sessionmaker(engine)
            emitter.attach(maker)
            sync_class = maker.kw["sync_session_class"]
            if id(sync_class) in seen:
                reused += 1
            seen.add(id(sync_class))
            async with maker() as session:
                stage_event(
                    session,
                    "item_created",
                    target_type="item",
                    target_id=f"round-{rounds}",
                    action="create",
                )
                await session.commit()
            rounds += 1
            del maker, session, sync_class
            gc.collect()
        await engine.dispose()
        assert reused == 3, "no Session class landed at a collected one's id()"
        return rounds

    rounds = asyncio.run(run())
    assert recorder.names == [f"round-{n}" for n in range(rounds)]


def test_session_dropped_with_its_transaction_open_reports_its_events(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """A session garbage-collected mid-transaction discards its events ("close")."""
    with capture_audit_events() as audit_events:
        session = Session()
        operation(session, "dropped")
        session.flush()
        del session
        gc.collect()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("dropped", "close")
        ]
    assert recorder.events == []
    assert stored_names(engine) == []


def test_events_of_a_detached_emitter_are_reported_when_the_session_goes(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Detached while events wait, then committed and dropped: they are
    reported, as "detached" (its transaction ended while the emitter was
    detached; "close" said it never committed)."""
    maker = sessionmaker(engine)
    emitter.attach(maker)
    with capture_audit_events() as audit_events:
        session = maker()
        operation(session, "orphaned")
        emitter.detach(maker)
        session.commit()  # nobody listens: nothing sent, nothing reported yet
        session.close()
        assert recorder.events == []
        del session
        gc.collect()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("orphaned", "detached")
        ]
    assert stored_names(engine) == ["orphaned"]


def test_settled_transactions_report_nothing_more_when_collected(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A committed or rolled-back transaction's events are never reported twice."""
    with capture_audit_events() as audit_events:
        session = Session()
        operation(session, "kept")
        session.commit()
        operation(session, "undone")
        session.rollback()
        session.close()
        del session
        gc.collect()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("undone", "rollback")
        ]
    assert recorder.names == ["kept"]


_OPEN_AT_EXIT = textwrap.dedent(
    """
    import atexit, sys
    later = []  # exit handlers registered first run last: after access_audit's
    atexit.register(lambda: [work() for work in later])
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session, scoped_session, sessionmaker
    from access_audit import AuditEmitter, hookimpl, signals, stage_event

    class Printer:
        @hookimpl
        def audit_event_logged(self, envelope):
            print("DELIVERED", envelope.target_id, flush=True)

    def discarded(sender, event, reason):
        print("DISCARDED", event.target_id, reason, flush=True)

    signals.audit_event_discarded.connect(discarded)
    engine = create_engine(sys.argv[1])
    emitter = AuditEmitter(load_entrypoints=False)
    emitter.register(Printer())
    maker = sessionmaker(engine)
    emitter.attach(maker)

    def stage(session, target_id):
        stage_event(session, "doc.read", target_type="doc", target_id=target_id,
                    action="read")
        session.execute(text("SELECT 1"))

    left_open = maker()  # a script that forgot to commit
    stage(left_open, "forgotten")
    committed = maker()
    stage(committed, "committed")
    committed.commit()
    registry = scoped_session(maker)  # a thread-local session, as apps keep
    stage(registry(), "scoped")
    closed_late = maker()  # closed, or committed, after the exit's discards
    stage(closed_late, "closed-late")
    committed_late = maker()
    stage(committed_late, "committed-late")
    later.extend([closed_late.close, committed_late.commit])
    """
)


def test_events_of_a_session_still_open_at_exit_are_discarded(engine: Engine) -> None:
    """A process that exits with a session's transaction open (a script that
    forgot to commit, a scoped session never removed) reports its events
    discarded, reason ``"close"``, with a warning: no COMMIT will come. The
    interpreter collects none of them at exit, so nothing was reported. A
    later exit handler's close() or commit() of such a session neither
    reports them again nor sends them."""
    url = engine.url.render_as_string(hide_password=False)
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_AT_EXIT, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split("\n")) == [
        "",
        "DELIVERED committed",
        "DISCARDED closed-late close",
        "DISCARDED committed-late close",
        "DISCARDED forgotten close",
        "DISCARDED scoped close",
    ], done.stdout  # once each, and what was reported discarded is not sent
    warnings = [line for line in done.stderr.splitlines() if "exit" in line]
    assert len(warnings) == 1 and "4 staged events" in warnings[0], done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="needs os.fork")
def test_a_child_forked_beside_an_open_transaction_reports_nothing_of_it(
    tmp_path: Path,
) -> None:
    """A worker forked while another thread of the parent has a transaction
    open gets a copy of it, without the thread: the child reported its
    event discarded (reason ``"close"``, with a warning) at exit, while the
    parent committed and delivered it. The parent's alone to settle."""
    done = run_script(
        f"""
        import gc, os, sys, threading

        emitter = AuditEmitter([Printer()], load_entrypoints=False)
        maker = sessionmaker(create_engine("sqlite:///{tmp_path / "fork.db"}"))
        emitter.attach(maker)

        @signals.audit_event_discarded.connect
        def discarded(sender, event, reason):
            print("discarded", event.target_id, reason, flush=True)

        staged, go = threading.Event(), threading.Event()

        def request():
            with maker.begin() as session:
                stage_event(session, "e", target_type="t", target_id="parent",
                            action="a")
                staged.set()
                go.wait(10)

        thread = threading.Thread(target=request)
        thread.start()
        staged.wait(10)
        child = os.fork()
        if child == 0:
            gc.collect()
            sys.exit(0)
        os.waitpid(child, 0)
        go.set()
        thread.join(10)
        """,
        "-W",
        "ignore::DeprecationWarning",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["delivered parent"]
    assert "discarded at exit" not in done.stderr
