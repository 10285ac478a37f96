"""The library's typed choices, each defined once.

Every place that takes or reports one of these uses the ``Literal`` here, so
a misspelt value is a type error, and the tuples list the values at run time.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DISCARD_REASONS",
    "DISPATCH_MODES",
    "JOINED_TRANSACTIONS",
    "QUEUE_FULL_POLICIES",
    "DiscardReason",
    "DispatchMode",
    "JoinedTransactions",
    "QueueFullPolicy",
]

DiscardReason = Literal[
    "rollback",
    "savepoint_rollback",
    "close",
    "lazy_value_failed",
    "detached",
    "unstaged",
    "refused",
]
"""Why a staged event will never be emitted, as
:data:`~access_audit.signals.audit_event_discarded` reports it:

- ``"rollback"``: its transaction rolled back, or the outer transaction a
  joined session waited for did (or its COMMIT failed);
- ``"savepoint_rollback"``: its SAVEPOINT rolled back;
- ``"close"``: its transaction ended without commit or rollback (``close()``,
  ``reset()``, ``invalidate()``, a SAVEPOINT a flush error closed, the session
  garbage-collected with its transaction open, or still open as the process
  exits);
- ``"lazy_value_failed"``: a lazy value failed after COMMIT (staged by a hook
  that runs after access_audit's last chance before COMMIT);
- ``"detached"``: its transaction ended while its emitter was detached;
- ``"unstaged"``: withdrawn by :func:`~access_audit.discard_staged`;
- ``"refused"``: its transaction then took a connection that staging would
  have refused (``AUTOCOMMIT``, or inside a SAVEPOINT the session did not
  open), and that raised ``AuditConfigurationError``.
"""
DISCARD_REASONS: tuple[DiscardReason, ...] = get_args(DiscardReason)

DispatchMode = Literal["inline", "background", "asyncio", "relay"]
"""``AuditEmitter(dispatch=...)``: deliver in the committing thread before
``commit()`` returns, hand the batch to a worker thread, to a task on the
running event loop, or leave it to the outbox's relay alone."""
DISPATCH_MODES: tuple[DispatchMode, ...] = get_args(DispatchMode)

QueueFullPolicy = Literal["block", "drop"]
"""``AuditEmitter(queue_full=...)``: with a full background queue, make the
committing thread wait, or drop the batch for the outbox relay to deliver."""
QUEUE_FULL_POLICIES: tuple[QueueFullPolicy, ...] = get_args(QueueFullPolicy)

JoinedTransactions = Literal["outer", "session"]
"""``AuditEmitter(joined_transactions=...)``: when a session joined to an
outer transaction it does not end delivers its events: once that outer
transaction commits, or on the session's own ``commit()``."""
JOINED_TRANSACTIONS: tuple[JoinedTransactions, ...] = get_args(JoinedTransactions)
