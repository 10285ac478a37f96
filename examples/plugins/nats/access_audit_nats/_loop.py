"""An asyncio event loop in a thread of its own, for synchronous callers.

access_audit calls hooks synchronously, in the thread that committed. That
thread may itself be running an event loop (an ``AsyncSession`` commits in a
greenlet inside the application's loop), where ``asyncio.run`` is refused and
awaiting is impossible. So the plugin keeps its own loop in a daemon thread,
hands it coroutines with :func:`asyncio.run_coroutine_threadsafe`, and blocks
the calling thread on the result, with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["BackgroundLoop"]

T = TypeVar("T")


class BackgroundLoop:
    """Runs coroutines on a private event loop in a daemon thread.

    The thread starts at the first :meth:`run`, not at construction, so an
    object that is never used starts nothing. :meth:`stop` ends it; a later
    :meth:`run` starts a fresh loop. Safe to call from any thread except the
    loop's own (that would wait for itself forever, so it raises).

    :param name: the thread's name, as shown by :func:`threading.enumerate`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the loop thread has been started and not stopped."""
        return self._thread is not None

    def run(
        self, make_coroutine: Callable[[], Coroutine[Any, Any, T]], timeout: float
    ) -> T:
        """Run ``make_coroutine()`` on the loop and return its result.

        The coroutine is created only once the loop can take it, so none is
        left un-awaited when starting fails.

        :raises TimeoutError: no result within *timeout* seconds; the
            coroutine is cancelled.
        :raises RuntimeError: called from the loop's own thread.
        :raises: whatever the coroutine raised.
        """
        loop = self._start()
        coroutine = make_coroutine()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except BaseException:
            coroutine.close()
            raise
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"no result from the {self.name!r} event loop within {timeout} s"
            ) from None

    def stop(
        self,
        make_coroutine: Callable[[], Coroutine[Any, Any, object]] | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Run ``make_coroutine()`` (a clean-up) if given, then end the loop.

        Waits for the thread to finish; tasks still pending are cancelled and
        the loop is closed. Does nothing if the loop is not running. The
        clean-up's errors are raised after the loop has stopped.
        """
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            if threading.get_ident() == thread.ident:
                raise RuntimeError(f"{self.name}: stop() called from its own loop")
            error: BaseException | None = None
            if make_coroutine is not None:
                coroutine = make_coroutine()
                future = asyncio.run_coroutine_threadsafe(coroutine, loop)
                try:
                    future.result(timeout)
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    error = TimeoutError(f"{self.name}: clean-up exceeded {timeout} s")
                except Exception as raised:
                    error = raised
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            self._loop = self._thread = None
        if error is not None:
            raise error

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None and self._thread is not None:
                if threading.get_ident() == self._thread.ident:
                    raise RuntimeError(
                        f"{self.name}: called from its own event loop, which would "
                        "wait for itself; call it from another thread"
                    )
                return self._loop
            loop = asyncio.new_event_loop()
            # A daemon thread: a process that never calls stop() can still
            # exit. Nothing is lost then: callers wait for every result.
            thread = threading.Thread(
                target=_run_forever, args=(loop,), name=self.name, daemon=True
            )
            thread.start()
            self._loop, self._thread = loop, thread
            return loop


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # What asyncio.run does on the way out: nothing stays pending, no
        # async generator or executor is left open, and the loop is closed.
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
