"""attach()/detach(): which sessions an emitter hears, and refusing the rest.

Attaching is about routing, not about the database, so these tests run on
SQLite only (the ``engine`` fixture, parametrised indirectly).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from support import Item, Recorder, operation, run_script, stored_names

from access_audit import AuditConfigurationError, AuditEmitter, hookimpl, stage_event
from access_audit.testing import capture_audit_events

SQLITE_ONLY = pytest.mark.parametrize(
    "engine", ["sqlite"], indirect=True, ids=["sqlite"]
)

SessionHandle = Any
"""A Session, or a scoped_session standing for one."""
Target = tuple[Any, Callable[[], SessionHandle]]
"""What to attach, and how to get a session that it covers."""


def stage(handle: SessionHandle, name: str) -> None:
    """Add an Item and stage its event through *handle* (Session or scoped)."""
    handle.add(Item(name=name))
    stage_event(
        handle, "item_created", target_type="item", target_id=name, action="create"
    )


def new_emitter() -> tuple[AuditEmitter, Recorder]:
    recorder = Recorder()
    return AuditEmitter([recorder], load_entrypoints=False), recorder


def via_subclass(engine: Engine) -> Target:
    class AuditedSession(Session):
        pass

    return AuditedSession, lambda: AuditedSession(engine)


def via_sessionmaker(engine: Engine) -> Target:
    maker = sessionmaker(engine)
    return maker, maker


def via_scoped_session(engine: Engine) -> Target:
    scoped = scoped_session(sessionmaker(engine))
    return scoped, lambda: scoped


def via_instance(engine: Engine) -> Target:
    session = Session(engine)
    return session, lambda: session


TARGETS = [via_subclass, via_sessionmaker, via_scoped_session, via_instance]
TARGET_IDS = ["Session_subclass", "sessionmaker", "scoped_session", "Session_instance"]


@pytest.fixture
def cleanup() -> Iterator[list[tuple[AuditEmitter, Any]]]:
    """(emitter, target) pairs to detach after the test, whatever happened."""
    attached: list[tuple[AuditEmitter, Any]] = []
    yield attached
    for emitter, target in reversed(attached):
        emitter.detach(target)
        if isinstance(target, scoped_session):
            target.remove()


def attach(
    emitter: AuditEmitter, target: Any, cleanup: list[tuple[AuditEmitter, Any]]
) -> None:
    cleanup.append((emitter, target))
    emitter.attach(target)


@SQLITE_ONLY
@pytest.mark.parametrize("make_target", TARGETS, ids=TARGET_IDS)
def test_attach_target_emits_on_commit(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
    make_target: Callable[[Engine], Target],
) -> None:
    """Each kind of attach target emits its sessions' committed events."""
    target, session_of = make_target(engine)
    attach(emitter, target, cleanup)
    handle = session_of()
    stage(handle, "a")
    stage(handle, "b")
    assert recorder.events == []
    handle.commit()
    assert recorder.names == ["a", "b"]
    stage(handle, "c")
    handle.rollback()
    handle.close()
    assert recorder.names == ["a", "b"]
    assert stored_names(engine) == ["a", "b"]


@SQLITE_ONLY
def test_stage_event_accepts_scoped_session(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
) -> None:
    """stage_event on a scoped_session stages on its current session."""
    scoped = scoped_session(sessionmaker(engine))
    attach(emitter, scoped, cleanup)
    stage_event(scoped, "item_created", target_type="item", target_id="a", action="c")
    scoped().add(Item(name="a"))
    scoped.remove()  # closes the current session: its event is dropped
    stage_event(scoped, "item_created", target_type="item", target_id="b", action="c")
    scoped().add(Item(name="b"))
    scoped().commit()
    assert recorder.names == ["b"]
    assert stored_names(engine) == ["b"]


ATTACH_TWICE = {
    "same_sessionmaker": lambda maker: (maker, maker),
    "sessionmaker_then_its_scoped_session": lambda maker: (
        maker,
        scoped_session(maker),
    ),
    "same_class": lambda maker: (maker.class_, maker.class_),
    "class_then_its_sessionmaker": lambda maker: (maker.class_, maker),
}


@SQLITE_ONLY
@pytest.mark.parametrize("targets", ATTACH_TWICE.values(), ids=ATTACH_TWICE.keys())
def test_attaching_twice_is_a_noop(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
    targets: Callable[[sessionmaker[Session]], tuple[Any, Any]],
) -> None:
    """Attaching the same sessions twice emits each event once, not twice."""
    maker = sessionmaker(engine)
    first, second = targets(maker)
    attach(emitter, first, cleanup)
    emitter.attach(second)
    with maker() as session:
        operation(session, "a")
        session.commit()
    assert recorder.names == ["a"]
    assert len(recorder.batches) == 1
    # One attachment, so one detach ends it.
    emitter.detach(second)
    with maker() as session, pytest.raises(AuditConfigurationError):
        operation(session, "b")
    assert recorder.names == ["a"]
    assert stored_names(engine) == ["a"]


@SQLITE_ONLY
def test_attaching_instance_twice_is_a_noop(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
) -> None:
    """Attaching the same Session instance twice emits each event once."""
    session = Session(engine)
    attach(emitter, session, cleanup)
    emitter.attach(session)
    operation(session, "a")
    session.commit()
    assert recorder.names == ["a"]
    assert len(recorder.batches) == 1
    emitter.detach(session)
    with pytest.raises(AuditConfigurationError):
        operation(session, "b")
    session.rollback()
    session.close()
    assert recorder.names == ["a"]
    assert stored_names(engine) == ["a"]


@SQLITE_ONLY
@pytest.mark.parametrize("make_target", TARGETS, ids=TARGET_IDS)
def test_detach_stops_emission(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    make_target: Callable[[Engine], Target],
) -> None:
    """After detach, staged events are not sent and stage_event refuses."""
    target, session_of = make_target(engine)
    emitter.attach(target)
    handle = session_of()
    operation(handle, "a")
    emitter.detach(target)
    handle.commit()
    assert recorder.events == []
    assert stored_names(engine) == ["a"]
    with pytest.raises(AuditConfigurationError, match="attach"):
        operation(handle, "b")
    handle.rollback()
    handle.close()
    if isinstance(target, scoped_session):
        target.remove()
    assert recorder.events == []
    assert stored_names(engine) == ["a"]


@SQLITE_ONLY
def test_detach_then_attach_another_emitter(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
) -> None:
    """A session that staged under a detached emitter emits to the new one."""
    other, other_recorder = new_emitter()
    maker = sessionmaker(engine)
    emitter.attach(maker)
    session = maker()
    operation(session, "a")
    emitter.detach(maker)
    session.commit()  # "a" was staged under the detached emitter: not sent
    attach(other, maker, cleanup)
    operation(session, "b")
    session.commit()
    session.close()
    assert stored_names(engine) == ["a", "b"]
    assert recorder.events == []
    assert other_recorder.names == ["b"]
    assert dict(session.info) == {}


@SQLITE_ONLY
def test_events_left_by_a_detached_emitter_are_reported_discarded(
    engine: Engine, emitter: AuditEmitter, cleanup: list[tuple[AuditEmitter, Any]]
) -> None:
    """Events of a transaction that ended after detach() are discarded as "detached"."""
    other, _ = new_emitter()
    maker = sessionmaker(engine)
    emitter.attach(maker)
    session = maker()
    with capture_audit_events() as audit_events:
        operation(session, "a")
        emitter.detach(maker)
        session.commit()
        attach(other, maker, cleanup)
        operation(session, "b")
        session.rollback()
    session.close()
    assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
        ("a", "detached"),
        ("b", "rollback"),
    ]


@SQLITE_ONLY
def test_instance_attached_mid_transaction_takes_over(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An emitter attached to the session while it stages sends the whole commit."""
    other, other_recorder = new_emitter()
    maker = sessionmaker(engine)
    emitter.attach(maker)
    session = maker()
    operation(session, "before")
    other.attach(session)
    operation(session, "after")
    session.commit()
    session.close()
    other.detach(session)
    emitter.detach(maker)
    assert recorder.events == []
    assert other_recorder.names == ["before", "after"]


def test_attaching_the_plain_async_session_class_is_refused() -> None:
    """attach(AsyncSession) would reach every Session, so it raises TypeError."""
    from sqlalchemy.ext.asyncio import AsyncSession

    with pytest.raises(TypeError, match="every Session in the process"):
        AuditEmitter(load_entrypoints=False).attach(AsyncSession)


@SQLITE_ONLY
def test_stage_without_emitter_raises(engine: Engine) -> None:
    """stage_event on an unattached session raises and says how to fix it."""
    with Session(engine) as session:
        with pytest.raises(AuditConfigurationError) as caught:
            operation(session, "a")
        session.rollback()
    assert isinstance(caught.value, RuntimeError)
    message = str(caught.value)
    assert "no AuditEmitter is attached" in message
    assert "emitter.attach(" in message
    assert stored_names(engine) == []


@SQLITE_ONLY
@pytest.mark.parametrize("make_target", TARGETS, ids=TARGET_IDS)
def test_second_emitter_on_same_target_raises(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
    make_target: Callable[[Engine], Target],
) -> None:
    """Attaching a different emitter to an attached target raises; the first stays."""
    other, other_recorder = new_emitter()
    target, session_of = make_target(engine)
    attach(emitter, target, cleanup)
    with pytest.raises(AuditConfigurationError, match="detach"):
        other.attach(target)
    handle = session_of()
    operation(handle, "a")
    handle.commit()
    handle.close()
    assert recorder.names == ["a"]
    assert other_recorder.events == []
    assert stored_names(engine) == ["a"]


@SQLITE_ONLY
def test_instance_emitter_wins_over_class_emitter(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
) -> None:
    """An emitter attached to a Session instance wins over its class's emitter."""
    other, other_recorder = new_emitter()
    maker = sessionmaker(engine)
    attach(emitter, maker, cleanup)
    special = maker()
    attach(other, special, cleanup)
    plain = maker()
    operation(special, "special")
    operation(plain, "plain")
    special.commit()
    plain.commit()
    special.close()
    plain.close()
    assert other_recorder.names == ["special"]
    assert recorder.names == ["plain"]
    assert stored_names(engine) == ["plain", "special"]


@SQLITE_ONLY
def test_two_sessionmakers_are_independent(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
) -> None:
    """Two sessionmakers with two emitters each get only their own events."""
    other, other_recorder = new_emitter()
    first_maker, second_maker = sessionmaker(engine), sessionmaker(engine)
    attach(emitter, first_maker, cleanup)
    attach(other, second_maker, cleanup)
    with first_maker() as first, second_maker() as second:
        operation(first, "first-1")
        operation(second, "second-1")
        operation(first, "first-2")
        first.commit()
        assert other_recorder.events == []
        second.commit()
    assert recorder.names == ["first-1", "first-2"]
    assert other_recorder.names == ["second-1"]
    assert stored_names(engine) == ["first-1", "first-2", "second-1"]


@pytest.mark.parametrize(
    "target",
    [object(), "sessionmaker", 42, int, None],
    ids=["object", "str", "int", "a_class", "None"],
)
@pytest.mark.parametrize("method", ["attach", "detach"])
def test_unknown_target_raises_type_error(target: object, method: str) -> None:
    """attach()/detach() of something else raises TypeError naming what it takes."""
    emitter = AuditEmitter(load_entrypoints=False)
    with pytest.raises(TypeError) as caught:
        getattr(emitter, method)(target)
    message = str(caught.value)
    for accepted in (
        "Session",
        "sessionmaker",
        "scoped_session",
        "AsyncSession",
        "async_sessionmaker",
        "async_scoped_session",
    ):
        assert accepted in message


@SQLITE_ONLY
@pytest.mark.parametrize("other_ends", ["commit", "rollback", "close"])
def test_events_stay_on_their_session(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    cleanup: list[tuple[AuditEmitter, Any]],
    other_ends: str,
) -> None:
    """Events staged on one session never appear in another session's commit."""
    maker = sessionmaker(engine)
    attach(emitter, maker, cleanup)
    with maker() as one, maker() as other:
        operation(one, "one")
        operation(other, "other")
        getattr(other, other_ends)()
        expected = ["other"] if other_ends == "commit" else []
        assert recorder.names == expected
        one.commit()
        assert recorder.names == [*expected, "one"]
        # "one"'s commit carried its own event only, in a batch of its own.
        assert [len(batch) for batch in recorder.batches] == [1] * len(recorder.names)
        assert len({e.transaction_id for e in recorder.events}) == len(recorder.names)
    assert stored_names(engine) == sorted(["one", *expected])


@SQLITE_ONLY
def test_detach_removes_the_listeners_whatever_sqlalchemy_s_registry_holds(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """SQLAlchemy's event registry is keyed by ids, and can keep the entry of
    a collected class whose listener had the same ids: ``event.remove``
    then takes that entry's (dead) function instead of ours, and the
    emitter went on delivering after ``detach()`` (a flaky failure in a
    long test run). Such an entry is planted here."""
    import weakref

    from sqlalchemy.event import registry

    maker = sessionmaker(engine)
    for name, hook in emitter._listeners._hooks.items():
        key = registry._EventKey(maker.class_, name, hook, None)._key
        owner = getattr(maker.class_.dispatch, name).ref
        # A collected class's listener: nothing refers to it, so it is dead.
        registry._key_to_collection[key][owner] = weakref.ref(lambda *_: None)
    emitter.attach(maker)
    session = maker()
    operation(session, "a")
    emitter.detach(maker)
    session.commit()
    session.close()
    assert recorder.events == []


def _installed_hooks(emitter: AuditEmitter, maker: sessionmaker) -> list[str]:
    """The events whose listener of *emitter*'s is in *maker*'s class."""
    found = []
    for name, hook in emitter._listeners._hooks.items():
        listeners = getattr(maker.class_.dispatch, name)._clslevel.get(maker.class_, ())
        if hook in listeners:
            found.append(name)
    return found


def with_a_kill_switch(emitter: AuditEmitter, maker: sessionmaker) -> sessionmaker:
    """Attach *emitter* to *maker*, with a plugin that detaches it from
    *maker* as it is delivered an event on ``"switch"``; returns *maker*."""

    class KillSwitch:
        @hookimpl
        def audit_event_logged(self, envelope: Any) -> None:
            if envelope.target_id == "switch":
                emitter.detach(maker)

    emitter.register(KillSwitch(), name="kill-switch")
    emitter.attach(maker)
    return maker


@SQLITE_ONLY
def test_detach_by_a_plugin_as_it_is_delivered_to_keeps_the_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A plugin that detaches the emitter as it is delivered to (a kill
    switch): SQLAlchemy is running the listener that delivers, so removing
    it then made ``commit()`` raise ("deque mutated during iteration")
    though the COMMIT went through. The listener stays until the emitter's
    next attach() or detach(); attached again, it delivers once."""
    maker = with_a_kill_switch(emitter, sessionmaker(engine))
    with maker() as session:
        operation(session, "switch")
        session.commit()
        with pytest.raises(AuditConfigurationError, match="attach"):
            operation(session, "refused")
        session.rollback()
    assert recorder.names == ["switch"]
    emitter.attach(maker)
    with maker() as session:
        operation(session, "again")
        session.commit()
    assert recorder.names == ["switch", "again"]
    emitter.detach(maker)
    assert _installed_hooks(emitter, maker) == []
    assert stored_names(engine) == ["again", "switch"]


class _Failures(list[BaseException]):
    """What a commit in another thread raised; :meth:`join` waits for it."""

    join: Callable[[], None]


@contextlib.contextmanager
def delivering_in_a_thread(
    emitter: AuditEmitter, maker: sessionmaker, *, wait: bool = False
) -> Iterator[_Failures]:
    """Commit an event (``"slow"``) in another thread, and hold its delivery
    in a plugin while the block runs; then let it finish. Yields what that
    commit raised, once the thread is joined (at the block's end, or by
    ``join()`` when *wait*: the session's info then has ``"wait"``)."""
    delivering, release = threading.Event(), threading.Event()

    class Gate:
        @hookimpl
        def audit_event_logged(self, envelope: Any) -> None:
            delivering.set()
            release.wait(10)

    emitter.register(Gate(), name="gate")
    emitter.attach(maker)
    failures = _Failures()

    def commit() -> None:
        try:
            with maker() as session:
                session.info["wait"] = wait
                operation(session, "slow")
                session.commit()
        except BaseException as error:
            failures.append(error)

    worker = threading.Thread(target=commit)
    worker.start()
    failures.join = lambda: worker.join(10)
    try:
        assert delivering.wait(10)
        yield failures
    finally:
        release.set()
        if not wait:
            worker.join(10)


@SQLITE_ONLY
def test_detach_from_another_thread_during_a_delivery_keeps_the_commit(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A shutdown or a test's teardown detaches while another thread's
    commit delivers to a slow plugin: that commit returns (it used to raise),
    its event delivered; the listener goes at the next detach()."""
    maker = sessionmaker(engine)
    with delivering_in_a_thread(emitter, maker) as failures:
        emitter.detach(maker)
    assert failures == []
    assert (recorder.names, stored_names(engine)) == (["slow"], ["slow"])
    assert _installed_hooks(emitter, maker) == ["after_transaction_end"]
    emitter.detach(maker)
    assert _installed_hooks(emitter, maker) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads
@SQLITE_ONLY
def test_a_child_forked_during_a_delivery_detaches_at_once(
    engine: Engine, emitter: AuditEmitter
) -> None:
    """The child of a fork made while a thread delivered has no such
    thread: its detach() removes every listener at once."""
    maker = sessionmaker(engine)
    with delivering_in_a_thread(emitter, maker) as failures:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                emitter.detach(maker)
                code = 0 if _installed_hooks(emitter, maker) == [] else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert failures == []
    emitter.detach(maker)


@SQLITE_ONLY
def test_a_detach_during_a_delivery_leaves_the_emitter_s_other_targets_alone(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """The listener left in place is the detached target's only: a
    session the emitter is also attached to on its own still delivers,
    SAVEPOINTs included (they were ignored with it, and lost)."""
    maker = with_a_kill_switch(emitter, sessionmaker(engine))
    kept = maker()
    emitter.attach(kept)
    with maker() as session:
        operation(session, "switch")
        session.commit()
    operation(kept, "outer")
    with kept.begin_nested():
        operation(kept, "inner")
    kept.commit()
    kept.close()
    emitter.detach(kept)
    assert recorder.names == ["switch", "outer", "inner"]


def test_deliveries_interleaved_on_one_loop_are_each_counted(
    tmp_path: Any, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """Two AsyncSession commits on one loop deliver to an ``async def``
    plugin at once, in one thread: when the first ends, the second is still
    counted, so its plugin's detach() leaves the running listener in place
    (the commit used to raise), and none is counted once both are over."""
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from access_audit import _listeners

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'loop.db'}")
    maker = async_sessionmaker(engine)

    class SlowKillSwitch:
        @hookimpl
        async def audit_event_logged(self, envelope: Any) -> None:
            await asyncio.sleep(0.05 if envelope.target_id == "first" else 0.3)
            if envelope.target_id == "second":
                emitter.detach(maker)

    emitter.register(SlowKillSwitch(), name="kill-switch")
    emitter.attach(maker)

    async def commit(target_id: str, after: float) -> None:
        await asyncio.sleep(after)
        async with maker() as session:
            stage_event(
                session, "item_seen", target_type="item", target_id=target_id,
                action="see",
            )  # fmt: skip
            await session.commit()

    async def main() -> None:
        try:
            await asyncio.gather(commit("first", 0), commit("second", 0.01))
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert sorted(recorder.names) == ["first", "second"]
    assert _listeners._delivering == []
    emitter.detach(maker)
    assert emitter._listeners._retired == {}


@SQLITE_ONLY
def test_detaching_another_target_leaves_a_running_commit_s_listener(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A shutdown detaches maker A as its commit delivers, then maker B
    while that commit still runs an application's after_transaction_end
    listener of A's: the listener left on A stays (it was removed then, and
    the commit raised); it goes with the next detach of A itself."""
    maker_a, maker_b = sessionmaker(engine), sessionmaker(engine)
    emitter.attach(maker_b)
    in_app_listener, detached_b = threading.Event(), threading.Event()

    def app_listener(session: Session, transaction: Any) -> None:
        if transaction.parent is None and session.info.pop("wait", False):
            in_app_listener.set()
            detached_b.wait(10)

    event.listen(maker_a, "after_transaction_end", app_listener)
    with delivering_in_a_thread(emitter, maker_a, wait=True) as failures:
        emitter.detach(maker_a)
    assert in_app_listener.wait(10)
    emitter.detach(maker_b)
    detached_b.set()
    failures.join()
    assert failures == []
    assert recorder.names == ["slow"]
    assert _installed_hooks(emitter, maker_a) == ["after_transaction_end"]
    emitter.detach(maker_a)
    assert _installed_hooks(emitter, maker_a) == []


class _Base(Session):
    """An application's Session class, attached on its own too."""


@SQLITE_ONLY
@pytest.mark.parametrize("during", [False, True], ids=["idle", "delivering"])
def test_detaching_a_sessionmaker_leaves_its_attached_base_class_listening(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder, during: bool
) -> None:
    """The emitter attached to a Session class and to a sessionmaker of a
    subclass: SQLAlchemy copies the class's listeners into the subclass's,
    the same bound methods. Detaching the sessionmaker took those copies
    too, and its sessions' committed events were discarded as "close"."""
    maker = sessionmaker(engine, class_=_Base)
    emitter.attach(_Base)
    if during:
        with_a_kill_switch(emitter, maker)
    else:
        emitter.attach(maker)
        emitter.detach(maker)
    try:
        for name in ["switch", "after"]:
            with maker.begin() as session:
                operation(session, name)
                with session.begin_nested():
                    operation(session, f"{name}-in-savepoint")
    finally:
        emitter.detach(_Base)
        emitter.detach(maker)
    expected = ["switch", "switch-in-savepoint", "after", "after-in-savepoint"]
    assert recorder.names == expected


def test_a_delivery_that_forks_returns_in_both_processes(tmp_path: Any) -> None:
    """A plugin that forks as it is delivered to: the child, whose count of
    running deliveries starts empty, returns from the commit too."""
    done = run_script(
        """
        import os

        class Forker:
            @hookimpl
            def audit_event_logged(self, envelope):
                global child
                child = os.fork()

        emitter = AuditEmitter([Forker()], load_entrypoints=False)
        maker = sessionmaker(create_engine("sqlite://"))
        emitter.attach(maker)
        with maker.begin() as session:
            stage_event(session, "e", target_type="t", target_id="x", action="a")
        print("child returned" if child == 0 else "parent returned", flush=True)
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        """,
        "-W",
        "ignore::DeprecationWarning",
    )
    assert sorted(done.stdout.splitlines()) == ["child returned", "parent returned"]
