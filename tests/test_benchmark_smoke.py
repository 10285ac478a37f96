"""The benchmark's quick mode runs end to end, so that it cannot rot."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import unavailable

from benchmarks.outbox_relay import BacklogRun, RelayRun, Tally

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD_KEYS = ("commit", "flask_signal", "bulk", "memory", "async", "relay")
RATIO_KEYS = ("median", "q1", "q3", "low", "high")


def run_python(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``python ARGUMENTS`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks ARGUMENTS`` from the repository root."""
    return run_python("-m", "benchmarks", *arguments)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One quick run on SQLite: its printed table and its JSON figures."""
    output = tmp_path_factory.mktemp("benchmark") / "latest.json"
    completed = run_benchmark(
        "--quick", "--databases", "sqlite", "--output", str(output)
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout, json.loads(output.read_text())


def test_quick_run_describes_the_machine(quick_run: tuple[str, dict[str, Any]]) -> None:
    """The JSON names CPU, cores, Python and SQLAlchemy; quick mode enforces nothing."""
    _, figures = quick_run
    machine = figures["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    assert machine["python"].endswith(platform.python_version())
    assert machine["versions"]["SQLAlchemy"][0].isdigit()
    assert figures["settings"]["quick"] is True
    assert figures["passed"] is None


@pytest.mark.parametrize("workload", WORKLOAD_KEYS, ids=WORKLOAD_KEYS)
def test_quick_run_writes_each_workload(
    quick_run: tuple[str, dict[str, Any]], workload: str
) -> None:
    """Every workload has its figures under the database it ran on, and only that."""
    _, figures = quick_run
    assert list(figures["databases"]) == ["sqlite"]
    assert workload in figures["databases"]["sqlite"]


def test_quick_run_figures_are_measured(quick_run: tuple[str, dict[str, Any]]) -> None:
    """Ratios, rates and memory figures are present and positive where they must be."""
    _, figures = quick_run
    sqlite = figures["databases"]["sqlite"]
    commit, flask = sqlite["commit"], sqlite["flask_signal"]
    for ratio in (commit["no_event_ratio"], commit["one_event_ratio"]):
        assert set(ratio) == set(RATIO_KEYS) and ratio["median"] > 0
    for key in ("track_modifications_ratio", "access_audit_ratio"):
        assert flask[key]["median"] > 0
    processes = figures["settings"]["processes"]
    for pooled in (commit, flask):
        # Rounds come from that many worker interpreters, each calibrating.
        assert len(pooled["ops_per_round"]) == processes >= 2
        assert pooled["rounds"] == figures["settings"]["rounds"]
    bulk = sqlite["bulk"]
    assert len(bulk["sizes"]) == 3 and len(bulk["savepoints"]) == 2
    for size in bulk["sizes"].values():
        assert size["commit_dispatch_events_per_s"]["median"] > 0
        assert size["stage_us_per_event"]["median"] > 0
    assert bulk["scaling_total_per_event"]["median"] > 0
    for ending in ("rollback", "close"):
        assert sqlite["memory"][ending]["transactions"] > 0
        assert sqlite["memory"][ending]["info_keys_left"] == []
        assert isinstance(sqlite["memory"][ending]["retained_bytes"], int)


def test_quick_run_prints_targets_unchecked(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    """The table lists every target, marked as not enforced in quick mode."""
    table, figures = quick_run
    targets = figures["targets"]
    assert {target["workload"].split()[0] for target in targets} == {
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
    }
    assert all(isinstance(target["passed"], bool) for target in targets)
    assert all(target["rounds"] for target in targets if target["unit"] == "x")
    results = {
        line.split("|")[-2].strip()
        for line in table.splitlines()
        if line.startswith("| sqlite")
    }
    assert results == {"", "(quick)"}


def test_quick_async_workload_compares_with_a_plain_async_session(
    tmp_path: Path,
) -> None:
    """``--workloads async``: sync and async def plugin rows against plain AsyncSession."""
    output = tmp_path / "latest.json"
    completed = run_benchmark(
        "--quick", "--databases", "sqlite", "--workloads", "async", "--output",
        str(output),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    figures = json.loads(output.read_text())
    measured = figures["databases"]["sqlite"]
    assert list(measured) == ["server", "async"]
    found = measured["async"]
    assert found["driver"] == "aiosqlite"
    assert found["server"].startswith("aiosqlite: sqlite ")
    assert set(found["us_per_commit"]) == {"plain", "sync_plugin", "async_plugin"}
    for key in ("sync_plugin_ratio", "async_plugin_ratio"):
        assert set(found[key]) == set(RATIO_KEYS) and found[key]["median"] > 0
    assert len(found["ops_per_round"]) == figures["settings"]["processes"] >= 2
    assert found["rounds"] == figures["settings"]["rounds"]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in completed.stdout.splitlines()
        if line.startswith("| sqlite")
    ]
    assert [(row[1], row[2], row[6], row[7]) for row in rows] == [
        ("7 async commit", "plain AsyncSession insert+commit (aiosqlite)", "", ""),
        (
            "7 async, one event",
            "sync no-op plugin / plain (aiosqlite)",
            "<= 1.10x",
            "(quick)",
        ),
        (
            "7 async, one event",
            "async def no-op plugin / plain (aiosqlite)",
            "<= 1.10x",
            "(quick)",
        ),
    ]


DOWN = "postgresql+psycopg://root@127.0.0.1:1/test"
"""A PostgreSQL URL nothing listens on."""
ASYNC_DOWN = DOWN.replace("psycopg", "asyncpg")
MARIADB_DOWN = "mysql+pymysql://root@127.0.0.1:1/test"
"""A MariaDB URL nothing listens on."""


@pytest.mark.parametrize(
    "unreachable",
    [
        {
            "ACCESS_AUDIT_TEST_POSTGRESQL_URL": DOWN,
            "ACCESS_AUDIT_TEST_POSTGRESQL_ASYNC_URL": ASYNC_DOWN,
        },
        {"ACCESS_AUDIT_TEST_POSTGRESQL_ASYNC_URL": ASYNC_DOWN},
    ],
    ids=["server-down", "asyncpg-cannot-connect"],
)
def test_async_workload_skips_a_server_it_cannot_reach(
    tmp_path: Path, unreachable: dict[str, str]
) -> None:
    """Only async rows asked for: a PostgreSQL it cannot reach is skipped, with a message."""
    output = tmp_path / "latest.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--databases", "postgresql",
         "--workloads", "async", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **unreachable},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "postgresql: async rows skipped" in completed.stderr
    assert "| postgresql" not in completed.stdout
    skipped = json.loads(output.read_text())["databases"]["postgresql"]
    assert "skipped" in skipped.get("async", skipped)


def table_rows(stdout: str, database: str) -> list[tuple[str, str, str, str]]:
    """Workload, figure, target and result of each of *database*'s printed rows."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith(f"| {database} ")
    ]
    return [(row[1], row[2], row[6], row[7]) for row in rows]


def run_relay_workload(
    database: str, output: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """A quick ``--workloads relay`` run on *database*; skips a server that is down
    (a failure under ``CI=true``)."""
    completed = run_benchmark(
        "--quick", "--databases", database, "--workloads", "relay", "--output",
        str(output),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    if f"{database}: relay rows skipped" in completed.stderr:
        unavailable(database, RuntimeError(completed.stderr.strip()))
    return completed, json.loads(output.read_text())


def assert_delivered_once(run: dict[str, Any], seeded: int, relays: int) -> None:
    """Every seeded event of a backlog run reached the relays' plugins exactly once."""
    assert run["seeded"] == seeded
    assert len(run["delivered"]) == relays
    assert sum(run["delivered"]) == seeded
    assert run["pending_after"] == 0
    assert run["exactly_once"] is True
    assert run["events_per_s"] > 0
    assert all(10 < peak < 2_000 for peak in run["peak_rss_mb"])


def test_quick_relay_workload_delivers_every_seeded_event_once(
    tmp_path: Path,
) -> None:
    """``--workloads relay`` on SQLite: one relay, latency and RSS rows, no event lost
    or doubled."""
    completed, figures = run_relay_workload("sqlite", tmp_path / "latest.json")
    settings = figures["settings"]
    found = figures["databases"]["sqlite"]["relay"]
    assert found["batch_size"] == settings["relay_batch"]
    assert len(found["rounds"]) == settings["relay_rounds"]
    for run in found["rounds"]:
        assert_delivered_once(run["one"], settings["relay_backlog"], 1)
        assert run["several"] is None  # SQLite takes one relay at a time
    assert_delivered_once(found["memory"], settings["relay_rss_backlog"], 1)
    assert found["exactly_once"] is True
    latency = found["latency"]
    if "unavailable" not in latency:
        assert latency["commits"] == latency["received"]
        assert latency["commits"] == settings["relay_latency_commits"]
        assert latency["undelivered"] == 0
        assert 0 < latency["latency_ms"]["median"] < 10_000
    backlog = f"8 relay, {settings['relay_backlog']:,} backlog"
    commits = f"8 relay, {settings['relay_commit_rate']:,.0f} commits/s"
    rows = table_rows(completed.stdout, "sqlite")
    assert rows[0] == (backlog, "one relay, no-op plugin", "", "")
    assert rows[-2:] == [
        (
            f"8 relay, {settings['relay_rss_backlog']:,} backlog",
            "relay process peak RSS",
            "",
            "",
        ),
        (f"8 relay, {settings['relay_rounds'] + 1} backlogs",
         "an event lost, doubled or left pending", "0", "(quick)"),
    ]  # fmt: skip
    latency_rows = [row[1] for row in rows if row[0] == commits]
    assert latency_rows in (
        ["commit rate reached", "commit->delivery p50", "commit->delivery p99"],
        ["commit->delivery: unavailable (this access_audit has no dispatch='relay')"],
    )


def test_quick_relay_workload_shares_a_backlog_among_four_relays(
    tmp_path: Path,
) -> None:
    """On PostgreSQL, four relay processes deliver the backlog between them, each
    event once, next to one relay alone."""
    completed, figures = run_relay_workload("postgresql", tmp_path / "latest.json")
    settings = figures["settings"]
    found = figures["databases"]["postgresql"]["relay"]
    for run in found["rounds"]:
        assert_delivered_once(run["one"], settings["relay_backlog"], 1)
        assert_delivered_once(
            run["several"], settings["relay_backlog"], settings["relay_processes"]
        )
    backlog = f"8 relay, {settings['relay_backlog']:,} backlog"
    assert table_rows(completed.stdout, "postgresql")[:3] == [
        (backlog, "one relay, no-op plugin", ">= 20,000/s", "(quick)"),
        (backlog, "4 relays / one", ">= 1.50x", "(quick)"),
        (backlog, "4 relays, largest / smallest share", "<= 2.00x", "(quick)"),
    ]


def test_a_duplicate_that_replaces_a_lost_event_is_caught() -> None:
    """The exactly-once check compares event ids, not only counts."""
    seeded = Tally(2, 10 + 20)
    relayed = RelayRun(2, Tally(2, 10 + 10), 0.0, 1.0, 50.0, 60.0)
    assert not BacklogRun(seeded, [relayed], pending=0).exactly_once
    delivered = dataclasses.replace(relayed, tally=seeded)
    assert BacklogRun(seeded, [delivered], pending=0).exactly_once
    assert not BacklogRun(seeded, [delivered], pending=1).exactly_once


def test_relay_workload_skips_a_server_it_cannot_reach(tmp_path: Path) -> None:
    """Only relay rows asked for: a MariaDB it cannot reach is skipped, with a message."""
    output = tmp_path / "latest.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--databases", "mariadb",
         "--workloads", "relay", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "ACCESS_AUDIT_TEST_MARIADB_URL": MARIADB_DOWN},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "mariadb: relay rows skipped" in completed.stderr
    assert "| mariadb" not in completed.stdout
    assert "skipped" in json.loads(output.read_text())["databases"]["mariadb"]


@pytest.mark.parametrize(
    "arguments",
    [
        ("--databases", "oracle"),
        ("--workloads", "commit,nonsense"),
        ("--databases", "mariadb", "--workloads", "commit"),
    ],
    ids=["unknown-database", "unknown-workload", "workload-not-on-database"],
)
def test_unknown_names_are_a_usage_error(arguments: tuple[str, ...]) -> None:
    """An unknown database or workload name, or a database none of the workloads
    runs on, exits 2 and names the valid choices."""
    completed = run_benchmark("--quick", *arguments)
    assert completed.returncode == 2
    assert "choose from" in completed.stderr


def test_a_failing_worker_fails_the_run_with_its_output() -> None:
    """A worker interpreter that fails raises, showing what the worker printed."""
    completed = run_python(
        "-c",
        "from benchmarks.harness import QUICK, pooled; "
        "pooled('nonsense', 'sqlite', QUICK)",
    )
    assert completed.returncode != 0
    assert (
        "RuntimeError: benchmark worker nonsense on sqlite failed" in completed.stderr
    )
    assert "Usage: ``python -m benchmarks.worker" in completed.stderr


def test_breakdown_times_each_entry_point_in_the_loop() -> None:
    """``python -m benchmarks.breakdown`` finds every listener where it is called."""
    completed = run_python(
        "-m", "benchmarks.breakdown", "--commits", "20", "--rounds", "2"
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    rows = {
        cells[0]: cells[1:]
        for line in completed.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| piece", "| ---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    # Per audited commit: one stage, each commit-path listener once, and
    # after_transaction_end twice (the flush's subtransaction, then the commit).
    calls = {name: float(cells[0]) for name, cells in rows.items() if cells[0]}
    assert calls == {
        "stage_event": 1.0,
        "_before_commit": 1.0,
        "_after_flush_postexec": 1.0,
        "_after_commit": 1.0,
        "_after_rollback": 0.0,
        "_after_transaction_end": 2.0,
    }
    assert float(rows["all of access_audit"][1]) > 0


def test_outbox_steps_measure_each_step_of_the_outbox_commit() -> None:
    """``python -m benchmarks.outbox_steps`` runs every step, and the outbox
    as shipped costs more than the same commit without an outbox (each
    step really does the outbox's work it names)."""
    from benchmarks.outbox_steps import STEPS

    completed = run_python(
        "-m", "benchmarks.outbox_steps", "--commits", "100", "--rounds", "3"
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    ratios = {
        cells[0]: float(cells[1].rstrip("x"))
        for line in completed.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| variant", "| ---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    assert list(ratios) == [name for name, _ in STEPS]
    assert all(ratio > 0 for ratio in ratios.values())
    shipped, without = ratios[STEPS[-2][0]], ratios[STEPS[0][0]]
    assert shipped > without
