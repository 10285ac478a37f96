"""Time-ordered UUIDs (version 7) that sort in creation order within a process."""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Callable
from os import urandom
from time import time_ns

__all__ = ["as_uuid", "uuid7_int", "with_inverted_tail"]

# 42 bits of counter: the 12 bits of ``rand_a`` and the top 30 bits of ``rand_b``
# (RFC 9562 section 6.2, method 1), re-seeded each new millisecond with its top
# bit clear so that many increments fit before it overflows.
_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_LOW_BITS = 30
_LOW_MASK = (1 << _LOW_BITS) - 1
"""The counter's low 30 bits, which end the 96-bit head of the UUID."""

_SAFE = uuid.SafeUUID.unknown
_BATCH = 128
"""Ids made from one draw of random bytes from the OS."""
_unpack_random = struct.Struct(f">{2 * _BATCH}I").unpack
_MS_MASK = 0xFFFF_FFFF_FFFF


def _head(unix_ms: int, counter: int) -> int:
    """The UUID's top 96 bits: milliseconds, version, counter, variant, counter."""
    return (
        (unix_ms & _MS_MASK) << 48
        | 0x7 << 44
        | (counter >> _LOW_BITS) << 32
        | 0b10 << _LOW_BITS
        | (counter & _LOW_MASK)
    )


def _counter_of(head: int) -> int:
    return ((head >> 32) & 0xFFF) << _LOW_BITS | (head & _LOW_MASK)


# uuid.UUID(int=...) re-validates and costs as much again; the value is built
# in range here. CPython 3.14 does the same in uuid.UUID._from_int.
_UUID = uuid.UUID
_new_uuid = object.__new__
# The slots' own setters: UUID.__setattr__ refuses changes, and
# object.__setattr__ looks the slot up again on every call.
_set_int = _UUID.__dict__["int"].__set__
_set_is_safe = _UUID.__dict__["is_safe"].__set__


class _Uuid7Generator:
    """A monotonic UUIDv7 source; thread-safe and fork-safe."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            # A forked child must not replay the parent's random bytes.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        lock = threading.Lock()
        # Bound once: cheaper per call than ``with lock`` looking up
        # __enter__ and __exit__.
        self._acquire, self._release = lock.acquire, lock.release
        self._last_ms = -1
        self._head = 0
        self._tails: tuple[int, ...] = ()
        self._seeds: tuple[int, ...] = ()
        self._index = _BATCH

    def _refill(self) -> None:
        """Draw the random bits of the next :data:`_BATCH` ids from the OS.

        Each id takes a random 32-bit tail and, should it start a new
        millisecond, a fresh counter: 32 random bits shifted up by 9 (its top
        bit stays clear, leaving room to count), stored already laid out as
        the head's low 48 bits, so that a new millisecond is one shift and
        one ``|`` in :meth:`__call__`.
        """
        random = _unpack_random(urandom(8 * _BATCH))
        self._tails = random[:_BATCH]
        self._seeds = tuple(_head(0, seed << 9) for seed in random[_BATCH:])
        self._index = 0

    def __call__(self) -> int:
        # Hot: one call per staged event. The head (everything but the 32
        # random tail bits) of the previous id is kept, so another id in the
        # same millisecond is one addition; one in a new millisecond is the
        # time and a seed laid out in advance by _refill().
        self._acquire()
        try:
            now_ms = time_ns() // 1_000_000
            index = self._index
            if index == _BATCH:
                self._refill()
                index = 0
            self._index = index + 1
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                head = (now_ms & _MS_MASK) << 48 | self._seeds[index]
            else:
                head = self._head + 1
                if not head & _LOW_MASK:
                    head = self._carry()
            self._head = head
            tail = self._tails[index]
        finally:
            self._release()
        return head << 32 | tail

    def _carry(self) -> int:
        # The counter's low bits overflowed into the variant bits: count in
        # full instead. Borrow a millisecond when the whole counter overflows
        # rather than ever going backwards (also when the clock stepped back).
        counter = _counter_of(self._head) + 1
        if counter > _COUNTER_MAX:
            self._last_ms += 1
            counter = 0
        return _head(self._last_ms, counter)


def _locked_stdlib_uuid7() -> Callable[[], int] | None:
    # Python 3.14's uuid.uuid7 counts within a millisecond the same way, but
    # keeps its state in module globals without a lock: serialise the calls so
    # that ids stay unique and ordered across threads.
    stdlib = getattr(uuid, "uuid7", None)
    if stdlib is None:
        return None
    locks = [threading.Lock()]
    if hasattr(os, "register_at_fork"):
        # A fork while another thread held the lock must not leave the
        # child's copy locked forever.
        os.register_at_fork(
            after_in_child=lambda: locks.__setitem__(0, threading.Lock())
        )

    def locked() -> int:
        with locks[0]:
            return stdlib().int  # type: ignore[no-any-return]

    return locked


# The generator's bound method: calling it skips the instance call's lookup
# of __call__.
uuid7_int: Callable[[], int] = _locked_stdlib_uuid7() or _Uuid7Generator().__call__
"""Return the 128-bit value of a new UUIDv7; a later call returns a greater one.

A value rather than a :class:`uuid.UUID`: the object is made by
:func:`as_uuid` when it is needed, next to the commit's other objects."""


def as_uuid(value: int) -> uuid.UUID:
    """The :class:`uuid.UUID` of a 128-bit *value* known to be in range."""
    made = _new_uuid(_UUID)
    _set_int(made, value)
    _set_is_safe(made, _SAFE)
    return made


def with_inverted_tail(value: int) -> int:
    """*value* with its 32 trailing (random) bits inverted; still a UUIDv7."""
    return value ^ 0xFFFF_FFFF
