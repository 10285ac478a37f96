"""Recording what the dispatch after COMMIT delivered, off the request path.

The commit itself only INSERTs the outbox rows. What its dispatch then
delivered is handed to a thread that writes it for many commits at once:
it gathers records for up to :data:`LINGER` seconds after the first (or
until :data:`MAX_BATCH` of them, or a flush), then writes them in one
transaction per engine, so a request never waits for it and a steady
stream of commits costs one short transaction per period, not one each. A record lost to a crash in between costs a re-delivery by the
relay (at least once, as always), never an event.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .._exit import before_os_exit
from .._logging import logger
from ._store import Dispatched, settle_dispatched

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ._table import Outbox

__all__ = ["Recorder"]

_Item = tuple["Engine", Dispatched, "Outbox"] | threading.Event
"""A record to write, with its outbox (held until it is written: an outbox
an app per test made may have no other owner by then), or a flush."""

MAX_BATCH = 5000
"""Records written in one transaction at most."""

LINGER = 0.2
"""Seconds the recorder gathers records before writing them: longer is
cheaper per commit, and widens the window in which a crash makes the relay
deliver an event again (the relay waits ``relay_after`` anyway)."""

_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


class Recorder:
    """A daemon thread writing :class:`Dispatched` records for one outbox.

    Started on first use and again in a forked child; :meth:`flush` waits
    for what was submitted before it, and interpreter exit flushes (briefly).
    """

    def __init__(self, outbox: Outbox) -> None:
        # Weak: this thread lives as long as the process; the records it
        # holds keep their outbox while they wait.
        self._owner = weakref.ref(outbox)
        self._pending: collections.deque[_Item] = collections.deque()
        self._wake = threading.Event()
        """Set by the first record after the thread went idle."""
        self._hurry = threading.Event()
        """Set to write before the linger is over: a flush, or a full batch."""
        self._pid = -1
        self._lock = threading.Lock()
        self._here = threading.local()
        _recorders.add(self)

    def defer(self, engine: Engine, record: Dispatched, write: bool = True) -> None:
        """Keep *record* for this thread to write with later ones: when
        :data:`MAX_BATCH` are kept or :data:`LINGER` has passed since the
        first (at a call with *write*), or at :meth:`flush` in this thread.
        For engines whose connection belongs to a thread or is every
        thread's (in-memory SQLite), where no other thread may write
        through it."""
        kept: list[tuple[Engine, Dispatched]] | None = getattr(self._here, "kept", None)
        now = time.monotonic()
        if kept is None:
            kept = self._here.kept = []
            self._here.since = now
            self._here.outbox = self._owner()  # held until they are written
        kept.append((engine, record))
        if write and (len(kept) >= MAX_BATCH or now - self._here.since >= LINGER):
            self._write_kept()

    def _write_kept(self) -> None:
        kept: list[tuple[Engine, Dispatched]] | None = getattr(self._here, "kept", None)
        outbox: Outbox | None = getattr(self._here, "outbox", None)
        self._here.kept = self._here.outbox = None
        if kept and outbox is not None:
            for engine, records in _by_engine(kept).items():
                self._write(engine, records, outbox)

    def submit(self, engine: Engine, record: Dispatched) -> None:
        """Queue *record* of rows written through *engine*; returns at once.

        Only the first record after the thread went idle wakes it (and the
        record that fills a batch): a commit does not hand the interpreter
        to another thread.
        """
        if self._pid != os.getpid():
            self._start()
        pending = self._pending
        outbox = self._owner()
        assert outbox is not None  # its record() is what submits
        pending.append((engine, record, outbox))
        if not self._wake.is_set():
            self._wake.set()
        elif len(pending) >= MAX_BATCH:
            self._hurry.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until what was submitted so far is written (or failed and logged).

        Returns False if *timeout* seconds passed first. Writes what this
        thread kept (:meth:`defer`) first.
        """
        self._write_kept()
        if self._pid != os.getpid():
            return True
        done = threading.Event()
        # After every record submitted before it: done once they are written.
        self._pending.append(done)
        self._wake.set()
        self._hurry.set()
        return done.wait(timeout)

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # Fresh in a forked child: the parent's thread is not here.
            self._pending = collections.deque()
            self._wake = threading.Event()
            self._hurry = threading.Event()
            threading.Thread(
                target=self._run, name="access_audit-outbox-recorder", daemon=True
            ).start()
            self._pid = os.getpid()
            # After the background dispatchers' close (priority 20).
            before_os_exit(self.flush, 2.0, priority=10)

    def _run(self) -> None:
        pending, wake, hurry = self._pending, self._wake, self._hurry
        while True:
            wake.wait()
            hurry.wait(LINGER)
            # Cleared before counting: a record added from now on sets them
            # again, and waits for the next round. Only what is here now is
            # taken: under a steady stream of commits, records arriving
            # while these are written would otherwise be written a few at
            # a time, a transaction each, as fast as they come.
            wake.clear()
            hurry.clear()
            left = len(pending)
            while left:
                left -= self._write_some(pending, left)

    def _write_some(self, pending: collections.deque[_Item], most: int) -> int:
        """Take up to *most* items off *pending* (at most :data:`MAX_BATCH`
        records) and write them, one transaction per engine; then release
        the flushes taken with them. Returns the number of items taken."""
        waiting: list[threading.Event] = []
        by_engine: dict[Engine, list[Dispatched]] = {}
        outbox: Outbox | None = None  # held until the records are written
        count = taken = 0
        while taken < most and count < MAX_BATCH:
            item = pending.popleft()
            taken += 1
            if isinstance(item, threading.Event):
                waiting.append(item)
                continue
            engine, record, outbox = item  # one recorder: one outbox
            by_engine.setdefault(engine, []).append(record)
            count += 1
        if outbox is not None:
            for engine, records in by_engine.items():
                self._write(engine, records, outbox)
        for done in waiting:
            done.set()
        return taken

    @staticmethod
    def _write(engine: Engine, records: list[Dispatched], outbox: Outbox) -> None:
        try:
            with engine.begin() as connection:
                settle_dispatched(connection, outbox, records)
        except Exception:
            logger.exception(
                "could not record the delivery of %d outbox rows; the relay "
                "will deliver them again (consumers de-duplicate by id)",
                sum(len(r.taken) + len(r.partial) for r in records),
            )


def _by_engine(
    items: list[tuple[Engine, Dispatched]],
) -> dict[Engine, list[Dispatched]]:
    grouped: dict[Engine, list[Dispatched]] = {}
    for engine, record in items:
        grouped.setdefault(engine, []).append(record)
    return grouped


@atexit.register
def _flush_all() -> None:
    for recorder in list(_recorders):
        recorder.flush(timeout=2.0)
