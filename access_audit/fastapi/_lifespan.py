"""``audit_lifespan``: deliver what is queued whenever the app shuts down."""

from __future__ import annotations

from types import TracebackType

from .._emitter import AuditEmitter
from .._logging import logger

__all__ = ["audit_lifespan"]


class audit_lifespan:  # lower case: used like a function, as audit_context is
    """An app lifespan that delivers what *emitter* has queued on shutdown.

    On shutdown it awaits :meth:`AuditEmitter.aflush(timeout)
    <access_audit.AuditEmitter.aflush>`: what background or asyncio
    dispatch queued is delivered before the server exits, and the event loop
    keeps serving meanwhile. The emitter stays open, so an app started
    again in the same process (a test client per test) goes on auditing;
    the interpreter's exit closes it. If *timeout* (seconds; None: no
    limit) passes first, an error is logged on the ``access_audit`` logger
    and shutdown goes on; the rest stays queued (with an outbox, the relay
    delivers it later).

    Pass it as the app's lifespan, ``FastAPI(lifespan=audit_lifespan(emitter))``,
    or enter it in your own::

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async with audit_lifespan(emitter, timeout=10):
                yield
    """

    __slots__ = ("emitter", "timeout")

    def __init__(self, emitter: AuditEmitter, *, timeout: float | None = None) -> None:
        self.emitter = emitter
        self.timeout = timeout

    def __call__(self, app: object) -> audit_lifespan:
        """The lifespan of *app* (as ``FastAPI(lifespan=...)`` calls it)."""
        return self

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not await self.emitter.aflush(self.timeout):
            logger.error(
                "audit_lifespan: %r did not deliver what it had queued within "
                "%s seconds; shutting down without it",
                self.emitter,
                self.timeout,
            )

    def __repr__(self) -> str:
        return f"audit_lifespan({self.emitter!r}, timeout={self.timeout!r})"
