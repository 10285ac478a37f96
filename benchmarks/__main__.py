"""``python -m benchmarks``: run the workloads, print the table, write the JSON.

Exit status: 0 when every target is met (or with ``--quick``, which checks
none), 1 when a target is missed, 2 on a usage error or a database that
cannot be reached. A target whose median lies within two standard errors of
its limit is marked ``(?)`` and listed in a warning: on a busy machine its
verdict may change from run to run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from . import outbox_relay
from .async_commit import async_commit
from .fixtures import DATABASES, Base, make_engine, server_version
from .flask_signal import flask_signal
from .harness import FULL, QUICK, Row, Settings, WorkloadResult, machine
from .memory import memory
from .report import format_table, write_json
from .workloads import bulk, commit_overhead

Workload = Callable[[str, Settings], WorkloadResult]

WORKLOADS: dict[str, Workload] = {
    "commit": commit_overhead,
    "flask": flask_signal,
    "bulk": bulk,
    "memory": memory,
    "async": async_commit,
    "relay": outbox_relay.outbox_relay,
}
"""Workloads by the name ``--workloads`` takes, in the order they run."""

WORKLOAD_DATABASES: dict[str, tuple[str, ...]] = {"relay": outbox_relay.DATABASES}
"""The databases a workload runs on, where they are not :data:`DATABASES`."""

ALL_DATABASES: tuple[str, ...] = tuple(
    dict.fromkeys([*DATABASES, *outbox_relay.DATABASES])
)
"""Every database some workload runs on, in the order they run."""

SKIPPED_WHEN_DOWN = frozenset({"async", "relay"})
"""Workloads that skip (with a message) a database they cannot reach; a run
of only these on a database goes on without its server, any other exits 2."""

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "latest.json"


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or 'empty list'}; choose from {','.join(allowed)}"
            )
        return names

    return parse


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see ``python -m benchmarks --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure access_audit against plain SQLAlchemy and "
        "Flask-SQLAlchemy's models_committed signal.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a smoke test; targets are not checked",
    )
    parser.add_argument(
        "--databases",
        type=_names(ALL_DATABASES),
        default=None,
        metavar="NAMES",
        help=f"comma-separated, from {','.join(ALL_DATABASES)} (default: all "
        "that a chosen workload runs on; mariadb: relay only)",
    )
    parser.add_argument(
        "--workloads",
        type=_names(list(WORKLOADS)),
        default=list(WORKLOADS),
        metavar="NAMES",
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the JSON figures (default: %(default)s)",
    )
    arguments = parser.parse_args(argv)
    if arguments.databases is None:
        arguments.databases = [
            database
            for database in ALL_DATABASES
            if workloads_on(database, arguments.workloads)
        ]
    for database in arguments.databases:
        if not workloads_on(database, arguments.workloads):
            parser.error(
                f"no workload of {','.join(arguments.workloads)} runs on "
                f"{database}; choose from "
                + ",".join(w for w in WORKLOADS if workloads_on(database, [w]))
            )
    return arguments


def workloads_on(database: str, names: Sequence[str]) -> list[str]:
    """Those of the workloads *names* that run on *database*, in order."""
    return [
        name for name in names if database in WORKLOAD_DATABASES.get(name, DATABASES)
    ]


def _describe(about: dict[str, Any], settings: Settings, workloads: list[str]) -> str:
    versions = ", ".join(f"{name} {v}" for name, v in about["versions"].items())
    mode = "quick (no targets checked)" if settings.quick else "full"
    relay = (
        f", {settings.relay_rounds} relay rounds of a "
        f"{settings.relay_backlog:,}-event backlog"
        if "relay" in workloads
        else ""
    )
    return (
        f"machine: {about['cpu']}, {about['cores']} cores, {about['python']}, "
        f"{about['platform']}, load average {about['load_average_start']}\n"
        f"versions: {versions}\n"
        f"run: {mode}, {settings.rounds} rounds per commit workload in "
        f"{settings.processes} processes, "
        f"{settings.bulk_rounds} bulk rounds{relay}; variants interleaved, medians "
        "of per-round values (q1 .. q3: their quartiles; std. error: of the "
        "median; '(?)': the median lies within two standard errors of the target)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    arguments = parse_arguments(argv)
    settings = QUICK if arguments.quick else FULL
    about = machine()
    about["load_average_start"] = _load_average()
    print(_describe(about, settings, arguments.workloads), flush=True)
    document: dict[str, Any] = {
        "machine": about,
        "settings": settings,
        "databases": {},
        "targets": [],
        "passed": None,
    }
    rows: list[Row] = []
    for database in arguments.databases:
        names = workloads_on(database, arguments.workloads)
        try:
            server = _server(database)
        except Exception as error:
            print(f"{database} is not reachable: {error}", file=sys.stderr)
            if set(names) <= SKIPPED_WHEN_DOWN:
                print(f"{database}: {', '.join(names)} rows skipped", file=sys.stderr)
                document["databases"][database] = {"skipped": str(error)}
                continue
            return 2
        results: dict[str, Any] = {"server": server}
        document["databases"][database] = results
        try:
            for name in names:
                started = time.perf_counter()
                result = WORKLOADS[name](database, settings)
                seconds = time.perf_counter() - started
                print(f"  {database}: {name} done in {seconds:.1f} s", file=sys.stderr)
                results[result.key] = result.figures
                rows += result.rows
        finally:
            _drop_tables(database)
    print(format_table(rows, enforced=not settings.quick))
    targets = [row for row in rows if row.passed is not None]
    missed = [row for row in targets if not row.passed]
    uncertain = [row for row in targets if row.uncertain]
    about["load_average_end"] = _load_average()
    if uncertain:
        print(
            f"warning: {len(uncertain)} target(s) lie within two standard errors "
            "of their limit, so a rerun may judge them otherwise (on a busy "
            "machine, rerun when it is quiet): "
            + ", ".join(f"{row.database} {row.workload}" for row in uncertain),
            file=sys.stderr,
        )
    document["targets"] = targets
    document["uncertain_targets"] = uncertain
    document["passed"] = None if settings.quick else not missed
    write_json(arguments.output, document)
    print(f"figures written to {arguments.output}")
    if missed and not settings.quick:
        print(f"{len(missed)} target(s) missed", file=sys.stderr)
        return 1
    return 0


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _server(database: str) -> str:
    """Connect to *database* once (raising if it cannot) and name its server."""
    if database in DATABASES:
        engine = make_engine(database)
    else:
        engine = create_engine(outbox_relay.database_url(database))
    try:
        return server_version(engine)
    finally:
        engine.dispose()


def _drop_tables(database: str) -> None:
    """Leave a server database as it was found (SQLite in memory goes by itself;
    the relay workload drops its own table)."""
    if database == "sqlite" or database not in DATABASES:
        return
    engine = make_engine(database)
    try:
        Base.metadata.drop_all(engine)
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
