"""Workload 7: one ``AsyncSession`` commit with an emitter, against a plain one.

ORM insert of one row and ``await session.commit()`` on an AsyncSession:
plain (no emitter), and with one ``stage_event`` delivered to a no-op plugin
whose ``audit_event_logged`` is a plain ``def`` (called after COMMIT on the
event loop's thread) or an ``async def`` (awaited before the commit returns).
``sqlite`` runs on aiosqlite in memory, ``postgresql`` on asyncpg.

The three variants run as one interleaved comparison in one event loop per
worker interpreter, so both ratios are against the same plain baseline,
measured in the same rounds; each batch is timed inside the loop, around its
commits only.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl

from .fixtures import POSTGRESQL_URL, Base, BenchItem, make_emitter, stage_one
from .harness import (
    Batch,
    Samples,
    Settings,
    WorkloadResult,
    figure_row,
    interleave,
    ops_per_round,
    per_round_ratios,
    pooled,
    ratio_row,
    spread,
)

__all__ = [
    "AsyncNoOpPlugin",
    "async_commit",
    "async_database_url",
    "async_samples",
]

DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
"""The async driver each database is measured with."""

LIMITS = {"sqlite": 1.10, "postgresql": 1.03}
"""One event with a no-op plugin (sync or async) over a plain AsyncSession commit."""

POSTGRESQL_ASYNC_URL = os.environ.get(
    "ACCESS_AUDIT_TEST_POSTGRESQL_ASYNC_URL"
) or make_url(POSTGRESQL_URL).set(drivername="postgresql+asyncpg").render_as_string(
    hide_password=False
)


class AsyncNoOpPlugin:
    """An ``async def`` plugin that receives every committed event and ignores it."""

    @hookimpl
    async def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        """Ignore the event: the benchmark measures access_audit, not a sink."""


def async_database_url(database: str) -> str:
    """The async driver's URL of *database*: aiosqlite in memory, or asyncpg."""
    if database == "sqlite":
        return "sqlite+aiosqlite://"
    if database == "postgresql":
        return POSTGRESQL_ASYNC_URL
    raise ValueError(f"unknown database {database!r}; choose from {tuple(DRIVERS)}")


async def _timed_commits(session: AsyncSession, ops: int, stage: bool) -> int:
    """Insert a row and commit *ops* times; with ``stage``, audit each. Returns ns."""
    start = perf_counter_ns()
    for number in range(ops):
        name = f"item-{number}"
        session.add(BenchItem(name=name))
        if stage:
            stage_one(session, name)
        await session.commit()
    return perf_counter_ns() - start


def _commit_batch(
    run: Callable[[Coroutine[Any, Any, int]], int],
    maker: async_sessionmaker[AsyncSession],
    stage: bool,
) -> Batch:
    """Insert a row and commit, *n* times on one AsyncSession, in the worker's loop."""

    async def batch(ops: int) -> int:
        async with maker() as session:
            return await _timed_commits(session, ops, stage)

    return lambda ops: run(batch(ops))


async def _create_tables(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


def async_samples(database: str, settings: Settings) -> tuple[Samples, int]:
    """One process's rounds of workload 7, in one event loop.

    Returns nanoseconds per commit of each variant per round, and the
    operations per batch.
    """
    loop = asyncio.new_event_loop()
    engine = create_async_engine(async_database_url(database))
    plain = async_sessionmaker(engine)
    sync_plugin = async_sessionmaker(engine)
    async_plugin = async_sessionmaker(engine)
    sync_emitter = make_emitter()
    async_emitter = AuditEmitter([AsyncNoOpPlugin()], load_entrypoints=False)
    sync_emitter.attach(sync_plugin)
    async_emitter.attach(async_plugin)
    try:
        loop.run_until_complete(_create_tables(engine))
        batches = {
            "plain": _commit_batch(loop.run_until_complete, plain, stage=False),
            "sync_plugin": _commit_batch(
                loop.run_until_complete, sync_plugin, stage=True
            ),
            "async_plugin": _commit_batch(
                loop.run_until_complete, async_plugin, stage=True
            ),
        }
        ops = ops_per_round(batches["plain"], settings)
        samples = interleave(
            {name: _per_op(batch, ops) for name, batch in batches.items()},
            settings.rounds,
            collect_each=False,
        )
    finally:
        sync_emitter.detach(sync_plugin)
        async_emitter.detach(async_plugin)
        loop.run_until_complete(engine.dispose())
        loop.close()
    return samples, ops


def _per_op(batch: Batch, ops: int) -> Callable[[], float]:
    return lambda: batch(ops) / ops


async def _server(database: str) -> str:
    """Connect once through the async driver (raising if it cannot) and name the server."""
    engine = create_async_engine(async_database_url(database))
    try:
        async with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                query = "select sqlite_version()"
            else:
                query = "select version()"
            version = (await connection.execute(text(query))).scalar()
    finally:
        await engine.dispose()
    return f"{DRIVERS[database]}: {engine.dialect.name} {version}"


def async_commit(database: str, settings: Settings) -> WorkloadResult:
    """Workload 7: AsyncSession commit with one event and a sync or async no-op plugin."""
    driver = DRIVERS[database]
    try:
        server = asyncio.run(_server(database))
    except Exception as error:
        message = f"{database}: async rows skipped, {driver} cannot connect: {error}"
        print(message, file=sys.stderr)
        return WorkloadResult("async", {"skipped": message}, [])
    samples, ops = pooled("async", database, settings)
    sync_ratio = per_round_ratios(samples["sync_plugin"], samples["plain"])
    async_ratio = per_round_ratios(samples["async_plugin"], samples["plain"])
    figures = {
        "driver": driver,
        "server": server,
        "ops_per_round": ops,
        "rounds": len(samples["plain"]),
        "us_per_commit": {
            name: spread([ns / 1000 for ns in values])
            for name, values in samples.items()
        },
        "sync_plugin_ratio": spread(sync_ratio),
        "async_plugin_ratio": spread(async_ratio),
    }
    limit = LIMITS[database]
    rows = [
        figure_row(
            database,
            "7 async commit",
            f"plain AsyncSession insert+commit ({driver})",
            [ns / 1000 for ns in samples["plain"]],
            "us",
        ),
        ratio_row(
            database,
            "7 async, one event",
            f"sync no-op plugin / plain ({driver})",
            sync_ratio,
            limit,
        ),
        ratio_row(
            database,
            "7 async, one event",
            f"async def no-op plugin / plain ({driver})",
            async_ratio,
            limit,
        ),
    ]
    return WorkloadResult("async", figures, rows)
