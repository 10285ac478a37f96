"""Time-ordered UUIDs (version 7) that sort in creation order within a process."""

from __future__ import annotations

import os
import struct
import threading
import uuid
from collections.abc import Callable
from os import urandom

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
_unpack_random = struct.Struct(f">{_BATCH}Q{_BATCH}I").unpack
"""Per id of a batch: 64 bits for its counter seed (the mask takes 32 of them),
then, after all of those, 32 bits for its tail."""
_MS_MASK = 0xFFFF_FFFF_FFFF
_SEED_MASK = 0x7FF << 32 | 0x3FFF_FE00
"""Where a new millisecond's counter seed takes its 32 random bits, in the
head's low 48 bits: ``rand_a`` but its top bit, and the counter's 30 bits in
``rand_b`` but the lowest nine (a top bit clear and nine clear low bits leave
room to count)."""
_VERSION_VARIANT = 0x7 << 44 | 0b10 << _LOW_BITS


def _head(unix_ms: int, counter: int) -> int:
    """The UUID's top 96 bits: milliseconds, version, counter, variant, counter."""
    return (
        (unix_ms & _MS_MASK) << 48
        | _VERSION_VARIANT
        | (counter >> _LOW_BITS) << 32
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

    __slots__ = ("_acquire", "_head", "_index", "_last_ms", "_random", "_release")

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
        self._random: tuple[int, ...] = ()
        self._index = _BATCH

    def __call__(self, now_ns: int) -> int:
        # Hot: one call per staged event. The head (everything but the 32
        # random tail bits) of the previous id is kept, so another id in the
        # same millisecond is one addition. Each id has random bits of its
        # own for its tail and, should it start a new millisecond, its
        # counter's seed; the two never share a bit.
        now_ms = now_ns // 1_000_000
        self._acquire()
        try:
            index = self._index
            if index == _BATCH:
                self._random = _unpack_random(urandom(12 * _BATCH))
                index = 0
            self._index = index + 1
            random = self._random
            if now_ms > self._last_ms:
                self._last_ms = now_ms
                head = (
                    (now_ms & _MS_MASK) << 48
                    | random[index] & _SEED_MASK
                    | _VERSION_VARIANT
                )
            else:
                head = self._head + 1
                if not head & _LOW_MASK:
                    head = self._carry()
            self._head = head
        finally:
            self._release()
        return head << 32 | random[_BATCH + index]

    def _carry(self) -> int:
        # The counter's low bits overflowed into the variant bits: count in
        # full instead. Borrow a millisecond when the whole counter overflows
        # rather than ever going backwards (also when the clock stepped back).
        counter = _counter_of(self._head) + 1
        if counter > _COUNTER_MAX:
            self._last_ms += 1
            counter = 0
        return _head(self._last_ms, counter)


def _locked_stdlib_uuid7() -> Callable[[int], int] | None:
    # Python 3.14's uuid.uuid7 counts within a millisecond the same way, but
    # keeps its state in module globals without a lock: serialise the calls so
    # that ids stay unique and ordered across threads. It reads the clock
    # itself.
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

    def locked(now_ns: int) -> int:
        with locks[0]:
            return stdlib().int  # type: ignore[no-any-return]

    return locked


# The generator's bound method: calling it skips the instance call's lookup
# of __call__.
uuid7_int: Callable[[int], int] = _locked_stdlib_uuid7() or _Uuid7Generator().__call__
"""Return the 128-bit value of a new UUIDv7; a later call returns a greater one,
even should the clock step back.

``now_ns`` is the caller's reading of :func:`time.time_ns`, so that it need
not be read twice; the id carries its millisecond, or a later one where an
earlier call's id already did (the standard library's ``uuid7``, where it is
used, reads the clock itself).

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
