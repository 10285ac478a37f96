"""Time-ordered UUIDs (version 7) that sort in creation order within a process."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from os import urandom
from time import time_ns

__all__ = ["uuid7", "with_inverted_tail"]

# 42 bits of counter: the 12 bits of ``rand_a`` and the top 30 bits of ``rand_b``
# (RFC 9562 section 6.2, method 1), re-seeded each new millisecond with its top
# bit clear so that many increments fit before it overflows.
_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1


_SAFE = uuid.SafeUUID.unknown
_RANDOM_CHUNK = 4096


# uuid.UUID(int=...) re-validates and costs as much again; the value is built
# in range here. CPython 3.14 does the same in uuid.UUID._from_int.
_UUID = uuid.UUID
_new_uuid = object.__new__
_set = object.__setattr__


class _Uuid7Generator:
    """A monotonic UUIDv7 source; thread-safe and fork-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0
        self._random = b""
        self._offset = 0
        if hasattr(os, "register_at_fork"):
            # A forked child must not replay the parent's random bytes.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._random = b""
        self._offset = 0

    def __call__(self) -> uuid.UUID:
        # Hot: one call per staged event. Written out flat, as few operations
        # as the layout needs (RFC 9562 UUIDv7, method 1 counter).
        with self._lock:
            now_ms = time_ns() // 1_000_000
            offset = self._offset
            if offset + 10 > len(self._random):
                self._random, offset = urandom(_RANDOM_CHUNK), 0
            random = self._random
            self._offset = offset + 10
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                # A fresh counter with its top bit clear leaves room to count.
                self._counter = int.from_bytes(random[offset : offset + 6], "big") >> 7
            else:
                # Same millisecond, or the clock stepped back: keep sorting
                # after the previous id by counting up, borrowing a millisecond
                # on overflow rather than ever going backwards.
                self._counter += 1
                if self._counter > _COUNTER_MAX:
                    self._last_ms += 1
                    self._counter = 0
            unix_ms, counter = self._last_ms, self._counter
        tail = int.from_bytes(random[offset + 6 : offset + 10], "big")
        # Two 64-bit halves, joined once: cheaper than six 128-bit operations.
        # High: 48 bits of milliseconds, version 7, the counter's top 12 bits.
        high = (unix_ms & 0xFFFF_FFFF_FFFF) << 16 | 0x7000 | counter >> 30
        # Low: the RFC 4122 variant, the counter's low 30 bits, 32 random bits.
        low = 0x8000_0000_0000_0000 | (counter & 0x3FFF_FFFF) << 32 | tail
        made = _new_uuid(_UUID)
        _set(made, "int", high << 64 | low)
        _set(made, "is_safe", _SAFE)
        return made


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


def with_inverted_tail(value: uuid.UUID) -> uuid.UUID:
    """*value* with its 32 trailing (random) bits inverted; still a UUIDv7."""
    made = _new_uuid(_UUID)
    _set(made, "int", value.int ^ 0xFFFF_FFFF)
    _set(made, "is_safe", _SAFE)
    return made
