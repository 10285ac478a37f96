"""Workload 3: access_audit against Flask-SQLAlchemy's ``models_committed``.

The same insert-and-commit runs in four Flask apps, each with its own
Flask-SQLAlchemy extension and Session subclass (so that listeners on one
cannot reach another), inside a pushed app context, using ``db.session`` as
a view would:

- ``plain``: ``SQLALCHEMY_TRACK_MODIFICATIONS=False``, nothing else: the baseline.
- ``track_modifications``: ``SQLALCHEMY_TRACK_MODIFICATIONS=True`` and one
  no-op ``models_committed`` receiver.
- ``access_audit``: track modifications off, an emitter attached to
  ``db.session`` with one no-op plugin, one ``stage_event`` per commit (one
  event per commit, as ``models_committed`` reports the one inserted row).
- ``access_audit_no_event``: the same emitter, nothing staged.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession
from flask_sqlalchemy.track_modifications import models_committed

from .fixtures import Base, database_url, make_emitter, timed_commits
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

__all__ = ["flask_samples", "flask_signal"]


def _on_models_committed(sender: Flask, changes: list[tuple[Any, str]]) -> None:
    """The one ``models_committed`` receiver: does nothing."""


def _app(database: str, name: str, *, track: bool) -> tuple[Flask, SQLAlchemy]:
    """A Flask app with its own extension and Session subclass, tables created."""
    app = Flask(f"bench_{name}")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url(database)
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = track
    session_class = type(f"Bench_{name}_Session", (FlaskSession,), {})
    db = SQLAlchemy(session_options={"class_": session_class})
    db.init_app(app)
    with app.app_context():
        Base.metadata.create_all(db.engine)
    return app, db


def _flask_batch(app: Flask, db: SQLAlchemy, stage: bool) -> Batch:
    """Insert and commit *n* times through ``db.session`` in one app context."""

    def batch(ops: int) -> int:
        with app.app_context():
            return timed_commits(db.session, ops, stage)

    return batch


@contextmanager
def _apps(database: str) -> Iterator[dict[str, Batch]]:
    """The four variants' batches; receivers, emitter and engines undone after."""
    plain = _app(database, "plain", track=False)
    tracked = _app(database, "track_modifications", track=True)
    audited = _app(database, "access_audit", track=False)
    emitter = make_emitter()
    emitter.attach(audited[1].session)
    models_committed.connect(_on_models_committed, sender=tracked[0])
    try:
        yield {
            "plain": _flask_batch(*plain, stage=False),
            "track_modifications": _flask_batch(*tracked, stage=False),
            "access_audit": _flask_batch(*audited, stage=True),
            "access_audit_no_event": _flask_batch(*audited, stage=False),
        }
    finally:
        models_committed.disconnect(_on_models_committed, sender=tracked[0])
        emitter.detach(audited[1].session)
        for app, db in (plain, tracked, audited):
            with app.app_context():
                db.engine.dispose()


def flask_samples(database: str, settings: Settings) -> tuple[Samples, int]:
    """One process's rounds of workload 3: nanoseconds per commit, and operations per batch."""
    with _apps(database) as batches:
        ops = ops_per_round(batches["plain"], settings)
        samples = interleave(
            {name: _per_op(batch, ops) for name, batch in batches.items()},
            settings.rounds,
            collect_each=False,
        )
    return samples, ops


def flask_signal(database: str, settings: Settings) -> WorkloadResult:
    """Workload 3: both overheads against the same plain Flask-SQLAlchemy baseline."""
    samples, ops = pooled("flask", database, settings)
    base = samples["plain"]
    tracked = per_round_ratios(samples["track_modifications"], base)
    audited = per_round_ratios(samples["access_audit"], base)
    no_event = per_round_ratios(samples["access_audit_no_event"], base)
    head_to_head = per_round_ratios(
        samples["access_audit"], samples["track_modifications"]
    )
    figures: dict[str, Any] = {
        "ops_per_round": ops,
        "rounds": len(base),
        "us_per_commit": {
            name: spread([ns / 1000 for ns in values])
            for name, values in samples.items()
        },
        "track_modifications_ratio": spread(tracked),
        "access_audit_ratio": spread(audited),
        "access_audit_no_event_ratio": spread(no_event),
        "access_audit_over_track_modifications": spread(head_to_head),
    }
    tracked_median = statistics.median(tracked)
    workload = "3 flask-sqlalchemy"
    rows = [
        figure_row(
            database,
            workload,
            "plain insert+commit",
            [ns / 1000 for ns in base],
            "us",
        ),
        ratio_row(database, workload, "track_modifications / plain", tracked),
        ratio_row(database, workload, "access_audit no event / plain", no_event),
        figure_row(
            database,
            workload,
            "access_audit one event / plain",
            audited,
            "x",
            f"<= {tracked_median:.3f}x (tm)",
            lambda median: median <= tracked_median,
            tracked_median,
        ),
        ratio_row(
            database, workload, "access_audit / track_modifications", head_to_head
        ),
    ]
    return WorkloadResult("flask_signal", figures, rows)


def _per_op(batch: Batch, ops: int) -> Callable[[], float]:
    return lambda: batch(ops) / ops
