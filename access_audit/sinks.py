"""Ready-made plugins that write committed events to a logger or a file.

Standard library only; import this module explicitly (``import access_audit``
does not). Register a sink like any plugin::

    AuditEmitter([JsonLinesSink("/var/log/app/audit.jsonl")])

A sink that cannot write raises: the emitter logs the error and reports it
through ``audit_delivery_failed``, and the commit is not failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._hookspecs import hookimpl

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ._envelope import AuditEventEnvelope

__all__ = ["JsonLinesSink", "LoggingSink"]


class LoggingSink:
    """Log each committed event as one line of JSON.

    The message is :meth:`~access_audit.AuditEventEnvelope.to_json`, logged
    with ``"%s"`` so handlers and formatters apply as usual, and the record
    carries ``audit_event`` (the envelope's
    :meth:`~access_audit.AuditEventEnvelope.to_dict`) for structured
    handlers. Nothing is serialised when the logger would drop the level. The
    sink never adds handlers: configure ``logger_name`` as you would any
    logger.

    Logging handlers never raise: one that cannot write reports it on
    stderr and goes on, so the event counts as delivered. Where every event
    must land (an outbox's at-least-once), use :class:`JsonLinesSink`.
    """

    def __init__(
        self, logger_name: str = "access_audit.events", level: int = logging.INFO
    ) -> None:
        self.logger = logging.getLogger(logger_name)
        self.level = level

    def __repr__(self) -> str:
        level = logging.getLevelName(self.level)
        return f"<LoggingSink logger={self.logger.name!r} level={level}>"

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        """Log *envelope* as one record at the sink's level."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "%s",
                envelope.to_json(),
                extra={"audit_event": envelope.to_dict()},
            )


class JsonLinesSink:
    """Append each committed transaction's events to a JSON Lines file.

    Each event is one line, its
    :meth:`~access_audit.AuditEventEnvelope.to_json` (JSON escapes newlines,
    so a line is always a whole event), in staging order. Guarantees:

    - A batch is written with one ``write`` on a descriptor opened with
      ``O_APPEND``, under an exclusive ``flock`` where the platform has one
      (POSIX): processes and threads appending to the same file never
      interleave their batches' lines. A short write is continued under the
      same lock. (``flock`` is advisory, and reliable on local file systems.)
    - With ``fsync=True`` (the default) the hook returns only after one
      ``os.fsync`` of the batch: an event acknowledged is on disk.
    - The file is opened for each batch, so log rotation that moves the file
      away is followed at the next commit without a reopen signal.
    - A new file is created with mode ``0o600`` (audit data is sensitive;
      the umask may only narrow it). An existing file keeps its mode.
    - A write that fails raises ``OSError`` to the emitter; nothing is
      retried or dropped silently. What part of the batch was written (a
      disk filling up) is taken back first, under the lock, so the file
      stays whole lines and the batch delivered again reads whole (where
      there is ``flock``, and among writers that take it: logrotate's
      ``copytruncate`` does not).

    :param path: the file; made absolute at construction, so a later
        ``chdir`` does not move it.
    :param fsync: flush each batch to disk before returning.
    :raises FileNotFoundError: the file's directory does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.fsync = fsync
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"JsonLinesSink: the directory {directory!r} of {self.path!r} "
                "does not exist; create it before constructing the sink"
            )

    def __repr__(self) -> str:
        return f"<JsonLinesSink path={self.path!r} fsync={self.fsync}>"

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Append *envelopes*, one line each, as one uninterleaved write."""
        if not envelopes:
            return
        data = "".join(envelope.to_json() + "\n" for envelope in envelopes)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            view = memoryview(data.encode("utf-8"))
            # Under the lock no other writer appends: what this batch wrote
            # can be taken back. Without one (no flock), it is left.
            start = os.fstat(fd).st_size if fcntl is not None else None
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                if start is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)  # no torn line left behind
                raise
            if fcntl is not None:
                # The bytes are in the file now; let other writers go on
                # while this batch is flushed to disk.
                fcntl.flock(fd, fcntl.LOCK_UN)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
