"""What the broker plugins' tests share: access-audit-redis, -rabbitmq, -kafka.

Imported as ``broker_support`` by ``examples/plugins/{redis,rabbitmq,kafka}/tests``
(the repository's root ``conftest.py`` puts this folder on ``sys.path``); no
conftest.py there, so that the core suite's ``from conftest import ...`` keeps
meaning ``tests/conftest.py``. The test modules make their fixtures from these
helpers:

- the plugin tests: a maker of plugins of either kind closed afterwards, an
  emitter with the plugin attached, stand-alone envelopes, and the checks of
  the package's entry point;
- the end-to-end tests: an application (a child process) SIGKILLed inside
  the real plugin's hook after COMMIT, the relay that then delivers, and the
  bookkeeping of a consumer that de-duplicates by the event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from support import Base, Failures, Item, Recorder, operation, outbox_rows

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, stage_event
from access_audit.outbox import Outbox, count_pending

T = TypeVar("T")

# -- the plugin tests -----------------------------------------------------------


def emitter_loop_threads() -> int:
    """How many event-loop threads access_audit runs (for sync-side async hooks)."""
    return sum(t.name == "access_audit-asyncio" for t in threading.enumerate())


def threads_named(name: str) -> int:
    """How many running threads are called *name*."""
    return sum(t.name == name for t in threading.enumerate())


def close(plugin: Any) -> None:
    """Close a plugin of either kind from synchronous code.

    An async plugin (one with a coroutine ``aclose``) is closed by running
    ``aclose()`` on a loop of its own, any other by ``close()``.
    """
    if inspect.iscoroutinefunction(getattr(plugin, "aclose", None)):
        asyncio.run(plugin.aclose())
    else:
        plugin.close()


@contextlib.contextmanager
def plugin_maker(
    sync: Callable[..., T],
    asynchronous: Callable[..., T],
    defaults: dict[str, Any],
    closing: Callable[[T], object] = close,
) -> Iterator[Callable[..., T]]:
    """Make plugins of either kind (``kind="sync"|"async"``) from *defaults*
    and the caller's options; close every one made (by *closing*) after."""
    made: list[T] = []

    def make(kind: str = "sync", **options: Any) -> T:
        cls = asynchronous if kind == "async" else sync
        plugin = cls(**{**defaults, **options})
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        closing(plugin)


def attach(
    name: str, engine: Engine, plugin: object, outbox: Outbox | None = None
) -> tuple[sessionmaker[Session], Recorder, Failures]:
    """An emitter with *plugin* as *name*, a recorder and a failure log."""
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter([recorder, failures], load_entrypoints=False, outbox=outbox)
    emitter.register(plugin, name=name)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    return maker, recorder, failures


def envelope(
    target_id: str = "g",
    payload: Any = None,
    *,
    event_type: str = "member_added",
    target_type: str = "group",
) -> AuditEventEnvelope:
    """A stand-alone envelope, as a relay rebuilds one from its row."""
    now = "2024-05-01T12:00:00+00:00"
    return AuditEventEnvelope.from_dict(
        {
            "id": str(uuid.uuid4()),
            "event_type": event_type,
            "timestamp": now,
            "staged_at": now,
            "actor_id": "system",
            "actor_email": None,
            "target_type": target_type,
            "target_id": target_id,
            "target_name": None,
            "action": "add",
            "reason": None,
            "payload": payload or {},
            "metadata": {},
            "transaction_id": str(uuid.uuid4()),
            "sequence": 0,
        }
    )


def assert_entry_point_is_loaded(
    distribution: str, name: str, package: ModuleType
) -> None:
    """*distribution* is installed, its only entry point is *name* =
    ``<package>:plugin``, and AuditEmitter() registers that plugin as *name*."""
    found = importlib.metadata.distribution(distribution)
    assert [
        (ep.name, ep.value) for ep in found.entry_points if ep.group == "access_audit"
    ] == [(name, f"{package.__name__}:plugin")]
    emitter = AuditEmitter(load_entrypoints=True)
    assert emitter.plugin_manager.get_plugin(name) is package.plugin


def assert_unconfigured_entry_point_is_no_outbox_recipient(
    caplog: pytest.LogCaptureFixture,
    name: str,
    package: ModuleType,
    message: str,
    unset: str,
) -> None:
    """Unconfigured (*message* logged, *unset* in its repr), the entry-point
    plugin *name* implements no hook, so a row kept for another plugin that
    failed ("down") does not name it."""
    with caplog.at_level(logging.DEBUG, logger=package.__name__):
        assert isinstance(package.from_env({}), package.Unconfigured)
    assert [r.getMessage() for r in caplog.records] == [message]
    assert isinstance(package.plugin, package.Unconfigured)
    assert unset in repr(package.plugin)

    class Down:
        @hookimpl
        def audit_event_logged(self) -> None:
            raise ConnectionError("down")

    outbox = Outbox()
    emitter = AuditEmitter(load_entrypoints=True, outbox=outbox)
    emitter.register(Down(), name="down")
    manager = emitter.plugin_manager
    assert manager.get_plugin(name) is package.plugin
    assert manager.get_hookcallers(package.plugin) == []
    engine = create_engine("sqlite://")
    outbox.create(engine)
    Base.metadata.create_all(engine)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    with maker() as session:
        operation(session, "quiet")
        session.commit()
    emitter.flush()
    (row,) = outbox_rows(engine, outbox)  # kept for "down"
    recipients = json.loads(row["recipients"])
    assert "down" in recipients
    assert name not in recipients
    engine.dispose()


def commit_twice_on_the_applications_loop(
    plugin: Any,
    name: str,
    state: Callable[[], object],
    states: tuple[object, object, object],
    *,
    loop_ran_meanwhile: bool = False,
) -> Recorder:
    """Two AsyncSession commits, on a loop of the test's, with the async
    *plugin* registered as *name*: both are stored, each published on that
    loop (not the emitter's), nothing failed. *state()* is *states* before
    the first publish, after the commits and after ``aclose()`` (twice).
    With *loop_ran_meanwhile*, the loop ran another task while they did."""
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter([recorder, failures], load_entrypoints=False)
    emitter.register(plugin, name=name)
    loop_threads = emitter_loop_threads()
    before, during, after = states

    async def main() -> list[str]:
        engine = create_async_engine("sqlite+aiosqlite://")
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            assert state() == before  # nothing before the first publish
            for target in ("one", "two"):
                async with maker() as session:
                    session.add(Item(name=target))
                    stage_event(
                        session, "item_created", target_type="item",
                        target_id=target, action="create",
                    )  # fmt: skip
                    await session.commit()
            assert state() == during  # this loop's, reused
            assert emitter_loop_threads() == loop_threads  # the app's loop did it
            if loop_ran_meanwhile:
                assert len(ticks) > 2  # the loop ran other tasks meanwhile
            async with maker() as session:
                return list(await session.scalars(select(Item.name)))
        finally:
            ticker.cancel()
            await plugin.aclose()
            await plugin.aclose()
            await engine.dispose()

    assert asyncio.run(main()) == ["one", "two"]
    assert state() == after
    assert failures.calls == []
    return recorder


def commit_three_and_roll_back_one(maker: sessionmaker[Session]) -> None:
    """Commit "alpha" and "admins" (a group_member_added of a group), then
    "beta"; roll "rolled-back" back: three events committed, in that order."""
    with maker() as session:
        operation(session, "alpha")
        stage_event(
            session,
            "group_member_added",
            target_type="group",
            target_id="admins",
            action="add",
            payload={"member": "alice"},
        )
        session.commit()
        operation(session, "beta")
        session.commit()
        operation(session, "rolled-back")
        session.rollback()


def fail_one_commit(
    database: tuple[Engine, Outbox],
    plugin: Any,
    name: str,
    seconds: tuple[float, float] = (0, 3),
) -> tuple[tuple[AuditEventEnvelope, ...], BaseException]:
    """Commit one event with *plugin* (down) as *name*: within *seconds* the
    hook fails and audit_delivery_failed reports it once; the outbox keeps
    the event pending for *name*. The envelopes and the error reported."""
    engine, outbox = database
    maker, recorder, failures = attach(name, engine, plugin, outbox)
    started = time.monotonic()
    with maker() as session:
        operation(session, "kept")
        session.commit()
    low, high = seconds
    assert low <= time.monotonic() - started < high
    ((failed, envelopes, error),) = failures.calls
    assert failed == name
    assert envelopes == tuple(recorder.events)
    outbox.flush()
    (row,) = outbox_rows(engine, outbox)
    assert (row["id"], row["states"][name]) == (str(envelopes[0].id), "pending")
    return envelopes, error


# -- the end-to-end tests -------------------------------------------------------

COMMITS = 4  # the first COMMITS - 1 are published before the kill, the last is not

# Targets of each commit's events, as str.format patterns of the commit's
# prefix ("sent", "held") and index: two of each commit's own, or the same
# two in every commit (whose order per target is then checked).
TARGETS_PER_COMMIT = "{prefix}-{index}-0,{prefix}-{index}-1"
TARGETS_SHARED = "a,b"

APPLICATION = """
import importlib
import sys
import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from access_audit import AuditEmitter, hookimpl, stage_event
from access_audit.outbox import Outbox

database_url, plugin, url, keyword, destination, name, targets, commits = sys.argv[1:9]
module, _, cls = plugin.partition(":")
Plugin = getattr(importlib.import_module(module), cls)
engine = create_engine(database_url)
entered = threading.Semaphore(0)
never = threading.Event()


class KilledInItsHook(Plugin):
    # The real plugin, which publishes a batch staged as sent (and, where the
    # broker acknowledges, has it acknowledged) and then hangs, so its delivery
    # is never recorded; and hangs before publishing any other: the process is
    # killed in here.
    @hookimpl
    def audit_events_committed(self, envelopes):
        if envelopes[0].payload["sent"]:
            self.publish(envelopes)
        entered.release()
        never.wait()


emitter = AuditEmitter(load_entrypoints=False, outbox=Outbox())
emitter.register(KilledInItsHook(url, **{keyword: destination}), name=name)


def stage(session, target, index, sent):
    stage_event(
        session, "item_updated", target_type="item", target_id=target,
        action="update", payload={"commit": index, "sent": sent},
    )


def commit(index, sent):
    prefix = "sent" if sent else "held"
    with Session(engine) as session:
        emitter.attach(session)
        for target in targets.split(","):
            stage(session, target.format(prefix=prefix, index=index), index, sent)
        session.commit()


for index in range(int(commits)):
    with Session(engine) as session:  # rolled back: never delivered
        emitter.attach(session)
        first = targets.split(",")[0]
        stage(session, first.format(prefix="rolled-back", index=index), -1, True)
        session.rollback()
    # Each commit hangs in its delivery, so each gets a thread of its own.
    sent = index < int(commits) - 1
    threading.Thread(target=commit, args=(index, sent), daemon=True).start()
    entered.acquire()
print("hanging", flush=True)
never.wait()
"""


def committed_targets(targets: str) -> list[str]:
    """The target of every committed event, in commit order."""
    return [
        target.format(prefix="sent" if index < COMMITS - 1 else "held", index=index)
        for index in range(COMMITS)
        for target in targets.split(",")
    ]


@contextlib.contextmanager
def outbox_database(
    tmp_path: Path, *, models: bool = False
) -> Iterator[tuple[Engine, Outbox]]:
    """A file SQLite database with the outbox tables (and with *models* the
    test tables); the relay's Outbox."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    if models:
        Base.metadata.create_all(engine)
    outbox = Outbox(relay_after=timedelta(0))
    outbox.create(engine)
    try:
        yield engine, outbox
    finally:
        engine.dispose()


def kill_when_ready(command: list[str], ready: str) -> None:
    """Run *command* until it prints the line *ready*, then SIGKILL it.

    A watchdog kills it after 60 s; the test fails (with its stderr) if the
    first line is another, or if it did not die of the SIGKILL.
    """
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, child.kill)
    watchdog.start()
    try:
        assert child.stdout is not None
        first = child.stdout.readline()
        assert first == ready, first or child.communicate()[1]
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL


def kill_application_after_commit(
    tmp_path: Path,
    database: tuple[Engine, Outbox],
    *,
    plugin: str,
    url: str,
    destination: tuple[str, str],
    name: str,
    targets: str,
) -> list[dict[str, Any]]:
    """Run the application until each of its COMMITS commits hangs in the hook
    of *plugin* (``"module:Class"``, made with *url* and the keyword argument
    *destination*, registered as *name*), SIGKILL it; its outbox rows.

    Every commit is in the outbox, in order, with no delivery recorded.
    """
    engine, outbox = database
    script = tmp_path / "application.py"
    script.write_text(APPLICATION)
    keyword, value = destination
    arguments = [str(engine.url), plugin, url, keyword, value, name, targets]
    kill_when_ready(
        [sys.executable, str(script), *arguments, str(COMMITS)], "hanging\n"
    )
    rows = outbox_rows(engine, outbox)
    committed = committed_targets(targets)
    assert [row["aggregateid"] for row in rows] == committed
    assert [row["states"] for row in rows] == [{}] * len(committed)  # none recorded
    return rows


def relay_once(
    database: tuple[Engine, Outbox],
    plugin: Any,
    name: str,
    expected: int,
    **options: Any,
) -> AuditEmitter:
    """Relay once (with *options*) with *plugin* as *name*: *expected* events
    delivered, none failed or left pending; the relay's emitter."""
    engine, outbox = database
    relay = AuditEmitter(load_entrypoints=False, outbox=outbox)
    relay.register(plugin, name=name)
    stats = relay.relay(engine, once=True, **options)
    assert (stats.delivered, stats.failed) == (expected, 0)
    assert count_pending(engine, outbox) == 0
    return relay


def relay_everything(
    database: tuple[Engine, Outbox],
    plugin: Any,
    name: str,
    expected: int,
    closing: Callable[[Any], object] = close,
) -> None:
    """Relay once with *plugin* as *name*: *expected* events delivered, none
    failed or left; a second pass delivers nothing. Closes the plugin."""
    engine, outbox = database
    try:
        relay = relay_once(database, plugin, name, expected)
        assert outbox_rows(engine, outbox) == []
        again = relay.relay(engine, once=True)
        assert again.delivered == 0
    finally:
        closing(plugin)


class Deduplicating(Generic[T]):
    """What the READMEs tell consumers to do, the bookkeeping of it.

    Remember the ids processed (here in memory; in production in the store
    the consumer writes to, in the same transaction), skip what has an id
    already seen, acknowledge everything either way (the subclass does).
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.processed: list[T] = []
        self.read = 0

    def receive(self, event_id: str, item: T) -> None:
        """Count *item* read; process it unless its id was seen."""
        self.read += 1
        if event_id not in self.seen:
            self.seen.add(event_id)
            self.processed.append(item)
