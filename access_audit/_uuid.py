"""Time-ordered UUIDs (version 7) that sort in creation order within a process."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable

__all__ = ["uuid7"]

# 42 bits of counter: the 12 bits of ``rand_a`` and the top 30 bits of ``rand_b``
# (RFC 9562 section 6.2, method 1), re-seeded each new millisecond with its top
# bit clear so that many increments fit before it overflows.
_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1


class _Uuid7Generator:
    """A monotonic UUIDv7 source; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def __call__(self) -> uuid.UUID:
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                self._counter = int.from_bytes(os.urandom(6), "big") >> 7
            else:
                # Same millisecond, or the clock stepped back: keep sorting
                # after the previous id by counting up, borrowing a millisecond
                # on overflow rather than ever going backwards.
                self._counter += 1
                if self._counter > _COUNTER_MAX:
                    self._last_ms += 1
                    self._counter = 0
            unix_ms, counter = self._last_ms, self._counter
        tail = int.from_bytes(os.urandom(4), "big")
        value = (unix_ms & 0xFFFF_FFFF_FFFF) << 80
        value |= 0x7 << 76  # version
        value |= (counter >> 30) << 64  # rand_a: counter high 12 bits
        value |= 0b10 << 62  # RFC 4122 variant
        value |= (counter & 0x3FFF_FFFF) << 32  # rand_b: counter low 30 bits
        value |= tail
        return uuid.UUID(int=value)


def _locked_stdlib_uuid7() -> Callable[[], uuid.UUID] | None:
    # Python 3.14's uuid.uuid7 counts within a millisecond the same way, but
    # keeps its state in module globals without a lock: serialise the calls so
    # that ids stay unique and ordered across threads.
    stdlib = getattr(uuid, "uuid7", None)
    if stdlib is None:
        return None
    lock = threading.Lock()

    def locked() -> uuid.UUID:
        with lock:
            return stdlib()  # type: ignore[no-any-return]

    return locked


uuid7: Callable[[], uuid.UUID] = _locked_stdlib_uuid7() or _Uuid7Generator()
"""Return a new UUIDv7; a later call returns a greater UUID than an earlier one."""
