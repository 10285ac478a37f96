"""``AsyncWebhookPlugin``: the ``async def`` hook, over pooled HTTP connections.

access_audit awaits the hook on the application's own event loop inside
``await session.commit()`` of an ``AsyncSession``, and on the event loop the
emitter owns for a sync ``Session``. An :class:`httpx.AsyncClient` (its
connection pool) belongs to the loop it was first used on, so the plugin
keeps one client per loop, made at that loop's first delivery and reused by
every later one: a keep-alive connection carries many deliveries.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from access_audit import hookimpl

from ._plugin import _Failure, _Request, _Webhook, retryable_status

if TYPE_CHECKING:
    import httpx

    from access_audit import AuditEventEnvelope

__all__ = ["AsyncWebhookPlugin"]


class AsyncWebhookPlugin(_Webhook):
    """POST each committed event (or batch) from an ``async def`` hook, pooled.

    Sends, signs and retries exactly as
    :class:`~access_audit_webhook.WebhookPlugin` does (the same code builds
    and signs the requests), with the same settings; waits between attempts
    with :func:`asyncio.sleep`, so the loop keeps running.

    Connections: one :class:`httpx.AsyncClient` per event loop, made at that
    loop's first delivery and kept, so deliveries on a loop reuse its
    keep-alive connections instead of opening one each. Redirects are not
    followed; proxies and certificates come from the environment as for
    :class:`~access_audit_webhook.WebhookPlugin`. :meth:`aclose` closes every
    loop's client, each on its own loop; await it before the loop ends (a
    lifespan's shutdown). A later delivery makes a new client.
    """

    def _start(self) -> None:
        try:
            import httpx  # noqa: F401  (the ``async`` extra)
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "AsyncWebhookPlugin needs httpx: pip install 'access-audit-webhook[async]'"
            ) from None
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._clients_lock = threading.Lock()

    def _client(self) -> httpx.AsyncClient:
        import httpx

        loop = asyncio.get_running_loop()
        with self._clients_lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                for stale in [k for k in self._clients if k.is_closed()]:
                    del self._clients[stale]
                client = self._clients[loop] = httpx.AsyncClient(
                    timeout=self.timeout, follow_redirects=False, trust_env=True
                )
            return client

    @hookimpl
    async def audit_events_committed(
        self, envelopes: Sequence[AuditEventEnvelope]
    ) -> None:
        """POST *envelopes*: one request each, or one for all with ``batch``.

        :raises WebhookDeliveryError: a request was not answered 2xx.
        """
        for request in self._requests(envelopes):
            failure = await self._send(request)
            if failure is not None:
                raise self._error(request, failure)

    async def _send(self, request: _Request) -> _Failure | None:
        """POST *request* until a 2xx, a refusal, or the last attempt; None on 2xx."""
        import httpx

        client = self._client()
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            failed: BaseException
            try:
                response = await client.post(
                    self.url,
                    content=request.body,
                    headers=self._attempt_headers(request),
                )
            except httpx.TransportError as error:
                # Refused, DNS, TLS, a timeout, a dropped connection.
                retry, failed, reason = True, error, repr(error)
            else:
                status = response.status_code
                if response.is_success:
                    return None
                retry = retryable_status(status)
                failed = httpx.HTTPStatusError(
                    f"HTTP {status}", request=response.request, response=response
                )
                reason = f"HTTP {status} {response.reason_phrase}"
            failure = _Failure(attempt, status, failed, reason)
            delay = self._retry_delay(failure, retry)
            if delay is None:
                return failure
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Close every loop's client (its pooled connections), each on its own loop.

        Idempotent. The running loop's is closed here; one on a loop running
        in another thread (the emitter's) is closed there, awaited without
        blocking this loop; one on a loop that no longer runs is dropped.
        """
        current = asyncio.get_running_loop()
        with self._clients_lock:
            clients = list(self._clients.items())
            self._clients.clear()
        for loop, client in clients:
            if loop is current:
                await client.aclose()
            elif loop.is_running():
                await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                )
