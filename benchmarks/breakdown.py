"""``python -m benchmarks.breakdown``: where one audited commit's time goes.

Workload 2 (insert a row, stage one event, commit) is run as the benchmark
runs it, and each access_audit entry point on its path is timed from inside
that loop: ``stage_event`` and each session listener. Between two commits
SQLAlchemy and the database driver fill the CPU's caches with their own work,
so this code runs cold and costs several times what it costs in a tight loop
or under cProfile (``benchmarks.profiling``, whose own overhead is larger
than the pieces measured here). The cost of the timer itself is measured the
same way, from an ``after_commit`` hook of sessions of its own, and
subtracted; the plain baseline runs no listener at all.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter_ns
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from access_audit._listeners import SessionListeners

from . import fixtures
from .fixtures import DATABASES, Base, make_emitter, make_engine, timed_commits

__all__ = ["HOOKS", "breakdown", "loop_arguments", "main"]

HOOKS = tuple("_" + name for name in SessionListeners.EVENTS)
"""The session listeners of :class:`SessionListeners`, as its methods are named."""

STAGE = "stage_event"
TIMER = "timer"


def _timed(function: Callable[..., Any], name: str, totals: Counter[str]) -> Any:
    """Wrap *function* to count its calls and nanoseconds in *totals*.

    They go to ``totals[name + " calls"]`` and ``totals[name]``.
    """

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += perf_counter_ns() - start
            totals[name + " calls"] += 1

    return timed


@contextmanager
def _instrumented(totals: Counter[str]) -> Iterator[None]:
    """Time ``stage_event`` (as the workload calls it) and the listeners.

    The listeners are bound when an emitter is made, so make it inside.
    """
    # stage_one() calls the stage_event that fixtures imported.
    saved_stage = getattr(fixtures, STAGE)
    saved_hooks = {name: getattr(SessionListeners, name) for name in HOOKS}
    setattr(fixtures, STAGE, _timed(saved_stage, STAGE, totals))
    for name, hook in saved_hooks.items():
        setattr(SessionListeners, name, _timed(hook, name, totals))
    try:
        yield
    finally:
        setattr(fixtures, STAGE, saved_stage)
        for name, hook in saved_hooks.items():
            setattr(SessionListeners, name, hook)


def breakdown(database: str, commits: int, rounds: int) -> dict[str, float]:
    """Microseconds per audited commit of each timed piece, timer cost removed.

    Also ``"plain"``, a plain insert+commit in the same rounds, and for each
    piece, ``piece + " calls"``: calls per commit. Medians over *rounds*
    batches of *commits* commits each. A listener's time includes its own
    call, not SQLAlchemy's loop that calls it.
    """
    totals: Counter[str] = Counter()
    engine = make_engine(database)
    plain = sessionmaker(engine)
    # The timer's cost, around a C function that does nothing of note, at
    # the point of a commit where the listeners run; on sessions of its own,
    # so that the plain baseline runs no listener at all.
    calibration = sessionmaker(engine)
    timer = _timed(id, TIMER, totals)
    event.listen(calibration, "after_commit", timer)
    audited = sessionmaker(engine)
    per_round: dict[str, list[float]] = {}
    try:
        Base.metadata.create_all(engine)
        with _instrumented(totals):
            emitter = make_emitter()
            emitter.attach(audited)
            try:
                for index in range(rounds + 1):  # the first round warms up
                    totals.clear()
                    with plain() as session:
                        plain_ns = timed_commits(session, commits, stage=False)
                    with calibration() as session:
                        timed_commits(session, commits, stage=False)
                    with audited() as session:
                        timed_commits(session, commits, stage=True)
                    if index:
                        _collect(per_round, totals, plain_ns, commits)
            finally:
                emitter.detach(audited)
    finally:
        event.remove(calibration, "after_commit", timer)
        if engine.dialect.name != "sqlite":
            Base.metadata.drop_all(engine)
        engine.dispose()
    return {name: statistics.median(values) for name, values in per_round.items()}


def _collect(
    per_round: dict[str, list[float]],
    totals: Counter[str],
    plain_ns: int,
    commits: int,
) -> None:
    timer_ns = totals[TIMER] / totals[TIMER + " calls"]
    figures = {"plain": plain_ns / commits / 1000}
    for name in (STAGE, *HOOKS):
        calls = totals[name + " calls"]
        figures[name] = (totals[name] - calls * timer_ns) / commits / 1000
        figures[name + " calls"] = calls / commits
    for name, value in figures.items():
        per_round.setdefault(name, []).append(value)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def loop_arguments(
    module: str, rounds: int, argv: Sequence[str] | None
) -> argparse.Namespace:
    """The command line of a commit-loop tool ``python -m benchmarks.MODULE``:
    ``--database``, ``--commits`` per batch and ``--rounds`` (default *rounds*)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}")
    parser.add_argument("--database", choices=DATABASES, default="sqlite")
    parser.add_argument("--commits", type=_positive, default=1_000, help="per batch")
    parser.add_argument("--rounds", type=_positive, default=rounds)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the breakdown of workload 2 on one database."""
    arguments = loop_arguments("breakdown", 20, argv)
    figures = breakdown(arguments.database, arguments.commits, arguments.rounds)
    plain = figures["plain"]
    print(f"{arguments.database}: plain insert+commit {plain:.2f} us (median)")
    print("| piece | calls per commit | us per commit | of a plain commit |")
    print("| --- | ---: | ---: | ---: |")
    pieces = (STAGE, *HOOKS)
    for name in pieces:
        value = figures[name]
        print(
            f"| {name} | {figures[name + ' calls']:.1f} | {value:.2f} "
            f"| {value / plain:.1%} |"
        )
    total = sum(figures[name] for name in pieces)
    print(f"| all of access_audit | | {total:.2f} | {total / plain:.1%} |")


if __name__ == "__main__":
    main()
