"""``python -m benchmarks.outbox_steps``: where an outbox-mode commit's cost goes.

Workload 6 (insert a row, stage one event, commit, with an outbox) taken
apart: each variant adds one piece of the outbox's work to the one before
it, and all of them run interleaved with a plain insert+commit in the same
rounds, reported as medians of per-round ratios over plain. The variants
leave pieces out by overriding the outbox's delivery-store methods
(``write``, ``record``) or, within the shipped ``write``, the one call
that sends the INSERT; everything else runs as shipped. Replacing that
call takes a wrapper (one more lookup of the session's connection), so the
three variants that go through it are compared with each other, and the
shipped code without the record is measured too. The last variant sends a
bare ``SELECT 1`` in place of the INSERT: the cost of a round trip alone,
the floor of any outbox that sends its row as a statement of its own.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from access_audit.outbox import Outbox

from .breakdown import loop_arguments
from .fixtures import Base, make_emitter, make_engine, timed_commits
from .harness import interleave, per_round_ratios

__all__ = ["STEPS", "main", "steps"]


class _Unrecorded(Outbox):
    """The outbox as shipped, but that records no delivery."""

    def record(self, *_: Any) -> None:
        """Record nothing: the rows stay (each variant has a table of its own)."""


class _Unwritten(_Unrecorded):
    """Outbox mode without the INSERT: the envelopes are still built before COMMIT."""

    def write(self, session: Session, envelopes: Any, plugins: Any) -> Any:
        return session.get_bind(clause=self.table)


@contextmanager
def _sent_by(connection: Connection, send: Callable[..., object]) -> Any:
    """Let *send* take the place of *connection*'s ``exec_driver_sql``."""
    setattr(connection, "exec_driver_sql", send)  # noqa: B010 - an instance's own
    try:
        yield
    finally:
        delattr(connection, "exec_driver_sql")


class _Sent(_Unrecorded):
    """The shipped ``write``, with the INSERT sent by :meth:`send` instead."""

    def write(self, session: Session, envelopes: Any, plugins: Collection[str]) -> Any:
        connection = session.connection(bind_arguments={"clause": self.table})
        with _sent_by(
            connection, lambda sql, parameters: self.send(connection, sql, parameters)
        ):
            return super().write(session, envelopes, plugins)

    def send(self, connection: Connection, sql: str, parameters: Any) -> None:
        """Send nothing: the row and its parameters are made, no more."""


class _Raw(_Sent):
    def send(self, connection: Connection, sql: str, parameters: Any) -> None:
        """Send the INSERT through the DB-API cursor, past SQLAlchemy."""
        cursor = connection.connection.cursor()
        try:
            cursor.execute(sql, parameters)
        finally:
            cursor.close()


class _Through(_Sent):
    def send(self, connection: Connection, sql: str, parameters: Any) -> None:
        """Send the INSERT as shipped, through SQLAlchemy."""
        Connection.exec_driver_sql(connection, sql, parameters)


class _RoundTrip(_Unwritten):
    def write(self, session: Session, envelopes: Any, plugins: Any) -> Any:
        session.connection(bind_arguments={"clause": self.table}).exec_driver_sql(
            "SELECT 1"
        )
        return super().write(session, envelopes, plugins)


STEPS: tuple[tuple[str, type[Outbox] | None], ...] = (
    ("one event, no outbox", None),
    ("outbox mode, no INSERT and no record (envelope built before COMMIT)", _Unwritten),
    (
        "+ the session's connection, the row, its JSON and its parameters (wrapped)",
        _Sent,
    ),
    ("+ the INSERT through the DB-API cursor (wrapped)", _Raw),
    ("the INSERT through SQLAlchemy instead (wrapped)", _Through),
    ("as shipped, but for the record (not wrapped)", _Unrecorded),
    ("+ the record of the delivery: as shipped", Outbox),
    ("a bare SELECT 1 in place of the INSERT", _RoundTrip),
)
"""Each variant's name, and its outbox class (None: no outbox)."""


def steps(database: str, commits: int, rounds: int) -> dict[str, float]:
    """Median ratio over a plain insert+commit of each of :data:`STEPS`,
    in *rounds* interleaved batches of *commits* commits each; also
    ``"plain"``, its median microseconds per commit."""
    engine = make_engine(database)
    Base.metadata.create_all(engine)
    outboxes: list[Outbox] = []
    batches: dict[str, Callable[[], float]] = {
        "plain": _batch(sessionmaker(engine), commits, stage=False)
    }
    try:
        for index, (name, kind) in enumerate(STEPS):
            maker: sessionmaker[Session] = sessionmaker(engine)
            if kind is None:
                make_emitter().attach(maker)
            else:
                outbox = kind(table_name=f"bench_outbox_step{index}")
                outboxes.append(outbox)
                _fresh(engine, outbox)
                make_emitter(outbox=outbox).attach(maker)
            batches[name] = _batch(maker, commits, stage=True)
        samples = interleave(batches, rounds, collect_each=False)
    finally:
        for outbox in outboxes:
            outbox.drop(engine)
        engine.dispose()
    figures = {"plain": statistics.median(samples["plain"]) / 1000}
    for name, _ in STEPS:
        ratios = per_round_ratios(samples[name], samples["plain"])
        figures[name] = statistics.median(ratios)
    return figures


def _fresh(engine: Engine, outbox: Outbox) -> None:
    outbox.drop(engine)
    outbox.create(engine)


def _batch(
    maker: sessionmaker[Session], commits: int, stage: bool
) -> Callable[[], float]:
    """Nanoseconds per commit of *commits* commits on one session."""

    def batch() -> float:
        with maker() as session:
            return timed_commits(session, commits, stage) / commits

    return batch


def main(argv: Sequence[str] | None = None) -> None:
    """Print the steps of workload 6 on one database."""
    arguments = loop_arguments("outbox_steps", 25, argv)
    figures = steps(arguments.database, arguments.commits, arguments.rounds)
    print(
        f"{arguments.database}: plain insert+commit {figures['plain']:.2f} us "
        "(median); medians of per-round ratios over it"
    )
    print("| variant | over plain |")
    print("| --- | ---: |")
    for name, _ in STEPS:
        print(f"| {name} | {figures[name]:.3f}x |")


if __name__ == "__main__":
    main()
