"""access_audit.testing: the recorder, ``capture_audit_events()`` and the pytest plugin."""

from __future__ import annotations

import asyncio
import io
import sys
import time
import unittest
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from support import Recorder, operation

from access_audit import AuditEmitter, JoinedTransactions, hookimpl, stage_event
from access_audit.testing import AuditEventRecorder, capture_audit_events

GENERATED_TESTS = """
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from access_audit import AuditEmitter, stage_event

emitter = AuditEmitter(load_entrypoints=False)
Session = sessionmaker(create_engine("sqlite://"))
emitter.attach(Session)


def approve(session, request_id, fail=False):
    stage_event(session, "access_approve", target_type="access_request",
                target_id=request_id, action="approve", actor_id="u-1",
                reason="looks fine")
    if fail:
        raise RuntimeError("granting the access failed")


def test_approval_emits(audit_events):
    with Session.begin() as session:
        approve(session, 12)
    envelope = audit_events.assert_emitted("access_approve", target_id=12, actor_id="u-1")
    assert envelope.reason == "looks fine"


def test_failed_approval_emits_nothing(audit_events):
    with pytest.raises(RuntimeError), Session.begin() as session:
        approve(session, 13, fail=True)
    audit_events.assert_not_emitted("access_approve")
    assert [d.reason for d in audit_events.discarded] == ["rollback"]


def test_wrongly_expects_the_failed_approval(audit_events):
    with Session.begin() as session:
        stage_event(session, "group_create", target_type="group", target_id=1,
                    target_name="admins", action="create", actor_id="u-9")
    with pytest.raises(RuntimeError), Session.begin() as session:
        approve(session, 14, fail=True)
    audit_events.assert_emitted("access_approve", target_id=14)
"""


def test_pytest_plugin_passes_and_fails_exactly_when_it_should(
    pytester: pytest.Pytester,
) -> None:
    """The fixture's assertions pass for emitted events and fail with a useful report."""
    pytester.makepyfile(test_generated=GENERATED_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*no 'access_approve' event with target_id=14 was emitted.*",
            "*Emitted events (1):*",
            "*#  event_type    target            actor  action*",
            "*0  group_create  group/1 (admins)  u-9    create*",
            "*'access_approve' was staged, then discarded by a rollback (1 event).*",
        ]
    )


def test_pytest_plugin_can_be_turned_off(pytester: pytest.Pytester) -> None:
    """``-p no:access_audit`` removes the fixture."""
    pytester.makepyfile(test_off="def test_uses(audit_events):\n    pass\n")
    result = pytester.runpytest(
        "-p", "no:access_audit", "-p", "no:cacheprovider", "-p", "no:asyncio"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'audit_events' not found*"])


PLUGIN_BUG_TEST = """
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from access_audit import AuditEmitter, hookimpl, stage_event

class Buggy:
    @hookimpl
    def audit_event_logged(self, envelope):
        raise KeyError("plugin bug")

emitter = AuditEmitter([Buggy()], load_entrypoints=False)
Session = sessionmaker(create_engine("sqlite://"))
emitter.attach(Session)

def test_commit(audit_events):
    with Session.begin() as session:
        stage_event(session, "tag_create", target_type="tag", target_id=1, action="create")
    audit_events.assert_emitted("tag_create")
"""


@pytest.mark.parametrize(
    ("ini", "outcome"),
    [("", {"passed": 1}), ("audit_raise_plugin_errors = true", {"failed": 1})],
    ids=["logged-by-default", "raised-with-ini-option"],
)
def test_ini_option_makes_plugin_errors_fail_the_test(
    pytester: pytest.Pytester, ini: str, outcome: dict[str, int]
) -> None:
    """With ``audit_raise_plugin_errors = true`` a plugin bug fails the test."""
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_bug=PLUGIN_BUG_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(**outcome)
    if "failed" in outcome:
        result.stdout.fnmatch_lines(["*KeyError: 'plugin bug'*"])


def test_recorder_sees_commit_rollback_savepoint_rollback_and_close(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Committed events are recorded in order; dropped ones with their reason."""
    with capture_audit_events() as audit_events, Session() as session:
        operation(session, "committed")
        savepoint = session.begin_nested()
        operation(session, "in-savepoint")
        savepoint.rollback()
        session.commit()
        operation(session, "rolled-back")
        session.rollback()
        operation(session, "closed")
    assert [e.target_id for e in audit_events.events] == ["committed"]
    assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
        ("in-savepoint", "savepoint_rollback"),
        ("rolled-back", "rollback"),
        ("closed", "close"),
    ]
    assert recorder.names == ["committed"]  # the real plugin still got it


def test_recorder_stops_recording_after_the_block(
    Session: sessionmaker,
) -> None:
    """Events committed after the block ends are not recorded."""
    with capture_audit_events() as audit_events:
        pass
    with Session.begin() as session:
        operation(session, "late")
    assert audit_events.events == []


def test_recorder_leaves_out_discards_of_events_staged_before_it(
    Session: sessionmaker,
) -> None:
    """An event an earlier test staged, discarded while this one records
    (its session collected now), is not this test's discard."""
    earlier = Session()
    operation(earlier, "earlier-test")
    with capture_audit_events() as audit_events, Session() as session:
        operation(session, "this-test")
        earlier.close()
        session.rollback()
    assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
        ("this-test", "rollback")
    ]


class SlowPlugin:
    """Takes a moment per batch, as a sink on the network does."""

    @hookimpl
    def audit_events_committed(self, envelopes: object) -> None:
        time.sleep(0.3)


def test_recorder_waits_for_background_dispatch(engine: Engine) -> None:
    """With ``dispatch="background"`` an assertion right after the commit
    sees the event, and what a block committed is delivered before it ends,
    never into the next block's recording."""
    emitter = AuditEmitter(
        [SlowPlugin()], load_entrypoints=False, dispatch="background"
    )
    maker = sessionmaker(engine)
    emitter.attach(maker)
    try:
        with capture_audit_events() as first:
            with maker.begin() as session:
                operation(session, "first")
            first.assert_emitted("item_created", target_id="first")
            with maker.begin() as session:
                operation(session, "second")
        with capture_audit_events() as following:
            time.sleep(0.5)
        assert [e.target_id for e in first.events] == ["first", "second"]
        assert following.events == []
    finally:
        emitter.close()


@pytest.mark.parametrize("joined", ["session", "outer"])
def test_recorder_inside_the_rollback_per_test_recipe(
    engine: Engine, emitter: AuditEmitter, joined: JoinedTransactions
) -> None:
    """The outer-transaction test recipe records on ``session.commit()``
    with ``joined_transactions="session"``; without it the event waits for
    the outer transaction, and a failing assertion says so."""
    emitter.joined_transactions = joined
    with engine.connect() as connection, capture_audit_events() as audit_events:
        outer = connection.begin()
        maker = sessionmaker(bind=connection, join_transaction_mode="create_savepoint")
        emitter.attach(maker)
        with maker() as session:
            operation(session, "inside-recipe")
            session.commit()
        if joined == "session":
            audit_events.assert_emitted("item_created", target_id="inside-recipe")
        else:
            with pytest.raises(AssertionError, match="wait for the outer transaction"):
                audit_events.assert_emitted("item_created")
        emitter.detach(maker)
        outer.rollback()


def test_recorder_leaves_out_events_an_earlier_block_committed(
    engine: Engine, emitter: AuditEmitter
) -> None:
    """A session joined to a connection a fixture keeps across tests: its
    events wait for the outer transaction, and are sent once the connection
    begins its next one, in the next test. They are that earlier test's."""
    with engine.connect() as connection:
        maker = sessionmaker(bind=connection)
        emitter.attach(maker)
        with capture_audit_events() as first, connection.begin(), maker() as session:
            operation(session, "first-test")
            session.commit()
        with capture_audit_events() as second:
            with connection.begin(), maker() as session:
                operation(session, "second-test")
                session.commit()
            connection.close()  # settles the second test's outer transaction
        emitter.detach(maker)
    assert [e.target_id for e in second.events] == ["second-test"]
    assert first.events == []  # sent after the block: recorded by neither


def test_recorder_records_under_a_clock_set_back(
    Session: sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that freezes time in the past (freezegun, time-machine) after
    recording began still records what it commits."""
    from access_audit import _lifecycle, _staging

    frozen = 1_577_836_800 * 10**9  # 2020-01-01
    with capture_audit_events() as audit_events:
        monkeypatch.setattr(_lifecycle, "time_ns", lambda: frozen)
        monkeypatch.setattr(_staging, "time_ns", lambda: frozen)
        with Session.begin() as session:
            operation(session, "in-2020")
    assert [e.target_id for e in audit_events.events] == ["in-2020"]
    assert audit_events.events[0].timestamp.year == 2020


def test_recorder_leaves_out_what_asyncio_dispatch_delivers_late(
    tmp_path: Path,
) -> None:
    """``dispatch="asyncio"`` delivers after the commit returned; a test that
    did not ``aflush()`` had its events recorded by the next one."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    class SlowAsyncPlugin:
        @hookimpl
        async def audit_event_logged(self, envelope: object) -> None:
            await asyncio.sleep(0.05)

    emitter = AuditEmitter(
        [SlowAsyncPlugin()], load_entrypoints=False, dispatch="asyncio"
    )

    async def run() -> tuple[list[str], list[str]]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        with capture_audit_events() as first:
            async with maker.begin() as session:
                stage_event(session, "tag_create", target_type="tag",
                            target_id="first", action="create")  # fmt: skip
        with capture_audit_events() as second:
            await emitter.aflush(10)
        await engine.dispose()
        return [e.target_id for e in first.events], [e.target_id for e in second.events]

    assert asyncio.run(run()) == ([], [])


class FailingPlugin:
    @hookimpl
    def audit_event_logged(self, envelope: object) -> None:
        raise KeyError("plugin bug")


def test_strict_capture_fails_on_what_background_dispatch_raised(
    engine: Engine,
) -> None:
    """``raise_plugin_errors`` cannot raise into a commit that returned
    before the worker delivered: the block's end raises the first error
    instead (it only logged it)."""
    emitter = AuditEmitter(
        [FailingPlugin()], load_entrypoints=False, dispatch="background"
    )
    maker = sessionmaker(engine)
    emitter.attach(maker)
    try:
        with (
            pytest.raises(KeyError, match="plugin bug") as raised,
            capture_audit_events(raise_plugin_errors=True),
            maker.begin() as session,
        ):
            operation(session, "delivered-late")
        notes = getattr(raised.value, "__notes__", [])
        assert sys.version_info < (3, 11) or any("background" in n for n in notes)
        with capture_audit_events(raise_plugin_errors=True):
            pass  # the error was the earlier block's: nothing raised here
    finally:
        emitter.close()


@pytest.fixture
def recorded() -> AuditEventRecorder:
    """A recorder holding three hand-staged events on SQLite in memory."""
    from sqlalchemy import create_engine

    emitter = AuditEmitter(load_entrypoints=False)
    maker = sessionmaker(create_engine("sqlite://"))
    emitter.attach(maker)
    with capture_audit_events() as audit_events, maker.begin() as session:
        stage_event(
            session,
            "group_member_added",
            target_type="group",
            target_id=7,
            action="add_member",
            actor_id="u-1",
            payload={"user": {"id": 3, "name": "ada"}, "roles": ["viewer"]},
            metadata={"request_id": "r-1"},
        )
        stage_event(
            session,
            "group_member_added",
            target_type="group",
            target_id=8,
            action="add",
        )
        stage_event(session, "tag_create", target_type="tag", target_id="t", action="c")
    return audit_events


def test_filter_matches_fields_subsets_and_predicates(
    recorded: AuditEventRecorder,
) -> None:
    """Filters compare fields; payload/metadata are subsets; callables are predicates."""
    assert len(recorded.filter(payload={"roles": ("viewer",)})) == 1  # as staged
    assert len(recorded.filter()) == 3
    assert len(recorded.filter("group_member_added")) == 2
    assert [e.target_id for e in recorded.filter(target_id=7)] == ["7"]
    assert len(recorded.filter(payload={"user": {"id": 3}})) == 1
    assert recorded.filter(payload={"user": {"id": 4}}) == []
    assert recorded.filter(payload={"missing": 1}) == []
    assert len(recorded.filter(metadata={"request_id": "r-1"})) == 1
    assert len(recorded.filter(actor_id=lambda actor: actor != "system")) == 1
    with pytest.raises(TypeError, match="unknown envelope field"):
        recorded.filter(colour="red")


def test_assert_emitted_returns_the_first_match(recorded: AuditEventRecorder) -> None:
    """``assert_emitted`` returns the first matching envelope."""
    envelope = recorded.assert_emitted("group_member_added")
    assert envelope.target_id == "7"
    with pytest.raises(AssertionError, match="no 'group_member_added' event with"):
        recorded.assert_emitted("group_member_added", actor_id="u-2")


def test_assert_not_emitted_lists_what_matched(recorded: AuditEventRecorder) -> None:
    """``assert_not_emitted`` fails listing the matches, and passes when none match."""
    recorded.assert_not_emitted("access_approve")
    recorded.assert_not_emitted("tag_create", target_id="other")
    with pytest.raises(AssertionError, match=r"(?s)but 1 matched:.*tag/t"):
        recorded.assert_not_emitted("tag_create")
    with pytest.raises(AssertionError, match="but 3 matched"):
        recorded.assert_not_emitted()


def test_clear_forgets_everything(recorded: AuditEventRecorder) -> None:
    """``clear()`` empties events and discarded."""
    recorded.clear()
    assert recorded.events == [] and recorded.discarded == []
    with pytest.raises(AssertionError, match=r"Emitted events \(0\)"):
        recorded.assert_emitted("tag_create")


def test_capture_raise_plugin_errors_raises_after_all_plugins(
    Session: sessionmaker, recorder: Recorder, emitter: AuditEmitter
) -> None:
    """``capture_audit_events(raise_plugin_errors=True)`` makes a plugin bug raise."""

    class Buggy:
        @hookimpl(tryfirst=True)
        def audit_event_logged(self, envelope: object) -> None:
            raise KeyError("plugin bug")

    emitter.register(Buggy())
    with (
        capture_audit_events(raise_plugin_errors=True) as audit_events,
        pytest.raises(KeyError, match="plugin bug"),
        Session.begin() as session,
    ):
        operation(session, "strict")
    assert recorder.names == ["strict"]  # the other plugin still ran
    audit_events.assert_emitted("item_created", target_id="strict")
    with Session.begin() as session:  # outside the block: logged only
        operation(session, "lenient")
    assert recorder.names == ["strict", "lenient"]


def test_capture_works_in_a_unittest_testcase() -> None:
    """``capture_audit_events()`` serves a plain ``unittest.TestCase``."""
    from sqlalchemy import create_engine

    emitter = AuditEmitter(load_entrypoints=False)
    maker = sessionmaker(create_engine("sqlite://"))
    emitter.attach(maker)

    class ApprovalTest(unittest.TestCase):
        def test_emits(self) -> None:
            with capture_audit_events() as audit_events, maker.begin() as session:
                stage_event(
                    session, "tag_create", target_type="tag", target_id=1, action="c"
                )
            audit_events.assert_emitted("tag_create", target_id=1)

        def test_wrong_expectation(self) -> None:
            with capture_audit_events() as audit_events, maker.begin() as session:
                stage_event(
                    session, "tag_create", target_type="tag", target_id=1, action="c"
                )
            audit_events.assert_emitted("tag_delete")

    suite = unittest.defaultTestLoader.loadTestsFromTestCase(ApprovalTest)
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
    assert result.testsRun == 2
    assert [test.id().rsplit(".", 1)[1] for test, _ in result.failures] == [
        "test_wrong_expectation"
    ]
    assert "no 'tag_delete' event was emitted" in result.failures[0][1]
    assert result.errors == []


def test_every_discard_reason_has_a_description() -> None:
    """The recorder's failure messages name each DiscardReason there is."""
    from access_audit._types import DISCARD_REASONS
    from access_audit.testing._recorder import _REASONS

    assert set(_REASONS) == set(DISCARD_REASONS)
