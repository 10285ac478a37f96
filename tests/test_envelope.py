"""docs/concepts.md, "The envelope": what plugins receive, and its guarantees.

Envelopes come from real commits on SQLite (the envelope does not depend on the
database), except where noted. They round-trip through JSON, carry aware UTC
times and UUIDv7 ids in staging order, and are immutable all the way down.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import pickle
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import hypothesis
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import Recorder, operation

from access_audit import (
    AuditEmitter,
    AuditEventEnvelope,
    StagedEvent,
    hookimpl,
    stage_event,
)
from access_audit._clock import utc_datetime
from access_audit._envelope import stored_envelope

FIELDS = [field.name for field in dataclasses.fields(AuditEventEnvelope)]


@pytest.fixture
def engine(sqlite_file_engine: Engine) -> Engine:
    """SQLite only: the envelope does not depend on the database."""
    return sqlite_file_engine


def _stage(session: OrmSession, target_id: str, **fields: Any) -> None:
    stage_event(
        session,
        "item_changed",
        target_type="item",
        target_id=target_id,
        action="update",
        **fields,
    )


RICH_PAYLOAD: dict[str, Any] = {
    "roles": ["admin", "viewer"],
    "nested": {"list": [1, 2.5, None, True, {"deep": "é ☃"}], "empty": {}},
    "count": 3,
    "ratio": 0.1,
    "nothing": None,
}


def _committed(Session: sessionmaker, recorder: Recorder) -> AuditEventEnvelope:
    """Commit one event with every field set; return its envelope."""
    with Session() as session:
        operation(
            session,
            "round",
            target_name="Round Item",
            actor_id="u-1",
            actor_email="u1@example.com",
            reason="because",
            payload=RICH_PAYLOAD,
            metadata={"request_id": "r-1", "path": "/items"},
        )
        session.commit()
    return recorder.events[-1]


@pytest.fixture
def committed(Session: sessionmaker, recorder: Recorder) -> AuditEventEnvelope:
    """The envelope of one committed event with every field set."""
    return _committed(Session, recorder)


@pytest.mark.parametrize(
    "rebuild",
    [AuditEventEnvelope.from_dict, stored_envelope],
    ids=["from_dict", "stored_envelope"],
)
def test_json_round_trip_gives_an_equal_envelope(
    committed: AuditEventEnvelope, rebuild: Callable[[Any], AuditEventEnvelope]
) -> None:
    """from_dict(json.loads(e.to_json())) == e, field by field and as a whole;
    the relay's stored_envelope gives the same, read-only."""
    envelope = committed
    text = envelope.to_json()
    data = json.loads(text)
    assert set(data) == set(FIELDS)
    assert data["id"] == str(envelope.id)
    assert data["transaction_id"] == str(envelope.transaction_id)
    assert data["payload"] == RICH_PAYLOAD
    again = rebuild(data)
    assert again == envelope
    for name in FIELDS:
        assert getattr(again, name) == getattr(envelope, name), name
    with pytest.raises(TypeError):
        again.payload["nested"]["list"].append(1)  # type: ignore[index]
    assert rebuild(envelope.to_dict()) == envelope
    assert again.to_json() == text


def test_to_dict_is_plain_json_primitives(committed: AuditEventEnvelope) -> None:
    """to_dict() holds only str/int/float/bool/None, plain dicts and lists."""
    envelope = committed

    def check(value: Any) -> None:
        if isinstance(value, dict):
            assert type(value) is dict
            for key, item in value.items():
                assert type(key) is str
                check(item)
        elif isinstance(value, list):
            assert type(value) is list
            for item in value:
                check(item)
        else:
            assert value is None or type(value) in (str, int, float, bool)

    data = envelope.to_dict()
    check(data)
    data["payload"]["roles"].append("mutable")  # a plain copy, not the envelope
    assert envelope.payload["roles"] == ["admin", "viewer"]


def test_to_json_passes_options_to_json_dumps(committed: AuditEventEnvelope) -> None:
    """to_json(**options) forwards options such as sort_keys and indent."""
    envelope = committed
    pretty = envelope.to_json(sort_keys=True, indent=2)
    assert json.loads(pretty) == envelope.to_dict()
    assert pretty.startswith('{\n  "action"')
    keys = [line.split('"')[1] for line in pretty.splitlines()[1:-1] if line[2] == '"']
    assert keys == sorted(keys)
    assert '"action": ' in pretty  # indented output keeps json's own separators
    assert '"action":"' in envelope.to_json()  # the default is compact


def test_envelopes_hash_by_id(committed: AuditEventEnvelope) -> None:
    """Envelopes are hashable (by id), so they can go in sets and dict keys."""
    copy = AuditEventEnvelope.from_dict(committed.to_dict())
    assert hash(copy) == hash(committed) == hash(committed.id)
    assert {committed, copy} == {committed}


def test_from_dict_accepts_other_utc_offsets(committed: AuditEventEnvelope) -> None:
    """Times written with another offset come back as the same instant, in UTC."""
    envelope = committed
    data = envelope.to_dict()
    plus_two = timezone(timedelta(hours=2))
    data["timestamp"] = envelope.timestamp.astimezone(plus_two).isoformat()
    again = AuditEventEnvelope.from_dict(data)
    assert again.timestamp == envelope.timestamp
    assert again.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize("missing", FIELDS, ids=FIELDS)
@pytest.mark.parametrize(
    "rebuild",
    [AuditEventEnvelope.from_dict, stored_envelope],
    ids=["from_dict", "stored_envelope"],
)
def test_from_dict_names_a_missing_field(
    committed: AuditEventEnvelope,
    missing: str,
    rebuild: Callable[[Any], AuditEventEnvelope],
) -> None:
    """from_dict without a field raises ValueError naming exactly that field."""
    data = committed.to_dict()
    del data[missing]
    with pytest.raises(ValueError, match=re.escape(f"missing fields ['{missing}']")):
        rebuild(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "not-a-uuid"),
        ("transaction_id", 12),
        ("timestamp", "yesterday"),
        ("staged_at", "2024-01-01T00:00:00"),
    ],
    ids=["id-garbage", "transaction_id-int", "timestamp-garbage", "staged_at-naive"],
)
@pytest.mark.parametrize(
    "rebuild",
    [AuditEventEnvelope.from_dict, stored_envelope],
    ids=["from_dict", "stored_envelope"],
)
def test_from_dict_names_an_unparseable_field(
    committed: AuditEventEnvelope,
    field: str,
    value: object,
    rebuild: Callable[[Any], AuditEventEnvelope],
) -> None:
    """A value from_dict cannot parse raises ValueError naming its field."""
    data = committed.to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=field):
        rebuild(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sequence", "0"),
        ("event_type", 5),
        ("actor_id", None),
        ("target_id", 7),
        ("payload", [1]),
        ("metadata", None),
    ],
    ids=[
        "sequence-str",
        "event_type-int",
        "actor_id-none",
        "target_id-int",
        "payload-list",
        "metadata-none",
    ],
)
@pytest.mark.parametrize(
    "rebuild",
    [AuditEventEnvelope.from_dict, stored_envelope],
    ids=["from_dict", "stored_envelope"],
)
def test_from_dict_refuses_a_value_of_the_wrong_type(
    committed: AuditEventEnvelope,
    field: str,
    value: object,
    rebuild: Callable[[Any], AuditEventEnvelope],
) -> None:
    """from_dict refuses a field of the wrong JSON type with ValueError naming it."""
    data = committed.to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=field):
        rebuild(data)


@pytest.mark.parametrize(
    "rebuild",
    [AuditEventEnvelope.from_dict, stored_envelope],
    ids=["from_dict", "stored_envelope"],
)
def test_from_dict_names_an_unknown_field(
    committed: AuditEventEnvelope, rebuild: Callable[[Any], AuditEventEnvelope]
) -> None:
    """An extra key raises ValueError naming it, rather than being dropped."""
    data = committed.to_dict()
    data["colour"] = "red"
    with pytest.raises(ValueError, match=re.escape("unknown fields ['colour']")):
        rebuild(data)


def test_times_are_aware_utc_and_commit_follows_staging(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """timestamp and staged_at are aware UTC; timestamp >= staged_at, one per commit."""
    with Session() as session:
        for name in ("a", "b", "c"):
            operation(session, name)
        session.commit()
    for envelope in recorder.events:
        for moment in (envelope.timestamp, envelope.staged_at):
            assert moment.tzinfo is not None
            assert moment.utcoffset() == timedelta(0)
        assert envelope.timestamp >= envelope.staged_at
    assert len({envelope.timestamp for envelope in recorder.events}) == 1
    staged = [envelope.staged_at for envelope in recorder.events]
    assert staged == sorted(staged)
    assert max(staged) <= recorder.events[0].timestamp


def test_ids_are_uuid7_and_increase_in_staging_order(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Many events staged quickly get distinct UUIDv7 ids that sort in staging order."""
    with Session() as session:
        for number in range(2000):
            _stage(session, f"n{number}")
        session.commit()
        for number in range(2000, 2500):
            _stage(session, f"n{number}")
        session.commit()
    ids = [envelope.id for envelope in recorder.events]
    assert [envelope.target_id for envelope in recorder.events] == [
        f"n{number}" for number in range(2500)
    ]
    assert all(identifier.version == 7 for identifier in ids)
    assert all(identifier.variant == uuid.RFC_4122 for identifier in ids)
    assert all(earlier < later for earlier, later in itertools.pairwise(ids))
    assert all(
        earlier.bytes < later.bytes for earlier, later in itertools.pairwise(ids)
    )
    for envelope in recorder.events:
        # The first 48 bits are the Unix time in milliseconds of staging.
        stamp_ms = envelope.id.int >> 80
        staged_ms = int(envelope.staged_at.timestamp() * 1000)
        assert -1 <= staged_ms - stamp_ms <= 1000


def test_ids_stay_unique_and_ordered_across_threads(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Threads staging at once get unique ids; each thread's ids sort in its order."""
    threads_count, per_thread = 6, 400
    barrier = threading.Barrier(threads_count)
    failures: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            with Session() as session:
                barrier.wait(timeout=10)
                for number in range(per_thread):
                    _stage(session, f"{thread}:{number}")
                    if number % 100 == 99:
                        session.commit()  # no SQL: nothing locks the database
        except BaseException as error:  # pragma: no cover - reported below
            failures.append(error)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert failures == []
    events = recorder.events
    assert len(events) == threads_count * per_thread
    assert len({envelope.id for envelope in events}) == len(events)
    assert all(envelope.id.version == 7 for envelope in events)
    in_id_order = sorted(events, key=lambda envelope: envelope.id)
    for thread in range(threads_count):
        mine = [
            e.target_id for e in in_id_order if e.target_id.startswith(f"{thread}:")
        ]
        assert mine == [f"{thread}:{number}" for number in range(per_thread)]


def test_transaction_id_and_sequence_per_commit(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """One transaction_id per commit, a new one per commit; sequence is 0..n-1."""
    with Session() as session:
        for name in ("a", "b", "c"):
            operation(session, name)
        session.commit()
        for name in ("d", "e"):
            operation(session, name)
        session.commit()
    first, second = recorder.batches
    assert len({envelope.transaction_id for envelope in first}) == 1
    assert len({envelope.transaction_id for envelope in second}) == 1
    assert first[0].transaction_id != second[0].transaction_id
    assert first[0].transaction_id.version == 7
    assert [envelope.sequence for envelope in first] == [0, 1, 2]
    assert [envelope.sequence for envelope in second] == [0, 1]
    assert list(first) + list(second) == recorder.events
    assert isinstance(first, tuple)


def _assign(envelope: AuditEventEnvelope) -> None:
    envelope.payload["count"] = 4  # type: ignore[index]


def _delete(envelope: AuditEventEnvelope) -> None:
    del envelope.payload["count"]  # type: ignore[attr-defined]


def _pop(envelope: AuditEventEnvelope) -> None:
    envelope.payload.pop("count")  # type: ignore[attr-defined]


def _setdefault(envelope: AuditEventEnvelope) -> None:
    envelope.payload.setdefault("new", 1)  # type: ignore[attr-defined]


def _clear(envelope: AuditEventEnvelope) -> None:
    envelope.payload.clear()  # type: ignore[attr-defined]


def _in_place_or(envelope: AuditEventEnvelope) -> None:
    payload = envelope.payload
    payload |= {"new": 1}  # type: ignore[operator]


def _nested_append(envelope: AuditEventEnvelope) -> None:
    envelope.payload["roles"].append("root")


def _nested_extend(envelope: AuditEventEnvelope) -> None:
    envelope.payload["roles"] += ["root"]  # type: ignore[index]


def _nested_list_item(envelope: AuditEventEnvelope) -> None:
    envelope.payload["roles"][0] = "root"


def _nested_sort(envelope: AuditEventEnvelope) -> None:
    envelope.payload["roles"].sort()


def _nested_dict_update(envelope: AuditEventEnvelope) -> None:
    envelope.payload["nested"].update(empty={"x": 1})


def _deep_dict_in_list(envelope: AuditEventEnvelope) -> None:
    envelope.payload["nested"]["list"][4]["deep"] = "changed"


def _metadata_assign(envelope: AuditEventEnvelope) -> None:
    envelope.metadata["request_id"] = "forged"  # type: ignore[index]


def _metadata_update(envelope: AuditEventEnvelope) -> None:
    envelope.metadata.update(path="/forged")  # type: ignore[attr-defined]


MUTATIONS: dict[str, Callable[[AuditEventEnvelope], None]] = {
    "assign": _assign,
    "delete": _delete,
    "pop": _pop,
    "setdefault": _setdefault,
    "clear": _clear,
    "in-place-or": _in_place_or,
    "nested-list-append": _nested_append,
    "nested-list-extend": _nested_extend,
    "nested-list-item": _nested_list_item,
    "nested-list-sort": _nested_sort,
    "nested-dict-update": _nested_dict_update,
    "dict-inside-list": _deep_dict_in_list,
    "metadata-assign": _metadata_assign,
    "metadata-update": _metadata_update,
}


@pytest.mark.parametrize("mutate", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_payload_and_metadata_are_read_only(
    committed: AuditEventEnvelope, mutate: Callable[[AuditEventEnvelope], None]
) -> None:
    """Every way of changing payload or metadata, at any depth, raises TypeError."""
    envelope = committed
    before = envelope.to_dict()
    with pytest.raises(TypeError, match="read-only"):
        mutate(envelope)
    assert envelope.to_dict() == before


@pytest.mark.parametrize(
    "duplicate",
    [lambda e: pickle.loads(pickle.dumps(e)), copy.deepcopy, copy.copy],
    ids=["pickle", "deepcopy", "copy"],
)
def test_copies_of_an_envelope_stay_equal_and_read_only(
    committed: AuditEventEnvelope,
    duplicate: Callable[[AuditEventEnvelope], AuditEventEnvelope],
) -> None:
    """A pickled or copied envelope is equal, and its payload/metadata still read-only."""
    again = duplicate(committed)
    assert again == committed
    with pytest.raises(TypeError, match="read-only"):
        again.payload["roles"].append("root")
    with pytest.raises(TypeError, match="read-only"):
        again.metadata["request_id"] = "forged"  # type: ignore[index]
    assert again.payload == RICH_PAYLOAD


def test_read_only_values_still_behave_as_json(committed: AuditEventEnvelope) -> None:
    """json.dumps takes payload/metadata as they are; lists stay lists, dicts dicts."""
    envelope = committed
    assert json.loads(json.dumps(envelope.payload)) == RICH_PAYLOAD
    assert json.loads(json.dumps(envelope.metadata)) == {
        "request_id": "r-1",
        "path": "/items",
    }
    assert isinstance(envelope.payload, dict)
    assert isinstance(envelope.payload["roles"], list)
    assert isinstance(envelope.payload["nested"]["list"], list)
    assert isinstance(envelope.payload["nested"]["list"][4], dict)
    assert envelope.payload == RICH_PAYLOAD
    copied = dict(envelope.payload)
    copied["count"] = 99  # a copy is the caller's to change
    assert envelope.payload["count"] == 3


def test_tuples_in_the_payload_arrive_as_lists(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A tuple staged in the payload is a list in the envelope, as JSON would make it."""
    with Session() as session:
        _stage(session, "t", payload={"pair": (1, (2, 3))})
        session.commit()
    [envelope] = recorder.events
    assert isinstance(envelope.payload["pair"], list)
    assert isinstance(envelope.payload["pair"][1], list)
    assert envelope.payload == {"pair": [1, [2, 3]]}


class Meddler:
    """Tries every mutation on what it receives, then keeps a mutated copy."""

    def __init__(self) -> None:
        self.refused = 0
        self.copies: list[dict[str, Any]] = []

    @hookimpl(tryfirst=True)
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        for mutate in MUTATIONS.values():
            try:
                mutate(envelope)
            except TypeError:
                self.refused += 1
        copy = envelope.to_dict()
        copy["payload"]["roles"].append("root")
        self.copies.append(copy)


class Snapshot:
    """Records, after the meddler ran, what it is given."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl(trylast=True)
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.seen.append(json.loads(json.dumps(envelope.payload)))


def test_a_plugin_cannot_change_what_another_plugin_sees(
    Session: sessionmaker, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A plugin that tries to mutate an envelope fails; later plugins see the original."""
    meddler, snapshot = Meddler(), Snapshot()
    emitter.register(meddler)
    emitter.register(snapshot)
    envelope = _committed(Session, recorder)
    assert meddler.refused == len(MUTATIONS)
    assert meddler.copies[0]["payload"]["roles"] == ["admin", "viewer", "root"]
    assert snapshot.seen == [RICH_PAYLOAD]
    assert envelope.payload == RICH_PAYLOAD
    assert recorder.batches[0][0] is envelope  # one object for every plugin


def test_caller_changes_after_staging_do_not_reach_the_event(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Payload and metadata are copied at stage time; later caller edits are ignored."""
    payload: dict[str, Any] = {"roles": ["a"], "nested": {"k": 1}}
    metadata: dict[str, Any] = {"tags": ["t"], "request": {"id": "r"}}
    with Session() as session:
        _stage(session, "copied", payload=payload, metadata=metadata)
        payload["roles"].append("b")
        payload["nested"]["k"] = 2
        payload["added"] = True
        metadata["tags"].clear()
        metadata["request"]["id"] = "forged"
        session.commit()
    [envelope] = recorder.events
    assert envelope.payload == {"roles": ["a"], "nested": {"k": 1}}
    assert envelope.metadata == {"tags": ["t"], "request": {"id": "r"}}


def test_envelope_is_frozen_and_slotted(committed: AuditEventEnvelope) -> None:
    """Fields cannot be set or added: a frozen dataclass with __slots__, no __dict__."""
    envelope = committed
    assert dataclasses.is_dataclass(envelope)
    assert "__slots__" in vars(AuditEventEnvelope)
    assert not hasattr(envelope, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.event_type = "forged"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.payload = {}  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del envelope.actor_id  # type: ignore[misc]
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        envelope.extra = 1  # type: ignore[attr-defined]
    assert envelope.event_type == "item_created"


def test_hand_built_envelope_is_frozen_too() -> None:
    """An envelope built directly freezes the mappings it is given (copying them)."""
    payload: dict[str, Any] = {"roles": ["a"]}
    envelope = AuditEventEnvelope(
        id=uuid.UUID(int=1),
        event_type="x",
        timestamp=datetime.now(timezone.utc),
        staged_at=datetime.now(timezone.utc),
        actor_id="system",
        actor_email=None,
        target_type="item",
        target_id="1",
        target_name=None,
        action="create",
        reason=None,
        payload=payload,
        metadata={},
        transaction_id=uuid.UUID(int=2),
        sequence=0,
    )
    payload["roles"].append("b")
    assert envelope.payload == {"roles": ["a"]}
    with pytest.raises(TypeError):
        envelope.payload["roles"].append("c")
    assert AuditEventEnvelope.from_dict(json.loads(envelope.to_json())) == envelope


@hypothesis.given(
    staged_ns=hypothesis.strategies.integers(0, 8_000_000_000 * 10**9),
)
def test_staged_at_is_the_clock_reading_to_the_microsecond(staged_ns: int) -> None:
    """The staged event keeps a clock reading; its datetime is exact (truncated)."""
    staged = StagedEvent(
        uuid.uuid4().int,
        "x",
        staged_ns,
        "system",
        None,
        "t",
        "1",
        None,
        "a",
        None,
        {},
        {},
        False,
    )
    assert staged.staged_at == _from_gmtime(staged_ns)
    assert staged.staged_at.tzinfo is timezone.utc
    assert staged.id == uuid.UUID(int=staged._id_int)


def _from_gmtime(ns: int) -> datetime:
    """The oracle: the datetime of *ns* by the C library's calendar."""
    seconds, micros = divmod(ns // 1000, 1_000_000)
    return datetime(*time.gmtime(seconds)[:6], micros, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "start_ns",
    [
        1_764_000_000 * 10**9,
        951_782_399 * 10**9 + 999_999_000,  # 2000-02-28T23:59:59.999999
        1_735_689_599 * 10**9 + 999_999_999,  # 2024-12-31T23:59:59.999999999
        -1,  # 1969-12-31T23:59:59.999999
        0,
    ],
)
def test_datetimes_within_and_across_a_second_are_exact(start_ns: int) -> None:
    """Readings in one second (the calendar fields are reused) and the next."""
    readings = [start_ns + step for step in (0, 1, 1_000, 999, 2_000, 10**9, 10**9 + 7)]
    readings += [start_ns, start_ns - 10**9]  # back to an earlier second
    for ns in readings:
        assert utc_datetime(ns) == _from_gmtime(ns)


def test_committed_envelope_sets_every_field() -> None:
    """The fast envelope builder fills each dataclass field from the staged event."""
    import dataclasses

    from access_audit._envelope import committed_envelope

    staged = StagedEvent(
        1 << 100, "x.done", 1_764_000_000 * 10**9, "u-1", "u@example.com",
        "t", "1", "name", "a", "why", {"k": 1}, {"m": "v"}, False,
    )  # fmt: skip
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)
    transaction_id = uuid.UUID(int=7)
    envelope = committed_envelope(staged, moment, transaction_id, 3)
    assert type(envelope) is AuditEventEnvelope
    expected = {
        "id": staged.id, "event_type": "x.done", "timestamp": moment,
        "staged_at": staged.staged_at, "actor_id": "u-1",
        "actor_email": "u@example.com", "target_type": "t", "target_id": "1",
        "target_name": "name", "action": "a", "reason": "why",
        "payload": {"k": 1}, "metadata": {"m": "v"},
        "transaction_id": transaction_id, "sequence": 3,
    }  # fmt: skip
    fields = {field.name for field in dataclasses.fields(AuditEventEnvelope)}
    assert fields == set(expected)
    assert {name: getattr(envelope, name) for name in fields} == expected
