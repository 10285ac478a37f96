"""docs/plugins.md, delivery: plugins, receivers, and what isolates them.

Each plugin implementation and each blinker receiver is called on its own: one
that raises is logged, reported through ``audit_delivery_failed``, and neither
stops the others nor fails the commit. Registration refuses what cannot be
called that way, and the call order is pluggy's. The tests that commit run on
all three databases. Entry points: test_entrypoints.py, and the example
package's own tests (examples/eggsample/tests).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pluggy
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import Item, Recorder, commit_two_events, operation, stored_names

from access_audit import (
    AuditEmitter,
    AuditEventEnvelope,
    StagedEvent,
    hookimpl,
    signals,
    stage_event,
)

HOOKS = ("audit_event_logged", "audit_events_committed", "audit_delivery_failed")


class PluginError(Exception):
    """What a failing test plugin raises."""


class Plugin:
    """Records every hook call, then raises on the hooks named in ``raising``."""

    def __init__(self, label: str, raising: Sequence[str] = ()) -> None:
        self.label = label
        self.raising = set(raising)
        self.events: list[AuditEventEnvelope] = []
        self.batches: list[tuple[AuditEventEnvelope, ...]] = []
        self.failures: list[
            tuple[str, tuple[AuditEventEnvelope, ...], BaseException]
        ] = []
        self.raised: list[PluginError] = []

    def _maybe_raise(self, hook: str) -> None:
        if hook in self.raising:
            error = PluginError(f"{self.label} failed in {hook}")
            self.raised.append(error)
            raise error

    @property
    def names(self) -> list[str]:
        return [envelope.target_id for envelope in self.events]

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.events.append(envelope)
        self._maybe_raise("audit_event_logged")

    @hookimpl
    def audit_events_committed(self, envelopes: tuple[AuditEventEnvelope, ...]) -> None:
        self.batches.append(envelopes)
        self._maybe_raise("audit_events_committed")

    @hookimpl
    def audit_delivery_failed(
        self,
        plugin_name: str,
        envelopes: tuple[AuditEventEnvelope, ...],
        error: BaseException,
    ) -> None:
        self.failures.append((plugin_name, envelopes, error))
        self._maybe_raise("audit_delivery_failed")


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "access_audit" and record.levelno >= logging.ERROR
    ]


@pytest.mark.parametrize(
    "raising",
    [("audit_event_logged",), ("audit_events_committed",), HOOKS],
    ids=["event-logged", "events-committed", "every-hook"],
)
def test_a_raising_plugin_does_not_stop_the_others(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
    raising: tuple[str, ...],
) -> None:
    """The middle plugin raises; the others get everything; logged and reported."""
    first, boom, last = Plugin("first"), Plugin("boom", raising), Plugin("last")
    for plugin in (first, boom, last):
        assert emitter.register(plugin, name=plugin.label) == plugin.label
    with Session() as session:
        for name in ("a", "b", "c"):
            operation(session, name)
        session.commit()  # does not raise
        envelopes = tuple(recorder.events)
        assert [envelope.target_id for envelope in envelopes] == ["a", "b", "c"]
        for plugin in (first, boom, last):
            assert plugin.events == list(envelopes)
            assert plugin.batches == [envelopes]

        expected: list[tuple[str, tuple[AuditEventEnvelope, ...], BaseException]] = []
        primary = [error for error in boom.raised if "delivery" not in str(error)]
        raised = iter(primary)
        if "audit_event_logged" in raising:
            expected += [("boom", (envelope,), next(raised)) for envelope in envelopes]
        if "audit_events_committed" in raising:
            expected.append(("boom", envelopes, next(raised)))
        for plugin in (first, boom, last):
            assert plugin.failures == expected
        assert [failure[2] for failure in expected] == primary

        records = _errors(caplog)
        # Per batch, a hook failing event after event logs its first failure
        # (with the traceback), then one line naming the rest.
        logged = [f for f in expected if len(f[1]) > 1 or f[1][0] is envelopes[0]]
        later = [f for f in expected if f not in logged]
        failed_hooks = len(expected) if "audit_delivery_failed" in raising else 0
        assert len(records) == len(logged) + failed_hooks + (1 if later else 0)
        for record in records:
            assert "'boom'" in record.getMessage()
        [*tracebacks] = [r for r in records if r.exc_info is not None]
        assert len(tracebacks) == len(logged) + failed_hooks
        for record in tracebacks:
            assert record.exc_info is not None
            assert isinstance(record.exc_info[1], PluginError)
        for _, failed, error in logged:  # one record per failure, with its ids
            [record] = [r for r in records if r.exc_info and r.exc_info[1] is error]
            assert all(str(envelope.id) in record.getMessage() for envelope in failed)
        if later:
            [rest] = [r for r in records if r.exc_info is None]
            assert "for 2 more events of the batch" in rest.getMessage()
            assert all(str(f[1][0].id) in rest.getMessage() for f in later)

        # The same session carries on: the next transaction commits and emits.
        boom.raising.clear()
        operation(session, "d")
        session.commit()
    for plugin in (first, boom, last):
        assert plugin.names == ["a", "b", "c", "d"]
        assert len(plugin.batches) == 2
    assert recorder.names == ["a", "b", "c", "d"]
    assert stored_names(engine) == ["a", "b", "c", "d"]


def test_a_raising_delivery_failed_hook_is_logged_with_the_event_ids(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raising audit_delivery_failed is logged with its plugin's name and the ids."""
    broken = Plugin("broken", ["audit_event_logged"])
    reporter = Plugin("reporter", ["audit_delivery_failed"])
    other = Plugin("other")
    for plugin in (broken, reporter, other):
        emitter.register(plugin, name=plugin.label)
    with Session() as session:
        operation(session, "a")
        session.commit()
    [envelope] = recorder.events
    for plugin in (broken, reporter, other):
        assert plugin.failures == [("broken", (envelope,), broken.raised[0])]
    [record] = [
        record
        for record in _errors(caplog)
        if record.exc_info and record.exc_info[1] is reporter.raised[0]
    ]
    assert "'reporter'" in record.getMessage()
    assert "audit_delivery_failed" in record.getMessage()
    assert str(envelope.id) in record.getMessage()


def test_a_raising_signal_receiver_does_not_stop_the_others(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One audit_event_committed receiver raising: the others still get every event."""
    got: dict[str, list[AuditEventEnvelope]] = {"one": [], "two": [], "boom": []}

    def one(sender: object, *, envelope: AuditEventEnvelope) -> None:
        assert sender is emitter
        got["one"].append(envelope)

    def boom(sender: object, *, envelope: AuditEventEnvelope) -> None:
        got["boom"].append(envelope)
        raise PluginError("receiver failed")

    def two(sender: object, *, envelope: AuditEventEnvelope) -> None:
        got["two"].append(envelope)

    receivers = (one, boom, two)
    for receiver in receivers:
        signals.audit_event_committed.connect(receiver, sender=emitter)
    try:
        with Session() as session:
            operation(session, "a")
            operation(session, "b")
            session.commit()  # does not raise
            operation(session, "c")
            session.commit()
    finally:
        for receiver in receivers:
            signals.audit_event_committed.disconnect(receiver, sender=emitter)
    assert recorder.names == ["a", "b", "c"]
    for name in got:
        assert got[name] == recorder.events, name
    records = _errors(caplog)
    assert len(records) == 3
    assert all("boom" in record.getMessage() for record in records)
    assert stored_names(engine) == ["a", "b", "c"]


@pytest.fixture
def strict_Session(engine: Engine) -> Iterator[tuple[sessionmaker, AuditEmitter]]:
    """A sessionmaker whose emitter has raise_plugin_errors=True and no plugins."""
    emitter = AuditEmitter(load_entrypoints=False, raise_plugin_errors=True)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    yield maker, emitter
    emitter.detach(maker)


def test_strict_mode_raises_after_all_plugins_ran_and_data_is_committed(
    strict_Session: tuple[sessionmaker, AuditEmitter], engine: Engine
) -> None:
    """raise_plugin_errors: commit raises the first error after every plugin ran."""
    Session, emitter = strict_Session
    early, middle, late = (
        Plugin("early", ["audit_event_logged"]),
        Plugin("middle"),
        Plugin("late", ["audit_events_committed"]),
    )
    for plugin in (early, middle, late):
        emitter.register(plugin, name=plugin.label)
    with Session() as session:
        operation(session, "a")
        operation(session, "b")
        with pytest.raises(PluginError) as raised:
            session.commit()
        # audit_event_logged runs for every event before audit_events_committed:
        # early's error on the first event is the first one raised.
        assert raised.value is early.raised[0]
        if sys.version_info >= (3, 11):
            notes = "\n".join(getattr(raised.value, "__notes__", []))
            assert "late failed in audit_events_committed" in notes
            assert notes.count("early failed in audit_event_logged") == 1
        for plugin in (early, middle, late):
            assert plugin.names == ["a", "b"]
            assert len(plugin.batches) == 1
            assert [name for name, _, _ in plugin.failures] == [
                "early",
                "early",
                "late",
            ]
        assert stored_names(engine) == ["a", "b"]  # the data IS committed
        assert not session.in_transaction()
        assert list(session.new) == []

        early.raising.clear()
        late.raising.clear()
        operation(session, "c")
        session.commit()
        session.add(Item(name="d"))
        session.flush()
        session.rollback()
    for plugin in (early, middle, late):
        assert plugin.names == ["a", "b", "c"]
    assert stored_names(engine) == ["a", "b", "c"]


def test_strict_mode_without_errors_commits_quietly(
    strict_Session: tuple[sessionmaker, AuditEmitter], engine: Engine
) -> None:
    """raise_plugin_errors changes nothing while every plugin succeeds."""
    Session, emitter = strict_Session
    plugin = Plugin("quiet")
    emitter.register(plugin)
    with Session() as session:
        operation(session, "a")
        session.commit()
    assert plugin.names == ["a"]
    assert plugin.failures == []
    assert stored_names(engine) == ["a"]


class SameSessionStager:
    """Tries to stage on the session that is dispatching to it."""

    def __init__(self) -> None:
        self.session: OrmSession | None = None
        self.errors: list[BaseException] = []

    def _try(self) -> None:
        assert self.session is not None
        try:
            stage_event(
                self.session,
                "item_echoed",
                target_type="item",
                target_id="echo",
                action="echo",
            )
        except RuntimeError as error:
            self.errors.append(error)

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self._try()

    @hookimpl
    def audit_events_committed(self, envelopes: tuple[AuditEventEnvelope, ...]) -> None:
        self._try()


def test_staging_on_the_dispatching_session_raises_runtime_error(
    Session: sessionmaker, emitter: AuditEmitter, recorder: Recorder, engine: Engine
) -> None:
    """A plugin staging on the session that dispatches to it gets RuntimeError."""
    stager = SameSessionStager()
    emitter.register(stager)
    with Session() as session:
        stager.session = session
        operation(session, "a")
        session.commit()
        assert len(stager.errors) == 2
        for error in stager.errors:
            assert type(error) is RuntimeError
            assert "dispatch" in str(error)
        emitter.unregister(stager)
        operation(session, "b")
        session.commit()
    assert recorder.names == ["a", "b"]  # no "echo" ever leaked in
    assert [len(batch) for batch in recorder.batches] == [1, 1]
    assert stored_names(engine) == ["a", "b"]


class Mirror:
    """Commits a derived event on another session for each item_created."""

    def __init__(self, maker: sessionmaker) -> None:
        self.maker = maker

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        if envelope.event_type != "item_created":
            return
        with self.maker() as other:
            other.add(Item(name=f"{envelope.target_id}-mirror"))
            stage_event(
                other,
                "item_mirrored",
                target_type="item",
                target_id=f"{envelope.target_id}-mirror",
                action="mirror",
                payload={"source": str(envelope.id)},
            )
            other.commit()


def test_a_plugin_may_stage_and_commit_on_another_session(
    Session: sessionmaker, emitter: AuditEmitter, recorder: Recorder, engine: Engine
) -> None:
    """Events a plugin commits on another session are emitted too."""
    emitter.register(Mirror(Session))
    with Session() as session:
        operation(session, "a")
        operation(session, "b")
        session.commit()
    by_type: dict[str, list[str]] = {}
    for envelope in recorder.events:
        by_type.setdefault(envelope.event_type, []).append(envelope.target_id)
    assert by_type == {
        "item_created": ["a", "b"],
        "item_mirrored": ["a-mirror", "b-mirror"],
    }
    sources = {
        e.target_id: e.payload["source"]
        for e in recorder.events
        if e.event_type == "item_mirrored"
    }
    created = {
        e.target_id: str(e.id)
        for e in recorder.events
        if e.event_type == "item_created"
    }
    assert sources["a-mirror"] == created["a"]
    assert sources["b-mirror"] == created["b"]
    assert sorted(len(batch) for batch in recorder.batches) == [1, 1, 2]
    assert stored_names(engine) == ["a", "a-mirror", "b", "b-mirror"]


def _wrapper_plugin(hook: str, style: str) -> object:
    """A plugin object whose only implementation of *hook* is a wrapper."""

    def new_style() -> Any:
        return (yield)

    def old_style() -> Any:
        yield

    if style == "wrapper":
        function = hookimpl(wrapper=True)(new_style)
    else:
        function = hookimpl(hookwrapper=True)(old_style)
    return SimpleNamespace(**{hook: function})


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"], ids=["new", "old"])
@pytest.mark.parametrize("hook", HOOKS, ids=HOOKS)
def test_hook_wrappers_are_refused(hook: str, style: str) -> None:
    """A plugin declaring a hook wrapper is refused with ValueError and not kept."""
    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False)
    plugin = _wrapper_plugin(hook, style)
    with pytest.raises(ValueError, match=f"{hook}.*wrapper"):
        emitter.register(plugin, name="wrapping")
    assert not emitter.plugin_manager.is_registered(plugin)
    assert emitter.plugin_manager.get_plugin("wrapping") is None
    with pytest.raises(ValueError, match="wrapper"):
        AuditEmitter([_wrapper_plugin(hook, style)], load_entrypoints=False)
    emitter.register(Plugin("after"), name="wrapping")  # the name is free again
    assert commit_two_events(emitter) == recorder.names


class UnknownHook:
    """Implements a real hook and one that does not exist."""

    def __init__(self) -> None:
        self.events: list[AuditEventEnvelope] = []

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.events.append(envelope)

    @hookimpl
    def audit_event_forgotten(self, envelope: AuditEventEnvelope) -> None:
        """Not a hook of AuditEventsPluginSpec."""


class ExtraArgument:
    """Implements a real hook with an argument the hook does not have."""

    def __init__(self) -> None:
        self.events: list[AuditEventEnvelope] = []

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope, session: object) -> None:
        self.events.append(envelope)


@pytest.mark.parametrize(
    "make", [UnknownHook, ExtraArgument], ids=["unknown-hook", "extra-argument"]
)
def test_invalid_hook_implementations_are_refused(
    make: Callable[[], UnknownHook | ExtraArgument],
) -> None:
    """pluggy.PluginValidationError; the plugin is not kept and the emitter still works."""
    recorder = Recorder()
    emitter = AuditEmitter([recorder], load_entrypoints=False)
    refused = make()
    with pytest.raises(pluggy.PluginValidationError):
        emitter.register(refused)
    assert not emitter.plugin_manager.is_registered(refused)
    good = Plugin("good")
    emitter.register(good)  # a refused plugin must not block later ones
    commit_two_events(emitter)
    assert refused.events == []
    assert good.names == recorder.names == ["x", "y"]
    with pytest.raises(pluggy.PluginValidationError):
        AuditEmitter([make()], load_entrypoints=False)


class Partial:
    """Implementations that take only some of their hook's arguments."""

    def __init__(self) -> None:
        self.logged = 0
        self.batch_sizes: list[int] = []
        self.failed_names: list[str] = []
        self.failed_errors: list[BaseException] = []

    @hookimpl
    def audit_event_logged(self) -> None:
        self.logged += 1

    @hookimpl
    def audit_events_committed(self, envelopes: tuple[AuditEventEnvelope, ...]) -> None:
        self.batch_sizes.append(len(envelopes))

    @hookimpl
    def audit_delivery_failed(self, plugin_name: str) -> None:
        self.failed_names.append(plugin_name)


class ErrorsOnly:
    """audit_delivery_failed taking only ``error``, registered by module-like name."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    @hookimpl
    def audit_delivery_failed(self, error: BaseException) -> None:
        self.errors.append(error)


def test_implementations_may_take_a_subset_of_the_arguments(
    Session: sessionmaker, emitter: AuditEmitter, recorder: Recorder, engine: Engine
) -> None:
    """Implementations with fewer arguments than the hook get what they ask for."""
    partial, errors_only = Partial(), ErrorsOnly()
    boom = Plugin("boom", ["audit_events_committed"])
    emitter.register(partial)
    emitter.register(errors_only)
    emitter.register(boom, name="boom")
    with Session() as session:
        operation(session, "a")
        operation(session, "b")
        session.commit()
    assert partial.logged == 2
    assert partial.batch_sizes == [2]
    assert partial.failed_names == ["boom"]
    assert errors_only.errors == boom.raised
    assert recorder.names == ["a", "b"]
    assert stored_names(engine) == ["a", "b"]


def _discard_rollback(session: OrmSession) -> list[tuple[str, str]]:
    operation(session, "a")
    operation(session, "b")
    session.flush()
    session.rollback()
    return [("a", "rollback"), ("b", "rollback")]


def _discard_begin_block(session: OrmSession) -> list[tuple[str, str]]:
    with pytest.raises(LookupError), session.begin():
        operation(session, "a")
        raise LookupError("the operation failed")
    return [("a", "rollback")]


def _discard_savepoint(session: OrmSession) -> list[tuple[str, str]]:
    operation(session, "kept")
    savepoint = session.begin_nested()
    operation(session, "a")
    operation(session, "b")
    session.flush()
    savepoint.rollback()
    return [("a", "savepoint_rollback"), ("b", "savepoint_rollback")]


def _discard_released_then_rollback(session: OrmSession) -> list[tuple[str, str]]:
    with session.begin_nested():
        operation(session, "a")
    operation(session, "b")
    session.rollback()
    return [("a", "rollback"), ("b", "rollback")]


def _discard_close(session: OrmSession) -> list[tuple[str, str]]:
    operation(session, "a")
    operation(session, "b")
    session.flush()
    session.close()
    return [("a", "close"), ("b", "close")]


def _discard_reset(session: OrmSession) -> list[tuple[str, str]]:
    operation(session, "a")
    session.reset()
    return [("a", "close")]


DISCARDS: dict[str, Callable[[OrmSession], list[tuple[str, str]]]] = {
    "rollback": _discard_rollback,
    "begin-block-raises": _discard_begin_block,
    "savepoint-rollback": _discard_savepoint,
    "released-savepoint-outer-rollback": _discard_released_then_rollback,
    "close": _discard_close,
    "reset": _discard_reset,
}


@pytest.mark.parametrize("scenario", list(DISCARDS.values()), ids=list(DISCARDS))
def test_discarded_signal_is_sent_once_per_event_with_its_reason(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    engine: Engine,
    scenario: Callable[[OrmSession], list[tuple[str, str]]],
) -> None:
    """audit_event_discarded: once per dropped event, with rollback/savepoint/close."""
    got: list[tuple[object, StagedEvent, str]] = []

    def receiver(sender: object, *, event: StagedEvent, reason: str) -> None:
        got.append((sender, event, reason))

    signals.audit_event_discarded.connect(receiver, sender=emitter)
    try:
        with Session() as session:
            expected = scenario(session)
            session.commit()
            operation(session, "after")
            session.commit()
    finally:
        signals.audit_event_discarded.disconnect(receiver, sender=emitter)
    assert [(event.target_id, reason) for _, event, reason in got] == expected
    assert all(sender is emitter for sender, _, _ in got)
    assert all(isinstance(event, StagedEvent) for _, event, _ in got)
    assert len({event.id for _, event, _ in got}) == len(got)
    kept = ["kept"] if "kept" in recorder.names else []
    assert recorder.names == [*kept, "after"]
    assert stored_names(engine) == sorted([*kept, "after"])


class Ordered:
    """Appends its label to the shared call log of each hook."""

    def __init__(self, label: str, calls: dict[str, list[str]], raising: bool) -> None:
        self.label = label
        self.calls = calls
        self.raising = raising

    def _called(self, hook: str) -> None:
        self.calls.setdefault(hook, []).append(self.label)

    @hookimpl
    def audit_event_logged(self) -> None:
        self._called("audit_event_logged")

    @hookimpl
    def audit_events_committed(self) -> None:
        self._called("audit_events_committed")
        if self.raising:
            raise PluginError(self.label)

    @hookimpl
    def audit_delivery_failed(self) -> None:
        self._called("audit_delivery_failed")


class OrderedFirst(Ordered):
    @hookimpl(tryfirst=True)
    def audit_event_logged(self) -> None:
        self._called("audit_event_logged")

    @hookimpl(tryfirst=True)
    def audit_events_committed(self) -> None:
        self._called("audit_events_committed")

    @hookimpl(tryfirst=True)
    def audit_delivery_failed(self) -> None:
        self._called("audit_delivery_failed")


class OrderedLast(Ordered):
    @hookimpl(trylast=True)
    def audit_event_logged(self) -> None:
        self._called("audit_event_logged")

    @hookimpl(trylast=True)
    def audit_events_committed(self) -> None:
        self._called("audit_events_committed")

    @hookimpl(trylast=True)
    def audit_delivery_failed(self) -> None:
        self._called("audit_delivery_failed")


def test_hook_call_order_follows_pluggy(
    Session: sessionmaker, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Last registered is called first; tryfirst/trylast are honoured, on every hook."""
    emitter.unregister(recorder)
    calls: dict[str, list[str]] = {}
    plugins = [
        Ordered("A", calls, raising=True),
        Ordered("B", calls, raising=False),
        OrderedFirst("C-tryfirst", calls, raising=False),
        OrderedLast("D-trylast", calls, raising=False),
    ]
    for plugin in plugins:
        emitter.register(plugin)
    with Session() as session:
        operation(session, "a")
        session.commit()
    expected = ["C-tryfirst", "B", "A", "D-trylast"]
    assert calls == {hook: expected for hook in HOOKS}
    # The same order pluggy itself uses when it calls a hook.
    calls.clear()
    emitter.plugin_manager.hook.audit_event_logged(envelope=None)
    assert calls == {"audit_event_logged": expected}


def test_plugins_changed_between_commits_take_effect_on_the_next(
    Session: sessionmaker, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Registering, unregistering and blocking apply from the next commit on.

    Dispatch keeps each hook's implementations between commits; any change
    made through the emitter or straight on its plugin manager replaces them.
    """
    calls: dict[str, list[str]] = {}
    late = Ordered("late", calls, raising=False)
    blocked = Ordered("blocked", calls, raising=False)

    def commit(name: str) -> None:
        with Session() as session:
            operation(session, name)
            session.commit()

    commit("a")
    emitter.plugin_manager.register(late, "late")
    commit("b")
    emitter.register(blocked, "blocked")
    emitter.plugin_manager.set_blocked("blocked")
    emitter.unregister(recorder)
    commit("c")
    emitter.plugin_manager.unregister(name="late")
    commit("d")
    assert recorder.names == ["a", "b"]
    assert calls == {
        "audit_event_logged": ["late", "late"],
        "audit_events_committed": ["late", "late"],
    }


def test_a_plugin_registered_while_another_thread_reads_the_order_is_called(
    Session: sessionmaker,
    emitter: AuditEmitter,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An order read across a registration serves that dispatch only.

    A dispatching thread is held just after it read the implementations
    (as a thread switch would hold it) while the main thread registers a
    plugin; every later commit must still reach the new plugin.
    """
    late = Recorder()
    read, resume = threading.Event(), threading.Event()
    get_hookimpls = pluggy.HookCaller.get_hookimpls

    def held(caller: pluggy.HookCaller) -> list[Any]:
        impls = get_hookimpls(caller)
        if threading.current_thread().name == "dispatcher":
            read.set()
            resume.wait(5)
        return impls

    monkeypatch.setattr(pluggy.HookCaller, "get_hookimpls", held)
    emitter.register(Recorder(), "other")  # forget the order built so far
    dispatcher = threading.Thread(
        target=emitter.plugin_manager.delivery_order, name="dispatcher"
    )
    dispatcher.start()
    assert read.wait(5)
    emitter.register(late, "late")
    resume.set()
    dispatcher.join(5)
    with Session() as session:
        operation(session, "a")
        session.commit()
    assert late.names == recorder.names == ["a"]


def test_unnamed_plugins_get_stable_names_by_class() -> None:
    """Unnamed instances are named by class path, then "#2", "#3"."""
    emitter = AuditEmitter(load_entrypoints=False)
    names = [emitter.register(Recorder()) for _ in range(3)]
    base = f"{Recorder.__module__}.{Recorder.__qualname__}"
    assert names == [base, f"{base}#2", f"{base}#3"]
