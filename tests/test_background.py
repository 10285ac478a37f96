"""Background dispatch: commits return at once, a worker thread delivers in order.

Most tests commit transactions that run no SQL (one staged event each), which
is the cheapest commit there is; the outbox tests use the ``engine`` fixture
(SQLite, PostgreSQL and MariaDB).
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from support import aiosqlite_engine, commit_one, outbox_rows, run_script

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event
from access_audit.outbox import DELIVERED, PENDING, Outbox


class Sink:
    """Records envelopes; optionally sleeps per event or waits at a gate first."""

    def __init__(self, *, delay: float = 0.0, gated: bool = False) -> None:
        self.events: list[AuditEventEnvelope] = []
        self.delay = delay
        self.slept = 0.0
        """Seconds really spent sleeping, summed."""
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.entered.set()
        self.gate.wait(30)
        if self.delay:
            started = time.perf_counter()
            time.sleep(self.delay)
            self.slept += time.perf_counter() - started
        self.events.append(envelope)

    @property
    def names(self) -> list[str]:
        return [envelope.target_id for envelope in self.events]


def background(
    emitters: list[AuditEmitter], sink: Sink, **options: Any
) -> tuple[AuditEmitter, sessionmaker]:
    """A background emitter delivering to *sink* ("sink"), and an attached maker."""
    bind = options.pop("bind", None)
    emitter = AuditEmitter(load_entrypoints=False, dispatch="background", **options)
    emitters.append(emitter)
    emitter.register(sink, name="sink")
    maker = sessionmaker(bind)
    emitter.attach(maker)
    return emitter, maker


def in_thread(function: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=function, args=args, daemon=True)
    thread.start()
    return thread


def test_many_commits_return_long_before_a_slow_plugin_is_done(
    emitters: list[AuditEmitter],
) -> None:
    """10,000 commits take far less than the plugin; flush() sees all, in order."""
    sink = Sink(delay=0.0002)
    emitter, maker = background(emitters, sink, queue_size=20_000)
    count = 10_000
    started = time.perf_counter()
    for number in range(count):
        commit_one(maker, str(number))
    committing = time.perf_counter() - started
    delivered_by_then = len(sink.events)
    assert emitter.flush(timeout=60)
    assert sink.names == [str(number) for number in range(count)]
    assert delivered_by_then < count
    assert committing < 0.5 * sink.slept, (committing, sink.slept)
    assert [e.sequence for e in sink.events[:3]] == [0, 0, 0]


def test_flush_times_out_while_delivery_is_stuck(
    emitters: list[AuditEmitter],
) -> None:
    """flush(timeout) returns False while a batch is undelivered, True once it is."""
    sink = Sink(gated=True)
    emitter, maker = background(emitters, sink)
    try:
        commit_one(maker, "stuck")
        assert sink.entered.wait(10)
        started = time.monotonic()
        assert emitter.flush(timeout=0.1) is False
        assert time.monotonic() - started >= 0.1
        assert sink.events == []
    finally:
        sink.gate.set()
    assert emitter.flush(timeout=10) is True
    assert sink.names == ["stuck"]


def test_flush_waits_for_what_was_queued_not_for_later_commits(
    emitters: list[AuditEmitter],
) -> None:
    """Other threads committing all the time keep the queue from ever
    draining: flush() still returns once what was queued when it was called
    has run, instead of timing out (or, without a timeout, never)."""
    sink = Sink(delay=0.005)
    emitter, maker = background(emitters, sink, queue_size=100_000)
    stop = threading.Event()

    def load(name: str) -> None:
        # Together about 600 commits a second, three times what the plugin takes.
        while not stop.is_set():
            commit_one(maker, name)
            time.sleep(0.005)

    loaders = [in_thread(load, f"load-{number}") for number in range(3)]
    try:
        time.sleep(0.05)
        commit_one(maker, "mine")
        assert emitter.flush(timeout=20)
        assert "mine" in sink.names
        still_queued = len(emitter._background._jobs)  # type: ignore[union-attr]
    finally:
        stop.set()
        for thread in loaders:
            thread.join(10)
    assert still_queued > 0  # the load really kept the queue from draining
    assert emitter.flush(timeout=60)


def dispatch_threads() -> int:
    return sum(t.name == "access_audit-dispatch" for t in threading.enumerate())


def test_close_delivers_what_is_queued_then_stops_the_worker(
    emitters: list[AuditEmitter],
) -> None:
    """close() with batches queued delivers them all, in order, and ends the thread."""
    before = dispatch_threads()
    sink = Sink(delay=0.002)
    emitter, maker = background(emitters, sink)
    for number in range(50):
        commit_one(maker, str(number))
    assert len(sink.events) < 50
    assert dispatch_threads() == before + 1
    assert emitter.close(timeout=30) is True
    assert sink.names == [str(number) for number in range(50)]
    assert dispatch_threads() == before


def test_after_close_staging_is_refused_and_a_late_commit_is_delivered_inline(
    emitters: list[AuditEmitter], caplog: pytest.LogCaptureFixture
) -> None:
    """After close(), stage_event raises (nothing would deliver the event);
    an event staged before and committed after (a request still running at
    shutdown) is delivered in the committing thread, with a warning: not
    lost with only a log line."""
    from access_audit import AuditConfigurationError, stage_event

    sink = Sink()
    emitter, maker = background(emitters, sink)
    commit_one(maker, "before")
    with maker() as late:
        stage_event(late, "report_viewed", target_type="report", target_id="late",
                    action="view")  # fmt: skip
        emitter.close(timeout=10)
        with caplog.at_level(logging.WARNING, logger="access_audit"):
            late.commit()
    with pytest.raises(AuditConfigurationError, match="was closed"):
        commit_one(maker, "after")
    assert sink.names == ["before", "late"]
    [record] = [r for r in caplog.records if r.name == "access_audit"]
    assert record.levelno == logging.WARNING
    assert "delivered in the committing thread" in record.getMessage()
    assert emitter.flush(timeout=1) is True


def test_a_script_that_exits_right_after_its_commit_records_the_delivery(
    tmp_path: Path,
) -> None:
    """Background dispatch with an outbox, in a process that ends as soon as
    it committed (a CLI command, a script): the exit drains the queue, then
    writes the record of what it delivered, so the relay has nothing to send
    again (the records were written first, and 5 runs of 5 left the row)."""

    database = tmp_path / "exit.db"
    done = run_script(
        f"""
        from access_audit.outbox import Outbox

        engine = create_engine("sqlite:///{database}")
        outbox = Outbox()
        outbox.create(engine)
        emitter = AuditEmitter(
            [Printer()], load_entrypoints=False, outbox=outbox, dispatch="background"
        )
        maker = sessionmaker(engine)
        emitter.attach(maker)
        with maker.begin() as session:
            stage_event(session, "e", target_type="t", target_id="last", action="a")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["delivered last"]
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{database}")
    assert outbox_rows(engine, Outbox()) == []
    engine.dispose()


def test_an_outbox_dropped_before_its_records_are_written_still_gets_them(
    tmp_path: Path,
) -> None:
    """An app per test with its own outbox: the emitter and the outbox may
    have no owner left by the time the recorder writes what the dispatch
    delivered (it gathers for 0.2 s). The records hold their outbox until
    then; else the write failed and the relay sent the events again."""
    import gc

    from sqlalchemy import create_engine

    from access_audit.outbox import _recorder

    engine = create_engine(f"sqlite:///{tmp_path / 'dropped.db'}")
    outbox = Outbox()
    outbox.create(engine)
    sink = Sink()
    emitter = AuditEmitter([sink], load_entrypoints=False, outbox=outbox,
                           dispatch="background")  # fmt: skip
    maker = sessionmaker(engine)
    emitter.attach(maker)
    commit_one(maker, "dropped")
    assert emitter._background is not None and emitter._background.flush(10)
    emitter.detach(maker)
    del emitter, outbox
    gc.collect()
    _recorder._flush_all()
    assert sink.names == ["dropped"]
    assert outbox_rows(engine, Outbox()) == []
    engine.dispose()


def test_close_hears_plugins_that_stage_while_it_drains_and_an_outbox_stays_open(
    emitters: list[AuditEmitter], tmp_path: Path
) -> None:
    """A plugin auditing its own work on another session while close()
    drains the queue is heard; with an outbox, staging after close() is
    not refused: the commit delivers in its own thread, and records it."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from access_audit import hookimpl, stage_event
    from access_audit.outbox import Outbox, count_pending

    engine = create_engine(f"sqlite:///{tmp_path / 'closing.db'}")
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(engine)
    maker = sessionmaker(engine)
    got: list[str] = []

    class AuditsItself:
        @hookimpl
        def audit_event_logged(self, envelope: Any) -> None:
            got.append(envelope.event_type)
            if envelope.event_type == "first":
                with maker.begin() as own:
                    stage_event(own, "from_plugin", target_type="t", target_id=2,
                                action="a")  # fmt: skip

    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="background")
    emitters.append(emitter)
    emitter.register(AuditsItself(), name="self")
    emitter.attach(maker)
    with maker.begin() as session:
        stage_event(session, "first", target_type="t", target_id=1, action="a")
    assert emitter.close(timeout=10)
    assert got == ["first", "from_plugin"]
    with maker.begin() as session:
        stage_event(session, "after_close", target_type="t", target_id=3, action="a")
    assert got == ["first", "from_plugin", "after_close"]
    assert emitter.flush(timeout=10)
    assert count_pending(engine, outbox) == 0
    engine.dispose()


def test_full_queue_blocks_the_committer_until_there_is_room(
    emitters: list[AuditEmitter],
) -> None:
    """With queue_full="block", a commit waits for room; then all arrive in order."""
    sink = Sink(gated=True)
    emitter, maker = background(emitters, sink, queue_size=2, queue_full="block")
    try:
        commit_one(maker, "0")
        assert sink.entered.wait(10)  # the worker holds batch 0
        commit_one(maker, "1")
        commit_one(maker, "2")  # the queue is full now
        waiting = in_thread(commit_one, maker, "3")
        waiting.join(0.3)
        assert waiting.is_alive(), "the commit did not wait for room in the queue"
        assert sink.events == []
    finally:
        sink.gate.set()
    waiting.join(10)
    assert not waiting.is_alive()
    assert emitter.flush(timeout=10)
    assert sink.names == ["0", "1", "2", "3"]
    assert emitter.dropped == 0


def test_drop_policy_requires_an_outbox() -> None:
    """queue_full="drop" without an outbox is refused: it would lose events."""
    with pytest.raises(ValueError, match="outbox"):
        AuditEmitter(load_entrypoints=False, dispatch="background", queue_full="drop")


LONG_AGO = datetime(2000, 1, 1, tzinfo=timezone.utc)


def test_full_queue_drops_and_counts_and_the_relay_delivers_the_dropped(
    emitters: list[AuditEmitter], engine: Engine, outbox: Outbox
) -> None:
    """queue_full="drop" drops batches and counts them; the relay delivers them."""
    sink = Sink(gated=True)
    emitter, maker = background(
        emitters, sink, bind=engine, outbox=outbox, queue_size=1, queue_full="drop"
    )
    try:
        commit_one(maker, "0")
        assert sink.entered.wait(10)
        committer = in_thread(lambda: [commit_one(maker, n) for n in ("1", "2", "3")])
        committer.join(10)
        assert not committer.is_alive(), "a full queue blocked with queue_full='drop'"
        assert emitter.dropped == 2
    finally:
        sink.gate.set()
    assert emitter.flush(timeout=10)
    assert sink.names == ["0", "1"]
    rows = outbox_rows(engine, outbox)  # the delivered ones are gone
    assert [row["aggregateid"] for row in rows] == ["2", "3"]
    assert [row["states"] for row in rows] == [{}, {}]

    assert emitter.relay(engine, once=True).delivered == 0  # not due yet
    table = outbox.table
    with engine.begin() as connection:  # as if relay_after had passed
        # (commit order stays: rows sort by transaction id and sequence next)
        connection.execute(update(table).values(created_at=LONG_AGO))
    stats = emitter.relay(engine, once=True)
    assert stats.delivered == 2
    assert sink.names == ["0", "1", "2", "3"]
    assert [str(e.id) for e in sink.events[2:]] == [row["id"] for row in rows]
    assert outbox_rows(engine, outbox) == []


def test_background_dispatch_records_outbox_deliveries(
    emitters: list[AuditEmitter], engine: Engine, outbox: Outbox
) -> None:
    """Rows every plugin took leave the outbox; a failing plugin's stay pending."""
    sink = Sink()
    emitter, maker = background(emitters, sink, bind=engine, outbox=outbox)

    class Broken:
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            if envelope.target_id == "bad":
                raise RuntimeError("broken for bad")

    emitter.register(Broken(), name="broken")
    for name in ("one", "two", "bad"):
        commit_one(maker, name)
    assert emitter.flush(timeout=10)
    assert sink.names == ["one", "two", "bad"]
    rows = {row["aggregateid"]: row for row in outbox_rows(engine, outbox)}
    assert list(rows) == ["bad"]  # the others every plugin took are gone
    assert rows["bad"]["states"] == {"sink": DELIVERED, "broken": PENDING}
    assert "broken for bad" in rows["bad"]["errors"]["broken"]


EXITING_CHILD = """
import sys
import time

from sqlalchemy.orm import Session

from access_audit import AuditEmitter, hookimpl, stage_event


class Slow:
    @hookimpl
    def audit_event_logged(self, envelope):
        time.sleep(0.01)
        with open(sys.argv[1], "a") as log:
            log.write(envelope.target_id + "\\n")


emitter = AuditEmitter(load_entrypoints=False, dispatch="background")
emitter.register(Slow(), name="slow")
for number in range(20):
    with Session() as session:
        emitter.attach(session)
        stage_event(
            session, "report_viewed", target_type="report",
            target_id=str(number), action="view",
        )
        session.commit()
print("committed", flush=True)
"""


def test_interpreter_exit_drains_the_queue(tmp_path: Path) -> None:
    """A process that exits right after committing still delivers what it queued."""
    script = tmp_path / "exiting_child.py"
    script.write_text(EXITING_CHILD)
    log = tmp_path / "delivered.log"
    completed = subprocess.run(
        [sys.executable, str(script), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "committed\n"
    assert log.read_text().splitlines() == [str(number) for number in range(20)]


@pytest.mark.parametrize("with_outbox", [False, True], ids=["plain", "outbox"])
def test_async_commit_does_not_wait_for_a_slow_plugin(
    emitters: list[AuditEmitter], tmp_path: Path, with_outbox: bool
) -> None:
    """With AsyncSession the awaited commit returns before a 0.2 s plugin is done."""
    sink = Sink(delay=0.2)
    outbox = Outbox() if with_outbox else None
    emitter = AuditEmitter(load_entrypoints=False, dispatch="background", outbox=outbox)
    emitters.append(emitter)
    emitter.register(sink, name="sink")

    async def main() -> tuple[float, int, list[dict[str, Any]]]:
        engine = aiosqlite_engine(tmp_path / "async.db")
        try:
            if outbox is not None:
                async with engine.begin() as connection:
                    await connection.run_sync(outbox.create)
            maker = async_sessionmaker(engine)
            emitter.attach(maker)
            async with maker() as session:
                stage_event(
                    session, "report_viewed", target_type="report", target_id=1,
                    action="view",
                )  # fmt: skip
                started = time.perf_counter()
                await session.commit()
                took = time.perf_counter() - started
            # The loop keeps running while the worker delivers.
            ticks = 0
            while not sink.events and ticks < 100:
                await asyncio.sleep(0.01)
                ticks += 1
            assert await asyncio.to_thread(emitter.flush, 10)
            rows: list[dict[str, Any]] = []
            if outbox is not None:
                # The worker hands the row's deletion to this loop without
                # waiting for it: give the loop the time to run it.
                for _ in range(200):
                    async with AsyncSession(engine) as reader:
                        result = await reader.execute(select(outbox.table))
                        rows = [dict(row) for row in result.mappings()]
                    if not rows:
                        break
                    await asyncio.sleep(0.01)
            return took, ticks, rows
        finally:
            await engine.dispose()

    took, ticks, rows = asyncio.run(main())
    assert sink.names == ["1"]
    assert took < 0.1, took
    assert ticks >= 5  # the loop ran while the plugin slept
    if outbox is not None:
        assert rows == []  # written, then deleted once the plugin took it


def test_background_commit_from_an_orm_session_on_a_database(
    emitters: list[AuditEmitter], engine: Engine
) -> None:
    """Commits that run SQL return before delivery and deliver every event once."""
    sink = Sink(gated=True)
    emitter, maker = background(emitters, sink, bind=engine)
    try:
        for number in range(5):
            with maker() as session:
                session.execute(select(1))
                stage_event(
                    session, "report_viewed", target_type="report",
                    target_id=str(number), action="view",
                )  # fmt: skip
                session.commit()
        assert sink.events == []
    finally:
        sink.gate.set()
    assert emitter.flush(timeout=10)
    assert sink.names == [str(number) for number in range(5)]


def test_a_plugin_committing_another_session_never_deadlocks_the_worker(
    emitters: list[AuditEmitter],
) -> None:
    """With a full queue, a plugin's own commit is queued past the bound."""
    follow_ups: list[str] = []

    class Chaining:
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            if envelope.event_type == "report_viewed":
                with maker() as other:  # another attached session
                    stage_event(
                        other, "report_followed_up", target_type="report",
                        target_id=envelope.target_id, action="follow_up",
                    )  # fmt: skip
                    other.commit()
            else:
                follow_ups.append(envelope.target_id)
                assert emitter.flush(timeout=5) is False  # from the worker itself

    sink = Sink()
    emitter, maker = background(emitters, sink, queue_size=1)
    emitter.register(Chaining(), name="chaining")
    committer = in_thread(lambda: [commit_one(maker, str(n)) for n in range(5)])
    committer.join(timeout=30)
    assert not committer.is_alive(), "a commit is stuck behind the worker"
    assert emitter.flush(timeout=30)
    assert sorted(follow_ups) == ["0", "1", "2", "3", "4"]


def test_aflush_and_aclose_wait_without_blocking_the_loop(engine: Engine) -> None:
    """aflush()/aclose() deliver what is queued while the loop keeps running."""
    sink = Sink(delay=0.05)
    emitter = AuditEmitter([sink], load_entrypoints=False, dispatch="background")
    maker = sessionmaker(engine)
    emitter.attach(maker)
    commit_one(maker, "queued")

    async def main() -> tuple[bool, bool, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        flushed = await emitter.aflush(timeout=10)
        closed = await emitter.aclose(timeout=10)
        ticker.cancel()
        return flushed, closed, ticks

    flushed, closed, ticks = asyncio.run(main())
    assert (flushed, closed) == (True, True)
    assert ticks > 0
    assert [envelope.target_id for envelope in sink.events] == ["queued"]
    emitter.detach(maker)


def test_aflush_is_true_at_once_for_inline_dispatch() -> None:
    """Inline dispatch has nothing queued: aflush() and aclose() return True."""
    emitter = AuditEmitter(load_entrypoints=False)
    assert asyncio.run(emitter.aflush()) is True
    assert asyncio.run(emitter.aclose()) is True


def test_a_backlog_the_exit_cannot_wait_for_is_reported(tmp_path: Path) -> None:
    """The interpreter's exit waits a bounded time for the queue; what is
    left then is reported as an error naming how many batches were not
    delivered (the rest was dropped without a word)."""
    done = run_script(
        """
        import logging, time
        logging.basicConfig(format="%(levelname)s %(message)s")
        from access_audit import _background

        _background.EXIT_WAIT = 0.5

        class Slow:
            @hookimpl
            def audit_event_logged(self, envelope):
                time.sleep(0.3)
                print("delivered", envelope.target_id, flush=True)

        emitter = AuditEmitter([Slow()], load_entrypoints=False, dispatch="background")
        maker = sessionmaker(create_engine("sqlite://"))
        emitter.attach(maker)
        for number in range(6):
            with maker.begin() as session:
                stage_event(session, "e", target_type="t", target_id=str(number),
                            action="a")
        """
    )
    assert done.returncode == 0, done.stderr
    delivered = len(done.stdout.splitlines())
    reported = re.search(
        r"(\d+) batches of committed events were not delivered", done.stderr
    )
    assert reported is not None, done.stderr
    # The daemon worker may deliver more as the interpreter ends.
    assert 0 < 6 - delivered <= int(reported[1]) <= 6


@pytest.mark.parametrize(
    ("dispatch", "outboxed"),
    [("background", False), ("background", True), ("inline", True)],
    ids=["background", "background-outbox", "inline-outbox"],
)
def test_a_multiprocessing_child_delivers_and_records_before_it_ends(
    tmp_path: Path, dispatch: str, outboxed: bool
) -> None:
    """A process multiprocessing forks ends with ``os._exit()``: the
    interpreter's exit handlers never run there, and a background worker
    died with its queue (nothing delivered), the outbox's recorder with
    what it had not written (the relay sent it all again). Both finish in
    multiprocessing's own finalizers."""
    database = tmp_path / "child.db"
    done = run_script(
        f"""
        import multiprocessing, time
        from access_audit.outbox import Outbox, count_pending

        class SlowPrinter(Printer):
            @hookimpl
            def audit_event_logged(self, envelope):
                time.sleep(0.05)
                super().audit_event_logged(envelope)

        engine = create_engine("sqlite:///{database}")
        outbox = Outbox() if {outboxed} else None
        emitter = AuditEmitter([SlowPrinter()], load_entrypoints=False,
                               outbox=outbox, dispatch={dispatch!r})
        maker = sessionmaker(engine)
        emitter.attach(maker)

        def work():
            for number in range(10):
                with maker.begin() as session:
                    stage_event(session, "e", target_type="t",
                                target_id=f"child-{{number}}", action="a")

        if __name__ == "__main__":
            if outbox is not None:
                outbox.create(engine)
            engine.dispose()
            child = multiprocessing.get_context("fork").Process(target=work)
            child.start()
            child.join(30)
            if outbox is not None:
                print("pending", count_pending(engine, outbox), flush=True)
        """
    )
    delivered = [f"delivered child-{number}" for number in range(10)]
    pending = ["pending 0"] if outboxed else []
    assert done.stdout.splitlines() == delivered + pending, done.stderr
