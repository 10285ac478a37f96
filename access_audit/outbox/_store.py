"""Reading and writing outbox rows."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, update

from .._envelope import AuditEventEnvelope
from ._table import DEAD, DELIVERED, PENDING, Outbox

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .._dispatch import DeliveryReport

__all__ = [
    "OutboxRow",
    "mark_dispatched",
    "row_values",
    "transaction",
    "waiting_plugins",
    "write",
]

_CHUNK = 500


def row_values(
    envelope: AuditEventEnvelope, relay_after: timedelta, recipients: str
) -> dict[str, Any]:
    """The outbox row of a freshly committed envelope."""
    return {
        "id": str(envelope.id),
        "aggregatetype": envelope.target_type,
        "aggregateid": envelope.target_id,
        "type": envelope.event_type,
        "payload": envelope.to_json(),
        "created_at": envelope.timestamp,
        "transaction_id": str(envelope.transaction_id),
        "sequence": envelope.sequence,
        "status": PENDING,
        "delivered_to": "[]",
        "failures": "{}",
        "next_attempt_at": envelope.timestamp + relay_after,
        "delivered_at": None,
        "recipients": recipients,
    }


def write(
    session: Session,
    outbox: Outbox,
    envelopes: Sequence[AuditEventEnvelope],
    recipients: Iterable[str],
) -> None:
    """Insert rows for *envelopes* in the session's transaction (before COMMIT).

    *recipients* are the plugins each event is for: a relay that lacks one of
    them leaves the event pending for a relay that has it.
    """
    if envelopes:
        names = json.dumps(sorted(recipients))
        rows = [row_values(e, outbox.relay_after, names) for e in envelopes]
        # Core, on the session's connection for the table: the ORM's
        # session.execute() path costs as much again per commit.
        connection = session.connection(bind_arguments={"clause": outbox.table})
        connection.execute(outbox.statements.insert, rows)


@contextmanager
def transaction(bind: Engine | Connection) -> Iterator[Connection]:
    """A connection in a transaction of its own, or the joined caller's one.

    A session bound to a Connection (the rollback-per-test recipe) already
    runs inside the caller's transaction: outbox updates go there too.
    """
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.begin() as connection:
            yield connection


def mark_dispatched(
    bind: Engine | Connection,
    outbox: Outbox,
    envelopes: Sequence[AuditEventEnvelope],
    plugins: Iterable[str],
    report: DeliveryReport,
) -> None:
    """Record the outcome of delivering freshly committed envelopes.

    Rows every plugin took become ``delivered``; the others stay ``pending``
    with the plugins that took them and the failures, due for the relay at
    once.
    """
    table = outbox.table
    plugins = sorted(set(plugins))
    now = datetime.now(timezone.utc)
    failed_by_event: dict[uuid.UUID, dict[str, BaseException]] = {}
    for name, errors in report.failed.items():
        for event_id, error in errors.items():
            failed_by_event.setdefault(event_id, {})[name] = error
    with transaction(bind) as connection:
        done = [str(e.id) for e in envelopes if e.id not in failed_by_event]
        delivered_to = json.dumps(plugins)
        for start in range(0, len(done), _CHUNK):
            connection.execute(
                outbox.statements.mark_delivered,
                {
                    "ids": done[start : start + _CHUNK],
                    "delivered_to": delivered_to,
                    "delivered_at": now,
                },
            )
        for event_id, failed in failed_by_event.items():
            failures = {
                name: {"attempts": 1, "error": repr(error)[:500], "dead": False}
                for name, error in failed.items()
            }
            connection.execute(
                update(table)
                .where(table.c.id == str(event_id))
                .values(
                    delivered_to=json.dumps([p for p in plugins if p not in failed]),
                    failures=json.dumps(failures, sort_keys=True),
                    next_attempt_at=now,
                )
            )


class OutboxRow:
    """One outbox row as the relay sees it."""

    __slots__ = (
        "delivered_to",
        "failures",
        "id",
        "next_attempt_at",
        "payload",
        "recipients",
        "status",
        "target",
        "transaction_id",
    )

    def __init__(self, mapping: Any) -> None:
        self.id: str = mapping["id"]
        self.target = (mapping["aggregatetype"], mapping["aggregateid"])
        self.transaction_id: str = mapping["transaction_id"]
        self.status: str = mapping["status"]
        self.delivered_to: set[str] = set(json.loads(mapping["delivered_to"]))
        self.failures: dict[str, dict[str, Any]] = json.loads(mapping["failures"])
        self.next_attempt_at: datetime = mapping["next_attempt_at"]
        self.payload: str = mapping["payload"]
        self.recipients: set[str] = set(json.loads(mapping["recipients"]))

    def envelope(self) -> AuditEventEnvelope:
        return AuditEventEnvelope.from_dict(json.loads(self.payload))

    def waiting(self) -> frozenset[str]:
        """The plugin names that have neither taken this event nor given up on it.

        Only plugins the event is for count: see :func:`waiting_plugins`.
        """
        return waiting_plugins(self.recipients, self.delivered_to, self.failures)

    def wanting(self, plugins: Iterable[str]) -> list[str]:
        """Those of *plugins* that this event is still waiting for."""
        waiting = self.waiting()
        return [name for name in plugins if name in waiting]

    def updated_status(self) -> str:
        """``delivered``, ``dead`` or ``pending``, from the delivery state now.

        The event stays pending while a plugin it is for has neither taken it
        nor given up on it, whether the asking relay has that plugin or not.
        """
        if self.waiting():
            return PENDING
        audience = self.recipients | set(self.failures)
        return DEAD if audience - self.delivered_to else DELIVERED


def waiting_plugins(
    recipients: Iterable[str],
    delivered_to: Iterable[str],
    failures: dict[str, dict[str, Any]],
) -> frozenset[str]:
    """The plugin names an event still waits for, from its row's delivery state.

    An event is for the plugins it was written for (*recipients*) and any
    that failed on it (one registered between the write and the dispatch);
    never for another plugin, whatever its class. Of those, it waits for the
    ones not in *delivered_to* and not dead in *failures*.
    """
    taken = set(delivered_to)
    return frozenset(
        name
        for name in {*recipients, *failures}
        if name not in taken and not failures.get(name, {}).get("dead", False)
    )
