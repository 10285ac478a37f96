"""The outbox relay: re-delivery after a crash or a failing plugin, dead letters,
order per target, retention, the command line, and several relays at once.

Database tests run on SQLite, PostgreSQL and MariaDB (the ``engine`` fixture)
unless they say otherwise. Each creates the outbox table on the engine and
drops it afterwards; server engines already work in a namespace of this run.
Those marked ``@on_every_relay`` (or listing ``relay`` variants) relay both
through the engine (``emitter.relay``) and through an async engine on the same
database (``await emitter.arelay``: aiosqlite, asyncpg); the ``relay`` fixture
stands for either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from support import (
    aiosqlite_engine,
    commit_shared_targets,
    outbox_emitter,
    outbox_rows,
)

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event
from access_audit.outbox import (
    DEAD,
    DELIVERED,
    PENDING,
    Outbox,
    RelayStats,
    _claim,
    count_pending,
    list_dead,
    prune,
    retry_dead,
    status,
)
from conftest import RUN_NAMESPACE


class Sink:
    """A plugin that records every envelope it takes.

    ``fail_first`` makes the first that many calls per event raise;
    ``failing`` makes every call raise while it is true.
    """

    def __init__(self, *, failing: bool = False, fail_first: int = 0) -> None:
        self.events: list[AuditEventEnvelope] = []
        self.calls: dict[str, int] = {}
        self.failing = failing
        self.fail_first = fail_first

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        key = str(envelope.id)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.failing or self.calls[key] <= self.fail_first:
            raise RuntimeError(f"sink down for {envelope.target_id}")
        self.events.append(envelope)

    @property
    def names(self) -> list[str]:
        return [envelope.target_id for envelope in self.events]

    @property
    def ids(self) -> list[str]:
        return [str(envelope.id) for envelope in self.events]


def commit_events(
    engine: Engine, emitter: AuditEmitter, *transactions: list[str], flush: bool = True
) -> None:
    """Commit one transaction per list, staging an event per target id in it.

    With *flush*, wait until the outbox recorded what the dispatch delivered
    (inline dispatch records it on a thread of the outbox's own).
    """
    with OrmSession(engine) as session:
        emitter.attach(session)
        for targets in transactions:
            for target in targets:
                stage_event(
                    session, "item_updated", target_type="item", target_id=target,
                    action="update",
                )  # fmt: skip
            session.commit()
        emitter.detach(session)
    if flush:
        assert emitter.flush(timeout=30)


def make_due(engine: Engine, outbox: Outbox) -> None:
    """Make every row due now, as if ``relay_after`` and any backoff had passed.

    Retries wait in the delivery table until ``next_attempt_at``; a row with
    no delivery state waits ``relay_after`` from its ``created_at``, so every
    row is moved back by that much (which keeps the commit order).
    """
    table, state = outbox.table, outbox.delivery_table
    now = datetime.now(timezone.utc)
    with engine.begin() as connection:
        connection.execute(
            update(state).where(state.c.state == PENDING).values(next_attempt_at=now)
        )
        moved = [
            {"row_id": row.id, "moved_to": row.created_at - outbox.relay_after}
            for row in connection.execute(select(table.c.id, table.c.created_at))
        ]
        if moved:
            connection.execute(
                update(table)
                .where(table.c.id == bindparam("row_id"))
                .values(
                    created_at=bindparam("moved_to", type_=table.c.created_at.type)
                ),
                moved,
            )


def assert_outbox_empty(engine: Engine, outbox: Outbox) -> None:
    """Every event left both outbox tables: each plugin it was for took it."""
    assert outbox_rows(engine, outbox) == []
    with engine.connect() as connection:
        left = connection.execute(
            select(func.count()).select_from(outbox.delivery_table)
        ).scalar_one()
    assert left == 0
    assert count_pending(engine, outbox) == 0


def numbers(rows: list[dict[str, Any]]) -> list[int]:
    """``payload["n"]`` of each outbox row (see :func:`commit_numbered`)."""
    return [json.loads(row["payload"])["payload"]["n"] for row in rows]


def relay_until_idle(relay: Relay, emitter: AuditEmitter, **options: Any) -> RelayStats:
    """Run the relay until a run neither delivers nor fails; return the totals."""
    total = RelayStats()
    for _ in range(50):
        stats = relay(emitter, once=True, **options)
        total.delivered += stats.delivered
        total.failed += stats.failed
        total.dead += stats.dead
        total.batches += stats.batches
        total.pruned += stats.pruned
        total.missing_plugins = stats.missing_plugins
        if not stats.delivered and not stats.failed:
            return total
    raise AssertionError(f"the relay did not settle: {total}")


def database_url(engine: Engine | AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


@dataclasses.dataclass
class Relay:
    """How a test relays on ``engine``'s database: ``emitter.relay(engine)``,
    or ``await emitter.arelay()`` on an async engine for the same database,
    on an event loop of the test's own."""

    engine: Engine
    async_engine: AsyncEngine | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, emitter: AuditEmitter, **options: Any) -> RelayStats:
        if self.async_engine is None:
            stats: RelayStats = emitter.relay(self.engine, **options)
        else:
            assert self.loop is not None
            stats = self.loop.run_until_complete(
                emitter.arelay(self.async_engine, **options)
            )
        return stats

    def cli_arguments(self) -> list[str]:
        """``--database-url`` (and ``--schema``) for the command line."""
        if self.async_engine is None:
            return ["--database-url", database_url(self.engine)]
        arguments = ["--database-url", database_url(self.async_engine)]
        if self.async_engine.dialect.name == "postgresql":
            # asyncpg takes no search_path in the URL: name the run's schema.
            arguments += ["--schema", RUN_NAMESPACE]
        return arguments


def async_twin(engine: Engine, driver: str) -> AsyncEngine:
    """An async engine on *engine*'s database (the run's schema on PostgreSQL)."""
    if driver == "aiosqlite":
        assert engine.url.database is not None
        return aiosqlite_engine(Path(engine.url.database))
    url = engine.url.set(drivername="postgresql+asyncpg").difference_update_query(
        ["options"]
    )
    return create_async_engine(
        url, connect_args={"server_settings": {"search_path": RUN_NAMESPACE}}
    )


@pytest.fixture
def relay(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Relay]:
    """Relays on ``engine``'s database: through it, or (param ``aiosqlite``,
    ``asyncpg``) through an async engine on the same database."""
    driver = getattr(request, "param", "sync")
    if driver == "sync":
        yield Relay(engine)
        return
    loop = asyncio.new_event_loop()
    async_engine = async_twin(engine, driver)
    try:
        yield Relay(engine, async_engine, loop)
    finally:
        loop.run_until_complete(async_engine.dispose())
        loop.close()


SERVER_RELAYS = [("postgresql", "sync"), ("postgresql", "asyncpg"), ("mariadb", "sync")]
EVERY_RELAY = [("sqlite", "sync"), ("sqlite", "aiosqlite"), *SERVER_RELAYS]
"""(database, driver the relay runs through): MariaDB has no async driver here."""


def relays(*variants: tuple[str, str]) -> pytest.MarkDecorator:
    """Parametrise ``engine`` and ``relay`` together over *variants*."""
    return pytest.mark.parametrize(
        ("engine", "relay"),
        variants,
        indirect=True,
        ids=[f"{database}-{driver}" for database, driver in variants],
    )


on_every_relay = relays(*EVERY_RELAY)


# --------------------------------------------------------------------------
# Crash between COMMIT and delivery
# --------------------------------------------------------------------------

CRASHING_CHILD = """
import sys
import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from access_audit import AuditEmitter, hookimpl, stage_event
from access_audit.outbox import Outbox

url, dispatch, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = create_engine(url)
entered = threading.Semaphore(0)
never = threading.Event()


class Blocking:
    @hookimpl
    def audit_event_logged(self, envelope):
        entered.release()
        never.wait()  # blocks forever: the process is killed in here


emitter = AuditEmitter(load_entrypoints=False, outbox=Outbox(), dispatch=dispatch)
emitter.register(Blocking(), name="sink")


def stage(session, target):
    stage_event(
        session, "item_updated", target_type="item", target_id=target,
        action="update",
    )


def commit(index):
    with Session(engine) as session:
        emitter.attach(session)
        stage(session, f"c{index}-0")
        stage(session, f"c{index}-1")
        session.commit()


for index in range(count):
    with Session(engine) as session:
        emitter.attach(session)
        stage(session, f"r{index}")
        session.flush()
        session.rollback()
    if dispatch == "inline":
        # Each commit blocks in delivery, so each gets a thread of its own.
        threading.Thread(target=commit, args=(index,), daemon=True).start()
        entered.acquire()
    else:
        commit(index)
if dispatch == "background":
    entered.acquire()
print("blocked", flush=True)
never.wait()
"""


@pytest.mark.parametrize(
    "dispatch", ["inline", "background"], ids=["inline", "background"]
)
@relays(*EVERY_RELAY[:4])
def test_relay_delivers_what_a_killed_process_committed_exactly_once(
    engine: Engine, relay: Relay, outbox: Outbox, tmp_path: Path, dispatch: str
) -> None:
    """After SIGKILL between COMMIT and delivery, the relay delivers each event once."""
    count = 4 if dispatch == "inline" else 10
    script = tmp_path / "crashing_child.py"
    script.write_text(CRASHING_CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), database_url(engine), dispatch, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, child.kill)
    watchdog.start()
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "blocked\n", line or child.communicate()[1]
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    committed = [f"c{index}-{n}" for index in range(count) for n in (0, 1)]
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == committed
    # As written before COMMIT: no delivery was recorded for any of them.
    assert [(row["states"], row["parked"]) for row in rows] == [({}, False)] * len(
        committed
    )
    assert {row["recipients"] for row in rows} == {'["sink"]'}

    fresh = Sink()
    early = relay(outbox_emitter(outbox, sink=fresh), once=True)
    assert early.delivered == 0  # rows are left to their dispatch for relay_after
    assert fresh.events == []
    make_due(engine, outbox)
    stats = relay(outbox_emitter(outbox, sink=fresh), once=True)
    assert fresh.names == committed
    assert sorted(fresh.ids) == sorted(row["id"] for row in rows)
    assert len(set(fresh.ids)) == len(committed)
    assert stats.delivered == len(committed)
    assert stats.failed == 0
    assert_outbox_empty(engine, outbox)
    make_due(engine, outbox)
    again = relay(outbox_emitter(outbox, sink=fresh), once=True)
    assert again.delivered == 0
    assert len(fresh.events) == len(committed)


@on_every_relay
def test_relay_leaves_a_fresh_row_to_its_own_dispatch_for_relay_after(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """A relay does not take rows whose dispatch is still under way; it does later."""
    gate = threading.Event()
    entered = threading.Event()
    dispatched: list[str] = []

    class Gated:
        @hookimpl
        def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
            entered.set()
            gate.wait(30)
            dispatched.append(envelope.target_id)

    app = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="background")
    app.register(Gated(), name="sink")
    try:
        commit_events(engine, app, ["a"], ["b"], flush=False)
        assert entered.wait(10)
        rows = outbox_rows(engine, outbox)
        assert [(row["aggregateid"], row["states"]) for row in rows] == [
            ("a", {}),
            ("b", {}),
        ]
        relayed = Sink()
        stats = relay(outbox_emitter(outbox, sink=relayed), once=True)
        assert stats.delivered == 0
        assert relayed.events == []
        assert [row["id"] for row in outbox_rows(engine, outbox)] == [
            row["id"] for row in rows
        ]
    finally:
        gate.set()
        assert app.close(timeout=10)
    assert dispatched == ["a", "b"]
    assert_outbox_empty(engine, outbox)  # the dispatch recorded it took both
    make_due(engine, outbox)
    assert relay(outbox_emitter(outbox, sink=relayed), once=True).delivered == 0
    assert relayed.events == []


# --------------------------------------------------------------------------
# Retries, dead letters
# --------------------------------------------------------------------------


@on_every_relay
def test_plugin_failing_three_times_gets_the_event_once_through_the_relay(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """A plugin failing 3 times then working gets each event once; others no repeat."""
    flaky, steady = Sink(fail_first=3), Sink()
    emitter = outbox_emitter(outbox, flaky=flaky, steady=steady)
    commit_events(engine, emitter, ["a", "b"], ["c"])
    assert steady.names == ["a", "b", "c"]
    assert flaky.events == []
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["a", "b", "c"]
    for row in rows:
        assert row["states"] == {"flaky": PENDING, "steady": DELIVERED}
        assert row["attempts"]["flaky"] == 1
        assert "sink down for" in row["errors"]["flaky"]
    # A failed dispatch leaves the row due at once: no make_due().

    stats = relay_until_idle(relay, emitter, backoff=0)
    assert flaky.names == ["a", "b", "c"]
    assert set(flaky.calls.values()) == {4}
    assert steady.names == ["a", "b", "c"]
    assert stats.failed == 2 * 3  # two more failures per event, then success
    assert stats.delivered == 3
    assert flaky.ids == steady.ids == [row["id"] for row in rows]
    assert_outbox_empty(engine, outbox)


class ExitingSink(Sink):
    """A plugin whose client library calls ``sys.exit()`` when it gives up."""

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        raise SystemExit(3)


@on_every_relay
def test_a_plugin_raising_system_exit_is_a_failure_that_ends_dead(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """SystemExit from a plugin in the relay is that plugin's failure: it is
    retried and ends dead, and the other plugins get their events. Let
    through, it stopped every run before anything was recorded, forever."""
    steady = Sink()
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="relay")
    emitter.register(ExitingSink(), name="exiting")
    emitter.register(steady, name="steady")
    commit_events(engine, emitter, ["a"], ["b"])
    make_due(engine, outbox)
    stats = relay_until_idle(relay, emitter, backoff=0, max_attempts=2)
    assert steady.names == ["a", "b"]
    assert stats.dead == 2
    rows = outbox_rows(engine, outbox)
    assert [row["states"] for row in rows] == [
        {"exiting": DEAD, "steady": DELIVERED}
    ] * 2


@on_every_relay
def test_always_failing_plugin_ends_dead_and_retry_dead_redelivers_once_fixed(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """After max_attempts a delivery is dead; retry_dead re-delivers only to its plugin."""
    broken, steady = Sink(failing=True), Sink()
    emitter = outbox_emitter(outbox, broken=broken, steady=steady)
    commit_events(engine, emitter, ["a"], ["b"])
    make_due(engine, outbox)

    stats = relay_until_idle(relay, emitter, backoff=0, max_attempts=3)
    assert stats.dead == 2
    assert stats.failed == 2 * 2  # the dispatch's failure was the first attempt
    assert broken.events == []
    assert set(broken.calls.values()) == {3}
    assert steady.names == ["a", "b"]
    rows = outbox_rows(engine, outbox)
    assert [row["aggregateid"] for row in rows] == ["a", "b"]
    for row in rows:
        assert row["states"] == {"broken": DEAD, "steady": DELIVERED}
        assert row["attempts"]["broken"] == 3
        assert row["parked"]
    dead = list_dead(engine, outbox)
    assert [entry["id"] for entry in dead] == [row["id"] for row in rows]
    assert [entry["target"] for entry in dead] == ["item/a", "item/b"]
    for entry in dead:
        assert entry["status"] == DEAD
        assert list(entry["dead_plugins"]) == ["broken"]
        assert "sink down for" in entry["dead_plugins"]["broken"]
    assert status(engine, outbox).dead == {"broken": 2}
    assert count_pending(engine, outbox) == 0
    # Dead rows are not retried by later runs.
    make_due(engine, outbox)
    assert relay(emitter, once=True, backoff=0).failed == 0
    assert retry_dead(engine, outbox, {"steady"}) == 0
    assert list_dead(engine, outbox) == dead

    broken.failing = False
    assert retry_dead(engine, outbox) == 2
    assert list_dead(engine, outbox) == []
    rows = outbox_rows(engine, outbox)
    for row in rows:
        assert row["states"] == {"broken": PENDING, "steady": DELIVERED}
        assert not row["parked"]
    relay_until_idle(relay, emitter, backoff=0, max_attempts=3)
    assert broken.names == ["a", "b"]
    assert steady.names == ["a", "b"]
    assert broken.ids == steady.ids == [row["id"] for row in rows]
    assert_outbox_empty(engine, outbox)


CLI_PLUGIN = """
import os

from access_audit import hookimpl


@hookimpl
def audit_event_logged(envelope):
    with open(os.environ["AUDIT_RELAY_CLI_LOG"], "a") as log:
        log.write(f"{envelope.id} {envelope.target_id}\\n")
"""
CLI_PLUGIN_NAME = "audit_relay_cli_sink"
"""The module plugin's name: pluggy names a module plugin by its module name."""


def run_cli(relay: Relay, tmp_path: Path, *options: str) -> str:
    """Run ``python -m access_audit relay`` on *relay*'s database; its stdout."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tmp_path), environment.get("PYTHONPATH")])
    )
    environment["AUDIT_RELAY_CLI_LOG"] = str(tmp_path / "cli.log")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "access_audit",
            "relay",
            *relay.cli_arguments(),
            "--no-entrypoints",
            *options,
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@on_every_relay
def test_cli_lists_dead_deliveries_and_retry_dead_redelivers_them(
    engine: Engine, relay: Relay, outbox: Outbox, tmp_path: Path
) -> None:
    """``relay --list-dead`` shows dead rows; ``--retry-dead --once`` delivers them."""
    (tmp_path / f"{CLI_PLUGIN_NAME}.py").write_text(CLI_PLUGIN)
    broken, steady = Sink(failing=True), Sink()
    emitter = outbox_emitter(outbox, steady=steady, **{CLI_PLUGIN_NAME: broken})
    commit_events(engine, emitter, ["a", "b"])
    make_due(engine, outbox)
    relay_until_idle(relay, emitter, backoff=0, max_attempts=2)
    rows = outbox_rows(engine, outbox)
    assert [row["states"] for row in rows] == [
        {CLI_PLUGIN_NAME: DEAD, "steady": DELIVERED}
    ] * 2
    assert {row["parked"] for row in rows} == {True}

    output = run_cli(relay, tmp_path, "--list-dead")
    listed = [json.loads(line) for line in output.splitlines()]
    assert [entry["id"] for entry in listed] == [row["id"] for row in rows]
    assert [list(entry["dead_plugins"]) for entry in listed] == [[CLI_PLUGIN_NAME]] * 2
    assert [entry["status"] for entry in listed] == [DEAD] * 2

    output = run_cli(
        relay, tmp_path, "--retry-dead", "--once", "--backoff", "0",
        "--plugin", CLI_PLUGIN_NAME,
    )  # fmt: skip
    assert "2 dead rows are due again" in output
    assert "2 delivered" in output
    log = (tmp_path / "cli.log").read_text().splitlines()
    assert log == [f"{row['id']} {row['aggregateid']}" for row in rows]
    assert steady.names == ["a", "b"]
    assert broken.events == []
    assert_outbox_empty(engine, outbox)
    assert run_cli(relay, tmp_path, "--list-dead") == ""


@pytest.mark.parametrize(
    "relay_plugins", [["taken"], []], ids=["other-plugin-only", "no-plugins"]
)
@on_every_relay
def test_relay_without_a_plugin_leaves_that_plugins_deliveries_pending(
    engine: Engine, relay: Relay, outbox: Outbox, relay_plugins: list[str]
) -> None:
    """A relay lacking a plugin does not mark rows delivered that it still lacks."""
    taken, failing = Sink(), Sink(failing=True)
    commit_events(engine, outbox_emitter(outbox, taken=taken, failing=failing), ["a"])
    make_due(engine, outbox)
    [before] = outbox_rows(engine, outbox)
    assert before["states"] == {"taken": DELIVERED, "failing": PENDING}
    other_relay = Sink()
    relay_emitter = outbox_emitter(
        outbox, **{name: other_relay for name in relay_plugins}
    )
    stats = relay(relay_emitter, once=True)
    assert stats.delivered == 0
    assert other_relay.events == []
    [row] = outbox_rows(engine, outbox)
    assert row["id"] == before["id"]
    assert row["states"] == {"taken": DELIVERED, "failing": PENDING}
    assert row["attempts"]["failing"] == 1
    assert not row["parked"]
    assert count_pending(engine, outbox) == 1
    assert status(engine, outbox).pending == {"failing": 1}


@on_every_relay
def test_relay_lacking_a_plugin_leaves_crashed_rows_pending_for_it(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """Rows a crash left unmarked stay pending for a plugin the relay lacks."""
    siem, s3 = Sink(), Sink()
    commit_events(engine, crashed_emitter(outbox, siem=siem, s3=s3), ["a"])
    assert siem.events == s3.events == []
    [row] = outbox_rows(engine, outbox)
    assert (row["states"], row["parked"]) == ({}, False)
    make_due(engine, outbox)
    late_s3 = Sink()
    relay(outbox_emitter(outbox, s3=late_s3), once=True)
    [row] = outbox_rows(engine, outbox)
    assert late_s3.names == ["a"]
    assert json.loads(row["recipients"]) == ["s3", "siem"]
    assert (row["states"], row["parked"]) == ({"s3": DELIVERED}, False)
    assert count_pending(engine, outbox) == 1
    make_due(engine, outbox)
    late_siem, s3_again = Sink(), Sink()
    relay(outbox_emitter(outbox, siem=late_siem, s3=s3_again), once=True)
    assert late_siem.names == ["a"]
    assert s3_again.events == []
    assert_outbox_empty(engine, outbox)


def crashed_emitter(outbox: Outbox, **plugins: object) -> AuditEmitter:
    """An emitter that only writes the outbox rows, for *plugins* by keyword
    name: its commits leave the rows as a process killed right after COMMIT
    does (no delivery recorded)."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="relay")
    for name, plugin in plugins.items():
        emitter.register(plugin, name=name)
    return emitter


# --------------------------------------------------------------------------
# Plugin names: a row goes only to the names it was written for
# --------------------------------------------------------------------------

APP_NAME = "app.audit.Siem"
"""The name the application registered its plugin under."""

TWENTY = [
    [f"t{number}" for number in range(start, start + 5)] for start in (0, 5, 10, 15)
]
"""Twenty events in four transactions."""


def leave_pending(engine: Engine, outbox: Outbox, how: str) -> list[str]:
    """Commit TWENTY for APP_NAME and leave every row pending; the row ids.

    ``failed``: the plugin raised at dispatch. ``crashed``: the process died
    before recording anything (the rows are as written before COMMIT).
    """
    make = crashed_emitter if how == "crashed" else outbox_emitter
    commit_events(engine, make(outbox, **{APP_NAME: Sink(failing=True)}), *TWENTY)
    make_due(engine, outbox)
    rows = outbox_rows(engine, outbox)
    assert len(rows) == 20
    assert [row["states"] for row in rows] == [pending_states(how)] * 20
    assert {row["parked"] for row in rows} == {False}
    assert {row["recipients"] for row in rows} == {json.dumps([APP_NAME])}
    return [row["id"] for row in rows]


def pending_states(how: str) -> dict[str, str]:
    """The delivery state :func:`leave_pending` leaves each row with."""
    return {} if how == "crashed" else {APP_NAME: PENDING}


def relay_emitter(outbox: Outbox, plugin: object, name: str | None) -> AuditEmitter:
    """A relay's emitter with *plugin* under *name* (None: its class path)."""
    emitter = AuditEmitter(load_entrypoints=False, outbox=outbox)
    emitter.register(plugin, name=name)
    return emitter


@pytest.mark.parametrize(
    ("relay_name", "how"),
    [(None, "failed"), ("siem", "crashed")],
    ids=["class-path-name-after-failure", "other-name-after-crash"],
)
@on_every_relay
def test_relay_under_another_name_delivers_nothing_and_reports_the_recorded_name(
    engine: Engine,
    relay: Relay,
    outbox: Outbox,
    caplog: pytest.LogCaptureFixture,
    relay_name: str | None,
    how: str,
) -> None:
    """The same plugin class under another name gets nothing; the rows' name is reported."""
    ids = leave_pending(engine, outbox, how)
    caplog.set_level("WARNING", logger="access_audit")
    misnamed = Sink()
    stats = relay_until_idle(relay, relay_emitter(outbox, misnamed, relay_name))
    assert misnamed.events == []
    assert stats.delivered == stats.failed == 0
    assert stats.missing_plugins == {APP_NAME: 20}
    assert stats.missing_lines() == [
        f"relay: 20 rows pending for plugin {APP_NAME!r}, which this relay does not have"
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        f"20 rows pending for plugin {APP_NAME!r}, which this relay does not have"
        in message
        for message in warnings
    ), warnings
    rows = outbox_rows(engine, outbox)
    assert [row["id"] for row in rows] == ids
    assert [row["states"] for row in rows] == [pending_states(how)] * 20
    assert {row["parked"] for row in rows} == {False}

    make_due(engine, outbox)
    recorded = Sink()
    stats = relay_until_idle(relay, relay_emitter(outbox, recorded, APP_NAME))
    assert sorted(recorded.ids) == sorted(ids)
    assert len(recorded.ids) == len(set(recorded.ids)) == 20
    assert stats.delivered == 20
    assert stats.missing_plugins == {}
    assert_outbox_empty(engine, outbox)
    make_due(engine, outbox)
    assert (
        relay_until_idle(relay, relay_emitter(outbox, Sink(), relay_name)).delivered
        == 0
    )
    assert misnamed.events == []


@on_every_relay
def test_relay_with_both_names_delivers_each_event_once_to_the_recorded_name(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """A relay that also has the plugin under another name sends it nothing."""
    ids = leave_pending(engine, outbox, "failed")
    recorded, misnamed = Sink(), Sink()
    emitter = outbox_emitter(outbox, **{APP_NAME: recorded, "siem": misnamed})
    stats = relay_until_idle(relay, emitter)
    assert sorted(recorded.ids) == sorted(ids)
    assert len(recorded.ids) == 20
    assert misnamed.events == []
    assert stats.delivered == 20
    assert stats.missing_plugins == {}
    assert_outbox_empty(engine, outbox)


def test_a_polling_relay_warns_once_about_a_name_it_lacks(
    engine: Engine,
    outbox: Outbox,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay polling an idle outbox warns about a lacking name once, not each poll."""
    from access_audit.outbox import _relay

    leave_pending(engine, outbox, "failed")
    caplog.clear()
    caplog.set_level("WARNING", logger="access_audit")
    polls = [0]
    batch = _relay._relay_batch

    def counted_batch(*args: Any) -> int:
        polls[0] += 1
        return batch(*args)

    monkeypatch.setattr(_relay, "_relay_batch", counted_batch)
    stop = threading.Event()
    emitter = relay_emitter(outbox, Sink(), "siem")
    runner = threading.Thread(
        target=lambda: emitter.relay(engine, once=False, interval=0.01, stop=stop)
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while (polls[0] < 10 or not caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        runner.join(30)
    assert polls[0] >= 10
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert f"20 rows pending for plugin {APP_NAME!r}" in messages[0]


@on_every_relay
def test_cli_delivers_only_under_the_given_name_and_prints_the_missing_names(
    engine: Engine, relay: Relay, outbox: Outbox, tmp_path: Path
) -> None:
    """``--plugin MODULE`` under its own name delivers nothing; ``NAME=MODULE`` once each."""
    (tmp_path / f"{CLI_PLUGIN_NAME}.py").write_text(CLI_PLUGIN)
    ids = leave_pending(engine, outbox, "failed")
    log = tmp_path / "cli.log"

    output = run_cli(relay, tmp_path, "--once", "--plugin", CLI_PLUGIN_NAME)
    assert not log.exists()
    assert "0 delivered" in output
    assert (
        f"relay: 20 rows pending for plugin {APP_NAME!r}, which this relay does "
        "not have\n" in output
    )
    assert "--plugin NAME=MODULE:OBJECT" in output
    assert count_pending(engine, outbox) == 20

    make_due(engine, outbox)
    output = run_cli(
        relay, tmp_path, "--once", "--plugin", f"{APP_NAME}={CLI_PLUGIN_NAME}"
    )
    assert "20 delivered" in output
    assert "does not have" not in output
    make_due(engine, outbox)
    run_cli(relay, tmp_path, "--once", "--plugin", f"{APP_NAME}={CLI_PLUGIN_NAME}")
    run_cli(relay, tmp_path, "--once", "--plugin", CLI_PLUGIN_NAME)
    delivered = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(delivered) == sorted(ids)
    assert len(delivered) == 20
    assert_outbox_empty(engine, outbox)


def test_the_final_report_counts_the_missing_plugins_rows_afresh(
    engine: Engine, outbox: Outbox
) -> None:
    """A polling relay counts the rows of plugins it lacks when it is idle,
    at most once a minute: by the time it stops, another relay may have
    delivered them. Its last lines say what is pending then, not "20 rows
    pending" beside "0 pending"."""
    import io

    from access_audit.outbox import RelayStats
    from access_audit.outbox._cli import RelayOptions, _command

    counted = RelayStats()
    counted.missing_plugins = {APP_NAME: 20}  # since delivered by another relay
    out = io.StringIO()
    _command(RelayOptions(), engine, outbox, out, lambda **_: counted)
    assert (
        out.getvalue() == "relay: 0 delivered, 0 failed, 0 dead, 0 batches, 0 pending\n"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["=json"], "--plugin: empty plugin name in '=json'"),
        (["siem="], "--plugin: expected an import string"),
        (["siem=no_such_module_here:Sink"], "--plugin: cannot import"),
        (
            ["siem=access_audit.sinks:LoggingSink"] * 2,
            "--plugin 'siem=access_audit.sinks:LoggingSink': a plugin named 'siem' "
            "is registered already",
        ),
        (["siem=json"], "--plugin 'siem=json': <module 'json'"),
    ],
    ids=["empty-name", "empty-target", "not-importable", "name-taken", "no-hooks"],
)
def test_cli_refuses_an_invalid_plugin_option_naming_it(
    capsys: pytest.CaptureFixture[str], values: list[str], message: str
) -> None:
    """A malformed, unimportable, duplicate or hookless ``--plugin`` is a
    usage error naming it."""
    from access_audit.outbox._cli import main

    argv = ["relay", "--database-url", "sqlite://", "--no-entrypoints"]
    for value in values:
        argv += ["--plugin", value]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "access-audit relay: error: " + message in error, error
    assert len(error.strip().splitlines()) == 1, error


# --------------------------------------------------------------------------
# Order per target
# --------------------------------------------------------------------------


class OrderedSink(Sink):
    """Records ``payload["n"]``; fails once for the numbers in ``fail_once``."""

    def __init__(self) -> None:
        super().__init__(failing=True)
        self.fail_once: set[int] = set()

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        number = envelope.payload["n"]
        if number in self.fail_once:
            self.fail_once.discard(number)
            raise RuntimeError(f"transient failure for {number}")
        super().audit_event_logged(envelope)


def commit_numbered(engine: Engine, emitter: AuditEmitter, targets: list[str]) -> None:
    """One transaction per target, each event numbered in commit order; then
    wait until the outbox recorded what the dispatch delivered."""
    with OrmSession(engine) as session:
        emitter.attach(session)
        for number, target in enumerate(targets):
            stage_event(
                session, "item_updated", target_type="item", target_id=target,
                action="update", payload={"n": number},
            )  # fmt: skip
            session.commit()
        emitter.detach(session)
    assert emitter.flush(timeout=30)


@on_every_relay
def test_relay_delivers_in_commit_order(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """Undelivered events reach a plugin in commit order, across batches."""
    sink = OrderedSink()
    emitter = outbox_emitter(outbox, sink=sink)
    targets = [f"t{number % 3}" for number in range(12)]
    commit_numbered(engine, emitter, targets)
    sink.failing = False
    make_due(engine, outbox)
    assert numbers(outbox_rows(engine, outbox)) == list(range(12))
    stats = relay(emitter, once=True, batch_size=5)
    assert [e.payload["n"] for e in sink.events] == list(range(12))
    assert sink.names == targets
    assert stats.batches >= 3
    assert_outbox_empty(engine, outbox)


@on_every_relay
def test_relay_keeps_a_targets_later_events_behind_one_waiting_for_retry(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """While a target's event waits for a retry, its later events wait too."""
    sink = OrderedSink()
    emitter = outbox_emitter(outbox, sink=sink)
    commit_numbered(engine, emitter, ["x", "y", "x", "y"])  # n = 0, 1, 2, 3
    sink.failing = False
    sink.fail_once = {0}
    make_due(engine, outbox)

    relay(emitter, once=True, backoff=60)
    assert [e.payload["n"] for e in sink.events] == [1, 3]  # x waits behind n=0
    rows = outbox_rows(engine, outbox)  # y's events left: delivered
    assert numbers(rows) == [0, 2]
    assert [row["states"] for row in rows] == [{"sink": PENDING}] * 2
    # n=0 failed again; n=2 was held back, not tried.
    assert [row["attempts"] for row in rows] == [{"sink": 2}, {"sink": 1}]

    make_due(engine, outbox)
    relay(emitter, once=True, backoff=60)
    assert [e.payload["n"] for e in sink.events] == [1, 3, 0, 2]
    assert_outbox_empty(engine, outbox)


@on_every_relay
def test_a_transaction_held_back_holds_back_its_other_targets_too(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """Transactions (x), (x, y), (y): x's first event waits for a retry, so
    the second transaction waits behind it, and with it y's events: the
    third transaction's y event never overtakes the second's."""
    sink = OrderedSink()
    emitter = outbox_emitter(outbox, sink=sink)
    number = 0
    with OrmSession(engine) as session:
        emitter.attach(session)
        for targets in (["x"], ["x", "y"], ["y"]):
            for target in targets:
                stage_event(
                    session, "item_updated", target_type="item", target_id=target,
                    action="update", payload={"n": number},
                )  # fmt: skip
                number += 1
            session.commit()
        emitter.detach(session)
    assert emitter.flush(timeout=30)
    sink.failing = False
    sink.fail_once = {0}
    make_due(engine, outbox)

    relay(emitter, once=True, backoff=60)
    assert [e.payload["n"] for e in sink.events] == []
    make_due(engine, outbox)
    relay(emitter, once=True, backoff=60)
    assert [e.payload["n"] for e in sink.events] == [0, 1, 2, 3]
    assert_outbox_empty(engine, outbox)


@relays(*SERVER_RELAYS)
def test_a_row_another_relay_holds_keeps_the_targets_later_events_back(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """A target's events after one locked by another relay wait for it."""
    sink = OrderedSink()
    emitter = outbox_emitter(outbox, sink=sink)
    commit_numbered(engine, emitter, ["x", "y", "x", "y", "x"])  # n = 0 .. 4
    sink.failing = False
    make_due(engine, outbox)
    table = outbox.table
    held_id = outbox_rows(engine, outbox)[2]["id"]  # n = 2, target x
    with engine.connect() as other_relay:
        other_relay.begin()
        other_relay.execute(
            select(table.c.id).where(table.c.id == held_id).with_for_update()
        ).all()
        relay(emitter, once=True)
        # n = 0 is before the held row; n = 4 (x) must wait behind it.
        assert [e.payload["n"] for e in sink.events] == [0, 1, 3]
        other_relay.rollback()
    assert numbers(outbox_rows(engine, outbox)) == [2, 4]
    relay(emitter, once=True)
    assert [e.payload["n"] for e in sink.events] == [0, 1, 3, 2, 4]
    assert_outbox_empty(engine, outbox)


@pytest.mark.parametrize(
    "engine", ["postgresql", "mariadb"], indirect=True, ids=["postgresql", "mariadb"]
)
def test_a_second_relay_claims_the_rows_after_those_the_first_holds(
    engine: Engine, outbox: Outbox
) -> None:
    """Another relay takes the rows after those the first one holds. On
    MariaDB it reads past the locked ones and says it passed them; on
    PostgreSQL the server passes them (the flag matters only to a relay
    that claimed nothing)."""
    from access_audit.outbox._claim import claim

    sink = OrderedSink()
    commit_numbered(
        engine, outbox_emitter(outbox, sink=sink), [f"t{n}" for n in range(12)]
    )
    make_due(engine, outbox)
    now = datetime.now(timezone.utc)
    with engine.connect() as first, engine.connect() as second:
        first.begin()
        second.begin()
        taken_first, contended_first = claim(first, outbox, ["sink"], now, 4)
        taken_second, contended_second = claim(second, outbox, ["sink"], now, 4)
        first.rollback()
        second.rollback()
    passed = engine.dialect.name != "postgresql"
    assert (contended_first, contended_second) == (False, passed)
    for taken in (*taken_first, *taken_second):
        assert taken.plugins == ["sink"]
        assert taken.row.payload is not None
    claimed = [
        [taken.row.envelope().payload["n"] for taken in claims]
        for claims in (taken_first, taken_second)
    ]
    assert claimed == [[0, 1, 2, 3], [4, 5, 6, 7]]


@on_every_relay
def test_a_target_waiting_for_retry_does_not_hold_back_other_targets(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """Events of other targets are delivered while one target's backlog waits."""
    sink = OrderedSink()
    emitter = outbox_emitter(outbox, sink=sink)
    commit_numbered(engine, emitter, ["x"] * 8 + ["y"])  # y is n = 8
    sink.failing = False
    sink.fail_once = set(range(8))  # every x fails its next attempt
    make_due(engine, outbox)

    relay(emitter, once=True, backoff=60, batch_size=2)
    assert sink.names == ["y"]
    rows = outbox_rows(engine, outbox)  # y's event left: delivered
    assert numbers(rows) == list(range(8))
    assert {row["aggregateid"] for row in rows} == {"x"}
    assert [row["states"] for row in rows] == [{"sink": PENDING}] * 8


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------


@on_every_relay
def test_retention_prunes_old_dead_rows_only(
    engine: Engine, relay: Relay, outbox: Outbox
) -> None:
    """The relay's retention deletes events given up on longer ago than it, nothing else."""
    sink = Sink(failing=True)
    emitter = outbox_emitter(outbox, sink=sink)
    commit_events(engine, emitter, ["old-1", "old-2"], ["recent"])
    assert relay_until_idle(relay, emitter, backoff=0, max_attempts=2).dead == 3
    commit_events(engine, emitter, ["undelivered"])
    sink.failing = False
    commit_events(engine, emitter, ["delivered"])  # leaves the outbox at once
    sink.failing = True
    rows = outbox_rows(engine, outbox)
    assert [(row["aggregateid"], row["parked"]) for row in rows] == [
        ("old-1", True),
        ("old-2", True),
        ("recent", True),
        ("undelivered", False),
    ]
    ids = {row["aggregateid"]: row["id"] for row in rows}
    old = [ids["old-1"], ids["old-2"], ids["undelivered"]]
    table, state = outbox.table, outbox.delivery_table
    long_ago = datetime.now(timezone.utc) - timedelta(days=10)
    with engine.begin() as connection:
        connection.execute(
            update(table).where(table.c.id.in_(old)).values(created_at=long_ago)
        )
        connection.execute(
            update(state).where(state.c.event_id.in_(old)).values(updated_at=long_ago)
        )
    stats = relay(emitter, once=True, backoff=60, retention=timedelta(days=7))
    assert stats.pruned == 2
    remaining = {
        row["aggregateid"]: (row["states"], row["parked"])
        for row in outbox_rows(engine, outbox)
    }
    assert remaining == {
        "recent": ({"sink": DEAD}, True),
        "undelivered": ({"sink": PENDING}, False),
    }
    assert prune(engine, outbox, timedelta(days=7)) == 0
    assert prune(engine, outbox, timedelta(0)) == 1
    remaining = {
        row["aggregateid"]: (row["states"], row["parked"])
        for row in outbox_rows(engine, outbox)
    }
    assert remaining == {"undelivered": ({"sink": PENDING}, False)}
    with engine.connect() as connection:
        kept = set(connection.execute(select(state.c.event_id)).scalars())
    assert kept == {ids["undelivered"]}  # the pruned events' state went too


# --------------------------------------------------------------------------
# Several relays at once
# --------------------------------------------------------------------------


class SharedSink:
    """Appends (relay, n, target) to a list shared by every relay, under a lock."""

    def __init__(self, relay: str, into: list[tuple[str, int, str]]) -> None:
        self.relay = relay
        self.into = into
        self.lock = threading.Lock()

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        with self.lock:
            self.into.append((self.relay, envelope.payload["n"], envelope.target_id))


class StuckSink:
    """Hangs at a gate, then fails: a sink that is down while a backlog builds."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    @hookimpl
    def audit_events_committed(self, envelopes: tuple[AuditEventEnvelope, ...]) -> None:
        self.gate.wait(30)
        raise RuntimeError("sink is down")


@pytest.mark.parametrize(
    "engine", ["postgresql", "mariadb"], indirect=True, ids=["postgresql", "mariadb"]
)
def test_two_relays_at_once_deliver_each_event_once(
    engine: Engine, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Two concurrent relays over 5,000 events deliver each once, in order per target."""
    transactions, per_transaction, targets = 250, 20, 97
    # The backlog: "sink" hangs, so the background queue (one batch) drops
    # the rest, and what it did take fails: every row stays pending for "sink".
    stuck = StuckSink()
    backlog = AuditEmitter(
        load_entrypoints=False, outbox=outbox, dispatch="background",
        queue_size=1, queue_full="drop",
    )  # fmt: skip
    backlog.register(stuck, name="sink")
    caplog.set_level("CRITICAL", logger="access_audit")
    try:
        with OrmSession(engine) as session:
            backlog.attach(session)
            commit_shared_targets(session, transactions, per_transaction, targets)
    finally:
        stuck.gate.set()
        backlog.close(timeout=30)
    assert backlog.dropped >= transactions - 2
    total = transactions * per_transaction
    assert count_pending(engine, outbox) == total
    make_due(engine, outbox)

    delivered: list[tuple[str, int, str]] = []
    shared_lock = threading.Lock()
    start = threading.Barrier(2)
    totals: dict[str, int] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        sink = SharedSink(name, delivered)
        sink.lock = shared_lock
        emitter = outbox_emitter(outbox, sink=sink)
        count = 0
        try:
            start.wait()
            deadline = time.monotonic() + 60
            while count_pending(engine, outbox) and time.monotonic() < deadline:
                stats = emitter.relay(engine, once=True, batch_size=50)
                count += stats.delivered
                if not stats.delivered:
                    time.sleep(0.005)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        totals[name] = count

    threads = [threading.Thread(target=run, args=(name,)) for name in ("r1", "r2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    numbers = [number for _, number, _ in delivered]
    assert len(numbers) == total
    assert sorted(numbers) == list(range(total))
    assert sum(totals.values()) == total
    # No share of the work is promised: here every transaction touches 20 of
    # 97 targets, so keeping each target in order leaves little to run side
    # by side; what two relays must never do is deliver twice or reorder.
    by_target: dict[str, list[int]] = {}
    for _, number, target in delivered:
        by_target.setdefault(target, []).append(number)
    for target, seen in by_target.items():
        assert seen == sorted(seen), f"{target} out of commit order: {seen}"
    assert_outbox_empty(engine, outbox)


class Taking:
    """Records each event it takes, per relay; fails every time if *failing*."""

    def __init__(self, relay: str, into: list[tuple[str, str]], failing: bool) -> None:
        self.relay, self.into, self.failing = relay, into, failing

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.into.append((self.relay, envelope.target_id))
        if self.failing:
            raise ConnectionError("down")


@pytest.mark.parametrize("engine", ["mariadb"], indirect=True, ids=["mariadb"])
def test_a_relay_that_read_before_another_delivered_sends_nothing_again(
    engine: Engine, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relay A reads the due rows and their delivery state; before it locks
    them, relay B delivers them ("good" takes the event, "bad" fails and
    backs off for a minute). A must read the state again once it holds the
    rows: it must not send the event to "good" again, nor retry "bad" before
    its backoff, nor overwrite B's attempt count (on MariaDB it read its
    transaction's first snapshot). On PostgreSQL the reading relay holds
    the transaction's first row meanwhile, so the other one cannot come
    between; what could (a relay committing between the snapshot of the
    statement that locks the first rows and its lock) is closed the same
    way, by reading the state again."""
    taken: list[tuple[str, str]] = []

    def relay_emitter(name: str) -> AuditEmitter:
        return outbox_emitter(
            outbox,
            good=Taking(name, taken, failing=False),
            bad=Taking(name, taken, failing=True),
        )

    app = AuditEmitter(load_entrypoints=False, outbox=outbox, dispatch="relay")
    app.register(Taking("app", taken, failing=False), name="good")
    app.register(Taking("app", taken, failing=True), name="bad")
    commit_events(engine, app, ["t1"])
    make_due(engine, outbox)

    read, go_on = threading.Event(), threading.Event()
    load_states = _claim._load_states

    def pausing(connection: Any, outbox_: Outbox, rows: Any) -> None:
        load_states(connection, outbox_, rows)
        if threading.current_thread().name == "A" and not read.is_set():
            read.set()
            go_on.wait(10)

    monkeypatch.setattr(_claim, "_load_states", pausing)
    stats: dict[str, RelayStats] = {}

    def relay_a() -> None:
        stats["A"] = relay_emitter("A").relay(engine, once=True, backoff=60)

    thread = threading.Thread(target=relay_a, name="A")
    thread.start()
    try:
        assert read.wait(10)
        stats["B"] = relay_emitter("B").relay(engine, once=True, backoff=60)
    finally:
        go_on.set()
        thread.join(10)
    assert taken == [("B", "t1"), ("B", "t1")]  # to "good", and to "bad", failing
    [row] = outbox_rows(engine, outbox)
    assert row["states"] == {"good": DELIVERED, "bad": PENDING}
    assert row["attempts"]["bad"] == 1
