"""The relay under the ways real deployments break it.

Killed connections, a transaction of 100,000 events, a held target with a
long backlog in front of another target's due event, invalid options, and
a CDC reader's view of the outbox table (only INSERTs and DELETEs). Each
test runs on SQLite, PostgreSQL and MariaDB where it applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, insert, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from support import commit_shared_targets, lines_of, outbox_rows, wait_until

from access_audit import (
    AuditConfigurationError,
    AuditEmitter,
    AuditEventEnvelope,
    hookimpl,
    stage_event,
)
from access_audit.outbox import (
    Outbox,
    RelayStats,
    count_pending,
    list_dead,
    prune,
    retry_dead,
    status,
)
from access_audit.outbox._claim import claim
from access_audit.outbox._wake import listen
from conftest import server_engine

LONG_AGO = datetime(2000, 1, 1, tzinfo=timezone.utc)


class PollingRelay:
    """``emitter.relay(bind, once=False, ...)`` running in a thread."""

    def __init__(self, emitter: AuditEmitter, bind: Engine, **options: Any) -> None:
        self.stopping = threading.Event()
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(emitter, bind, options))
        self.thread.start()

    def _run(self, emitter: AuditEmitter, bind: Engine, options: Any) -> None:
        try:
            self.result["stats"] = emitter.relay(
                bind, once=False, stop=self.stopping, **options
            )
        except BaseException as error:  # stop() raises it
            self.result["error"] = error

    def running(self) -> bool:
        """Whether the relay is still polling (it has not ended or raised)."""
        return self.thread.is_alive() and not self.result

    def stop(self) -> RelayStats:
        """Stop the relay; its stats, or what it raised."""
        self.stopping.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the relay did not stop"
        if "error" in self.result:
            raise self.result["error"]
        stats: RelayStats = self.result["stats"]
        return stats


class Counter:
    """A plugin counting deliveries per event id; raises while ``failing``."""

    def __init__(self, failing: bool = False) -> None:
        self.seen: dict[str, int] = {}
        self.order: list[str] = []
        self.failing = failing
        self.lock = threading.Lock()

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        if self.failing:
            raise RuntimeError("down")
        with self.lock:
            key = str(envelope.id)
            self.seen[key] = self.seen.get(key, 0) + 1
            self.order.append(envelope.target_id)


def emitter_for(outbox: Outbox, plugin: object, **options: Any) -> AuditEmitter:
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, **options)
    emitter.register(plugin, name="sink")
    return emitter


def commit_events(
    engine: Engine, emitter: AuditEmitter, targets: list[str], per_commit: int = 1
) -> None:
    """Commit one event per target, *per_commit* to a transaction."""
    for start in range(0, len(targets), per_commit):
        with Session(engine) as session:
            emitter.attach(session)
            for target in targets[start : start + per_commit]:
                stage_event(
                    session, "doc.read", target_type="doc", target_id=target,
                    action="read",
                )  # fmt: skip
            session.commit()


@pytest.fixture
def due_outbox(engine: Engine) -> Any:
    """An outbox whose fresh rows are due for the relay at once."""
    outbox = Outbox(table_name="scale_outbox", relay_after=timedelta(0))
    outbox.drop(engine)
    outbox.create(engine)
    yield outbox
    outbox.drop(engine)


def test_a_claimed_row_reads_each_stored_field_in_its_place(
    engine: Engine, due_outbox: Outbox
) -> None:
    """The relay reads its candidates by position: each field lands where
    it belongs (two of them are strings of the same shape, the target's
    type and id; one is a flag)."""
    seen: list[AuditEventEnvelope] = []

    class Recorder:
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            seen.append(envelope)
            raise RuntimeError("left pending for the relay")

    emitter = emitter_for(due_outbox, Recorder())
    with Session(engine) as session:
        emitter.attach(session)
        for target in ("a-1", "a-2"):
            stage_event(
                session, "doc.read", target_type="document", target_id=target,
                action="read",
            )  # fmt: skip
        session.commit()
    due_outbox.flush(timeout=10)
    with engine.connect() as connection:
        # The dispatch after COMMIT failed for one event only, as recorded:
        # the other has no delivery state.
        state = due_outbox.delivery_table
        connection.execute(state.delete().where(state.c.event_id == str(seen[0].id)))
        claimed, _ = claim(
            connection, due_outbox, ["sink"], datetime.now(timezone.utc), 10
        )
        connection.rollback()
    rows = [taken.row for taken in claimed]
    assert [row.id for row in rows] == [str(envelope.id) for envelope in seen]
    assert [row.target for row in rows] == [("document", "a-1"), ("document", "a-2")]
    assert [row.sequence for row in rows] == [envelope.sequence for envelope in seen]
    assert {row.transaction_id for row in rows} == {str(seen[0].transaction_id)}
    assert [row.created_at for row in rows] == [e.timestamp for e in seen]
    assert [row.recipients for row in rows] == [frozenset({"sink"})] * 2
    assert [row.has_state for row in rows] == [False, True]
    assert [row.envelope().id for row in rows] == [e.id for e in seen]


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 0},
        {"batch_size": -5},
        {"batch_size": True},
        {"batch_size": "10"},
        {"max_attempts": 0},
        {"backoff": -1.0},
        {"max_backoff": float("nan")},
        {"backoff": 1e12},
        {"max_backoff": float("inf")},
        {"max_backoff": 0.5},  # below the default backoff, 1 s
        {"backoff": 600.0},  # above the default max_backoff, 300 s
        {"interval": -0.5},
        {"interval": 1e9},
        {"retention": timedelta(days=-1)},
        {"retention": timedelta(days=800_000)},
    ],
    ids=lambda options: "-".join(f"{k}={v}" for k, v in options.items()),
)
def test_invalid_relay_options_are_refused_naming_them(
    sqlite_file_engine: Engine, options: dict[str, Any]
) -> None:
    outbox = Outbox()
    outbox.create(sqlite_file_engine)
    emitter = emitter_for(outbox, Counter())
    [name] = options
    with pytest.raises(ValueError, match=name):
        emitter.relay(sqlite_file_engine, **options)


def test_a_retention_that_is_not_a_timedelta_is_refused_naming_it(
    sqlite_file_engine: Engine,
) -> None:
    """Before any work: it raised TypeError only once the relay went idle."""
    outbox = Outbox()
    outbox.create(sqlite_file_engine)
    emitter = emitter_for(outbox, Counter())
    with pytest.raises(TypeError, match="retention must be a timedelta, got 5"):
        emitter.relay(sqlite_file_engine, retention=5)


def test_a_plugin_failing_thousands_of_times_backs_off_to_max_backoff(
    sqlite_file_engine: Engine,
) -> None:
    """The backoff doubles up to ``max_backoff`` however many attempts
    failed: 2 to the power of a thousand attempts once overflowed, failing
    the batch (nothing recorded) on every run from then on."""
    from sqlalchemy import select, update

    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(sqlite_file_engine)
    sink = Counter()
    writer = emitter_for(outbox, sink, dispatch="relay")
    commit_events(sqlite_file_engine, writer, ["a"], per_commit=1)
    sink.failing = True
    relay = emitter_for(outbox, sink)
    relay.relay(sqlite_file_engine, once=True, max_attempts=5000)
    state = outbox.delivery_table
    with sqlite_file_engine.begin() as connection:
        connection.execute(update(state).values(attempts=1500, next_attempt_at=None))
    stats = relay.relay(sqlite_file_engine, once=True, max_attempts=5000,
                        backoff=1.0, max_backoff=30.0)  # fmt: skip
    assert stats.failed == 1
    with sqlite_file_engine.connect() as connection:
        attempts, due = connection.execute(
            select(state.c.attempts, state.c.next_attempt_at)
        ).one()
    assert attempts == 1501
    waited = due - datetime.now(timezone.utc)
    assert timedelta(seconds=25) < waited <= timedelta(seconds=30)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_the_cli_refuses_a_batch_size_below_one(
    sqlite_file_engine: Engine, value: str
) -> None:
    """``--batch-size 0`` exits 2 naming the option, instead of claiming nothing."""
    url = sqlite_file_engine.url.render_as_string(hide_password=False)
    result = subprocess.run(
        [sys.executable, "-m", "access_audit", "relay", "--database-url", url,
         "--create-table", "--once", "--batch-size", value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--batch-size" in result.stderr


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["relay", "--once", "--retention-days", "inf"], "--retention-days"),
        (["relay", "--once", "--retention-days", "1e9"], "--retention-days"),
        (["relay", "--once", "--retention-days", "nan"], "--retention-days"),
        (["relay", "--once", "--relay-after", "inf"], "--relay-after"),
        (["relay", "--once", "--backoff", "1e12"], "--backoff"),
        (
            ["relay", "--once", "--backoff", "5", "--max-backoff", "2"],
            "--max-backoff (2.0) must be at least --backoff (5.0)",
        ),
        (["relay", "--list-dead", "--retry-dead"], "--list-dead and --retry-dead"),
        (["relay", "--once", "--only-plugin", "siem"], "--only-plugin goes with"),
        (["relay", "--once"], "does not exist"),
        (["relay", "--list-dead"], "does not exist"),
        (["relay", "--retry-dead"], "does not exist"),
        (["status"], "does not exist"),
    ],
    ids=lambda value: "_".join(value) if isinstance(value, list) else None,
)
def test_the_cli_refuses_what_it_cannot_run_with_a_usage_error(
    tmp_path: Path, arguments: list[str], named: str
) -> None:
    """Out-of-range numbers and a missing outbox table exit 2 with one line
    naming the problem, not a traceback."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    command, *rest = arguments
    result = subprocess.run(
        [sys.executable, "-m", "access_audit", command, "--database-url", url, *rest],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", ["relay", "status"])
@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "nosuchdialect://host/db",
        "mysql+mysqldb://root@127.0.0.1/x",
        "mysql+pymysql://root@127.0.0.1:1/x?sslmod=require",  # not pymysql's
    ],
)
def test_the_cli_refuses_a_database_url_it_cannot_use_naming_it(
    command: str, url: str
) -> None:
    import importlib.util

    if "mysqldb" in url and importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("mysqlclient is installed: that URL's driver is not missing")
    result = subprocess.run(
        [sys.executable, "-m", "access_audit", command, "--database-url", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--database-url" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_cli_blames_a_plugin_that_fails_to_import_not_the_url(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An installed plugin whose module imports a missing dependency: the
    error says a plugin could not be imported, not that the URL is wrong."""
    from access_audit import AuditEmitter
    from access_audit.outbox._cli import main

    def broken(self: AuditEmitter) -> None:
        raise ModuleNotFoundError("No module named 'some_sdk_not_installed'")

    monkeypatch.setattr(AuditEmitter, "_load_entrypoints", broken)
    url = f"sqlite:///{tmp_path / 'fine.db'}"
    with pytest.raises(SystemExit) as exited:
        main(["relay", "--once", "--create-table", "--database-url", url])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "a plugin could not be imported" in err and "some_sdk_not_installed" in err
    assert "--database-url" not in err


def test_the_console_script_imports_plugins_from_the_current_directory(
    tmp_path: Path,
) -> None:
    """``access-audit relay --plugin mymodule:Plugin`` run where mymodule.py
    lies works as ``python -m access_audit`` does (a console script's path
    starts with its own directory, not the current one)."""
    script = Path(sys.executable).with_name("access-audit")
    assert script.exists(), "the package's console script is not installed"
    (tmp_path / "localplug.py").write_text(
        "from access_audit import hookimpl\n"
        "class Plugin:\n"
        "    @hookimpl\n"
        "    def audit_event_logged(self, envelope):\n"
        "        pass\n"
    )
    environment = {
        key: value for key, value in os.environ.items() if key != "PYTHONPATH"
    }
    result = subprocess.run(
        [str(script), "relay", "--once", "--no-entrypoints", "--create-table",
         "--database-url", f"sqlite:///{tmp_path / 'outbox.db'}",
         "--plugin", "sink=localplug:Plugin"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "0 delivered" in result.stdout + result.stderr


SLOW_PLUGIN = """
import os, time
from access_audit import hookimpl

class Slow:
    @hookimpl
    def audit_event_logged(self, envelope):
        time.sleep(0.3)
        with open(os.environ["SLOW_PLUGIN_LOG"], "a") as log:
            log.write(envelope.target_id + "\\n")

PLUGIN = Slow()
"""


def test_a_second_ctrl_c_stops_the_cli_relay_mid_batch(tmp_path: Path) -> None:
    """The first SIGINT lets the batch in hand finish; a second stops the
    relay at once (a plugin stuck on a batch must not make it unkillable
    but by SIGKILL): one line, status 130, and the batch is rolled back,
    every row still pending for a later run."""
    import signal

    (tmp_path / "slowplug.py").write_text(SLOW_PLUGIN)
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox = Outbox()
    outbox.create(engine)
    writer = emitter_for(outbox, Counter(), dispatch="relay")  # for "sink"
    commit_events(engine, writer, [f"{n:02d}" for n in range(60)], per_commit=60)
    log = tmp_path / "delivered.log"
    environment = dict(os.environ, SLOW_PLUGIN_LOG=str(log))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tmp_path), environment.get("PYTHONPATH")])
    )
    child = subprocess.Popen(
        [
            sys.executable, "-m", "access_audit", "relay", "--no-entrypoints",
            "--database-url", engine.url.render_as_string(hide_password=False),
            "--plugin", "sink=slowplug:PLUGIN", "--relay-after", "0",
            "--interval", "30",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )  # fmt: skip
    try:
        wait_until(lambda: lines_of(log) >= 2, 30)
        child.send_signal(signal.SIGINT)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "stopping after the batch in hand" in err
    assert "interrupted" in err and "Traceback" not in err
    assert len(log.read_text().splitlines()) < 60
    assert count_pending(engine, outbox) == 60  # rolled back: delivered again later
    engine.dispose()


def test_a_relay_delivers_a_hundred_thousand_event_transaction(
    engine: Engine, due_outbox: Outbox
) -> None:
    """One commit of 100,000 events is relayed, each event once, in order
    (the ids once went into one IN list, over psycopg's 65,535 parameters)."""
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    targets = [f"{number:06d}" for number in range(100_000)]
    commit_events(engine, writer, targets, per_commit=len(targets))
    sink = Counter()
    stats = emitter_for(due_outbox, sink).relay(engine, batch_size=5_000)
    assert stats.delivered == len(targets)
    assert set(sink.seen.values()) == {1}
    assert sink.order == targets
    assert count_pending(engine, due_outbox) == 0


def test_a_held_target_with_a_long_backlog_does_not_hide_another_targets_event(
    engine: Engine, due_outbox: Outbox
) -> None:
    """A target in backoff with 21,000 rows behind it, then another target:
    a relay run delivers the other target's event (the claim once gave up
    after 50 pages and reported nothing due)."""
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    commit_events(engine, writer, ["held"] * 21_001, per_commit=21_001)
    commit_events(engine, writer, ["free"])
    first = outbox_rows(engine, due_outbox)[0]["id"]
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    with engine.begin() as connection:  # the first "held" event backs off
        connection.execute(
            insert(due_outbox.delivery_table).values(
                event_id=first, plugin="sink", state="pending", attempts=1,
                next_attempt_at=later, updated_at=later,
            )
        )  # fmt: skip
    sink = Counter()
    stats = emitter_for(due_outbox, sink).relay(engine, once=True)
    assert sink.order == ["free"]
    assert stats.delivered == 1
    assert count_pending(engine, due_outbox) == 21_001


def test_a_once_relay_waits_for_rows_another_relay_locked_in_passing(
    engine: Engine, due_outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two relays locking the same transaction's rows at once (SKIP LOCKED)
    can each get part of it and both let it go. A relay run with ``once``
    that found only such rows due must not return with them pending: it
    tries again until they are free (it once returned at once, and four
    relays on a backlog left a whole transaction behind)."""
    from access_audit.outbox import _relay

    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks")
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    commit_events(engine, writer, ["a1", "a2"], per_commit=2)
    commit_events(engine, writer, ["b1"])
    [a2] = [
        row["id"]
        for row in outbox_rows(engine, due_outbox)
        if row["aggregateid"] == "a2"
    ]
    locked, release = threading.Event(), threading.Event()

    def lock_part() -> None:
        # What the other relay's attempt holds: a2, and not a1 (by primary
        # key: InnoDB would lock every row a scan reads).
        with engine.connect() as connection:
            connection.execute(
                select(due_outbox.table.c.id)
                .where(due_outbox.table.c.id == a2)
                .with_for_update()
            ).all()
            locked.set()
            release.wait(10)
            connection.rollback()

    holder = threading.Thread(target=lock_part)
    holder.start()
    assert locked.wait(10)
    threading.Timer(0.5, release.set).start()
    sink = Counter()
    pruned: list[float] = []

    def counted_prune(*args: Any) -> int:
        pruned.append(time.monotonic())
        return 0

    monkeypatch.setattr(_relay, "prune", counted_prune)
    stats = emitter_for(due_outbox, sink).relay(
        engine, once=True, retention=timedelta(days=30)
    )
    holder.join(10)
    assert sink.order == ["b1", "a1", "a2"]
    assert stats.delivered == 3
    assert count_pending(engine, due_outbox) == 0
    # Retention ran once, when nothing was left, not at every look again.
    assert len(pruned) == 1


def claimed_targets(claimed: list[Any]) -> list[str]:
    """The target ids of what ``claim`` returned, in order."""
    return [taken.row.target[1] for taken in claimed]


@pytest.mark.parametrize("first_from_head", [False, True], ids=["first", "head"])
def test_relays_claiming_two_ways_never_share_a_transaction_or_reorder_a_target(
    engine: Engine, due_outbox: Outbox, first_from_head: bool
) -> None:
    """On PostgreSQL a relay takes transactions by their first rows, or reads
    from the outbox's head (at least every second, and when the first way
    finds nothing); on MariaDB only the second. Whichever way each of two
    relays claims, the one that comes second takes neither a row of the
    transaction the first holds nor a later event of one of its targets."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks")
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    commit_events(engine, writer, ["a", "b"], per_commit=2)
    commit_events(engine, writer, ["a", "c"])
    now = datetime.now(timezone.utc)
    with engine.connect() as first, engine.connect() as second:
        first_claim, _ = claim(
            first, due_outbox, ["sink"], now, 2, from_head=first_from_head
        )
        second_claim, _ = claim(
            second, due_outbox, ["sink"], now, 10, from_head=not first_from_head
        )
        first.rollback()
        second.rollback()
    assert claimed_targets(first_claim) == ["a", "b"]
    # "a" waits behind the first relay's transaction; "c" is free.
    assert claimed_targets(second_claim) == ["c"]


def test_a_relay_holds_no_transaction_it_passed_over(
    engine: Engine, due_outbox: Outbox
) -> None:
    """A relay lacking the one plugin the outbox's first transaction waits
    for passes it over, and takes the next ones: while it delivers those,
    a relay that has the plugin takes the first (it once stayed locked by
    the first relay until its batch ended)."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks")

    class Down(Counter):
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            raise RuntimeError("down")

    first = AuditEmitter(load_entrypoints=False, outbox=due_outbox)
    first.register(Counter(), name="p1")
    first.register(Down(), name="p2")
    commit_events(engine, first, ["a"])  # delivered to p1, pending for p2
    assert first.flush(timeout=10)
    writer = AuditEmitter(load_entrypoints=False, outbox=due_outbox, dispatch="relay")
    writer.register(Counter(), name="p1")
    writer.register(Counter(), name="p2")
    commit_events(engine, writer, ["b", "c"])
    with engine.begin() as connection:  # p2's retry of "a" is due
        connection.execute(
            due_outbox.delivery_table.update().values(next_attempt_at=LONG_AGO)
        )
    now = datetime.now(timezone.utc)
    with engine.connect() as lacking, engine.connect() as having:
        passed_over, _ = claim(lacking, due_outbox, ["p1"], now, 10)
        taken, _ = claim(having, due_outbox, ["p1", "p2"], now, 10)
        lacking.rollback()
        having.rollback()
    assert claimed_targets(passed_over) == ["b", "c"]
    assert claimed_targets(taken) == ["a"]
    assert [claimed.plugins for claimed in taken] == [["p2"]]


def test_a_due_event_is_not_held_back_by_a_later_one_of_its_target(
    engine: Engine,
) -> None:
    """An event due now is delivered though a later event of its target is
    not due yet (fresh, left to the dispatch after its COMMIT): the later
    one once held the target back for the earlier one too, in the same
    page."""
    outbox = Outbox(table_name="fresh_outbox", relay_after=timedelta(hours=1))
    outbox.drop(engine)
    outbox.create(engine)
    try:
        writer = emitter_for(outbox, Counter(), dispatch="relay")
        commit_events(engine, writer, ["x", "x"])
        [early, _] = [row["id"] for row in outbox_rows(engine, outbox)]
        with engine.begin() as connection:
            connection.execute(
                outbox.table.update()
                .where(outbox.table.c.id == early)
                .values(created_at=LONG_AGO)
            )
        sink = Counter()
        stats = emitter_for(outbox, sink).relay(engine, once=True)
        assert list(sink.seen) == [early]
        assert stats.delivered == 1
        assert count_pending(engine, outbox) == 1
    finally:
        outbox.drop(engine)


def test_a_relay_keeps_no_lock_on_a_transaction_it_held_back(
    engine: Engine, due_outbox: Outbox
) -> None:
    """A transaction not due yet between two due ones: the relay takes the
    due ones, and the one it held back stays free for others to look at
    (locking it for the whole batch kept it from a relay it was due for)."""
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    for target in ("a", "b", "c"):
        commit_events(engine, writer, [target])
    [_, waiting, _] = [row["id"] for row in outbox_rows(engine, due_outbox)]
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    with engine.begin() as connection:  # "b" backs off
        connection.execute(
            insert(due_outbox.delivery_table).values(
                event_id=waiting, plugin="sink", state="pending", attempts=1,
                next_attempt_at=later, updated_at=later,
            )
        )  # fmt: skip
    table = due_outbox.table
    with engine.connect() as relay, engine.connect() as other:
        taken, _ = claim(relay, due_outbox, ["sink"], datetime.now(timezone.utc), 10)
        free = other.execute(
            select(table.c.id)
            .where(table.c.id == waiting)
            .with_for_update(skip_locked=True)
        ).all()
        relay.rollback()
        other.rollback()
    assert claimed_targets(taken) == ["a", "c"]
    if engine.dialect.name != "sqlite":
        assert free == [(waiting,)]


def test_a_relay_keeps_no_lock_on_transactions_past_a_full_page(
    engine: Engine, due_outbox: Outbox
) -> None:
    """A page filled by a slice of a large transaction leaves out the
    transactions after it whose first rows the same statement locked: they
    stay free for other relays."""
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    commit_events(engine, writer, ["h"])
    commit_events(engine, writer, [f"big{number}" for number in range(450)], 450)
    commit_events(engine, writer, ["x"])
    commit_events(engine, writer, ["y"])
    table = due_outbox.table
    with engine.connect() as relay, engine.connect() as other:
        taken, _ = claim(relay, due_outbox, ["sink"], datetime.now(timezone.utc), 100)
        free = other.execute(
            select(table.c.aggregateid)
            .where(table.c.aggregateid.in_(["x", "y"]))
            .with_for_update(skip_locked=True)
        ).all()
        relay.rollback()
        other.rollback()
    assert claimed_targets(taken)[:2] == ["h", "big0"]
    if engine.dialect.name == "postgresql":
        assert sorted(free) == [("x",), ("y",)]


@pytest.mark.parametrize("from_head", [False, True], ids=["first", "head"])
def test_a_relay_lets_go_of_what_another_relay_delivered_while_it_chose(
    engine: Engine,
    due_outbox: Outbox,
    monkeypatch: pytest.MonkeyPatch,
    from_head: bool,
) -> None:
    """A relay reads what it chooses before locking it (reading from the
    head), or lets go of the first rows it chose when it passed one over;
    if another relay delivered a chosen transaction in that moment, the
    first one finds its delivery state changed and leaves it (it delivered
    it again, and wrote its own state over the other relay's)."""
    from access_audit.outbox import _claim

    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite takes one relay at a time")
    if engine.dialect.name != "postgresql":
        pytest.skip(
            "on MariaDB (REPEATABLE READ) the relay reads the batch's first "
            "snapshot again: not yet told apart there"
        )

    class Down(Counter):
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            raise RuntimeError("down")

    writer = AuditEmitter(load_entrypoints=False, outbox=due_outbox, dispatch="relay")
    writer.register(Counter(), name="p1")
    writer.register(Counter(), name="p2")
    commit_events(engine, writer, ["t"])  # waits for p1 and p2
    passed = AuditEmitter(load_entrypoints=False, outbox=due_outbox)
    passed.register(Counter(), name="p1")
    passed.register(Down(), name="p2")
    commit_events(engine, passed, ["v"])  # waits for p2 only
    assert passed.flush(timeout=10)
    with engine.begin() as connection:
        connection.execute(
            due_outbox.delivery_table.update().values(next_attempt_at=LONG_AGO)
        )
    other = Counter()
    lock = _claim._Walk.lock
    meanwhile: list[RelayStats] = []
    started: list[bool] = []

    def lock_after_another_relay(
        walk: Any, connection: Any, wanted: Any, **options: Any
    ) -> None:
        if not started:
            started.append(True)  # the other relay's own locks go straight on
            emitter = AuditEmitter(load_entrypoints=False, outbox=due_outbox)
            emitter.register(other, name="p1")
            meanwhile.append(emitter.relay(engine, once=True))
        lock(walk, connection, wanted, **options)

    monkeypatch.setattr(_claim._Walk, "lock", lock_after_another_relay)
    with engine.connect() as connection:
        taken, _ = claim(
            connection,
            due_outbox,
            ["p1"],
            datetime.now(timezone.utc),
            10,
            from_head=from_head,
        )
        connection.rollback()
    assert [stats.delivered for stats in meanwhile] == [1]
    assert other.order == ["t"]
    assert taken == []


def test_a_relay_takes_no_slice_of_a_transaction_another_relay_holds(
    engine: Engine, due_outbox: Outbox
) -> None:
    """A transaction larger than a page goes in slices, in order: while one
    relay holds its first slice, another takes none of the later ones (it
    once took the second slice, the first slice's targets being all it
    held back)."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks")
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    commit_events(engine, writer, [f"t{number}" for number in range(450)], 450)
    now = datetime.now(timezone.utc)
    with engine.connect() as first, engine.connect() as second:
        first_slice, _ = claim(first, due_outbox, ["sink"], now, 100)
        second_slice, contended = claim(
            second, due_outbox, ["sink"], now, 100, from_head=True
        )
        first.rollback()
        second.rollback()
    assert [taken.row.sequence for taken in first_slice] == list(range(200))
    assert second_slice == []
    assert contended


def test_a_transaction_whose_first_row_left_is_taken_first_when_it_heads_the_outbox(
    engine: Engine, due_outbox: Outbox
) -> None:
    """A transaction delivered in part (its first event taken, the next
    failed) has no first row left to lock: at the head of the outbox it is
    claimed before the transactions after it, as on every database."""

    class FailsSecond(Counter):
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            if envelope.target_id == "x1":
                raise RuntimeError("down for x1")
            super().audit_event_logged(envelope)

    commit_events(engine, emitter_for(due_outbox, FailsSecond()), ["x0", "x1"], 2)
    due_outbox.flush(timeout=10)
    commit_events(engine, emitter_for(due_outbox, Counter(), dispatch="relay"), ["y"])
    state = due_outbox.delivery_table
    with engine.begin() as connection:  # x1's retry is due
        connection.execute(state.update().values(next_attempt_at=LONG_AGO))
    assert [row["aggregateid"] for row in outbox_rows(engine, due_outbox)] == [
        "x1",
        "y",
    ]
    with engine.connect() as connection:
        claimed, _ = claim(
            connection, due_outbox, ["sink"], datetime.now(timezone.utc), 1
        )
        connection.rollback()
    assert claimed_targets(claimed) == ["x1"]
    assert [taken.row.sequence for taken in claimed] == [1]


class FlakySink:
    """Fails the first attempt of every seventh event; records each delivery
    that succeeded as (number, target), from any thread."""

    def __init__(self, delivered: list[tuple[int, str]], lock: threading.Lock) -> None:
        self.delivered, self.lock = delivered, lock
        self.failed: set[str] = set()

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        number = envelope.payload["n"]
        with self.lock:
            if number % 7 == 3 and str(envelope.id) not in self.failed:
                self.failed.add(str(envelope.id))
                raise RuntimeError(f"first attempt of {number} fails")
            self.delivered.append((number, envelope.target_id))


def test_four_relays_with_failing_deliveries_keep_each_target_in_order(
    engine: Engine, due_outbox: Outbox
) -> None:
    """Four relays at once over transactions that share targets, with one
    event in seven failing its first attempt (which leaves transactions
    delivered in part, their first rows gone): each event is delivered once,
    and each target's events in commit order."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite takes one relay at a time")
    transactions, per_transaction, targets = 100, 20, 37
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    with Session(engine) as session:
        writer.attach(session)
        commit_shared_targets(session, transactions, per_transaction, targets)
    total = transactions * per_transaction
    assert count_pending(engine, due_outbox) == total
    delivered: list[tuple[int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        emitter = emitter_for(due_outbox, FlakySink(delivered, lock))
        try:
            start.wait()
            deadline = time.monotonic() + 120
            while count_pending(engine, due_outbox) and time.monotonic() < deadline:
                emitter.relay(engine, once=True, batch_size=50, backoff=0.0)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert count_pending(engine, due_outbox) == 0
    assert sorted(number for number, _ in delivered) == list(range(total))
    by_target: dict[str, list[int]] = {}
    for number, target in delivered:
        by_target.setdefault(target, []).append(number)
    assert len(by_target) == targets
    for target, seen in by_target.items():
        assert seen == sorted(seen), f"{target} out of commit order: {seen}"


def backend_ids(engine: Engine) -> list[int]:
    """Record the server-side id of every connection *engine* opens."""
    ids: list[int] = []
    query = (
        "SELECT pg_backend_pid()"
        if engine.dialect.name == "postgresql"
        else "SELECT CONNECTION_ID()"
    )

    @event.listens_for(engine, "connect")
    def remember(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(query)
        ids.append(int(cursor.fetchone()[0]))
        cursor.close()

    return ids


def kill(admin: Engine, ids: list[int]) -> None:
    """Terminate the server connections *ids* from another connection."""
    with admin.connect() as connection:
        for backend in list(ids):
            if admin.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}
                )
            else:
                with contextlib.suppress(Exception):  # already gone
                    connection.execute(text(f"KILL {backend}"))
            connection.commit()


class Killer(Counter):
    """A Counter that kills *ids* from *admin* at its 50th delivery, once:
    the relay's batch then fails in the middle."""

    def __init__(self, admin: Engine, ids: list[int]) -> None:
        super().__init__()
        self.admin, self.ids, self.calls = admin, ids, 0

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.calls += 1
        if self.calls == 50:
            kill(self.admin, self.ids)
        super().audit_event_logged(envelope)


def test_a_polling_relay_reconnects_through_killed_connections(
    engine: Engine, due_outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Its connections killed in the middle of a batch and three times
    between commits, a polling relay says so, keeps running, and every event
    is delivered (at least once)."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no connections to kill")
    from sqlalchemy import create_engine

    relay_engine = create_engine(engine.url, pool_pre_ping=False)
    ids = backend_ids(relay_engine)
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    sink = Killer(engine, ids)
    relay_emitter = emitter_for(due_outbox, sink)
    caplog.set_level("WARNING", logger="access_audit")
    targets = [str(number) for number in range(300)]
    commit_events(engine, writer, targets[:100])
    relay = PollingRelay(relay_emitter, relay_engine, interval=0.05, batch_size=20)
    try:
        for round_ in (1, 2):
            time.sleep(0.3)
            kill(engine, ids)
            commit_events(engine, writer, targets[round_ * 100 : round_ * 100 + 100])
        deadline = time.monotonic() + 60
        while count_pending(engine, due_outbox) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert relay.running()
    finally:
        stats = relay.stop()
        relay_engine.dispose()
    assert count_pending(engine, due_outbox) == 0
    assert set(sink.order) == set(targets)  # at least once, some maybe twice
    assert stats.reconnects >= 1
    assert any("trying again" in message for message in caplog.messages)


def test_a_polling_relay_waits_out_a_database_error_while_it_reports_progress(
    engine: Engine, due_outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The progress line reads the database too (the pending count): its
    connection killed there, the relay says so, skips that report and keeps
    running (it exited)."""
    from sqlalchemy.exc import OperationalError

    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    sink = Counter()
    calls: list[RelayStats] = []

    def progress(stats: RelayStats) -> None:
        calls.append(stats)
        if len(calls) == 1:
            raise OperationalError(
                "SELECT count(*)", {}, Exception("terminating connection")
            )

    caplog.set_level("WARNING", logger="access_audit")
    commit_events(engine, writer, ["a", "b"])
    relay = PollingRelay(
        emitter_for(due_outbox, sink), engine, interval=0.05, progress=progress
    )
    try:
        wait_until(lambda: len(calls) >= 1, 30)
        commit_events(engine, writer, ["c"])
        wait_until(
            lambda: not count_pending(engine, due_outbox) and len(calls) >= 2, 30
        )
        assert relay.running()
    finally:
        stats = relay.stop()
    assert sink.order == ["a", "b", "c"]
    assert stats.reconnects == 0  # the database was not down for the batches
    [warning] = [m for m in caplog.messages if "no progress report" in m]
    assert "terminating connection" in warning


def test_a_progress_callbacks_own_error_ends_the_relay(
    sqlite_file_engine: Engine,
) -> None:
    """An error of the callback's own (its output closed: ``| head``) is not
    a database error to wait out, with backoff, for ever: it is raised."""
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(sqlite_file_engine)
    writer = emitter_for(outbox, Counter(), dispatch="relay")
    commit_events(sqlite_file_engine, writer, ["a"])

    def progress(stats: RelayStats) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    relay = emitter_for(outbox, Counter())
    with pytest.raises(BrokenPipeError):
        relay.relay(sqlite_file_engine, once=True, progress=progress)


class Interrupting:
    """A plugin raising ``KeyboardInterrupt`` itself (or Ctrl-C landing in it)."""

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        raise KeyboardInterrupt


def test_an_interrupt_in_a_plugin_names_it_and_rolls_the_batch_back(
    engine: Engine, due_outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """``KeyboardInterrupt`` stops the relay (it is Ctrl-C's), but the log
    names the plugin it came out of: a plugin raising it by mistake is
    found. The batch stays pending, to be delivered again."""
    caplog.set_level("WARNING", logger="access_audit")
    emitters = [emitter_for(due_outbox, Counter(), dispatch="relay")]
    emitters.append(emitter_for(due_outbox, Counter()))
    for each in emitters:  # the writer records the rows for both names
        each.register(Interrupting(), name="interrupting")
    writer, relay = emitters
    commit_events(engine, writer, ["a", "b"], per_commit=2)
    with pytest.raises(KeyboardInterrupt):
        relay.relay(engine, once=True)
    [line] = [m for m in caplog.messages if "interrupted" in m]
    assert "plugin 'interrupting'" in line and "2 events" in line, line
    assert count_pending(engine, due_outbox) == 2


def test_status_on_an_unreachable_asyncpg_database_is_one_line() -> None:
    """asyncpg reports a refused connection as the socket's OSError, not a
    DBAPIError: still one line and exit status 1, not a traceback."""
    pytest.importorskip("asyncpg")
    result = subprocess.run(
        [sys.executable, "-m", "access_audit", "status", "--database-url",
         "postgresql+asyncpg://root@127.0.0.1:1/test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("access-audit status: error: the database:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _refused_url(case: str, tmp_path: Path) -> str:
    """A URL whose server is up but refuses it for good: *case* says how."""
    if case == "sqlite-no-directory":
        return f"sqlite:///{tmp_path / 'no-such-directory' / 'audit.db'}"
    name, wrong = case.split("-", 1)
    url = server_engine(name).url  # skips (or fails under CI) if it is down
    if wrong == "database":
        url = url.set(database="audit_no_such_database")
    else:
        url = url.set(username="audit_no_such_user")
    return url.render_as_string(hide_password=False)


REFUSED = [
    "postgresql-database",
    "postgresql-user",
    "mariadb-database",
    "mariadb-user",
    "sqlite-no-directory",
]


@pytest.mark.parametrize("case", REFUSED)
def test_a_relay_exits_on_a_database_that_refuses_it_for_good(
    case: str, tmp_path: Path
) -> None:
    """A database, role or user that does not exist (a typo in the URL) is
    a configuration error: the polling relay exits 2 with one line, instead
    of retrying with backoff for ever while it looks alive."""
    result = subprocess.run(
        [sys.executable, "-m", "access_audit", "relay", "--no-entrypoints",
         "--database-url", _refused_url(case, tmp_path), "--interval", "0.05"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "error:" in x]
    assert line.startswith("access-audit relay: error: the database refused"), line
    assert "trying again" not in result.stderr


@pytest.mark.parametrize("wrong", ["database", "user"])
def test_arelay_raises_on_a_database_that_refuses_it_for_good(wrong: str) -> None:
    """Through asyncpg, whose errors carry PostgreSQL's SQLSTATE: the
    library's relay raises ``AuditConfigurationError`` at once, even
    polling."""
    pytest.importorskip("asyncpg")
    url = server_engine("postgresql").url.set(drivername="postgresql+asyncpg")
    url = url.set(query={})  # asyncpg takes no libpq options
    url = (
        url.set(database="audit_no_such_database")
        if wrong == "database"
        else url.set(username="audit_no_such_user")
    )
    engine = create_async_engine(url)

    async def run() -> None:
        try:
            await AuditEmitter(outbox=Outbox()).arelay(engine, once=False)
        finally:
            await engine.dispose()

    with pytest.raises(AuditConfigurationError, match="refused") as raised:
        asyncio.run(asyncio.wait_for(run(), 30))
    assert "audit_no_such" in str(raised.value)


def test_a_refusal_once_the_relay_runs_is_waited_out(
    sqlite_file_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a relay that never got in takes a refusal for a configuration
    error: once running, "unable to open database file" (SQLite says so
    when the process runs out of file descriptors for a moment) is waited
    out as any database error (the relay exited)."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    import access_audit.outbox._relay as relay_module

    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(sqlite_file_engine)
    sink = Counter()
    commit_events(
        sqlite_file_engine, emitter_for(outbox, sink, dispatch="relay"), ["a"]
    )
    real_batch = relay_module._relay_batch
    calls: list[int] = []

    def out_of_descriptors_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            orig = sqlite3.OperationalError("unable to open database file")
            orig.sqlite_errorcode = 14  # type: ignore[attr-defined]
            raise OperationalError("SELECT", {}, orig)
        return real_batch(*args)

    monkeypatch.setattr(relay_module, "_relay_batch", out_of_descriptors_once)
    stats = emitter_for(outbox, sink).relay(sqlite_file_engine, once=True)
    assert stats.reconnects == 1
    assert sink.order == ["a"]


@pytest.mark.parametrize(
    "orig",
    [
        ({"S": "FATAL", "C": "3D000", "M": 'database "x" does not exist'},),
        ({"S": "ERROR", "C": "57P01", "M": "terminating connection"},),
        (["a list"],),
    ],
    ids=["pg8000-no-database", "pg8000-terminated", "unhashable"],
)
def test_a_refusal_is_read_from_any_driver_s_error_arguments(orig: tuple[Any]) -> None:
    """pg8000 puts the server's fields in a dict as the error's argument: its
    SQLSTATE is read there, and an argument of any type is no crash (a
    dict raised TypeError inside the relay's error handling)."""
    from sqlalchemy.exc import OperationalError

    from access_audit.outbox._relay import refused_for_good

    class DriverError(Exception):
        pass

    error = OperationalError("connect", {}, DriverError(*orig))
    first = orig[0]
    expected = isinstance(first, dict) and first["C"] == "3D000"
    assert (refused_for_good(error) is not None) is expected


class Gate:
    """A plugin that blocks in its delivery until ``opened`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.order: list[str] = []

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.entered.set()
        self.opened.wait(30)
        self.order.append(envelope.target_id)


def test_retry_dead_waits_for_a_relay_holding_the_event(
    engine: Engine, due_outbox: Outbox
) -> None:
    """An event recorded for two plugins: one gave up on it (dead), the
    other's relay is delivering it. ``retry_dead`` meanwhile waits for that
    relay's batch, then makes the dead delivery due: the relay, saving the
    states it had read, rewrote it as dead, and the retry was lost."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite takes one writer at a time: no relay runs beside it")
    dying, gate = Counter(failing=True), Gate()
    writer = emitter_for(due_outbox, dying, dispatch="relay")
    writer.register(gate, name="gated")
    commit_events(engine, writer, ["a"])
    only_dying = emitter_for(due_outbox, dying)
    only_dying.relay(engine, max_attempts=1)  # "sink" gives up on "a"
    assert [row["dead_plugins"] for row in list_dead(engine, due_outbox)] == [
        {"sink": "RuntimeError('down')"}
    ]
    only_gated = AuditEmitter(load_entrypoints=False, outbox=due_outbox)
    only_gated.register(gate, name="gated")
    relaying = threading.Thread(target=only_gated.relay, args=(engine,))
    relaying.start()
    try:
        assert gate.entered.wait(30)  # the relay holds "a"
        retried: list[int] = []
        retrying = threading.Thread(
            target=lambda: retried.append(retry_dead(engine, due_outbox))
        )
        retrying.start()
        time.sleep(0.5)  # retry_dead runs against the held event
    finally:
        gate.opened.set()
        relaying.join(30)
    retrying.join(30)
    assert retried == [1]
    assert list_dead(engine, due_outbox) == []
    dying.failing = False
    only_dying.relay(engine)
    assert dying.order == ["a"] and gate.order == ["a"]
    assert count_pending(engine, due_outbox) == 0


UPDATE_OUTBOX = re.compile(r"^\s*UPDATE\s+[`\"]?(\w+\.)?scale_outbox[`\"]?\s", re.I)


def test_the_outbox_table_only_ever_gets_inserts_and_deletes(
    engine: Engine, due_outbox: Outbox
) -> None:
    """Through dispatch, failures, retries, a dead delivery, retry_dead and
    prune, no statement updates the outbox table (Debezium's outbox event
    router skips, or fails on, updates)."""
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def capture(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    try:
        flaky = Counter(failing=True)
        emitter = emitter_for(due_outbox, flaky)
        commit_events(engine, emitter, ["a", "b"])
        assert emitter.flush(timeout=10)
        emitter.relay(engine, max_attempts=2, backoff=0)
        emitter.relay(engine, max_attempts=2, backoff=0)
        assert retry_dead(engine, due_outbox) == 2
        emitter.relay(engine, max_attempts=1, backoff=0)  # dead again
        assert prune(engine, due_outbox, timedelta(0)) == 2
        flaky.failing = False
        commit_events(engine, emitter, ["c"])
        assert emitter.flush(timeout=10)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert flaky.order == ["c"]
    assert count_pending(engine, due_outbox) == 0
    assert any(re.match(r"\s*DELETE", s, re.I) for s in statements)
    assert [s for s in statements if UPDATE_OUTBOX.match(s)] == []


def test_the_relay_delivers_numbers_beyond_64_bits_whole(
    sqlite_file_engine: Engine,
) -> None:
    """Payload numbers orjson would read as floats (an int beyond 64 bits)
    reach the plugin as they were staged, with or without orjson."""
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(sqlite_file_engine)
    payload = {"big": 2**100, "negative": -(2**70), "small": 7, "text": "x" * 30}

    class Keep:
        def __init__(self) -> None:
            self.payloads: list[Any] = []

        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            self.payloads.append(envelope.payload)

    writer = emitter_for(outbox, Keep(), dispatch="relay")
    with Session(sqlite_file_engine) as session:
        writer.attach(session)
        stage_event(
            session, "doc.read", target_type="doc", target_id="1", action="read",
            payload=payload,
        )  # fmt: skip
        session.commit()
    keep = Keep()
    assert emitter_for(outbox, keep).relay(sqlite_file_engine).delivered == 1
    assert keep.payloads == [payload]
    assert type(keep.payloads[0]["big"]) is int


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"a": 2**70}),
        json.dumps({"a": [1, -(2**64)]}),
        '{"a":9223372036854775807,"b":-9223372036854775808}',
        json.dumps({"a": "7" * 25, "b": 2**80}),
        '{"a":"\u00e9\u4e2d","b":1.5,"c":null}',
        '{"a":"x\ud800"}',
    ],
)
def test_stored_json_parses_as_json_reads_it(text: str) -> None:
    """The relay's parse of a stored row (through orjson where it is
    installed) gives what ``json.loads`` gives: ints beyond 64 bits whole,
    and a lone surrogate, which orjson refuses, still read."""
    from access_audit.outbox._store import _parse_json

    parsed = _parse_json(text)
    assert parsed == json.loads(text)
    assert [type(value) for value in parsed.values()] == [
        type(value) for value in json.loads(text).values()
    ]


def test_a_polling_relay_on_postgresql_wakes_on_commit_not_on_its_interval(
    engine: Engine, due_outbox: Outbox
) -> None:
    """With a 60-second interval, a polling relay on PostgreSQL delivers a
    fresh commit within seconds: the outbox's trigger NOTIFYs at COMMIT and
    the relay LISTENs. A rolled-back write wakes nothing."""
    if engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    assert relayed_while_polling_slowly(engine, due_outbox, "late") == (["late"], 1)


def relayed_while_polling_slowly(
    engine: Engine, outbox: Outbox, target_id: str
) -> tuple[list[str], int]:
    """Commit an event on *target_id* while a relay polls every 60 seconds;
    the target ids it delivered within 10 seconds, and its count of them
    once stopped."""
    writer = emitter_for(outbox, Counter(), dispatch="relay")
    sink = Counter()
    relay = PollingRelay(emitter_for(outbox, sink), engine, interval=60.0)
    try:
        time.sleep(0.5)  # the relay found nothing and waits
        with Session(engine) as session:
            writer.attach(session)
            stage_event(
                session, "doc.read", target_type="doc", target_id=target_id,
                action="read",
            )  # fmt: skip
            session.commit()
        wait_until(lambda: bool(sink.order))
    finally:
        stats = relay.stop()
    return sink.order, stats.delivered


def test_an_outbox_whose_full_name_is_long_commits_and_wakes_the_relay(
    engine: Engine,
) -> None:
    """PostgreSQL refuses a NOTIFY channel of 64 bytes or more, and the
    channel was the table's full name: an outbox in a schema of 44
    characters failed every commit. A long name gets a shortened channel,
    the same for the trigger and the relay's LISTEN."""
    if engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    schema = f"aa_{uuid.uuid4().hex}".ljust(60, "s")
    outbox = Outbox(table_name="access_audit_outbox", schema=schema)
    outbox.relay_after = timedelta(0)
    with engine.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        outbox.create(engine)
        assert relayed_while_polling_slowly(engine, outbox, "long") == (["long"], 1)
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


class _UnprintableError(Exception):
    """An exception whose repr() fails or gives text no database stores."""

    def __init__(self, text: str | None) -> None:
        super().__init__("down")
        self.text = text

    def __repr__(self) -> str:
        if self.text is None:
            raise AttributeError("'NoneType' object has no attribute 'status'")
        return self.text


class _Unprintable:
    def __init__(self, text: str | None) -> None:
        self.text = text

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        raise _UnprintableError(self.text)


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        (None, "<_UnprintableError: repr() failed>"),
        ("Api\x00Error()", "Api\\x00Error()"),
        ("Api\ud800Error()", "Api\\ud800Error()"),
    ],
    ids=["repr-raises", "nul", "lone-surrogate"],
)
def test_a_plugin_error_whose_repr_cannot_be_stored_is_retried_then_dead(
    engine: Engine, due_outbox: Outbox, text: str | None, stored: str
) -> None:
    """A plugin's error is stored as text: one whose ``repr()`` raises, or
    gives a NUL or a lone surrogate, is stored as what can be said of it.
    It made the commit's record fail, then every relay run raise, sending
    the healthy plugin's events again each time and never giving up."""
    good = Counter()
    emitter = AuditEmitter(load_entrypoints=False, outbox=due_outbox)
    emitter.register(good, name="good")
    emitter.register(_Unprintable(text), name="flaky")
    commit_events(engine, emitter, ["a", "b"])
    assert emitter.flush(timeout=10)
    assert status(engine, due_outbox).pending == {"flaky": 2}  # recorded
    # attempt 1 was the commit's; the run makes 2 and 3, then gives up
    stats = emitter.relay(engine, max_attempts=3, backoff=0)
    assert (stats.failed, stats.dead) == (4, 2), stats
    assert emitter.relay(engine, max_attempts=3, backoff=0).failed == 0
    assert sorted(good.order) == ["a", "b"]  # once each, at the commit
    found = status(engine, due_outbox)
    assert (found.pending, found.dead) == ({}, {"flaky": 2})
    delivery = due_outbox.delivery_table
    with engine.connect() as connection:
        [error] = set(
            connection.scalars(
                select(delivery.c.error).where(delivery.c.error.is_not(None))
            )
        )
    assert error == stored


def test_status_counts_pending_and_dead_per_plugin_and_the_oldest_pending(
    engine: Engine, due_outbox: Outbox
) -> None:
    """status() reads per-plugin pending and dead counts and the oldest
    pending event's time; ``access-audit status`` prints them."""
    good, flaky = Counter(), Counter(failing=True)
    emitter = AuditEmitter(load_entrypoints=False, outbox=due_outbox)
    emitter.register(good, name="good")
    emitter.register(flaky, name="flaky")
    before = datetime.now(timezone.utc)
    commit_events(engine, emitter, ["a", "b", "c"])
    assert emitter.flush(timeout=10)
    found = status(engine, due_outbox)
    assert found.events == 3
    assert found.pending == {"flaky": 3}
    assert found.dead == {}
    assert found.oldest_pending is not None
    assert (
        before - timedelta(seconds=1)
        <= found.oldest_pending
        <= before + timedelta(seconds=30)
    )
    emitter.relay(engine, max_attempts=1)  # flaky gives up on all three
    found = status(engine, due_outbox)
    assert (found.events, found.pending, found.dead) == (3, {}, {"flaky": 3})
    assert found.oldest_pending is None

    url = engine.url.render_as_string(hide_password=False)
    result = subprocess.run(
        [sys.executable, "-m", "access_audit", "status", "--database-url", url,
         "--table", "scale_outbox"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "outbox: 3 events, none pending",
        "  flaky: 0 pending, 3 dead",
    ]


def test_the_access_audit_console_script_is_installed() -> None:
    """``access-audit`` is a console script of the package, running the CLI."""
    from importlib.metadata import entry_points

    [script] = entry_points(group="console_scripts", name="access-audit")
    assert script.value == "access_audit.outbox._cli:main_exit"
    result = subprocess.run(
        [sys.executable, "-c", "from access_audit.outbox._cli import main_exit; "
         "main_exit()", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0
    assert "relay" in result.stdout and "status" in result.stdout


def test_a_plugin_not_tried_in_a_batch_keeps_its_retry_time(
    sqlite_file_engine: Engine,
) -> None:
    """A pending plugin held back behind an earlier failure of its target is
    not tried, and its next attempt is not pushed back by the batch."""
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(sqlite_file_engine)
    writer = emitter_for(outbox, Counter(), dispatch="relay")
    commit_events(sqlite_file_engine, writer, ["t", "t"])
    first, second = (row["id"] for row in outbox_rows(sqlite_file_engine, outbox))
    due = datetime.now(timezone.utc) - timedelta(seconds=5)
    with sqlite_file_engine.begin() as connection:
        for event_id in (first, second):
            connection.execute(
                insert(outbox.delivery_table).values(
                    event_id=event_id, plugin="sink", state="pending", attempts=3,
                    next_attempt_at=due, updated_at=due,
                )
            )  # fmt: skip
    flaky = Counter(failing=True)
    emitter_for(outbox, flaky).relay(sqlite_file_engine, backoff=100.0)
    with sqlite_file_engine.connect() as connection:
        times = dict(
            connection.execute(
                select(
                    outbox.delivery_table.c.event_id,
                    outbox.delivery_table.c.next_attempt_at,
                )
            ).all()
        )
    assert times[first] > datetime.now(timezone.utc) + timedelta(seconds=290)
    assert abs((times[second] - due).total_seconds()) < 1  # not tried: kept


class Proxy:
    """A TCP proxy to a database server that can be stopped and started
    again on the same port: to the relay behind it, the server went down
    (open connections cut, new ones refused) and came back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener: socket.socket | None = None
        self.port = 0
        self.links: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        self.port = listener.getsockname()[1]
        listener.listen()
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the accepting thread
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
            link.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            server = socket.create_connection(self.target)
            with self.lock:
                self.links += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pipe, args=(source, sink), daemon=True
                ).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_a_polling_relay_rides_out_a_server_restart(
    engine: Engine, due_outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The server goes away for two seconds (its connections cut, new ones
    refused) while a polling relay works, then comes back: the relay says
    so, keeps running, and delivers every event, those committed while the
    server was away included."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no server")
    from sqlalchemy import create_engine

    url = engine.url
    proxy = Proxy(url.host or "127.0.0.1", url.port or 0)
    proxy.start()
    relay_engine = create_engine(url.set(host="127.0.0.1", port=proxy.port))
    writer = emitter_for(due_outbox, Counter(), dispatch="relay")
    sink = Counter()
    caplog.set_level("WARNING", logger="access_audit")
    relay = PollingRelay(emitter_for(due_outbox, sink), relay_engine, interval=0.05)
    try:
        commit_events(engine, writer, ["before"])
        deadline = time.monotonic() + 20
        while "before" not in sink.order and time.monotonic() < deadline:
            time.sleep(0.05)
        proxy.stop()
        commit_events(engine, writer, ["during"])  # straight to the server
        time.sleep(2.0)
        assert relay.running()
        proxy.start()
        deadline = time.monotonic() + 60
        while "during" not in sink.order and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stats = relay.stop()
        relay_engine.dispose()
        proxy.stop()
    # At least once: a batch whose COMMIT the cut lost comes again (about
    # one run in ten on MariaDB), in order.
    assert list(dict.fromkeys(sink.order)) == ["before", "during"]
    assert sink.order == sorted(sink.order, key=["before", "during"].index)
    assert stats.reconnects >= 1
    assert any("trying again" in message for message in caplog.messages)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_the_cli_reports_database_errors_in_one_line(
    engine: Engine,
    outbox: Outbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreachable database for ``status`` exits 1, and a table that went
    missing while the relay ran (here, past its start-up check) exits 2, each
    with one line naming the database's complaint, not a traceback."""
    from access_audit.outbox import _relay
    from access_audit.outbox._cli import main

    url = engine.url.set(database="no_such_database_here")
    with pytest.raises(SystemExit) as exited:
        main(["status", "--database-url", url.render_as_string(hide_password=False)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_database_here" in err

    monkeypatch.setattr(_relay, "check_tables", lambda bind, outbox: None)
    with pytest.raises(SystemExit) as exited:
        main([
            "relay", "--once", "--no-entrypoints", "--table", "no_such_outbox",
            "--database-url", engine.url.render_as_string(hide_password=False),
        ])  # fmt: skip
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_outbox" in err, err


def test_a_listening_relay_polls_once_its_lost_listen_connection_is_back(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit notified while the LISTEN connection was down is missed:
    the wait returns as soon as it LISTENs again, for a poll, instead of
    leaving that commit to the interval."""
    if engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    from access_audit.outbox import _wake

    monkeypatch.setattr(_wake, "_RETRY_LISTEN", 0.2)
    outbox = Outbox(table_name="wake_outbox", relay_after=timedelta(0))
    listener = listen(engine, outbox)
    assert listener is not None
    try:
        listener.wait(0.01, stopped=lambda: False)  # listening
        backend = listener._connection.info.backend_pid
        with engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        started = time.monotonic()
        listener.wait(10.0, stopped=lambda: False)  # lost; back 0.2 s later
        waited = time.monotonic() - started
    finally:
        listener.close()
    assert waited < 5.0, waited


def test_a_relay_listens_before_its_first_poll(engine: Engine) -> None:
    """A relay LISTENs as it starts, before its first poll: a commit between
    that poll and its first wait wakes it, instead of waiting out the whole
    interval (CI once saw a 60-second relay miss such a commit)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    outbox = Outbox(table_name="wake_outbox", relay_after=timedelta(0))
    outbox.drop(engine)
    outbox.create(engine)
    listener = listen(engine, outbox)
    assert listener is not None
    try:
        # the relay's first poll found nothing; this commit lands before it waits
        commit_events(engine, emitter_for(outbox, Counter(), dispatch="relay"), ["x"])
        started = time.monotonic()
        listener.wait(10.0, stopped=lambda: False)
        waited = time.monotonic() - started
    finally:
        listener.close()
        outbox.drop(engine)
    assert waited < 5.0, waited


def test_a_listening_relay_wakes_when_notified_rows_are_due_not_per_commit(
    engine: Engine,
) -> None:
    """Commits NOTIFY all the time; their rows are due ``relay_after`` later.
    The relay's wait returns when the first of them is due (or at its
    interval), not at every notification: an idle relay polled once per
    commit, hundreds of times a second, for rows not due for a minute."""
    if engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    outbox = Outbox(table_name="wake_outbox", relay_after=timedelta(seconds=0.4))
    outbox.drop(engine)
    outbox.create(engine)
    writer = emitter_for(outbox, Counter(), dispatch="relay")
    listener = listen(engine, outbox)
    assert listener is not None
    stop = threading.Event()

    def commits() -> None:
        while not stop.is_set():
            commit_events(engine, writer, ["x"])
            time.sleep(0.01)

    thread = threading.Thread(target=commits)
    try:
        listener.wait(0.01, stopped=lambda: False)  # LISTEN before the commits
        thread.start()
        started = time.monotonic()
        listener.wait(5.0, stopped=lambda: False)
        waited = time.monotonic() - started
    finally:
        stop.set()
        thread.join(10)
        listener.close()
        outbox.drop(engine)
    assert 0.35 <= waited < 2.0, waited
