"""Side-by-side measurement: calibrated batches, interleaved rounds, medians.

A workload hands :func:`interleave` one callable per variant. Each round runs
every variant once, in an order rotated from round to round (A B, B A, ...),
with ``gc.collect()`` between samples or rounds, so that drift on a noisy
machine (another process, frequency scaling, a growing table) reaches every
variant alike. Figures are medians over the rounds; a ratio is the median of
the per-round ratios of two variants measured in the same round, timed with
:func:`time.perf_counter_ns` around a batch of operations. The per-commit
workloads share their rounds among several fresh interpreters
(:func:`pooled`), since where objects land in memory differs between them.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from access_audit.outbox import _store

__all__ = [
    "FULL",
    "QUICK",
    "Batch",
    "Row",
    "Samples",
    "Settings",
    "WorkloadResult",
    "figure_row",
    "interleave",
    "machine",
    "ops_per_round",
    "per_round_ratios",
    "pooled",
    "ratio_row",
    "spread",
]

T = TypeVar("T")

Batch = Callable[[int], int]
"""Runs *n* operations and returns the nanoseconds the timed part took."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """How much work a run does."""

    quick: bool
    """Tiny sizes for the smoke test; targets are reported, not enforced."""
    rounds: int
    """Rounds of the per-commit workloads (1 to 3), over all their processes."""
    processes: int
    """Fresh interpreters the rounds of workloads 1 to 3 are shared among.

    Where objects land in memory differs from one interpreter to the next and
    moves these ratios by several percent (1.07x to 1.15x for the same code
    on the same machine), more than the rounds within one vary: pooling the
    rounds of several interpreters keeps one lucky or unlucky layout from
    deciding a target.
    """
    round_seconds: float
    """Wanted duration of one variant's batch in one round of workloads 1 to 3.

    Short, so that a round of all variants lasts 50-100 ms and load from other
    processes on a shared machine reaches the variants of a round alike; many
    rounds make up for the noise of each.
    """
    fixed_ops: int | None
    """Operations per batch; None calibrates to ``round_seconds``."""
    bulk_rounds: int
    bulk_sizes: tuple[int, int, int]
    """Events in one transaction: small, medium (the rate target), large."""
    bulk_events_per_round: int
    """A smaller transaction is repeated until a round stages this many events."""
    savepoint_counts: tuple[int, int]
    """SAVEPOINTs per transaction: the reference and the large count."""
    events_per_savepoint: int
    memory_transactions: int
    memory_warmup: int
    memory_sample_every: int
    relay_rounds: int
    """Rounds of the relay's throughput runs: one relay, then several, each
    on a freshly seeded backlog."""
    relay_backlog: int
    """Pending events one relay (or several together) delivers in a round."""
    relay_batch: int
    """Events per seeded transaction, and the relay's ``batch_size``."""
    relay_processes: int
    """Relay processes run together against one."""
    relay_rss_backlog: int
    """Pending events of the run whose relay's peak resident set is measured."""
    relay_commit_rate: float
    """Commits per second while the commit -> delivery latency is measured."""
    relay_latency_commits: int
    relay_interval: float
    """Seconds the polling relay waits when it finds nothing due."""
    relay_latency_wait: float
    """Seconds after the last commit before an undelivered event is given up on."""


FULL = Settings(
    quick=False,
    rounds=105,
    processes=5,
    round_seconds=0.015,
    fixed_ops=None,
    bulk_rounds=11,
    bulk_sizes=(1_000, 10_000, 100_000),
    bulk_events_per_round=10_000,
    savepoint_counts=(100, 1_000),
    events_per_savepoint=10,
    memory_transactions=100_000,
    memory_warmup=1_000,
    memory_sample_every=1_000,
    relay_rounds=3,
    relay_backlog=50_000,
    relay_batch=1_000,
    relay_processes=4,
    relay_rss_backlog=200_000,
    relay_commit_rate=200.0,
    relay_latency_commits=2_000,
    relay_interval=0.01,
    relay_latency_wait=30.0,
)

QUICK = Settings(
    quick=True,
    rounds=4,
    processes=2,
    round_seconds=0.0,
    fixed_ops=5,
    bulk_rounds=2,
    bulk_sizes=(10, 100, 1_000),
    bulk_events_per_round=100,
    savepoint_counts=(2, 10),
    events_per_savepoint=10,
    memory_transactions=300,
    memory_warmup=20,
    memory_sample_every=10,
    relay_rounds=1,
    relay_backlog=200,
    relay_batch=50,
    relay_processes=4,
    relay_rss_backlog=400,
    relay_commit_rate=200.0,
    relay_latency_commits=20,
    relay_interval=0.01,
    relay_latency_wait=10.0,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One line of the table, and one figure with its target if it has one."""

    database: str
    workload: str
    figure: str
    value: float
    unit: str
    """``x`` (ratio), ``us`` or ``ms`` (micro- or milliseconds), ``ev/s`` (rate),
    ``B`` (bytes), ``MB`` (mebibytes), ``n``; ``n/a``: not measured here (the
    figure says why; the value means nothing)."""
    q1: float | None = None
    q3: float | None = None
    """First and third quartile of the per-round values: the noise around the median."""
    target: str | None = None
    passed: bool | None = None
    """None when the figure has no target."""
    rounds: int | None = None
    """How many per-round values the median is taken from."""
    limit: float | None = None
    """The number the target compares the median with."""

    @property
    def uncertain(self) -> bool:
        """Whether the median lies within two standard errors of its limit.

        The verdict of such a target could flip on a rerun: the rounds varied
        too much (a busy machine) for the distance to the limit.
        """
        error = self.median_error
        if error is None or self.limit is None:
            return False
        return abs(self.value - self.limit) < 2 * error

    @property
    def median_error(self) -> float | None:
        """Standard error of the median, estimated from the quartiles.

        ``1.2533 * sigma / sqrt(n)`` with ``sigma = IQR / 1.349``.
        """
        if self.q1 is None or self.q3 is None or not self.rounds:
            return None
        return 0.929 * (self.q3 - self.q1) / math.sqrt(self.rounds)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkloadResult:
    """What one workload measured on one database."""

    key: str
    """Its key in the JSON output."""
    figures: dict[str, Any]
    rows: list[Row]


def ops_per_round(batch: Batch, settings: Settings) -> int:
    """How many operations make one batch last ``settings.round_seconds``."""
    if settings.fixed_ops is not None:
        return settings.fixed_ops
    ops = 8
    while True:
        elapsed = batch(ops)
        if elapsed >= 20_000_000 or ops >= 1 << 20:
            break
        ops *= 2
    return max(1, round(ops * settings.round_seconds * 1e9 / elapsed))


def interleave(
    variants: Mapping[str, Callable[[], T]], rounds: int, *, collect_each: bool = True
) -> dict[str, list[T]]:
    """Run every variant once per round, rotating the order; return the samples.

    One untimed warm-up round comes first. ``gc.collect()`` runs before every
    sample (``collect_each``), so that no variant pays for garbage another one
    left, or only before every round, for short samples where a full
    collection would cost as much as the sample itself.
    """
    names = list(variants)
    for name in names:
        gc.collect()
        variants[name]()
    samples: dict[str, list[T]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        if not collect_each:
            gc.collect()
        for name in names[shift:] + names[:shift]:
            if collect_each:
                gc.collect()
            samples[name].append(variants[name]())
    return samples


Samples = dict[str, list[float]]
"""Per-round values of each variant, in round order."""


def pooled(
    sampler: str, database: str, settings: Settings
) -> tuple[Samples, list[int]]:
    """Run a per-commit workload's rounds in ``settings.processes`` fresh interpreters.

    Each runs ``python -m benchmarks.worker`` (*sampler* on *database*, its
    share of the rounds, calibrating its own batch size) one after another,
    so that no two compete for the CPU. Returns every variant's samples,
    pooled in process order, and each process's operations per batch.

    :raises RuntimeError: a worker failed; the message holds its output.
    """
    share = math.ceil(settings.rounds / settings.processes)
    mode = "quick" if settings.quick else "full"
    pooled_samples: Samples = {}
    ops: list[int] = []
    command = [sys.executable, "-m", "benchmarks.worker", sampler, database]
    command += [mode, str(share)]
    for _ in range(settings.processes):
        completed = subprocess.run(
            command,
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"benchmark worker {sampler} on {database} failed:\n"
                + completed.stdout
                + completed.stderr
            )
        result = json.loads(completed.stdout)
        ops.append(result["ops"])
        for name, values in result["samples"].items():
            pooled_samples.setdefault(name, []).extend(values)
    return pooled_samples, ops


def per_round_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """``values[i] / baseline[i]``: each round compared with itself."""
    return [value / base for value, base in zip(values, baseline, strict=True)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, lowest and highest of the per-round values."""
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4)
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "low": min(values),
        "high": max(values),
    }


def figure_row(
    database: str,
    workload: str,
    figure: str,
    values: Sequence[float],
    unit: str,
    target: str | None = None,
    passed: Callable[[float], bool] | None = None,
    limit: float | None = None,
) -> Row:
    """A row for per-round *values*; ``passed`` judges their median against *limit*."""
    found = spread(values)
    median = found["median"]
    verdict = None if passed is None else passed(median)
    return Row(
        database,
        workload,
        figure,
        median,
        unit,
        found["q1"],
        found["q3"],
        target,
        verdict,
        len(values),
        limit,
    )


def ratio_row(
    database: str,
    workload: str,
    figure: str,
    ratios: Sequence[float],
    limit: float | None = None,
) -> Row:
    """A ratio row; with ``limit``, the target is ``median <= limit``."""
    if limit is None:
        return figure_row(database, workload, figure, ratios, "x")
    return figure_row(
        database,
        workload,
        figure,
        ratios,
        "x",
        f"<= {limit:.2f}x",
        lambda median: median <= limit,
        limit,
    )


_PACKAGES = (
    "access-audit",
    "orjson",
    "SQLAlchemy",
    "Flask",
    "Flask-SQLAlchemy",
    "pluggy",
    "blinker",
    "psycopg",
    "aiosqlite",
    "asyncpg",
    "greenlet",
)


def machine() -> dict[str, Any]:
    """The machine and the versions the figures belong to."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    # What the relay parses stored JSON with: orjson only where it imports.
    versions["orjson"] = (
        versions["orjson"] if _store._fast_loads is not None else "not used"
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None
