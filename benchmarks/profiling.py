"""``python -m benchmarks.profiling``: cProfile of the hot paths.

Profiles workload 2 (insert, one ``stage_event``, commit, on one session)
and workload 4 (events staged in one transaction, then one commit), and
prints the functions that cost the most, overall and within access_audit.
The timings are inflated by the profiler; read them as proportions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.orm import sessionmaker

from .fixtures import DATABASES, Base, make_emitter, make_engine, stage_one
from .workloads import _commit_batch

__all__ = ["main"]


def _bulk(maker: sessionmaker[Any], events: int) -> Callable[[], None]:
    def run() -> None:
        with maker() as session:
            for _ in range(events):
                stage_one(session, "bulk")
            session.commit()

    return run


def profile(title: str, run: Callable[[], object], limit: int) -> None:
    """Warm up, profile one call of *run*, print the top costs."""
    run()
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    print(f"\n===== {title} =====")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats("/access_audit/", limit)


def main(argv: Sequence[str] | None = None) -> None:
    """Profile workloads 2 and 4 on one database."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument("--database", choices=DATABASES, default="sqlite")
    parser.add_argument("--commits", type=int, default=5_000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=25, help="rows per listing")
    arguments = parser.parse_args(argv)
    engine = make_engine(arguments.database, savepoints=True)
    Base.metadata.create_all(engine)
    maker = sessionmaker(engine)
    emitter = make_emitter()
    emitter.attach(maker)
    try:
        batch = _commit_batch(maker, stage=True)
        profile(
            f"workload 2: {arguments.commits:,} commits of one event",
            lambda: batch(arguments.commits),
            arguments.limit,
        )
        profile(
            f"workload 4: {arguments.events:,} events in one transaction",
            _bulk(maker, arguments.events),
            arguments.limit,
        )
    finally:
        emitter.detach(maker)
        if engine.dialect.name != "sqlite":
            Base.metadata.drop_all(engine)
        engine.dispose()


if __name__ == "__main__":
    main()
