"""Workload 5: nothing of a transaction outlives it.

Each transaction adds a row, stages one event and checks out its
connection (no INSERT is sent), then ends by ``rollback()`` or by
``close()``. After a warm-up, the transactions run under tracemalloc; the
memory still allocated after ``gc.collect()`` is the snapshot difference.
``session.info`` is searched for keys starting with ``access_audit`` after a
sample of the transactions and after the last one.
"""

from __future__ import annotations

import gc
import tracemalloc
from time import perf_counter_ns
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from .fixtures import Base, BenchItem, make_emitter, make_engine, stage_one
from .harness import Row, Settings, WorkloadResult

__all__ = ["memory"]

RETAINED_LIMIT = 1 << 20
"""Bytes a run of transactions may leave allocated."""
INFO_PREFIX = "access_audit"

ENDINGS = ("rollback", "close")


def _leftovers(session: Session) -> set[str]:
    return {
        key
        for key in session.info
        if isinstance(key, str) and key.startswith(INFO_PREFIX)
    }


def _retained(
    maker: sessionmaker[Any], ending: str, settings: Settings
) -> dict[str, Any]:
    """Run the transactions ending with *ending*; measure what stays behind."""
    leftovers: set[str] = set()
    with maker() as session:
        end = session.rollback if ending == "rollback" else session.close

        def transaction() -> None:
            session.add(BenchItem(name="memory"))
            stage_one(session, "memory")
            session.connection()
            end()

        for _ in range(settings.memory_warmup):
            transaction()
        sample_every = settings.memory_sample_every
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.take_snapshot()
            start = perf_counter_ns()
            for number in range(settings.memory_transactions):
                transaction()
                if number % sample_every == 0:
                    leftovers |= _leftovers(session)
            elapsed = perf_counter_ns() - start
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        leftovers |= _leftovers(session)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    differences = after.filter_traces(ignore).compare_to(
        before.filter_traces(ignore), "lineno"
    )
    return {
        "transactions": settings.memory_transactions,
        "retained_bytes": sum(stat.size_diff for stat in differences),
        "largest_differences": [str(stat) for stat in differences[:3]],
        "info_keys_left": sorted(leftovers),
        "us_per_transaction_traced": elapsed / settings.memory_transactions / 1000,
    }


def memory(database: str, settings: Settings) -> WorkloadResult:
    """Workload 5: retained memory and ``session.info`` after each ending."""
    engine = make_engine(database)
    Base.metadata.create_all(engine)
    maker = sessionmaker(engine)
    emitter = make_emitter()
    emitter.attach(maker)
    try:
        figures = {ending: _retained(maker, ending, settings) for ending in ENDINGS}
    finally:
        emitter.detach(maker)
        engine.dispose()
    rows = []
    for ending, found in figures.items():
        workload = f"5 memory, {found['transactions']:,} x {ending}"
        retained = found["retained_bytes"]
        left = len(found["info_keys_left"])
        rows += [
            Row(
                database,
                workload,
                "retained after gc",
                retained,
                "B",
                target=f"< {RETAINED_LIMIT:,} B",
                passed=retained < RETAINED_LIMIT,
            ),
            Row(
                database,
                workload,
                "access_audit* keys in info",
                left,
                "n",
                target="0",
                passed=left == 0,
            ),
        ]
    return WorkloadResult("memory", figures, rows)
