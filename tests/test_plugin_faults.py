"""Plugins that raise more than an ``Exception``, background workers, forked children.

A plugin raising ``GeneratorExit`` or a custom ``BaseException`` is isolated
like one raising ``Exception``; ``KeyboardInterrupt`` and ``SystemExit`` stop a
commit that delivers inline, but never the background worker, which also
starts afresh in a forked child.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from support import Failures, Recorder, commit_one, operation, stored_names

from access_audit import AuditEmitter, AuditEventEnvelope, hookimpl, signals


class CustomBaseError(BaseException):
    """A ``BaseException`` that is not one of Python's own."""


class Faulty:
    """Raises *error* from one delivery hook, for the events *targets* names."""

    def __init__(
        self, hook: str, error: type[BaseException], targets: tuple[str, ...] = ()
    ) -> None:
        self.hook = hook
        self.error = error
        self.targets = targets
        self.events: list[str] = []

    def _maybe_raise(
        self, hook: str, envelopes: tuple[AuditEventEnvelope, ...]
    ) -> None:
        if hook == self.hook and (
            not self.targets or any(e.target_id in self.targets for e in envelopes)
        ):
            raise self.error("raised by a plugin")

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self._maybe_raise("audit_event_logged", (envelope,))
        self.events.append(envelope.target_id)

    @hookimpl
    def audit_events_committed(self, envelopes: tuple[AuditEventEnvelope, ...]) -> None:
        self._maybe_raise("audit_events_committed", envelopes)


@pytest.fixture
def received() -> Iterator[list[str]]:
    """Targets of the events ``audit_event_committed`` receivers got."""
    targets: list[str] = []

    def receiver(sender: object, envelope: AuditEventEnvelope) -> None:
        targets.append(envelope.target_id)

    signals.audit_event_committed.connect(receiver, weak=False)
    yield targets
    signals.audit_event_committed.disconnect(receiver)


HOOKS = ["audit_event_logged", "audit_events_committed"]
ISOLATED = [GeneratorExit, CustomBaseError]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("error", ISOLATED, ids=["GeneratorExit", "custom"])
def test_a_base_exception_from_a_plugin_is_isolated(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    received: list[str],
    hook: str,
    error: type[BaseException],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The commit succeeds; other plugins, receivers and the failure hook all run."""
    failures = Failures()
    emitter.register(failures, name="failures")
    # Registered last, so called first: a fault that escaped would skip the rest.
    emitter.register(Faulty(hook, error), name="faulty")
    caplog.set_level(logging.ERROR, logger="access_audit")
    with Session() as session:
        operation(session, "a")
        session.commit()
        operation(session, "b")
        session.commit()
    assert stored_names(session.get_bind()) == ["a", "b"]
    assert recorder.names == ["a", "b"]
    assert [len(batch) for batch in recorder.batches] == [1, 1]
    assert received == ["a", "b"]
    assert failures.targets() == [("faulty", ["a"]), ("faulty", ["b"])]
    assert all(type(raised) is error for _, _, raised in failures.calls)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    for message, envelope in zip(messages, recorder.events, strict=True):
        assert f"plugin 'faulty' raised in {hook}" in message
        assert str(envelope.id) in message


def commit_items(Session: sessionmaker, count: int) -> None:
    """Commit *count* items, each with its ``item_created`` event, at once."""
    with Session() as session:
        for number in range(count):
            operation(session, f"item-{number}")
        session.commit()


def test_a_failure_on_a_large_commit_is_one_short_log_line(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The failure of a plugin on a commit of 5,000 events names a few of
    them and counts the rest: a line listing every id (3.8 MB for 100,000)
    is truncated or dropped by log shippers, and the failure with it."""
    emitter.register(Faulty("audit_events_committed", RuntimeError), name="faulty")
    caplog.set_level(logging.ERROR, logger="access_audit")
    commit_items(Session, 5000)
    assert len(recorder.events) == 5000
    [message] = [record.getMessage() for record in caplog.records]
    assert "plugin 'faulty' raised in audit_events_committed" in message
    assert str(recorder.events[0].id) in message
    assert str(recorder.events[-1].id) not in message
    assert "and 4,980 more" in message
    assert len(message) < 2000


def test_a_plugin_failing_every_event_of_a_commit_logs_two_lines(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A per-event plugin whose sink is down fails every event of a large
    commit: the first failure is logged with its traceback and the rest in
    one line (100,000 tracebacks were 40 MB of log, and slowed the commit
    fourfold); ``audit_delivery_failed`` still hears each one."""
    failures = Failures()
    emitter.register(failures, name="failures")
    emitter.register(Faulty("audit_event_logged", RuntimeError), name="faulty")
    caplog.set_level(logging.ERROR, logger="access_audit")
    commit_items(Session, 3000)
    assert len(recorder.events) == 3000
    assert len(failures.calls) == 3000
    first, rest = caplog.records
    assert first.exc_info is not None and rest.exc_info is None
    assert str(recorder.events[0].id) in first.getMessage()
    assert "plugin 'faulty' raised in audit_event_logged for 2,999 more events" in (
        rest.getMessage()
    )
    assert str(recorder.events[1].id) in rest.getMessage()
    assert len(rest.getMessage()) < 2000


@pytest.mark.parametrize("error", ISOLATED, ids=["GeneratorExit", "custom"])
def test_a_base_exception_from_a_receiver_or_failure_hook_is_isolated(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    error: type[BaseException],
) -> None:
    """Every receiver and ``audit_delivery_failed`` implementation runs, though each raises."""
    received: list[str] = []

    def receiver(sender: object, envelope: AuditEventEnvelope) -> None:
        received.append(envelope.target_id)
        raise error("raised by a receiver")

    class RaisingFailureHook:
        @hookimpl
        def audit_delivery_failed(self, plugin_name: str) -> None:
            raise error("raised by a failure hook")

    failures = Failures()
    emitter.register(failures, name="failures")
    # Registered last, so called first: a fault that escaped would skip the rest.
    emitter.register(RaisingFailureHook(), name="raising_failure_hook")
    emitter.register(Faulty("audit_event_logged", ValueError), name="faulty")
    # blinker calls receivers in no set order, so three distinct ones each
    # raise: whichever comes first, the other two must still run.
    receivers = [functools.partial(receiver) for _ in range(3)]
    for each in receivers:
        signals.audit_event_committed.connect(each, weak=False)
    try:
        with Session() as session:
            operation(session, "a")
            session.commit()
    finally:
        for each in receivers:
            signals.audit_event_committed.disconnect(each)
    assert recorder.names == ["a"]
    assert received == ["a", "a", "a"]
    assert [name for name, _, _ in failures.calls] == ["faulty"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_stop_an_inline_commit(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    error: type[BaseException],
) -> None:
    """Inline, Ctrl-C and ``sys.exit()`` from a plugin propagate out of ``commit()``.

    Deliberately not isolated: in the committing thread they mean "stop the
    program", which swallowing them would defeat. The data is committed by
    then, and the plugins after the raising one are not called.
    """
    emitter.register(Faulty("audit_event_logged", error), name="faulty")
    with Session() as session:
        operation(session, "a")
        with pytest.raises(error):
            session.commit()
    assert stored_names(session.get_bind()) == ["a"]
    assert recorder.names == []


# -- background dispatch -------------------------------------------------------


def background_emitter(emitters: list[AuditEmitter], *plugins: object) -> AuditEmitter:
    """A background emitter with *plugins*, each named by its class in lower case."""
    emitter = AuditEmitter(load_entrypoints=False, dispatch="background")
    emitters.append(emitter)
    for plugin in plugins:
        emitter.register(plugin, name=type(plugin).__name__.lower())
    return emitter


@pytest.mark.parametrize(
    "error", [SystemExit, KeyboardInterrupt, GeneratorExit, CustomBaseError]
)
def test_the_background_worker_survives_anything_a_plugin_raises(
    engine: Engine, emitters: list[AuditEmitter], error: type[BaseException]
) -> None:
    """Later events are still delivered, flush() is True, the failure is reported."""
    recorder, failures = Recorder(), Failures()
    faulty = Faulty("audit_event_logged", error, targets=("first",))
    emitter = background_emitter(emitters, recorder, failures, faulty)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    for name in ("first", "second"):
        with maker() as session:
            operation(session, name)
            session.commit()
    assert emitter.flush(timeout=5)
    assert recorder.names == ["first", "second"]
    assert faulty.events == ["second"]
    assert failures.targets() == [("faulty", ["first"])]
    assert [type(raised) for _, _, raised in failures.calls] == [error]


class Gated:
    """Records targets; blocks on ``gate`` for events whose target starts "parent"."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        if envelope.target_id.startswith("parent"):
            self.entered.set()
            self.gate.wait(30)
        self.events.append(envelope.target_id)


def in_child(work: Any) -> dict[str, Any]:
    """Run *work* in a forked child; return what it returned (a JSON object)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        try:
            os.close(read_end)
            try:
                result = work()
            except BaseException as error:
                result = {"error": repr(error)}
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    found: dict[str, Any] = json.loads(output)
    return found


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process.*is multi-threaded:DeprecationWarning")
def test_a_forked_child_delivers_its_own_background_events(
    emitters: list[AuditEmitter],
) -> None:
    """The child's events are delivered in the child; the parent's queue stays the parent's."""
    sink = Gated()
    emitter = background_emitter(emitters, sink)
    maker = sessionmaker()
    emitter.attach(maker)
    commit_one(maker, "parent-1")
    assert sink.entered.wait(10)  # the worker is busy with it at the fork
    commit_one(maker, "parent-2")  # and this one is queued

    def child() -> dict[str, Any]:
        commit_one(maker, "child")
        return {"flushed": emitter.flush(timeout=5), "events": sink.events}

    try:
        assert in_child(child) == {"flushed": True, "events": ["child"]}
    finally:
        sink.gate.set()
    assert emitter.flush(timeout=10)
    assert sink.events == ["parent-1", "parent-2"]


def test_the_fork_hook_does_not_keep_a_dispatcher_alive() -> None:
    """An emitter with background dispatch, once dropped, is collected with its worker state."""
    emitter = AuditEmitter(load_entrypoints=False, dispatch="background")
    dispatcher = emitter._background
    assert dispatcher is not None
    reference = weakref.ref(dispatcher)
    del emitter, dispatcher
    gc.collect()
    assert reference() is None
