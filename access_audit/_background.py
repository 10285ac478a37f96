"""Background dispatch: commits return at once; a worker thread delivers."""

from __future__ import annotations

import asyncio
import atexit
import collections
import functools
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._exit import before_os_exit
from ._logging import logger

if TYPE_CHECKING:
    from ._types import QueueFullPolicy

__all__ = ["BackgroundDispatcher", "flush_every", "running_loop"]

Job = Callable[[], None]


class BackgroundDispatcher:
    """A bounded queue of delivery jobs and the one thread that runs them in
    the order they were queued (which, for commits of different threads,
    may differ from the database's commit order: a thread may be paused
    between its COMMIT and queueing).

    When the queue is full, ``"block"`` makes the committing thread wait for
    room, and ``"drop"`` drops the batch and counts it (only offered with an
    outbox, whose relay re-delivers what was dropped). A thread running an
    asyncio event loop, and the worker itself (a plugin committing another
    session), are never made to wait: their jobs are queued past the bound
    instead. The interpreter's exit drains the queue.

    The worker survives whatever a job raises. A process forked from this one
    (gunicorn ``--preload``) starts with an empty queue and no worker, as a
    new dispatcher would: the jobs queued at the fork are the parent's to run,
    and the child's own are delivered by a worker of its own.
    """

    def __init__(self, maxsize: int, when_full: QueueFullPolicy) -> None:
        if maxsize <= 0:
            raise ValueError("queue_size must be positive")
        self.maxsize = maxsize
        self.when_full = when_full
        self._closed = False
        self._start_empty()
        _every.add(self)
        reference = weakref.ref(self)
        atexit.register(_close_at_exit, reference)
        if hasattr(os, "register_at_fork"):  # not on Windows
            os.register_at_fork(
                after_in_child=functools.partial(_start_empty_in_child, reference)
            )

    def _start_empty(self) -> None:
        self.dropped = 0
        """Batches dropped because the queue was full."""
        self._jobs: collections.deque[Job] = collections.deque()
        self._submitted = 0
        self._finished = 0
        """Jobs queued and jobs run, ever: run in order, so a flush waits
        for the count queued when it began (later commits never starve it)."""
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        """Queue a job, applying the queue-full policy.

        :raises RuntimeError: the dispatcher was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(
                    "this emitter's background dispatcher is closed; events "
                    "committed now cannot be delivered"
                )
            if (
                len(self._jobs) >= self.maxsize
                and threading.current_thread() is not self._thread
                and running_loop() is None
            ):
                if self.when_full == "drop":
                    self.dropped += 1
                    logger.warning(
                        "background queue full (%d batches): dropped a batch; "
                        "the outbox relay will deliver it",
                        self.maxsize,
                    )
                    return
                while len(self._jobs) >= self.maxsize and not self._closed:
                    self._lock.wait()
            self._jobs.append(job)
            self._submitted += 1
            self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="access_audit-dispatch", daemon=True
                )
                self._thread.start()
                # Before the outbox recorders' flush (priority 10).
                before_os_exit(_close_at_exit, weakref.ref(self), priority=20)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job queued before the call ran (not those queued
        since: other threads' commits never keep it waiting); False if
        *timeout* passed first.

        From the worker thread itself (a plugin), returns False at once: it
        cannot wait for its own queue.
        """
        if threading.current_thread() is self._thread:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            while self._finished < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued, then stop the thread; False on timeout."""
        drained = self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        thread = self._thread
        if drained and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return drained

    def undelivered(self) -> int:
        """Jobs queued and not run yet, the one running included."""
        with self._lock:
            return self._submitted - self._finished

    def stop(self) -> None:
        """End the thread once the queue is empty, without waiting: for an
        emitter that is gone (its jobs held it, so none is queued)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._lock.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._lock.notify_all()
            try:
                job()
            except BaseException:  # pragma: no cover - jobs log their own errors
                # Even a SystemExit: ending this thread would strand every
                # later job, and make flush() and the exit wait in vain.
                logger.exception("background delivery job failed")
            finally:
                # The job holds its emitter: kept while the thread waits for
                # the next, it would keep an emitter no app uses any more.
                del job
                with self._lock:
                    self._finished += 1
                    self._lock.notify_all()


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_every: weakref.WeakSet[BackgroundDispatcher] = weakref.WeakSet()
"""Every background dispatcher of the process, for :func:`flush_every`."""


def flush_every(timeout: float) -> bool:
    """Flush every background dispatcher of the process (see
    :meth:`BackgroundDispatcher.flush`), within *timeout* seconds in all;
    False if one had not run its jobs by then.

    For the testing recorder: the signals of a background delivery fire on
    the worker thread, after the commit returned.
    """
    deadline = time.monotonic() + timeout
    done = True
    for dispatcher in list(_every):
        remaining = max(0.0, deadline - time.monotonic())
        done = dispatcher.flush(remaining) and done
    return done


def _start_empty_in_child(reference: weakref.ref[BackgroundDispatcher]) -> None:
    # The child has copies of the parent's worker (not running here), of its
    # lock (possibly held by a thread that does not exist here) and of its queue.
    dispatcher = reference()
    if dispatcher is not None:
        dispatcher._start_empty()


EXIT_WAIT = 30.0
"""Seconds the interpreter's exit waits for a dispatcher's queue to drain."""


def _close_at_exit(reference: weakref.ref[BackgroundDispatcher]) -> None:
    dispatcher = reference()
    if dispatcher is not None and not dispatcher.close(timeout=EXIT_WAIT):
        logger.error(
            "exit: background delivery did not finish within %s seconds (a "
            "slow or stuck plugin); %d batches of committed events were not "
            "delivered (with an outbox, the relay delivers them)",
            EXIT_WAIT,
            dispatcher.undelivered(),
        )
