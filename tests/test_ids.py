"""The UUIDv7 source: version and variant bits, order, and its counter's edges."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from access_audit import _ids
from access_audit._ids import (
    _COUNTER_MAX,
    _Uuid7Generator,
    as_uuid,
    with_inverted_tail,
)

MS = 1_764_000_000_000
"""A fixed clock, in milliseconds."""


def _new(generator: _Uuid7Generator, unix_ms: int | None = None) -> uuid.UUID:
    """The generator's next id at *unix_ms* (default: now), as an envelope's UUID."""
    now_ns = time.time_ns() if unix_ms is None else unix_ms * 1_000_000 + 999_999
    return as_uuid(generator(now_ns))


def _check_layout(value: uuid.UUID, unix_ms: int) -> None:
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert value.int >> 80 == unix_ms
    assert uuid.UUID(str(value)) == value
    assert value.is_safe is uuid.SafeUUID.unknown


def _counter(value: uuid.UUID) -> int:
    return ((value.int >> 64) & 0xFFF) << 30 | (value.int >> 32) & 0x3FFF_FFFF


def test_ids_in_one_millisecond_count_up() -> None:
    generator = _Uuid7Generator()
    ids = [_new(generator, MS) for _ in range(1000)]
    for value in ids:
        _check_layout(value, MS)
    counters = [_counter(value) for value in ids]
    assert counters == list(range(counters[0], counters[0] + 1000))
    # Seeded with its top bit and its nine low bits clear, room to count.
    assert counters[0] < 1 << 41
    assert counters[0] & 0x1FF == 0


def test_tail_and_counter_seed_are_drawn_apart() -> None:
    """An id starting a millisecond has random bits for its seed and its tail."""
    generator = _Uuid7Generator()
    ids = [_new(generator, MS + step) for step in range(64)]  # each a new ms
    # Were both taken from the same random bits, these would always match.
    same = [value.int & 0x3FFF_FE00 == _counter(value) & 0x3FFF_FE00 for value in ids]
    assert sum(same) <= 1
    assert len({value.int & 0xFFFF_FFFF for value in ids}) >= 60


def test_counter_carries_across_the_variant_bits() -> None:
    generator = _Uuid7Generator()
    _new(generator, MS)
    generator._head = (generator._head | 0x3FFF_FFFF) - 1
    before = _counter(_new(generator, MS))  # the counter's low 30 bits are all set
    after = _new(generator, MS)
    _check_layout(after, MS)
    assert before & 0x3FFF_FFFF == 0x3FFF_FFFF
    assert _counter(after) == before + 1
    assert after.int & (0x3FFF_FFFF << 32) == 0


def test_counter_overflow_borrows_a_millisecond() -> None:
    generator = _Uuid7Generator()
    first = _new(generator, MS)
    generator._head = first.int >> 32 | 0xFFF << 32 | 0x3FFF_FFFF
    assert _counter(uuid.UUID(int=generator._head << 32)) == _COUNTER_MAX
    borrowed = _new(generator, MS)
    _check_layout(borrowed, MS + 1)
    assert _counter(borrowed) == 0
    assert borrowed > first
    # The real clock catching up does not go back either.
    _check_layout(_new(generator, MS + 1), MS + 1)


def test_clock_stepping_back_keeps_the_order() -> None:
    generator = _Uuid7Generator()
    ids = [_new(generator, ms) for ms in (MS, MS - 5_000, MS - 5_000, MS + 1)]
    assert ids == sorted(ids)
    for value in ids[:3]:
        _check_layout(value, MS)
    _check_layout(ids[3], MS + 1)


def test_ids_are_unique_and_ordered_per_thread() -> None:
    generator = _Uuid7Generator()
    made: list[list[uuid.UUID]] = [[] for _ in range(4)]

    def work(into: list[uuid.UUID]) -> None:
        for _ in range(5_000):
            into.append(_new(generator))

    threads = [threading.Thread(target=work, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ids in made:
        assert ids == sorted(ids)
    assert len({value for ids in made for value in ids}) == 20_000


def test_inverted_tail_is_another_uuid7_beside_its_source() -> None:
    value = _new(_Uuid7Generator())
    inverted = as_uuid(with_inverted_tail(value.int))
    assert inverted != value
    assert inverted.version == 7 and inverted.variant == uuid.RFC_4122
    assert inverted.int >> 32 == value.int >> 32
    assert with_inverted_tail(inverted.int) == value.int


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_draws_its_own_random_bits() -> None:
    generator = _Uuid7Generator()
    _new(generator)  # the parent's random buffer is filled now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, _new(generator).bytes)
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    in_child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    in_parent = _new(generator)
    # Without the reset both would take the same next random int as tail.
    assert in_child.int & 0xFFFF_FFFF != in_parent.int & 0xFFFF_FFFF


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads
def test_stdlib_uuid7_lock_is_fresh_in_a_forked_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.14+: a fork while another thread holds the lock must not hang."""
    holding, release = threading.Event(), threading.Event()

    def stdlib_uuid7() -> uuid.UUID:
        if threading.current_thread().name == "holder":
            holding.set()
            release.wait(10)
        return uuid.uuid4()

    monkeypatch.setattr(uuid, "uuid7", stdlib_uuid7, raising=False)
    locked = _ids._locked_stdlib_uuid7()
    assert locked is not None
    holder = threading.Thread(target=locked, args=(0,), name="holder")
    holder.start()
    assert holding.wait(10)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            locked(0)
        finally:
            os._exit(0)
    try:
        for _ in range(100):
            finished, status = os.waitpid(child, os.WNOHANG)
            if finished:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            pytest.fail("the child hung on the lock its parent's thread held")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join()
