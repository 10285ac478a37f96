"""At-least-once delivery: the transactional outbox and its relay.

An emitter created with ``outbox=Outbox(...)`` writes each committed event to
the outbox table inside the transaction that commits it, dispatches right
after COMMIT as usual, and records what each plugin took off the request
path (rows every plugin took leave the outbox). A relay
(:meth:`AuditEmitter.relay <access_audit.AuditEmitter.relay>`, its asyncio
twin :meth:`AuditEmitter.arelay <access_audit.AuditEmitter.arelay>`,
``python -m access_audit relay`` or ``flask access-audit relay``) re-delivers
what a crash, a deploy or a failing plugin left undelivered. Consumers
de-duplicate by the envelope ``id``.
"""

from ._relay import OutboxStatus as OutboxStatus
from ._relay import RelayStats as RelayStats
from ._relay import arelay as arelay
from ._relay import count_pending as count_pending
from ._relay import list_dead as list_dead
from ._relay import prune as prune
from ._relay import relay as relay
from ._relay import retry_dead as retry_dead
from ._relay import status as status
from ._store import DEAD as DEAD
from ._store import DELIVERED as DELIVERED
from ._store import PENDING as PENDING
from ._table import Outbox as Outbox

__all__ = [
    "DEAD",
    "DELIVERED",
    "PENDING",
    "Outbox",
    "OutboxStatus",
    "RelayStats",
    "arelay",
    "count_pending",
    "list_dead",
    "prune",
    "relay",
    "retry_dead",
    "status",
]
