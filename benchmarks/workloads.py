"""Workloads 1, 2 and 4: the cost of one commit, and of many events in one.

1. Commit overhead, no events: ORM insert of one row and commit, on a plain
   session and on a session with an emitter attached that stages nothing.
2. Commit overhead, one event: the same with one ``stage_event`` and one
   no-op ``audit_event_logged`` plugin.
4. Bulk: many events in one transaction (staging cost per event, commit and
   dispatch rate), and many SAVEPOINTs of a few events each.

Workloads 1 and 2 run as one interleaved comparison, so both ratios are
against the same plain baseline, measured in the same rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

from sqlalchemy.orm import sessionmaker

from access_audit.outbox import Outbox

from .fixtures import (
    Base,
    BenchItem,
    make_emitter,
    make_engine,
    stage_one,
    timed_commits,
)
from .harness import (
    Batch,
    Row,
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

__all__ = ["bulk", "commit_overhead", "commit_samples"]

NO_EVENT_LIMIT = 1.02
ONE_EVENT_LIMIT = 1.10
"""Enforced on SQLite in memory only, where the commit itself is cheapest."""
RATE_LIMIT = 100_000.0
"""Events per second committed and dispatched, at the medium size."""
SCALING_LIMIT = 1.5
"""Largest per-event cost over smallest: no super-linear step."""
OUTBOX_LIMITS = {"postgresql": 1.30, "sqlite": 1.50}
"""One event in outbox mode over a plain insert+commit (issue 16); a database
not listed is reported only."""


def _commit_batch(maker: sessionmaker[Any], stage: bool) -> Batch:
    """Insert a row and commit, *n* times on one session; with ``stage``, audit it."""

    def batch(ops: int) -> int:
        with maker() as session:
            return timed_commits(session, ops, stage)

    return batch


def commit_samples(database: str, settings: Settings) -> tuple[Samples, int]:
    """One process's rounds of workloads 1 and 2 (and the outbox variant).

    Returns nanoseconds per commit of each variant per round, and the
    operations per batch.
    """
    engine = make_engine(database)
    Base.metadata.create_all(engine)
    plain = sessionmaker(engine)
    audited = sessionmaker(engine)
    emitter = make_emitter()
    emitter.attach(audited)
    # The outbox mode (the delivery-guarantees issue): the same commit, with
    # the event also written to the outbox before COMMIT and marked after.
    outbox = Outbox(table_name="bench_outbox")
    outbox.drop(engine)
    outbox.create(engine)
    durable = sessionmaker(engine)
    durable_emitter = make_emitter(outbox=outbox)
    durable_emitter.attach(durable)
    try:
        batches = {
            "plain": _commit_batch(plain, stage=False),
            "attached_no_event": _commit_batch(audited, stage=False),
            "one_event": _commit_batch(audited, stage=True),
            "outbox_one_event": _commit_batch(durable, stage=True),
        }
        ops = ops_per_round(batches["plain"], settings)
        samples = interleave(
            {name: _per_op(batch, ops) for name, batch in batches.items()},
            settings.rounds,
            collect_each=False,
        )
    finally:
        emitter.detach(audited)
        durable_emitter.detach(durable)
        outbox.drop(engine)
        engine.dispose()
    return samples, ops


def commit_overhead(database: str, settings: Settings) -> WorkloadResult:
    """Workloads 1 and 2: per-commit cost with an emitter, against plain SQLAlchemy."""
    samples, ops = pooled("commit", database, settings)
    no_event = per_round_ratios(samples["attached_no_event"], samples["plain"])
    one_event = per_round_ratios(samples["one_event"], samples["plain"])
    outbox_event = per_round_ratios(samples["outbox_one_event"], samples["plain"])
    figures = {
        "ops_per_round": ops,
        "rounds": len(samples["plain"]),
        "us_per_commit": {
            name: spread([ns / 1000 for ns in values])
            for name, values in samples.items()
        },
        "no_event_ratio": spread(no_event),
        "one_event_ratio": spread(one_event),
        "outbox_one_event_ratio": spread(outbox_event),
    }
    one_event_limit = ONE_EVENT_LIMIT if database == "sqlite" else None
    rows = [
        figure_row(
            database,
            "1-2 commit",
            "plain insert+commit",
            [ns / 1000 for ns in samples["plain"]],
            "us",
        ),
        ratio_row(
            database, "1 commit, no event", "attached / plain", no_event, NO_EVENT_LIMIT
        ),
        ratio_row(
            database,
            "2 commit, one event",
            "one event / plain",
            one_event,
            one_event_limit,
        ),
        ratio_row(
            database,
            "6 outbox, one event",
            "outbox one event / plain",
            outbox_event,
            OUTBOX_LIMITS.get(database),
        ),
    ]
    return WorkloadResult("commit", figures, rows)


def _per_op(batch: Batch, ops: int) -> Callable[[], float]:
    return lambda: batch(ops) / ops


@dataclasses.dataclass(frozen=True, slots=True)
class BulkSample:
    """One round of one bulk variant, summed over its repeated transactions."""

    events: int
    transactions: int
    stage_ns: int
    """Staging (and SAVEPOINT begin/release), from the first event to the last."""
    commit_ns: int
    """``commit()``: flush, COMMIT, envelopes and dispatch to the plugin."""

    @property
    def stage_us_per_event(self) -> float:
        return self.stage_ns / self.events / 1000

    @property
    def total_us_per_event(self) -> float:
        return (self.stage_ns + self.commit_ns) / self.events / 1000

    @property
    def events_per_second(self) -> float:
        return self.events * 1e9 / self.commit_ns


def _bulk_variant(
    maker: sessionmaker[Any], events: int, savepoints: int, repeats: int
) -> Callable[[], BulkSample]:
    """Stage *events* in one transaction, repeated *repeats* times per sample.

    With *savepoints*, the events are staged in that many SAVEPOINTs of equal
    size, each released before the next begins, then the transaction commits.
    """
    per_savepoint = events // savepoints if savepoints else 0

    def sample() -> BulkSample:
        stage_ns = commit_ns = 0
        for _ in range(repeats):
            with maker() as session:
                session.add(BenchItem(name="bulk"))
                start = perf_counter_ns()
                if savepoints:
                    for _ in range(savepoints):
                        with session.begin_nested():
                            for _ in range(per_savepoint):
                                stage_one(session, "bulk")
                else:
                    for _ in range(events):
                        stage_one(session, "bulk")
                staged = perf_counter_ns()
                session.commit()
                stage_ns += staged - start
                commit_ns += perf_counter_ns() - staged
        return BulkSample(events * repeats, repeats, stage_ns, commit_ns)

    return sample


def bulk(database: str, settings: Settings) -> WorkloadResult:
    """Workload 4: events per transaction from small to large, and SAVEPOINT merges."""
    engine = make_engine(database, savepoints=True)
    Base.metadata.create_all(engine)
    maker = sessionmaker(engine)
    emitter = make_emitter()
    emitter.attach(maker)
    per_round = settings.bulk_events_per_round
    variants: dict[str, Callable[[], BulkSample]] = {}
    for size in settings.bulk_sizes:
        variants[f"events_{size}"] = _bulk_variant(
            maker, size, 0, max(1, per_round // size)
        )
    each = settings.events_per_savepoint
    for count in settings.savepoint_counts:
        variants[f"savepoints_{count}"] = _bulk_variant(
            maker, count * each, count, max(1, per_round // (count * each))
        )
    try:
        samples = interleave(variants, settings.bulk_rounds)
    finally:
        emitter.detach(maker)
        engine.dispose()

    small, medium, large = (f"events_{size}" for size in settings.bulk_sizes)
    few, many = (f"savepoints_{count}" for count in settings.savepoint_counts)
    scaling = _scaling(samples[large], samples[small])
    stage_scaling = [
        big.stage_us_per_event / little.stage_us_per_event
        for big, little in zip(samples[large], samples[small], strict=True)
    ]
    savepoint_scaling = _scaling(samples[many], samples[few])
    figures: dict[str, Any] = {
        "rounds": settings.bulk_rounds,
        "sizes": {
            str(size): _bulk_figures(samples[f"events_{size}"])
            for size in settings.bulk_sizes
        },
        "savepoints": {
            str(count): {
                "savepoints": count,
                "events_per_savepoint": each,
                **_bulk_figures(samples[f"savepoints_{count}"]),
            }
            for count in settings.savepoint_counts
        },
        "scaling_total_per_event": spread(scaling),
        "scaling_stage_per_event": spread(stage_scaling),
        "scaling_savepoints_per_event": spread(savepoint_scaling),
    }
    rows = []
    for size in settings.bulk_sizes:
        variant = samples[f"events_{size}"]
        workload = f"4 bulk, {size:,} events"
        rows.append(_stage_row(database, workload, "stage per event", variant))
        if f"events_{size}" == medium:
            rows.append(_rate_row(database, workload, variant, RATE_LIMIT))
    size_large, size_small = settings.bulk_sizes[2], settings.bulk_sizes[0]
    rows += [
        ratio_row(
            database,
            "4 bulk, scaling",
            f"per event {size_large:,} / {size_small:,}",
            scaling,
            SCALING_LIMIT,
        ),
        ratio_row(
            database,
            "4 bulk, scaling",
            f"stage only {size_large:,} / {size_small:,}",
            stage_scaling,
        ),
    ]
    for count in settings.savepoint_counts:
        variant = samples[f"savepoints_{count}"]
        workload = f"4 {count:,} savepoints x {each}"
        rows.append(_stage_row(database, workload, "stage+release per event", variant))
        rows.append(_rate_row(database, workload, variant))
    few_count, many_count = settings.savepoint_counts
    rows.append(
        ratio_row(
            database,
            "4 savepoints, scaling",
            f"per event {many_count:,} / {few_count:,}",
            savepoint_scaling,
            SCALING_LIMIT,
        )
    )
    return WorkloadResult("bulk", figures, rows)


def _scaling(big: list[BulkSample], little: list[BulkSample]) -> list[float]:
    return per_round_ratios(
        [sample.total_us_per_event for sample in big],
        [sample.total_us_per_event for sample in little],
    )


def _bulk_figures(samples: list[BulkSample]) -> dict[str, Any]:
    return {
        "events_per_transaction": samples[0].events // samples[0].transactions,
        "transactions_per_round": samples[0].transactions,
        "stage_us_per_event": spread([s.stage_us_per_event for s in samples]),
        "total_us_per_event": spread([s.total_us_per_event for s in samples]),
        "commit_dispatch_events_per_s": spread([s.events_per_second for s in samples]),
    }


def _stage_row(
    database: str, workload: str, figure: str, samples: list[BulkSample]
) -> Row:
    values = [sample.stage_us_per_event for sample in samples]
    return figure_row(database, workload, figure, values, "us")


def _rate_row(
    database: str,
    workload: str,
    samples: list[BulkSample],
    limit: float | None = None,
) -> Row:
    rates = [sample.events_per_second for sample in samples]
    if limit is None:
        return figure_row(database, workload, "commit+dispatch rate", rates, "ev/s")
    return figure_row(
        database,
        workload,
        "commit+dispatch rate",
        rates,
        "ev/s",
        f">= {limit:,.0f}/s",
        lambda median: median >= limit,
        limit,
    )
