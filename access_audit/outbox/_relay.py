"""The relay: re-deliver what a crash or a failing plugin left undelivered."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    delete,
    exc,
    func,
    insert,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.util import await_only, greenlet_spawn

from .._dispatch import deliver, delivering_plugins
from .._errors import AuditConfigurationError
from .._logging import logger
from ._claim import Claim, claim, group_rows, parked
from ._store import (
    DEAD,
    DELIVERED,
    PARKED,
    PENDING,
    OutboxRow,
    PluginState,
    chunks,
    delete_ids,
    error_text,
    forget,
    one_of,
    transaction,
)
from ._table import Outbox
from ._wake import listen

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from .._emitter import AuditEmitter

__all__ = [
    "OutboxStatus",
    "RelayStats",
    "arelay",
    "check_tables",
    "count_pending",
    "list_dead",
    "prune",
    "relay",
    "retry_dead",
    "status",
]


@dataclasses.dataclass(slots=True)
class RelayStats:
    """What a relay run did, counted per (event, plugin) delivery."""

    delivered: int = 0
    """Deliveries plugins took, including those of a batch whose database
    transaction failed afterwards (a killed connection): that batch is
    delivered, and counted, again."""
    failed: int = 0
    """Attempts that raised (each to be retried, or given up)."""
    dead: int = 0
    """Deliveries given up on after ``max_attempts`` during this run."""
    batches: int = 0
    pruned: int = 0
    reconnects: int = 0
    """Database errors the run waited out (a killed connection, a restart)."""
    missing_plugins: dict[str, int] = dataclasses.field(default_factory=dict)
    """Pending rows per plugin name this relay does not have, as counted when
    the run last found nothing due. Those rows are never delivered to another
    plugin: they wait for a relay with a plugin registered under that name."""

    def line(self, pending: int | None = None) -> str:
        """A one-line progress report."""
        text = (
            f"relay: {self.delivered} delivered, {self.failed} failed, "
            f"{self.dead} dead, {self.batches} batches"
        )
        return text if pending is None else f"{text}, {pending} pending"

    def missing_lines(self) -> list[str]:
        """One line per name in :attr:`missing_plugins`, sorted by name."""
        return [
            f"relay: {count} {'row' if count == 1 else 'rows'} pending for plugin "
            f"{name!r}, which this relay does not have"
            for name, count in sorted(self.missing_plugins.items())
        ]


def relay(
    emitter: AuditEmitter,
    bind: Engine | Connection,
    outbox: Outbox,
    *,
    batch_size: int = 500,
    max_attempts: int = 8,
    backoff: float = 1.0,
    max_backoff: float = 300.0,
    once: bool = True,
    interval: float = 1.0,
    retention: timedelta | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[RelayStats], None] | None = None,
) -> RelayStats:
    """Deliver pending outbox rows to the emitter's plugins that lack them.

    Rows are taken in commit order, a transaction's rows together; a target's
    later events wait while an earlier one of the same target waits for a
    retry. Each plugin gets only the events it has not taken
    (``audit_event_logged`` per event, ``audit_events_committed`` once per
    original transaction with those of its events); a plugin that raises is
    retried after ``backoff * 2**(attempts - 1)`` seconds (at most
    ``max_backoff``) and given up on after ``max_attempts`` (the row is then
    ``dead`` for it: see :func:`list_dead` and :func:`retry_dead`).

    An event is only ever delivered to the plugin names it was written for
    (the emitter's plugins when it committed), and plugins are matched by
    name alone: register each under the name the application gave it.
    Whenever a run finds nothing due (at its end with ``once``; otherwise at
    most once a minute), it counts the pending rows that wait for plugin
    names it does not have into :attr:`RelayStats.missing_plugins`, and logs
    a warning naming each such name when it first sees it.

    Rows are locked with ``FOR UPDATE SKIP LOCKED`` while they are delivered,
    so several relays may run at once on PostgreSQL and MariaDB without
    delivering an event to a plugin twice concurrently; on SQLite run one.

    :param once: return when no row is due; otherwise keep polling every
        ``interval`` seconds until ``stop`` is set. Due rows that other
        relays hold locked are waited for (up to 15 seconds), so relays
        run together with ``once`` leave nothing due behind.
    :param retention: when idle, delete the events that no plugin waits
        for any more and that some plugin gave up on longer ago than this
        (see :func:`prune`); a ``timedelta`` of at most a hundred years.
    :param progress: called with the running totals after each batch.
    :raises TypeError: *bind* is an ``AsyncEngine`` or ``AsyncConnection``
        (await :func:`arelay` with it instead).
    :raises AuditConfigurationError: an outbox table does not exist, or the
        database refuses the connection for good (a database, role or user
        that does not exist, a wrong password): such errors are not waited
        out as a killed connection or a restarting server is.
    """
    if not isinstance(bind, (Engine, Connection)):
        raise TypeError(
            f"relay() takes an Engine or a Connection, not {type(bind).__name__}; "
            "relay through an AsyncEngine or AsyncConnection with "
            "'await emitter.arelay(bind, ...)'"
        )
    check_options(batch_size, max_attempts, backoff, max_backoff, interval, retention)
    stopping = stop if stop is not None else threading.Event()
    listener = None if once else listen(bind, outbox)
    pause: Callable[[float], object] = stopping.wait
    if listener is not None:
        pause = functools.partial(listener.wait, stopped=stopping.is_set)
    try:
        return _poll(
            emitter, bind, outbox, stopping.is_set, pause,
            batch_size=batch_size, max_attempts=max_attempts, backoff=backoff,
            max_backoff=max_backoff, once=once, interval=interval,
            retention=retention, progress=progress,
        )  # fmt: skip
    finally:
        if listener is not None:
            listener.close()


async def arelay(
    emitter: AuditEmitter,
    bind: AsyncEngine | AsyncConnection,
    outbox: Outbox,
    *,
    batch_size: int = 500,
    max_attempts: int = 8,
    backoff: float = 1.0,
    max_backoff: float = 300.0,
    once: bool = True,
    interval: float = 1.0,
    retention: timedelta | None = None,
    stop: asyncio.Event | None = None,
    progress: Callable[[RelayStats], None] | None = None,
) -> RelayStats:
    """:func:`relay` from asyncio code, through an ``AsyncEngine`` or ``AsyncConnection``.

    The same run with the same options and guarantees, on the async driver
    (``postgresql+asyncpg``, ``sqlite+aiosqlite``): :func:`relay` runs on
    *bind*'s synchronous facade inside SQLAlchemy's greenlet bridge
    (``sqlalchemy.util.greenlet_spawn``), so each statement is awaited on
    the running loop, and the waits between polls are asyncio waits. The
    loop serves other tasks meanwhile; plugins are still called as by
    :func:`relay`, on the loop's thread, so one that blocks holds the loop
    while it runs.

    :param stop: with ``once=False``, the run returns its stats once this
        is set, waking from a wait between polls at once.

    Cancelling the task that awaits it ends the run too: a batch being
    delivered is rolled back (its rows stay pending and are delivered
    again, at least once as always), its connection is given back, and
    the :class:`asyncio.CancelledError` propagates.

    :raises TypeError: *bind* is a synchronous ``Engine`` or ``Connection``
        (call :func:`relay` with it instead).
    """
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    check_options(batch_size, max_attempts, backoff, max_backoff, interval, retention)
    sync_bind: Engine | Connection
    if isinstance(bind, AsyncEngine):
        sync_bind = bind.sync_engine
    elif isinstance(bind, AsyncConnection):
        if bind.sync_connection is None:
            await bind.start()
        assert bind.sync_connection is not None
        sync_bind = bind.sync_connection
    else:
        raise TypeError(
            f"arelay() takes an AsyncEngine or an AsyncConnection, not "
            f"{type(bind).__name__}; relay through a synchronous Engine or "
            "Connection with emitter.relay(bind, ...)"
        )
    stopping = stop if stop is not None else asyncio.Event()

    def pause(seconds: float) -> None:
        await_only(_wait(stopping, seconds))

    return await greenlet_spawn(
        _poll, emitter, sync_bind, outbox, stopping.is_set, pause,
        batch_size=batch_size, max_attempts=max_attempts, backoff=backoff,
        max_backoff=max_backoff, once=once, interval=interval,
        retention=retention, progress=progress,
    )  # fmt: skip


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep *seconds*, or until *stop* is set if that comes first."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


LONGEST_WAIT = 366 * 24 * 3600
"""The longest backoff or polling interval a relay takes, in seconds."""


def check_options(
    batch_size: int,
    max_attempts: int,
    backoff: float,
    max_backoff: float,
    interval: float,
    retention: timedelta | None,
    spell: Callable[[str], str] = str,
) -> None:
    """Refuse relay options that would claim nothing or never wait, or a
    ``max_backoff`` below the ``backoff`` it caps.

    :param spell: how an option's name is written in the message (the
        command line's ``--batch-size`` for ``batch_size``, say).
    :raises ValueError: naming the option.
    :raises TypeError: ``retention`` is not a ``timedelta``.
    """
    for name, value in (("batch_size", batch_size), ("max_attempts", max_attempts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{spell(name)} must be a whole number of at least 1, got {value!r}"
            )
    for name, number in (
        ("backoff", backoff),
        ("max_backoff", max_backoff),
        ("interval", interval),
    ):
        if (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not 0 <= number <= LONGEST_WAIT
        ):
            raise ValueError(
                f"{spell(name)} must be a number of seconds from 0 to "
                f"{LONGEST_WAIT:,} (a year), got {number!r}"
            )
    if max_backoff < backoff:
        raise ValueError(
            f"{spell('max_backoff')} ({float(max_backoff)}) must be at least "
            f"{spell('backoff')} ({float(backoff)}), the first retry's delay it "
            f"caps: raise {spell('max_backoff')} too (it defaults to 300)"
        )
    if retention is not None and not isinstance(retention, timedelta):
        raise TypeError(f"{spell('retention')} must be a timedelta, got {retention!r}")
    if retention is not None and not timedelta(0) <= retention <= LONGEST_RETENTION:
        raise ValueError(
            f"{spell('retention')} must be a timedelta from 0 to "
            f"{LONGEST_RETENTION.days:,} days, got {retention!r}"
        )


LONGEST_RETENTION = timedelta(days=36_500)
"""The longest ``retention`` (a hundred years): a relay's idea of "long
ago" is its clock less this, which must stay a date."""


_TRANSIENT = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)
"""What a killed connection or a restarting server raises through most
drivers: the relay waits and tries again."""


def transient(error: BaseException) -> bool:
    """Whether *error* is a database error the relay waits out: one of
    :data:`_TRANSIENT`, any error that ended the connection (asyncpg says
    only ``DBAPIError`` for a killed one; PostgreSQL's idle-in-transaction
    timeout is an ``InternalError``), or a connection refused as the
    driver connects (asyncpg raises the socket's ``OSError``)."""
    if isinstance(error, _TRANSIENT):
        return True
    if isinstance(error, exc.DBAPIError):
        return error.connection_invalidated
    return isinstance(error, OSError)


def refused_for_good(error: BaseException) -> str | None:
    """The server's reason, when *error* is a connection it refuses for as
    long as the URL stays as it is: a database, role or user that does not
    exist, a wrong password, no ``pg_hba.conf`` entry; a SQLite file whose
    directory does not exist. None for any other error.

    Known by PostgreSQL's SQLSTATE (asyncpg; pg8000 gives it among the
    server's fields), MySQL's error number (pymysql and the other MySQL
    drivers) or SQLite's error code; libpq (psycopg, psycopg2) gives no
    SQLSTATE for a refused connection, so there the server's message says
    it (in English, the server's default).

    Asked only until the relay first got in: once it runs, the same errors
    are waited out (SQLite cannot open its file when the process is out of
    file descriptors for a moment; a database restored under it is back).
    """
    if not isinstance(error, exc.DBAPIError) or error.orig is None:
        return None
    orig = error.orig
    first = orig.args[0] if orig.args else None
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is None and isinstance(first, dict):  # pg8000: the server's fields
        sqlstate = first.get("C")
    refused = (
        sqlstate in _REFUSED_SQLSTATES
        or (type(first) is int and first in _REFUSED_MYSQL)
        or getattr(orig, "sqlite_errorcode", None) == _SQLITE_CANTOPEN
        or _REFUSED_LIBPQ.search(str(orig)) is not None
    )
    if not refused:
        return None
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


_REFUSED_SQLSTATES = frozenset(("3D000", "28000", "28P01"))
"""No such database; a role that may not connect (or none such); a wrong password."""

_REFUSED_MYSQL = frozenset((1044, 1045, 1049, 1698))
"""Access denied to the database; to the user; no such database; access
denied by the user's authentication plugin."""

_SQLITE_CANTOPEN = 14

_REFUSED_LIBPQ = re.compile(
    r'FATAL:\s+(database ".*" does not exist|role ".*" does not exist|'
    r"password authentication failed|no pg_hba\.conf entry)"
)


_ONCE_RETRIES = 5
"""How many times a ``once`` run retries a database error before raising it."""

_MAX_RECONNECT_DELAY = 30.0

_CONTENDED_WAIT = 15.0
"""Seconds a ``once`` run keeps trying again while the only due rows it
finds are locked by others (each try after a short, random pause)."""


def _poll(
    emitter: AuditEmitter,
    bind: Engine | Connection,
    outbox: Outbox,
    stopped: Callable[[], bool],
    pause: Callable[[float], object],
    *,
    batch_size: int,
    max_attempts: int,
    backoff: float,
    max_backoff: float,
    once: bool,
    interval: float,
    retention: timedelta | None,
    progress: Callable[[RelayStats], None] | None,
) -> RelayStats:
    """The relay's loop; *pause* waits between polls, cut short once *stopped*.

    A database error that a killed connection or a restarting server
    raises is logged and retried with backoff (through an Engine, whose
    pool reconnects; a Connection given by the caller cannot be).
    """
    stats = RelayStats()
    plugins = sorted(delivering_plugins(emitter.plugin_manager))
    counted_at: float | None = None
    failures = 0
    checked = False
    contended_since: float | None = None
    from_head_at = time.monotonic() + _FROM_HEAD_EVERY
    while not stopped():
        try:
            if not checked:
                check_tables(bind, outbox)
                checked = True
            from_head = time.monotonic() >= from_head_at
            if from_head:
                from_head_at = time.monotonic() + _FROM_HEAD_EVERY
            done, contended = _relay_batch(
                emitter, bind, outbox, plugins, stats, batch_size, max_attempts,
                backoff, max_backoff, from_head,
            )  # fmt: skip
            if not done and not contended:
                # Idle (rows others hold locked are not idleness: a once
                # run looks again at once, see below).
                if retention is not None:
                    stats.pruned += prune(bind, outbox, retention)
                if (
                    counted_at is None
                    or time.monotonic() - counted_at >= _COUNT_MISSING_EVERY
                ):
                    _count_missing(bind, outbox, plugins, stats)
                    counted_at = time.monotonic()
        except Exception as error:
            reason = None if checked else refused_for_good(error)
            if reason is not None:
                raise AuditConfigurationError(
                    f"the database refused the relay's connection ({reason}); "
                    "check the database URL's database, user and password"
                ) from error
            if not transient(error):
                raise
            failures += 1
            if isinstance(bind, Connection) or (once and failures > _ONCE_RETRIES):
                raise
            delay = min(_MAX_RECONNECT_DELAY, 0.5 * 2 ** (failures - 1))
            stats.reconnects += 1
            logger.warning(
                "relay: database error (%s); trying again in %.1f s",
                str(error).splitlines()[0],
                delay,
            )
            pause(delay)
            continue
        if failures:
            logger.warning("relay: the database is back after %d errors", failures)
            failures = 0
        if done:
            contended_since = None
            if progress is not None:
                _report_progress(progress, stats)
            continue
        if once:
            # Rows another relay holds are delivered by it, or let go by an
            # attempt that locked only part of their transaction: look again
            # (at a random moment, so two such relays fall out of step)
            # rather than end with them pending.
            now = time.monotonic()
            if contended_since is None:
                contended_since = now
            if not contended or now - contended_since > _CONTENDED_WAIT:
                break
            pause(random.uniform(0.01, 0.1))
            continue
        pause(interval)
    return stats


def _report_progress(progress: Callable[[RelayStats], None], stats: RelayStats) -> None:
    """Call *progress*; a database error it meets (the CLI's progress line
    reads the pending count) skips that report, and the next batch waits it
    out. Any other error is the callback's own, and is raised."""
    try:
        progress(stats)
    except exc.DBAPIError as error:
        if not transient(error):
            raise
        logger.warning(
            "relay: no progress report (database error: %s)",
            str(error).splitlines()[0],
        )


_FROM_HEAD_EVERY = 1.0
"""Seconds between batches a relay claims reading from the outbox's head
even where it could take transactions by their first rows: transactions
whose first row has left are taken only so (see :func:`._claim.claim`)."""


def check_tables(bind: Engine | Connection, outbox: Outbox) -> None:
    """:raises AuditConfigurationError: an outbox table does not exist."""
    with transaction(bind) as connection:
        inspector = inspect(connection)
        for table in (outbox.table, outbox.delivery_table):
            if not inspector.has_table(table.name, schema=table.schema):
                raise AuditConfigurationError(
                    f"the outbox table {table.fullname!r} does not exist in "
                    f"{connection.engine.url.render_as_string()}; create it "
                    "(outbox.create(engine), metadata.create_all(), a migration "
                    "or access-audit relay --create-table)"
                )


# Seconds between counts of the rows waiting for plugins a polling relay
# lacks.
_COUNT_MISSING_EVERY = 60.0


def _count_missing(
    bind: Engine | Connection, outbox: Outbox, plugins: list[str], stats: RelayStats
) -> None:
    """Set ``stats.missing_plugins``; warn about each name not missing before."""
    before = stats.missing_plugins
    stats.missing_plugins = {
        name: count
        for name, count in sorted(status(bind, outbox).pending.items())
        if name not in plugins and count
    }
    for name, count in stats.missing_plugins.items():
        if name not in before:
            logger.warning(
                "relay: %d %s pending for plugin %r, which this relay does not "
                "have; they wait for a relay with a plugin registered under "
                "that name",
                count,
                "row" if count == 1 else "rows",
                name,
            )


def _relay_batch(
    emitter: AuditEmitter,
    bind: Engine | Connection,
    outbox: Outbox,
    plugins: list[str],
    stats: RelayStats,
    batch_size: int,
    max_attempts: int,
    backoff: float,
    max_backoff: float,
    from_head: bool = False,
) -> tuple[int, bool]:
    """Deliver one locked batch; returns how many rows it handled, and
    whether due rows were left because others had them locked.

    *from_head*: claim reading from the outbox's head (see :func:`._claim.claim`).

    Every handled row is delivered, or its next attempt is rescheduled, so a
    relay run with ``once`` always comes to an end.
    """
    now = datetime.now(timezone.utc)
    with transaction(bind, read_committed=True) as connection:
        claimed, contended = claim(
            connection, outbox, plugins, now, batch_size, from_head=from_head
        )
        if not claimed:
            return 0, contended
        _deliver_rows(emitter, claimed, stats, max_attempts)
        _save(connection, outbox, claimed, now, backoff, max_backoff)
        stats.batches += 1
        return len(claimed), contended


def _deliver_rows(
    emitter: AuditEmitter,
    claimed: list[Claim],
    stats: RelayStats,
    max_attempts: int,
) -> None:
    """Deliver each claimed row to its plugins, updating the rows' states.

    For each plugin, a failure holds back that plugin's later events of the
    same targets in this batch, and so do the transactions held back, for
    all their targets: each target's events stay in order across
    transactions.
    """
    envelopes = {taken.row.id: taken.row.envelope() for taken in claimed}
    plugins = sorted({name for taken in claimed for name in taken.plugins})
    for plugin in plugins:
        wanted = _group_claims(taken for taken in claimed if plugin in taken.plugins)
        held: set[tuple[str, str]] = set()
        for group in wanted:
            targets = {row.target for row in group}
            if targets & held:
                held |= targets  # its other targets' later events wait too
                continue
            batch = tuple(envelopes[row.id] for row in group)
            try:
                report = deliver(
                    emitter.plugin_manager,
                    emitter,
                    batch,
                    only={plugin},
                    send_signals=False,
                    let_through=_INTERRUPT,
                )
            except _INTERRUPT:
                # Ctrl-C's, or the plugin's own by mistake: say which.
                logger.warning(
                    "relay: interrupted while plugin %r took %d %s; the batch "
                    "in hand is rolled back, and a later run delivers it again",
                    plugin,
                    len(batch),
                    "event" if len(batch) == 1 else "events",
                )
                raise
            failed = report.failed.get(plugin, {})
            if failed:
                held |= targets
            for row, envelope in zip(group, batch, strict=True):
                error = failed.get(envelope.id)
                if error is None:
                    row.states[plugin] = PluginState(DELIVERED)
                    stats.delivered += 1
                    continue
                stats.failed += 1
                _count_failure(row, plugin, error, max_attempts, stats)


_INTERRUPT: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
"""What a plugin raising in the relay is let through: Ctrl-C stops the relay
(the batch rolls back, to be claimed again). ``SystemExit`` is the plugin's
failure, retried and ending dead: let through, it stopped every run before
anything was recorded, so the event could never be given up on."""


def _group_claims(claims: Iterable[Claim]) -> list[list[OutboxRow]]:
    return list(group_rows(taken.row for taken in claims).values())


def _count_failure(
    row: OutboxRow,
    plugin: str,
    error: BaseException,
    max_attempts: int,
    stats: RelayStats,
) -> None:
    before = row.states.get(plugin)
    attempts = (before.attempts if before is not None else 0) + 1
    dead = attempts >= max_attempts
    row.states[plugin] = PluginState(
        DEAD if dead else PENDING, attempts, error_text(error)
    )
    if dead:
        stats.dead += 1
        logger.error(
            "relay: giving up delivering event %s to plugin %r after %d attempts",
            row.id,
            plugin,
            attempts,
        )


def _save(
    connection: Connection,
    outbox: Outbox,
    claimed: list[Claim],
    now: datetime,
    backoff: float,
    max_backoff: float,
) -> None:
    """Write the claimed rows' new states: rows no plugin waits for any more
    leave the outbox (or are parked, if some plugin gave up on them)."""
    settled: list[str] = []
    kept: list[str] = []
    states: list[dict[str, Any]] = []
    for taken in claimed:
        row = taken.row
        waiting = row.waiting()
        if not waiting and not row.dead():
            settled.append(row.id)
            continue
        kept.append(row.id)
        row.states.pop(PARKED, None)
        for name, plugin_state in row.states.items():
            next_at = None
            if plugin_state.state == PENDING:
                # A plugin that failed in this run (its state has no time
                # yet) backs off; one not tried keeps its time.
                next_at = plugin_state.next_attempt_at
                if next_at is None:
                    # Doubling stops where it passes any max_backoff (2**40
                    # seconds); an int power of 2 would outgrow a float.
                    doublings = min(max(plugin_state.attempts, 1) - 1, 40)
                    delay = min(max_backoff, backoff * 2.0**doublings)
                    next_at = now + timedelta(seconds=delay)
            states.append(_state_row(row.id, name, plugin_state, next_at, now))
        if not waiting:
            states.append(_state_row(row.id, PARKED, PluginState(DEAD), None, now))
    forget(
        connection,
        outbox,
        settled,
        {taken.row.id for taken in claimed if taken.row.has_state},
    )
    state_table = outbox.delivery_table
    for part in chunks(connection, kept):
        delete_ids(connection, state_table.c.event_id, part)
    if states:
        connection.execute(insert(state_table), states)


def _state_row(
    event_id: str,
    plugin: str,
    state: PluginState,
    next_attempt_at: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "plugin": plugin,
        "state": state.state,
        "attempts": state.attempts,
        "error": state.error,
        "next_attempt_at": next_attempt_at,
        "updated_at": now,
    }


def list_dead(bind: Engine | Connection, outbox: Outbox) -> list[dict[str, Any]]:
    """Events some plugin gave up on: id, type, target, status (``dead`` if
    no plugin waits for the event any more, else ``pending``) and each dead
    plugin's last error, in commit order."""
    table, state = outbox.table, outbox.delivery_table
    found: dict[str, dict[str, Any]] = {}
    with transaction(bind) as connection:
        rows = connection.execute(
            select(
                table.c.id,
                table.c.type,
                table.c.aggregatetype,
                table.c.aggregateid,
                state.c.plugin,
                state.c.error,
            )
            .join(state, state.c.event_id == table.c.id)
            .where(state.c.state == DEAD)
            .order_by(
                table.c.created_at,
                table.c.transaction_id,
                table.c.sequence,
                state.c.plugin,
            )
        )
        for row in rows:
            entry = found.setdefault(
                row.id,
                {
                    "id": row.id,
                    "type": row.type,
                    "target": f"{row.aggregatetype}/{row.aggregateid}",
                    "status": PENDING,
                    "dead_plugins": {},
                },
            )
            if row.plugin == PARKED:
                entry["status"] = DEAD
            else:
                entry["dead_plugins"][row.plugin] = row.error or ""
    return list(found.values())


def retry_dead(
    bind: Engine | Connection, outbox: Outbox, plugins: set[str] | None = None
) -> int:
    """Make dead deliveries due again (for *plugins*, or all); returns the
    number of events changed.

    Plugins that already took an event are not sent it again. An event a
    relay holds (it is delivering it to other plugins) is waited for: that
    relay writes the event's states as it read them when its batch ends.
    """
    table, state = outbox.table, outbox.delivery_table
    now = datetime.now(timezone.utc)
    dead = (state.c.state == DEAD) & (state.c.plugin != PARKED)
    changed: set[str] = set()
    with transaction(bind) as connection:
        # A plugin at a time: its name is the statements' one parameter
        # besides the ids (an old SQLite takes 999 at most).
        for name in [None] if plugins is None else sorted(plugins):
            its = dead if name is None else dead & (state.c.plugin == name)
            ids = sorted(
                connection.execute(
                    select(state.c.event_id).where(its).distinct()
                ).scalars()
            )
            for part in chunks(connection, ids):
                # The lock a relay takes on the events it delivers: wait for
                # its batch, then change what it wrote (SQLite: one writer).
                connection.execute(
                    select(table.c.id)
                    .where(one_of(connection, table.c.id, part))
                    .with_for_update()
                ).all()
                connection.execute(
                    update(state)
                    .where(its, one_of(connection, state.c.event_id, part))
                    .values(
                        state=PENDING, attempts=0, next_attempt_at=now, updated_at=now
                    )
                )
            changed.update(ids)
        for part in chunks(connection, sorted(changed)):
            connection.execute(
                delete(state).where(
                    one_of(connection, state.c.event_id, part),
                    state.c.plugin == PARKED,
                )
            )
    return len(changed)


def prune(bind: Engine | Connection, outbox: Outbox, older_than: timedelta) -> int:
    """Delete events that no plugin waits for any more and that some plugin
    gave up on more than *older_than* ago; returns how many.

    (Events every plugin took leave the outbox as soon as they are taken.)
    Delivery state left behind by an event no longer in the outbox goes too.
    """
    table, state = outbox.table, outbox.delivery_table
    cutoff = datetime.now(timezone.utc) - older_than
    with transaction(bind) as connection:
        ids = list(
            connection.execute(
                select(state.c.event_id).where(
                    state.c.plugin == PARKED, state.c.updated_at < cutoff
                )
            ).scalars()
        )
        forget(connection, outbox, ids)
        orphaned = ~select(literal(1)).where(table.c.id == state.c.event_id).exists()
        connection.execute(delete(state).where(orphaned))
    return len(ids)


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What the outbox holds, per plugin name (see :func:`status`)."""

    events: int
    """Events in the outbox (waiting for some plugin, or kept as dead)."""
    pending: dict[str, int]
    """Per plugin name: events waiting for it (due or backing off)."""
    dead: dict[str, int]
    """Per plugin name: events it gave up on."""
    oldest_pending: datetime | None
    """When the oldest event some plugin still waits for committed."""

    def lines(self, now: datetime | None = None) -> list[str]:
        """A human-readable report, one line per plugin after a summary."""
        now = now or datetime.now(timezone.utc)
        age = (
            "none pending"
            if self.oldest_pending is None
            else f"oldest pending {(now - self.oldest_pending).total_seconds():.1f} s"
        )
        lines = [f"outbox: {self.events} events, {age}"]
        for name in sorted(set(self.pending) | set(self.dead)):
            lines.append(
                f"  {name}: {self.pending.get(name, 0)} pending, "
                f"{self.dead.get(name, 0)} dead"
            )
        return lines


def status(bind: Engine | Connection, outbox: Outbox) -> OutboxStatus:
    """Count what the outbox holds: per plugin pending and dead, and the
    age of the oldest pending event. Reads aggregates, never every row."""
    table, state = outbox.table, outbox.delivery_table
    in_outbox = select(literal(1)).where(table.c.id == state.c.event_id).exists()
    check_tables(bind, outbox)
    with transaction(bind) as connection:
        pending: collections.Counter[str] = collections.Counter()
        events = 0
        for recipients, count in connection.execute(
            select(table.c.recipients, func.count()).group_by(table.c.recipients)
        ):
            events += count
            for name in json.loads(recipients):
                pending[name] += count
        dead: dict[str, int] = {}
        for plugin, state_name, count in connection.execute(
            select(state.c.plugin, state.c.state, func.count())
            .where(state.c.plugin != PARKED, state.c.state != PENDING, in_outbox)
            .group_by(state.c.plugin, state.c.state)
        ):
            pending[plugin] -= count
            if state_name == DEAD:
                dead[plugin] = count
        oldest = connection.execute(
            select(func.min(table.c.created_at)).where(~parked(outbox, table))
        ).scalar_one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return OutboxStatus(
        events,
        {name: count for name, count in sorted(pending.items()) if count > 0},
        dict(sorted(dead.items())),
        oldest,
    )


def count_pending(bind: Engine | Connection, outbox: Outbox) -> int:
    """How many events some plugin still waits for."""
    table, state = outbox.table, outbox.delivery_table
    with transaction(bind) as connection:
        events = connection.execute(
            select(func.count()).select_from(table)
        ).scalar_one()
        dead = connection.execute(
            select(func.count()).where(state.c.plugin == PARKED)
        ).scalar_one()
    return int(events) - int(dead)
