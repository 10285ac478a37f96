"""docs/concepts.md, "Who acted" and "Metadata": actor precedence, audit_context, metadata merging.

Actor precedence is: explicit arguments > innermost ``audit_context`` >
``actor_resolver`` > ``"system"``. Metadata merges ``metadata_provider`` <
``audit_context`` < the call's ``metadata``. The context lives in a ContextVar,
so threads and asyncio tasks each see their own. None of this depends on the
database, so these tests run on SQLite only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import Recorder, operation, stored_names

from access_audit import Actor, AuditEmitter, audit_context, stage_event


@pytest.fixture
def engine(sqlite_file_engine: Engine) -> Engine:
    """SQLite only: who acted does not depend on the database."""
    return sqlite_file_engine


MakeSession = Callable[..., sessionmaker]


@pytest.fixture
def make_session(
    engine: Engine, recorder: Recorder
) -> Iterator[Callable[..., sessionmaker]]:
    """Build a sessionmaker whose emitter has the given options and ``recorder``."""
    attached: list[tuple[AuditEmitter, sessionmaker]] = []

    def make(**options: Any) -> sessionmaker:
        emitter = AuditEmitter([recorder], load_entrypoints=False, **options)
        maker = sessionmaker(engine)
        emitter.attach(maker)
        attached.append((emitter, maker))
        return maker

    yield make
    for emitter, maker in attached:
        emitter.detach(maker)


def _stage(session: OrmSession, name: str, **fields: Any) -> None:
    stage_event(
        session,
        "item_viewed",
        target_type="item",
        target_id=name,
        action="view",
        **fields,
    )


def _actors(recorder: Recorder) -> list[tuple[str, str | None]]:
    return [(envelope.actor_id, envelope.actor_email) for envelope in recorder.events]


# (id, explicit arguments, audit_context arguments or None, resolver result or
# "unset" for no resolver, expected actor)
PRECEDENCE: list[tuple[str, dict[str, Any], dict[str, Any] | None, Any, Any]] = [
    (
        "explicit-wins-over-all",
        {"actor_id": "explicit", "actor_email": "e@example.com"},
        {"actor_id": "context", "actor_email": "c@example.com"},
        Actor("resolver", "r@example.com"),
        ("explicit", "e@example.com"),
    ),
    (
        "explicit-id-alone-takes-no-email-from-below",
        {"actor_id": "explicit"},
        {"actor_id": "context", "actor_email": "c@example.com"},
        Actor("resolver", "r@example.com"),
        ("explicit", None),
    ),
    (
        "context-wins-over-resolver",
        {},
        {"actor_id": "context", "actor_email": "c@example.com"},
        Actor("resolver", "r@example.com"),
        ("context", "c@example.com"),
    ),
    (
        "context-without-actor-leaves-resolver",
        {},
        {"tenant": "t1"},
        Actor("resolver", "r@example.com"),
        ("resolver", "r@example.com"),
    ),
    (
        "resolver-actor",
        {},
        None,
        Actor("resolver", "r@example.com"),
        ("resolver", "r@example.com"),
    ),
    (
        "resolver-tuple",
        {},
        None,
        ("tuple-user", "t@example.com"),
        ("tuple-user", "t@example.com"),
    ),
    ("resolver-tuple-no-email", {}, None, ("tuple-user", None), ("tuple-user", None)),
    ("resolver-none-means-system", {}, None, None, ("system", None)),
    ("no-resolver-means-system", {}, None, "unset", ("system", None)),
    (
        "explicit-over-system",
        {"actor_id": "explicit"},
        None,
        "unset",
        ("explicit", None),
    ),
]


@pytest.mark.parametrize(
    ("explicit", "context", "resolved", "expected"),
    [case[1:] for case in PRECEDENCE],
    ids=[case[0] for case in PRECEDENCE],
)
def test_actor_precedence(
    make_session: MakeSession,
    recorder: Recorder,
    engine: Engine,
    explicit: dict[str, Any],
    context: dict[str, Any] | None,
    resolved: Any,
    expected: tuple[str, str | None],
) -> None:
    """Explicit arguments > innermost audit_context > actor_resolver > "system"."""
    options = {} if resolved == "unset" else {"actor_resolver": lambda: resolved}
    Session = make_session(**options)
    with Session() as session:
        if context is None:
            operation(session, "a", **explicit)
        else:
            with audit_context(**context):
                operation(session, "a", **explicit)
        session.commit()
    assert _actors(recorder) == [expected]
    assert stored_names(engine) == ["a"]


def test_resolver_is_called_at_stage_time(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """The resolver's answer when stage_event runs is used, not its answer at commit."""
    current = {"user": "first"}
    Session = make_session(actor_resolver=lambda: (current["user"], None))
    with Session() as session:
        _stage(session, "a")
        current["user"] = "second"
        _stage(session, "b")
        current["user"] = "at-commit"
        session.commit()
    assert _actors(recorder) == [("first", None), ("second", None)]


GARBAGE = [
    ("str", "alice"),
    ("int", 42),
    ("dict", {"id": "alice"}),
    ("list", ["alice", None]),
    ("one-tuple", ("alice",)),
    ("three-tuple", ("alice", "a@example.com", "extra")),
    ("tuple-int-id", (42, None)),
    ("tuple-int-email", ("alice", 42)),
]


@pytest.mark.parametrize(
    "garbage", [value for _, value in GARBAGE], ids=[name for name, _ in GARBAGE]
)
def test_resolver_returning_garbage_raises_type_error(
    make_session: MakeSession, recorder: Recorder, engine: Engine, garbage: object
) -> None:
    """A resolver returning anything but Actor/(str, str|None)/None: TypeError naming it."""
    answers = iter([garbage, Actor("fine")])
    Session = make_session(actor_resolver=lambda: next(answers))
    with Session() as session:
        with pytest.raises(TypeError, match="actor_resolver"):
            _stage(session, "refused")
        operation(session, "good")
        session.commit()
    assert recorder.names == ["good"]
    assert _actors(recorder) == [("fine", None)]
    assert stored_names(engine) == ["good"]


def test_resolver_error_propagates_and_stages_nothing(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """An exception raised by the resolver reaches the caller; nothing is staged."""

    def broken() -> Actor:
        raise LookupError("no user")

    Session = make_session(actor_resolver=broken)
    with Session() as session:
        with pytest.raises(LookupError):
            _stage(session, "refused")
        _stage(session, "explicit", actor_id="someone")
        session.commit()
    assert recorder.names == ["explicit"]


def test_audit_context_nesting_and_restoring(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """The inner actor wins, metadata merges, and each exit restores the outer state."""
    Session = make_session(actor_resolver=lambda: Actor("resolver"))
    with Session() as session:
        with audit_context(actor_id="outer", actor_email="o@example.com", a=1, b=1):
            _stage(session, "outer-before")
            with audit_context(actor_id="inner", b=2, c=2):
                _stage(session, "inner")
                with audit_context(d=3):  # no actor: keeps "inner"
                    _stage(session, "innermost")
                _stage(session, "inner-after")
            _stage(session, "outer-after")
        _stage(session, "outside")
        session.commit()
    assert recorder.names == [
        "outer-before",
        "inner",
        "innermost",
        "inner-after",
        "outer-after",
        "outside",
    ]
    assert _actors(recorder) == [
        ("outer", "o@example.com"),
        ("inner", None),
        ("inner", None),
        ("inner", None),
        ("outer", "o@example.com"),
        ("resolver", None),
    ]
    assert [dict(envelope.metadata) for envelope in recorder.events] == [
        {"a": 1, "b": 1},
        {"a": 1, "b": 2, "c": 2},
        {"a": 1, "b": 2, "c": 2, "d": 3},
        {"a": 1, "b": 2, "c": 2},
        {"a": 1, "b": 1},
        {},
    ]


def test_audit_context_is_restored_when_the_block_raises(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """An exception leaving audit_context still restores the outer context."""
    Session = make_session()
    with Session() as session:
        with audit_context(actor_id="outer"):
            with pytest.raises(LookupError), audit_context(actor_id="inner", x=1):
                raise LookupError("job failed")
            _stage(session, "after")
        session.commit()
    assert _actors(recorder) == [("outer", None)]
    assert recorder.events[0].metadata == {}


def test_metadata_precedence(make_session: MakeSession, recorder: Recorder) -> None:
    """metadata_provider < audit_context < the call's metadata, key by key."""
    provided = {"p": "provider", "pc": "provider", "pe": "provider", "all": "provider"}
    Session = make_session(metadata_provider=lambda: provided)
    with Session() as session:
        with audit_context(pc="context", ce="context", all="context"):
            _stage(
                session,
                "a",
                metadata={"pe": "explicit", "ce": "explicit", "all": "explicit"},
            )
        _stage(session, "b")
        session.commit()
    first, second = recorder.events
    assert first.metadata == {
        "p": "provider",
        "pc": "context",
        "pe": "explicit",
        "ce": "explicit",
        "all": "explicit",
    }
    assert second.metadata == provided


def test_metadata_provider_is_called_at_stage_time(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """The provider runs for each staged event; None means no metadata from it."""
    answers: list[Mapping[str, Any] | None] = [{"n": 1}, None]
    Session = make_session(metadata_provider=lambda: answers.pop(0))
    with Session() as session:
        _stage(session, "a")
        _stage(session, "b")
        session.commit()
    assert [envelope.metadata for envelope in recorder.events] == [{"n": 1}, {}]


def test_metadata_provider_returning_garbage_raises_type_error(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """A provider that returns a non-mapping raises TypeError naming it at stage time."""
    answers: list[Any] = [["not", "a", "mapping"], {"ok": True}]
    Session = make_session(metadata_provider=lambda: answers.pop(0))
    with Session() as session:
        with pytest.raises(TypeError, match="metadata_provider"):
            _stage(session, "refused")
        _stage(session, "good")
        session.commit()
    assert recorder.names == ["good"]
    assert recorder.events[0].metadata == {"ok": True}


def test_context_metadata_that_is_not_json_fails_at_stage_time(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """A non-JSON audit_context value is refused by stage_event, naming the key."""
    Session = make_session()
    with Session() as session:
        with audit_context(when={1, 2}), pytest.raises(TypeError, match="'when'"):
            _stage(session, "refused")
        _stage(session, "good")
        session.commit()
    assert recorder.names == ["good"]


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"actor_email": "a@example.com"}, ValueError),
        ({"actor_id": ""}, ValueError),
        ({"actor_id": "   "}, ValueError),
        ({"actor_id": "a", "actor_email": 5}, TypeError),
    ],
    ids=["email-without-id", "empty-id", "blank-id", "email-not-str"],
)
def test_audit_context_refuses_a_bad_actor(
    arguments: dict[str, Any], error: type[Exception]
) -> None:
    """audit_context checks its actor on entry, naming the field."""
    with pytest.raises(error, match="actor_"), audit_context(**arguments):
        pass  # pragma: no cover - never entered


def test_audit_context_is_isolated_between_threads(
    make_session: MakeSession, recorder: Recorder, engine: Engine
) -> None:
    """Two threads inside different audit_contexts at once each stage their own actor."""
    Session = make_session()
    inside = threading.Barrier(2)
    staged = threading.Barrier(2)
    failures: list[BaseException] = []
    lock = threading.Lock()

    def work(user: str) -> None:
        try:
            with Session() as session, audit_context(actor_id=user, worker=user):
                inside.wait(timeout=10)  # both contexts are open now
                _stage(session, f"{user}-event")
                staged.wait(timeout=10)
                with lock:  # one SQLite writer at a time
                    operation(session, f"{user}-row")
                    session.commit()
        except BaseException as error:  # pragma: no cover - reported below
            failures.append(error)

    threads = [threading.Thread(target=work, args=(user,)) for user in ("ann", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    by_target = {e.target_id: (e.actor_id, dict(e.metadata)) for e in recorder.events}
    assert by_target == {
        "ann-event": ("ann", {"worker": "ann"}),
        "ann-row": ("ann", {"worker": "ann"}),
        "bob-event": ("bob", {"worker": "bob"}),
        "bob-row": ("bob", {"worker": "bob"}),
    }
    assert stored_names(engine) == ["ann-row", "bob-row"]
    with Session() as session:  # the main thread saw neither context
        _stage(session, "main")
        session.commit()
    assert recorder.events[-1].actor_id == "system"


def test_audit_context_is_isolated_between_asyncio_tasks(
    make_session: MakeSession, recorder: Recorder, engine: Engine
) -> None:
    """Two tasks gathered at once each stage with their own audit_context."""
    Session = make_session()
    both_inside = asyncio.Event()
    entered: list[str] = []

    async def task(user: str) -> None:
        with audit_context(actor_id=user, task=user):
            entered.append(user)
            if len(entered) == 2:
                both_inside.set()
            await both_inside.wait()  # the other task's context is open too
            with Session() as session:
                operation(session, user)  # no await until committed
                session.commit()
            await asyncio.sleep(0)
            with Session() as session:
                _stage(session, f"{user}-again")
                session.commit()

    async def main() -> None:
        with audit_context(actor_id="parent"):
            await asyncio.gather(task("ann"), task("bob"))
            with Session() as session:  # children did not change the parent's
                _stage(session, "parent")
                session.commit()

    asyncio.run(main())
    by_target = {e.target_id: (e.actor_id, dict(e.metadata)) for e in recorder.events}
    assert by_target == {
        "ann": ("ann", {"task": "ann"}),
        "ann-again": ("ann", {"task": "ann"}),
        "bob": ("bob", {"task": "bob"}),
        "bob-again": ("bob", {"task": "bob"}),
        "parent": ("parent", {}),
    }
    assert stored_names(engine) == ["ann", "bob"]


def test_audit_context_as_a_decorator(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """@audit_context(...) applies to each call of the function, and only inside it."""
    Session = make_session()

    @audit_context(actor_id="nightly-job", job="cleanup")
    def job(session: OrmSession, name: str) -> None:
        _stage(session, name)

    with Session() as session:
        job(session, "first")
        _stage(session, "between")
        job(session, "second")
        session.commit()
    assert _actors(recorder) == [
        ("nightly-job", None),
        ("system", None),
        ("nightly-job", None),
    ]
    assert [dict(envelope.metadata) for envelope in recorder.events] == [
        {"job": "cleanup"},
        {},
        {"job": "cleanup"},
    ]


def test_audit_context_decorates_async_functions(
    make_session: MakeSession, recorder: Recorder
) -> None:
    """@audit_context(...) on an ``async def`` applies while the coroutine runs."""
    Session = make_session()
    decorator = audit_context(actor_id="async-worker", queue="q1")

    @decorator
    async def handle(name: str) -> str:
        await asyncio.sleep(0)
        with Session() as session:
            _stage(session, name)
            session.commit()
        return name

    async def main() -> list[str]:
        return list(await asyncio.gather(handle("one"), handle("two")))

    assert asyncio.run(main()) == ["one", "two"]
    assert _actors(recorder) == [("async-worker", None), ("async-worker", None)]
    assert [dict(e.metadata) for e in recorder.events] == [{"queue": "q1"}] * 2


def test_actor_is_a_frozen_value() -> None:
    """Actor compares by value, is immutable, and refuses an empty id."""
    assert Actor("a", "a@example.com") == Actor("a", "a@example.com")
    assert Actor("a").email is None
    with pytest.raises(AttributeError):
        Actor("a").id = "b"  # type: ignore[misc]
    with pytest.raises(ValueError, match="actor_id"):
        Actor("")


@pytest.mark.parametrize(
    "make_actor",
    [
        lambda: audit_context(actor_id="u-\ud800"),
        lambda: Actor("u-7", "\udc80@example.com"),
    ],
    ids=["audit_context", "Actor"],
)
def test_actor_text_with_a_lone_surrogate_is_refused(make_actor: Any) -> None:
    """An actor field UTF-8 cannot encode is refused where the actor is made."""
    with pytest.raises(ValueError, match=r"actor_(id|email) holds a lone surrogate"):
        make_actor()
