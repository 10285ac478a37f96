"""The relay: re-deliver what a crash or a failing plugin left undelivered."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    delete,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.util import await_only, greenlet_spawn

from .._dispatch import deliver, delivering_plugins
from .._logging import logger
from ._store import OutboxRow, transaction, waiting_plugins
from ._table import DEAD, DELIVERED, PENDING, Outbox

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from .._emitter import AuditEmitter

__all__ = ["RelayStats", "arelay", "list_dead", "prune", "relay", "retry_dead"]


@dataclasses.dataclass(slots=True)
class RelayStats:
    """What a relay run did, counted per (event, plugin) delivery."""

    delivered: int = 0
    failed: int = 0
    """Attempts that raised (each to be retried, or given up)."""
    dead: int = 0
    """Deliveries given up on after ``max_attempts`` during this run."""
    batches: int = 0
    pruned: int = 0
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
    batch_size: int = 100,
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
        ``interval`` seconds until ``stop`` is set.
    :param retention: delete ``delivered`` rows older than this.
    :param progress: called with the running totals after each batch.
    :raises TypeError: *bind* is an ``AsyncEngine`` or ``AsyncConnection``
        (await :func:`arelay` with it instead).
    """
    if not isinstance(bind, (Engine, Connection)):
        raise TypeError(
            f"relay() takes an Engine or a Connection, not {type(bind).__name__}; "
            "relay through an AsyncEngine or AsyncConnection with "
            "'await emitter.arelay(bind, ...)'"
        )
    stopping = stop if stop is not None else threading.Event()
    return _poll(
        emitter, bind, outbox, stopping.is_set, stopping.wait,
        batch_size=batch_size, max_attempts=max_attempts, backoff=backoff,
        max_backoff=max_backoff, once=once, interval=interval,
        retention=retention, progress=progress,
    )  # fmt: skip


async def arelay(
    emitter: AuditEmitter,
    bind: AsyncEngine | AsyncConnection,
    outbox: Outbox,
    *,
    batch_size: int = 100,
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
    """The relay's loop; *pause* waits between polls, cut short once *stopped*."""
    stats = RelayStats()
    plugins = sorted(delivering_plugins(emitter.plugin_manager))
    counted_at: float | None = None
    while not stopped():
        done = _relay_batch(
            emitter, bind, outbox, plugins, stats, batch_size, max_attempts, backoff,
            max_backoff,
        )  # fmt: skip
        if done and progress is not None:
            progress(stats)
        if done:
            continue
        if retention is not None:
            stats.pruned += prune(bind, outbox, retention)
        if counted_at is None or time.monotonic() - counted_at >= _COUNT_MISSING_EVERY:
            counted_at = time.monotonic()
            _count_missing(bind, outbox, plugins, stats)
        if once:
            break
        pause(interval)
    return stats


# Seconds between counts of the rows waiting for plugins a polling relay
# lacks: the count reads every pending row.
_COUNT_MISSING_EVERY = 60.0


def _count_missing(
    bind: Engine | Connection, outbox: Outbox, plugins: list[str], stats: RelayStats
) -> None:
    """Set ``stats.missing_plugins``; warn about each name not missing before."""
    before = stats.missing_plugins
    stats.missing_plugins = {
        name: count
        for name, count in sorted(_pending_by_plugin(bind, outbox).items())
        if name not in plugins
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


def _pending_by_plugin(
    bind: Engine | Connection, outbox: Outbox
) -> collections.Counter[str]:
    """How many pending rows wait for each plugin name."""
    table = outbox.table
    counts: collections.Counter[str] = collections.Counter()
    # Most pending rows share a few failure-free delivery states: parse each
    # of those once.
    parsed: dict[tuple[str, str], frozenset[str]] = {}
    with transaction(bind) as connection:
        states = connection.execute(
            select(table.c.recipients, table.c.delivered_to, table.c.failures).where(
                table.c.status == PENDING
            )
        )
        for recipients, delivered_to, failures in states:
            if failures != "{}":
                counts.update(
                    waiting_plugins(
                        json.loads(recipients),
                        json.loads(delivered_to),
                        json.loads(failures),
                    )
                )
                continue
            key = (recipients, delivered_to)
            waiting = parsed.get(key)
            if waiting is None:
                waiting = parsed[key] = waiting_plugins(
                    json.loads(recipients), json.loads(delivered_to), {}
                )
            counts.update(waiting)
    return counts


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
) -> int:
    """Deliver one locked batch; returns how many rows it handled.

    Every handled row is delivered, or its next attempt is rescheduled, so a
    relay run with ``once`` always comes to an end.
    """
    now = datetime.now(timezone.utc)
    with transaction(bind) as connection:
        eligible = _claim(connection, outbox.table, now, batch_size)
        if not eligible:
            return 0
        _deliver_rows(emitter, eligible, plugins, stats, max_attempts)
        for taken in eligible:
            _save(connection, outbox, taken, plugins, now, backoff, max_backoff)
        stats.batches += 1
        return len(eligible)


def _claim(
    connection: Connection, table: Table, now: datetime, batch_size: int
) -> list[OutboxRow]:
    """Lock and return up to about *batch_size* rows this relay may deliver now.

    Whole transactions, in commit order. A transaction is taken only if all
    its pending rows are due and free (not locked by another relay), and no
    earlier pending event of one of its targets is left behind: that one is
    waiting for a retry, held by another relay, or in a transaction not
    taken. Candidates are read without locks, page by page, and only the
    rows to deliver are locked, by primary key: a locking read that scans
    (InnoDB) would lock every row it reads, and idle relays would starve.
    """
    order = (table.c.created_at, table.c.transaction_id, table.c.sequence)
    pending = table.c.status == PENDING
    candidate = select(
        table.c.id,
        table.c.aggregatetype,
        table.c.aggregateid,
        table.c.next_attempt_at,
        *order,
    ).order_by(*order)
    held: set[tuple[str, str]] = set()
    claimed: list[OutboxRow] = []
    seen: set[str] = set()
    page_size = max(batch_size * 4, 50)
    after: tuple[Any, ...] | None = None
    for _page in range(_MAX_PAGES):
        # Keyset paging: rows that other relays deliver meanwhile leave the
        # pending set, and OFFSET would then skip rows this scan must see.
        query = candidate.where(pending).limit(page_size)
        if after is not None:
            query = query.where(tuple_(*order) > tuple_(*after))
        rows = connection.execute(query).all()
        if not rows:
            break
        after = (rows[-1].created_at, rows[-1].transaction_id, rows[-1].sequence)
        # Complete the last transaction of the page, which the limit may cut;
        # the next page skips what this one saw.
        groups = _group_rows(row for row in rows if row.transaction_id not in seen)
        if not groups:
            continue
        last = next(reversed(groups))
        groups[last] = list(
            connection.execute(candidate.where(pending, table.c.transaction_id == last))
        )
        seen.update(groups)
        pending_groups = collections.deque(groups.values())
        while pending_groups and len(claimed) < batch_size:
            # Try the next few groups this relay could take; those another
            # relay holds are left behind (and hold their targets back), and
            # the scan goes on with the groups after them.
            wanted: list[list[Any]] = []
            room = batch_size - len(claimed)
            while pending_groups and room > 0:
                group = pending_groups.popleft()
                targets = {(row.aggregatetype, row.aggregateid) for row in group}
                due = all(row.next_attempt_at <= now for row in group)
                if not due or targets & held:
                    held |= targets
                    continue
                wanted.append(group)
                room -= len(group)
            if wanted:
                _lock_whole(connection, table, now, wanted, held, claimed)
        if len(claimed) >= batch_size or len(rows) < page_size:
            break
    return claimed


def _lock_whole(
    connection: Connection,
    table: Table,
    now: datetime,
    wanted: list[list[Any]],
    held: set[tuple[str, str]],
    claimed: list[OutboxRow],
) -> None:
    """Lock *wanted* groups' rows; claim the groups locked whole, in order."""
    locked = {
        mapping["id"]: OutboxRow(mapping)
        for mapping in connection.execute(
            select(table)
            .where(
                table.c.id.in_([row.id for group in wanted for row in group]),
                table.c.status == PENDING,
                table.c.next_attempt_at <= now,
            )
            .with_for_update(skip_locked=True)
        ).mappings()
    }
    for group in wanted:
        targets = {(row.aggregatetype, row.aggregateid) for row in group}
        if targets & held or not all(row.id in locked for row in group):
            held |= targets
            continue
        claimed.extend(locked[row.id] for row in group)


# How many pages of candidates one batch reads before it settles for what it
# has: a backlog held behind a few waiting targets can be long.
_MAX_PAGES = 50


def _group_rows(rows: Any) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for row in rows:
        groups.setdefault(row.transaction_id, []).append(row)
    return groups


def _deliver_rows(
    emitter: AuditEmitter,
    rows: list[OutboxRow],
    plugins: list[str],
    stats: RelayStats,
    max_attempts: int,
) -> None:
    """Deliver each row to the plugins that want it.

    For each plugin, a failure holds back that plugin's later events of the
    same targets in this batch, so each target's events stay in order.
    """
    envelopes = {row.id: row.envelope() for row in rows}
    for plugin in plugins:
        wanted = _group_rows(row for row in rows if plugin in row.wanting(plugins))
        held: set[tuple[str, str]] = set()
        for group in wanted.values():
            targets = {row.target for row in group}
            if targets & held:
                continue
            batch = tuple(envelopes[row.id] for row in group)
            report = deliver(
                emitter.plugin_manager,
                emitter,
                batch,
                only={plugin},
                send_signals=False,
            )
            failed = report.failed.get(plugin, {})
            if failed:
                held |= targets
            for row, envelope in zip(group, batch, strict=True):
                error = failed.get(envelope.id)
                if error is None:
                    row.delivered_to.add(plugin)
                    row.failures.pop(plugin, None)
                    stats.delivered += 1
                    continue
                stats.failed += 1
                _count_failure(row, plugin, error, max_attempts, stats)


def _count_failure(
    row: OutboxRow,
    plugin: str,
    error: BaseException,
    max_attempts: int,
    stats: RelayStats,
) -> None:
    state = row.failures.setdefault(plugin, {"attempts": 0})
    state["attempts"] = int(state.get("attempts", 0)) + 1
    state["error"] = repr(error)[:500]
    state["dead"] = state["attempts"] >= max_attempts
    if state["dead"]:
        stats.dead += 1
        logger.error(
            "relay: giving up delivering event %s to plugin %r after %d attempts",
            row.id,
            plugin,
            state["attempts"],
        )


def _save(
    connection: Connection,
    outbox: Outbox,
    row: OutboxRow,
    plugins: list[str],
    now: datetime,
    backoff: float,
    max_backoff: float,
) -> None:
    status = row.updated_status()
    retrying = [
        int(state.get("attempts", 1))
        for name, state in row.failures.items()
        if name in plugins and not state.get("dead", False)
    ]
    if retrying or row.wanting(plugins):
        delay = min(max_backoff, backoff * 2 ** (min(retrying, default=1) - 1))
    else:
        # Pending only for plugins this relay does not have: leave it to a
        # relay that has them, looking again now and then.
        delay = max(max_backoff, 1.0)
    table = outbox.table
    connection.execute(
        update(table)
        .where(table.c.id == row.id)
        .values(
            status=status,
            delivered_to=json.dumps(sorted(row.delivered_to)),
            failures=json.dumps(row.failures, sort_keys=True),
            next_attempt_at=now + timedelta(seconds=delay),
            delivered_at=now if status == DELIVERED else None,
        )
    )


def list_dead(bind: Engine | Connection, outbox: Outbox) -> list[dict[str, Any]]:
    """Rows some plugin gave up on: id, type, target, and each dead plugin's error."""
    table = outbox.table
    found = []
    with transaction(bind) as connection:
        rows = connection.execute(
            select(table)
            .where(table.c.status.in_((DEAD, PENDING)), table.c.failures != "{}")
            .order_by(table.c.created_at, table.c.transaction_id, table.c.sequence)
        ).mappings()
        for mapping in rows:
            row = OutboxRow(mapping)
            dead = {
                name: state.get("error", "")
                for name, state in row.failures.items()
                if state.get("dead")
            }
            if dead:
                found.append(
                    {
                        "id": row.id,
                        "type": mapping["type"],
                        "target": "/".join(row.target),
                        "status": row.status,
                        "dead_plugins": dead,
                    }
                )
    return found


def retry_dead(
    bind: Engine | Connection, outbox: Outbox, plugins: set[str] | None = None
) -> int:
    """Make dead deliveries due again (for *plugins*, or all); returns rows changed.

    Plugins that already took an event are not sent it again.
    """
    table = outbox.table
    changed = 0
    now = datetime.now(timezone.utc)
    with transaction(bind) as connection:
        rows = connection.execute(
            select(table.c.id, table.c.failures)
            .where(table.c.status.in_((DEAD, PENDING)), table.c.failures != "{}")
            .with_for_update()
        ).all()
        for row_id, failures_text in rows:
            failures = json.loads(failures_text)
            revived = [
                name
                for name, state in failures.items()
                if state.get("dead") and (plugins is None or name in plugins)
            ]
            if not revived:
                continue
            for name in revived:
                del failures[name]
            connection.execute(
                update(table)
                .where(table.c.id == row_id)
                .values(
                    status=PENDING,
                    failures=json.dumps(failures, sort_keys=True),
                    next_attempt_at=now,
                )
            )
            changed += 1
    return changed


def prune(bind: Engine | Connection, outbox: Outbox, older_than: timedelta) -> int:
    """Delete ``delivered`` rows delivered more than *older_than* ago."""
    table = outbox.table
    cutoff = datetime.now(timezone.utc) - older_than
    with transaction(bind) as connection:
        result = connection.execute(
            delete(table).where(
                table.c.status == DELIVERED, table.c.delivered_at < cutoff
            )
        )
        return int(result.rowcount or 0)


def count_pending(bind: Engine | Connection, outbox: Outbox) -> int:
    """How many rows are still pending."""
    table = outbox.table
    with transaction(bind) as connection:
        return int(
            connection.execute(
                select(func.count()).where(table.c.status == PENDING)
            ).scalar_one()
        )
