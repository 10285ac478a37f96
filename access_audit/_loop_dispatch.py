"""``dispatch="asyncio"``: commits return at once; a task on the loop delivers.

Each event loop that commits gets a queue and one worker task, which runs
the delivery jobs in the order the commits queued them. The queue is bounded, with the policies of
background dispatch: with ``"block"`` a committing ``AsyncSession`` waits for
room without blocking the loop (SQLAlchemy runs the commit in a greenlet it
can suspend); synchronous code on the loop's own thread cannot wait there,
and neither can a delivery (a plugin committing), so their jobs go
past the bound instead, as does the batch of a commit cancelled while it
waits. ``"drop"`` drops and counts the batch (only with an outbox, whose
relay delivers it). A loop that ends with jobs still queued (no
``aclose()``) has them delivered synchronously as its worker is cancelled.
A loop closed without cancelling its tasks (``run_until_complete`` then
``close()``) leaves its jobs stranded: the next loop that commits takes
them over, ahead of its own, and at interpreter exit what is still
stranded is delivered synchronously. A batch that was being delivered when
its loop closed cannot be resumed: its events are logged as interrupted.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import weakref
from collections.abc import Callable, Coroutine, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._logging import event_ids, logger
from ._sqla import await_only, in_greenlet

if TYPE_CHECKING:
    from ._envelope import AuditEventEnvelope
    from ._types import QueueFullPolicy

__all__ = ["LoopDispatcher"]


class Job:
    """A delivery: the coroutine that makes it, and the same done synchronously."""

    __slots__ = ("envelopes", "fallback", "run")

    def __init__(
        self,
        run: Callable[[], Coroutine[Any, Any, None]],
        fallback: Callable[[], None],
        envelopes: Sequence[AuditEventEnvelope],
    ) -> None:
        self.run = run
        self.fallback = fallback
        """Delivers the batch without the loop, for a loop that is ending."""
        self.envelopes = envelopes


_delivering: ContextVar[bool] = ContextVar("access_audit_delivering", default=False)
"""Set in the worker, and so in every task a delivery starts (a plugin's):
a commit there must not wait for room that only the worker can make."""


class _LoopQueue:
    """One event loop's jobs and the worker task running them."""

    def __init__(self) -> None:
        self.jobs: collections.deque[Job] = collections.deque()
        self.changed = asyncio.Condition()
        self.submitted = 0
        self.finished = 0
        """Jobs queued and jobs run, ever: run in order, so a flush waits
        for the count queued when it began (later commits never starve it)."""
        self.worker: asyncio.Task[None] | None = None
        """The running worker; None once it finished, so that an idle queue
        (the value of a weak-keyed entry) keeps no reference to its loop."""
        self.current: Job | None = None
        """The job the worker is running."""

    def strand(self) -> list[Job]:
        """Empty the queue of a loop that closed with its worker suspended:
        its jobs, to run elsewhere; the job in flight is logged as lost."""
        if self.current is not None:
            logger.error(
                "events %s were being delivered when their event loop closed "
                "(without aclose(), and without cancelling its tasks): their "
                "delivery was interrupted",
                event_ids(self.current.envelopes),
            )
            self.current = None
        if self.worker is not None:
            # It will never run again; its destruction is not news.
            self.worker._log_destroy_pending = False  # type: ignore[attr-defined]
            self.worker = None
        stranded = list(self.jobs)
        self.jobs.clear()
        self.finished = self.submitted
        return stranded


class LoopDispatcher:
    """Delivery jobs queued per event loop, each loop's run in order by one task."""

    def __init__(self, maxsize: int, when_full: QueueFullPolicy) -> None:
        if maxsize <= 0:
            raise ValueError("queue_size must be positive")
        self.maxsize = maxsize
        self.when_full = when_full
        self.dropped = 0
        """Batches dropped because the queue was full."""
        self._queues: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _LoopQueue
        ] = weakref.WeakKeyDictionary()
        self._closed = False
        _dispatchers.add(self)

    def submit(self, loop: asyncio.AbstractEventLoop, job: Job) -> None:
        """Queue *job* on *loop* (the running one), applying the queue-full policy.

        :raises RuntimeError: the dispatcher was closed.
        """
        if self._closed:
            raise RuntimeError(
                "this emitter's asyncio dispatcher is closed; events committed "
                "now cannot be delivered"
            )
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._new_queue(loop)
        if len(queue.jobs) >= self.maxsize and not _delivering.get():
            if self.when_full == "drop":
                self.dropped += 1
                logger.warning(
                    "asyncio delivery queue full (%d batches): dropped a batch; "
                    "the outbox relay will deliver it",
                    self.maxsize,
                )
                return
            if in_greenlet():
                try:
                    await_only(_room(queue, self.maxsize))
                except asyncio.CancelledError:
                    # The batch is committed: queue it all the same.
                    _append(loop, queue, job)
                    raise
        _append(loop, queue, job)

    def _new_queue(self, loop: asyncio.AbstractEventLoop) -> _LoopQueue:
        """A queue for *loop*, holding first the jobs stranded on closed loops."""
        queue = self._queues[loop] = _LoopQueue()
        for other, stranded in list(self._queues.items()):
            if other.is_closed() and (stranded.jobs or stranded.current):
                for job in stranded.strand():
                    _append(loop, queue, job)
        return queue

    def deliver_stranded(self) -> None:
        """Deliver, synchronously, the jobs of every loop that is not running
        (at interpreter exit: nothing else will)."""
        for loop, queue in list(self._queues.items()):
            if not loop.is_running() and (queue.jobs or queue.current):
                _fall_back(queue.strand())

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until this loop's queued jobs ran (and those it took over from
        closed loops); False if *timeout* passed first."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._new_queue(loop)

        target = queue.submitted

        async def drained() -> None:
            async with queue.changed:
                await queue.changed.wait_for(lambda: queue.finished >= target)

        try:
            await asyncio.wait_for(drained(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float | None = None) -> bool:
        """Deliver what this loop has queued, then refuse new jobs."""
        drained = await self.flush(timeout)
        self._closed = True
        return drained


def _append(loop: asyncio.AbstractEventLoop, queue: _LoopQueue, job: Job) -> None:
    queue.jobs.append(job)
    queue.submitted += 1
    if queue.worker is None or queue.worker.done():
        queue.worker = loop.create_task(_work(queue))


async def _room(queue: _LoopQueue, maxsize: int) -> None:
    async with queue.changed:
        await queue.changed.wait_for(lambda: len(queue.jobs) < maxsize)


async def _work(queue: _LoopQueue) -> None:
    _delivering.set(True)
    try:
        while queue.jobs:
            job = queue.current = queue.jobs.popleft()
            try:
                await job.run()
            except Exception:  # pragma: no cover - jobs report their own errors
                logger.exception("asyncio delivery job failed")
            finally:
                queue.current = None
                queue.finished += 1
                async with queue.changed:
                    queue.changed.notify_all()
    except asyncio.CancelledError:
        # The loop is ending (asyncio.run() cancels what is left) before
        # aclose() drained the queue: deliver the rest without it.
        leftovers = list(queue.jobs)
        queue.jobs.clear()
        queue.finished = queue.submitted
        _fall_back(leftovers)
        raise
    finally:
        queue.worker = None


def _fall_back(jobs: list[Job]) -> None:
    """Deliver *jobs* synchronously, in order, each failure logged."""
    for job in jobs:
        try:
            job.fallback()
        except Exception:
            logger.exception("delivering a queued batch without its loop failed")


_dispatchers: weakref.WeakSet[LoopDispatcher] = weakref.WeakSet()
"""Every live dispatcher, for :func:`_deliver_stranded_at_exit`."""


@atexit.register
def _deliver_stranded_at_exit() -> None:
    for dispatcher in list(_dispatchers):
        dispatcher.deliver_stranded()
