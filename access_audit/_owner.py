"""What the layers below the emitter need of it, as protocols.

Staging, the transaction lifecycle and the session listeners work for the
emitter that owns a session, and the outbox plugs into the commit; each sees
only the small interface here, so no lower module imports the emitter or the
outbox (``tests/test_layers.py`` checks the import graph).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine, Table
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
    from sqlalchemy.orm import Session

    from ._context import ActorResolver, MetadataProvider
    from ._dispatch import DeliveryReport
    from ._envelope import AuditEventEnvelope
    from ._staged import StagedEvent
    from ._types import DiscardReason, JoinedTransactions
    from ._values import PayloadRules

__all__ = ["DeliveryStore", "Owner"]


class DeliveryStore(Protocol):
    """Durable delivery plugged into the commit; :class:`~access_audit.outbox.Outbox` is one.

    It is written inside the committing transaction, told afterwards what
    the plugins took, and relayed from later.
    """

    table: Table
    """Where the rows are stored."""

    def write(
        self,
        session: Session,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
    ) -> Engine | Connection:
        """Store *envelopes*, each for *plugins*, in *session*'s transaction.

        Returns the bind the rows went to, for :meth:`record` to use.
        """

    def record(
        self,
        bind: Engine | Connection,
        envelopes: Sequence[AuditEventEnvelope],
        plugins: Collection[str],
        report: DeliveryReport,
        *,
        apart: bool = False,
    ) -> None:
        """Record which of *plugins* took *envelopes* after COMMIT; *apart*:
        called from inside one of a connection's own events (the end of a
        joined session's outer transaction), where no connection may be
        taken or written through."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until what :meth:`record` was given so far is stored; False
        if *timeout* seconds passed first."""

    def relay(self, emitter: Any, bind: Engine | Connection, **options: Any) -> Any:
        """Deliver what is stored and still undelivered to *emitter*'s plugins."""

    async def arelay(
        self, emitter: Any, bind: AsyncEngine | AsyncConnection, **options: Any
    ) -> Any:
        """:meth:`relay` from a coroutine, through an async *bind*, without
        blocking the running loop."""


class Owner(Protocol):
    """The emitter that owns a session, as staging and the lifecycle see it."""

    actor_resolver: ActorResolver | None
    metadata_provider: MetadataProvider | None
    payload_rules: PayloadRules
    joined_transactions: JoinedTransactions
    outbox: DeliveryStore | None
    _closed: bool
    """Whether ``close()``/``aclose()`` stopped its background or asyncio
    dispatch, with no outbox to relay what is staged: staging is refused
    from then on."""

    def _write_outbox(
        self, session: Session, envelopes: Sequence[AuditEventEnvelope]
    ) -> Engine | Connection:
        """Write *envelopes* to the outbox, for the plugins that take events."""

    def _committed(
        self,
        envelopes: tuple[AuditEventEnvelope, ...],
        outbox_bind: Engine | Connection | None,
        *,
        record_apart: bool = False,
    ) -> None:
        """Deliver a committed batch (*record_apart*: record the outbox
        deliveries on a thread of their own)."""

    def _discarded(self, events: Sequence[StagedEvent], reason: DiscardReason) -> None:
        """Report events that will never be emitted."""

    def _watch_connections(self, session: Session) -> None:
        """Check the connections *session* acquires from now on."""
