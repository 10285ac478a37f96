"""docs/semantics.md, "Refused at stage time": every refusal names the field, and loses nothing.

A bad ``stage_event`` call fails at once with ``ValueError`` or ``TypeError``
and a message naming the field; nothing of it is parked, so the next good
event commits alone. A lazy value that raises or resolves to garbage fails the
``commit()`` before COMMIT, and lazy values are never called for a transaction
that does not commit. The tests that touch the database run on all three.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from support import Item, Recorder, operation, stored_names

from access_audit import AuditEmitter, StagedEvent, signals, stage_event

GOOD: dict[str, Any] = {
    "event_type": "item_created",
    "target_type": "item",
    "target_id": "bad",
    "action": "create",
}


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"x": value}
    return value


def _self_referencing() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


# Python's default int-to-str limit is 4,300 digits: json.dumps refuses more.
LARGEST_INT = 10**4300 - 1
"""The largest int an event may carry: 4,300 digits."""
TOO_MANY_DIGITS = 10**4300
"""4,301 digits: refused wherever an event would carry it."""
HUGE_INT = "is an int of more than 4300 digits.*pass it as a str"
SURROGATE = "holds a lone surrogate"


class Whole(int):
    """An int subclass: frozen as a plain int, checked like one."""


class Text(str):
    """A str subclass: frozen as a plain str, checked like one."""


# (id, keyword arguments replacing GOOD's, exception type, regex the message matches)
BAD_INPUTS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    # event_type
    ("event_type-empty", {"event_type": ""}, ValueError, "event_type"),
    ("event_type-upper", {"event_type": "Item_Created"}, ValueError, "event_type"),
    ("event_type-digit-first", {"event_type": "1item"}, ValueError, "event_type"),
    ("event_type-underscore-first", {"event_type": "_item"}, ValueError, "event_type"),
    ("event_type-hyphen", {"event_type": "item-created"}, ValueError, "event_type"),
    ("event_type-space", {"event_type": "item created"}, ValueError, "event_type"),
    ("event_type-padded", {"event_type": " item_created"}, ValueError, "event_type"),
    ("event_type-newline", {"event_type": "item_created\n"}, ValueError, "event_type"),
    ("event_type-129", {"event_type": "a" * 129}, ValueError, "event_type"),
    ("event_type-int", {"event_type": 42}, TypeError, "event_type"),
    ("event_type-none", {"event_type": None}, TypeError, "event_type"),
    ("event_type-bytes", {"event_type": b"item_created"}, TypeError, "event_type"),
    ("event_type-list", {"event_type": ["item_created"]}, TypeError, "event_type"),
    ("action-list", {"action": ["create"]}, TypeError, "action"),
    ("event_type-trailing-dot", {"event_type": "grp."}, ValueError, "dot-separated"),
    ("event_type-double-dot", {"event_type": "a..b"}, ValueError, "dot-separated"),
    ("event_type-leading-dot", {"event_type": ".a"}, ValueError, "dot-separated"),
    (
        "event_type-empty-last-token",
        {"event_type": "grp.member."},
        ValueError,
        r"event_type 'grp\.member\.' is malformed",
    ),
    # target_type and action
    ("target_type-empty", {"target_type": ""}, ValueError, "target_type"),
    ("target_type-leading", {"target_type": " item"}, ValueError, "target_type"),
    ("target_type-trailing", {"target_type": "item "}, ValueError, "target_type"),
    ("target_type-blank", {"target_type": "   "}, ValueError, "target_type"),
    ("target_type-control", {"target_type": "it\nem"}, ValueError, "target_type"),
    ("target_type-129", {"target_type": "t" * 129}, ValueError, "target_type"),
    ("target_type-int", {"target_type": 1}, TypeError, "target_type"),
    ("target_type-dict", {"target_type": {}}, TypeError, "target_type"),
    ("target_type-none", {"target_type": None}, TypeError, "target_type"),
    ("action-empty", {"action": ""}, ValueError, "action"),
    ("action-leading", {"action": "\tcreate"}, ValueError, "action"),
    ("action-trailing", {"action": "create "}, ValueError, "action"),
    ("action-129", {"action": "c" * 129}, ValueError, "action"),
    ("action-int", {"action": 1}, TypeError, "action"),
    # target_id, target_name, reason, actor
    ("target_id-float", {"target_id": 1.5}, TypeError, "target_id"),
    ("target_id-none", {"target_id": None}, TypeError, "target_id"),
    ("target_id-true", {"target_id": True}, TypeError, "target_id"),
    ("target_id-false", {"target_id": False}, TypeError, "target_id"),
    ("target_id-bytes", {"target_id": b"id"}, TypeError, "target_id"),
    ("target_id-list", {"target_id": ["id"]}, TypeError, "target_id"),
    ("target_id-object", {"target_id": object()}, TypeError, "target_id"),
    ("target_id-empty", {"target_id": ""}, ValueError, "target_id"),
    (
        "target_id-int-4301-digits",
        {"target_id": TOO_MANY_DIGITS},
        ValueError,
        "^target_id " + HUGE_INT,
    ),
    (
        "target_id-int-5000-digits",
        {"target_id": 10**4999},
        ValueError,
        "^target_id " + HUGE_INT,
    ),
    (
        "target_id-negative-int-4301-digits",
        {"target_id": -TOO_MANY_DIGITS},
        ValueError,
        "^target_id " + HUGE_INT,
    ),
    (
        "target_id-surrogate",
        {"target_id": "id-\ud800"},
        ValueError,
        "^target_id " + SURROGATE,
    ),
    (
        "target_name-surrogate",
        {"target_name": "\udce9"},
        ValueError,
        "^target_name " + SURROGATE,
    ),
    ("reason-surrogate", {"reason": "caf\udce9"}, ValueError, "^reason " + SURROGATE),
    (
        "actor_id-surrogate",
        {"actor_id": "u-\ud800"},
        ValueError,
        "^stage_event: actor_id " + SURROGATE,
    ),
    (
        "actor_email-surrogate",
        {"actor_id": "u-7", "actor_email": "\udc80@example.com"},
        ValueError,
        "^stage_event: actor_email " + SURROGATE,
    ),
    ("target_name-int", {"target_name": 5}, TypeError, "target_name"),
    ("reason-int", {"reason": 5}, TypeError, "reason"),
    ("actor_id-int", {"actor_id": 42}, TypeError, "actor_id"),
    ("actor_id-empty", {"actor_id": ""}, ValueError, "actor_id"),
    ("actor_id-blank", {"actor_id": "  "}, ValueError, "actor_id"),
    (
        "actor_email-int",
        {"actor_id": "someone", "actor_email": 5},
        TypeError,
        "actor_email",
    ),
    (
        "actor_email-without-actor_id",
        {"actor_email": "a@example.com"},
        ValueError,
        "actor_email",
    ),
    # payload
    ("payload-set", {"payload": {"when": {1, 2}}}, TypeError, r"payload\['when'\]"),
    (
        "payload-frozenset",
        {"payload": {"when": frozenset()}},
        TypeError,
        r"payload\['when'\]",
    ),
    ("payload-bytes", {"payload": {"when": b"x"}}, TypeError, r"payload\['when'\]"),
    (
        "payload-datetime",
        {"payload": {"when": datetime.datetime.now(datetime.timezone.utc)}},
        TypeError,
        r"payload\['when'\]",
    ),
    (
        "payload-date",
        {"payload": {"when": datetime.date(2024, 1, 1)}},
        TypeError,
        r"payload\['when'\]",
    ),
    (
        "payload-decimal",
        {"payload": {"when": decimal.Decimal("1.5")}},
        TypeError,
        r"payload\['when'\]",
    ),
    (
        "payload-uuid",
        {"payload": {"when": uuid.uuid4()}},
        TypeError,
        r"payload\['when'\]",
    ),
    (
        "payload-object",
        {"payload": {"when": object()}},
        TypeError,
        r"payload\['when'\]",
    ),
    ("payload-complex", {"payload": {"when": 1j}}, TypeError, r"payload\['when'\]"),
    (
        "payload-nested-path",
        {"payload": {"a": {"b": [1, b"x"]}}},
        TypeError,
        r"payload\['a'\]\['b'\]\[1\]",
    ),
    ("payload-int-key", {"payload": {1: "x"}}, TypeError, "payload"),
    ("payload-none-key", {"payload": {None: "x"}}, TypeError, "payload"),
    (
        "payload-nested-tuple-key",
        {"payload": {"a": {(1, 2): "x"}}},
        TypeError,
        r"payload\['a'\]",
    ),
    ("payload-nan", {"payload": {"x": float("nan")}}, ValueError, r"payload\['x'\]"),
    ("payload-inf", {"payload": {"x": float("inf")}}, ValueError, r"payload\['x'\]"),
    (
        "payload-nested-minus-inf",
        {"payload": {"x": [float("-inf")]}},
        ValueError,
        r"payload\['x'\]\[0\]",
    ),
    ("payload-too-deep", {"payload": _deep(40)}, ValueError, "payload"),
    ("payload-self-reference", {"payload": _self_referencing()}, ValueError, "payload"),
    ("payload-list", {"payload": [1, 2]}, TypeError, "payload"),
    ("payload-str", {"payload": "text"}, TypeError, "payload"),
    ("payload-int", {"payload": 3}, TypeError, "payload"),
    ("payload-tuple", {"payload": ("a",)}, TypeError, "payload"),
    (
        "payload-int-4301-digits",
        {"payload": {"count": TOO_MANY_DIGITS}},
        ValueError,
        r"^payload\['count'\] " + HUGE_INT,
    ),
    (
        "payload-negative-int-4301-digits",
        {"payload": {"count": -TOO_MANY_DIGITS}},
        ValueError,
        r"^payload\['count'\] " + HUGE_INT,
    ),
    (
        "payload-nested-int-5000-digits",
        {"payload": {"a": {"b": [1, 10**4999]}}},
        ValueError,
        r"^payload\['a'\]\['b'\]\[1\] " + HUGE_INT,
    ),
    (
        "payload-int-subclass-4301-digits",
        {"payload": {"count": Whole(TOO_MANY_DIGITS)}},
        ValueError,
        r"^payload\['count'\] " + HUGE_INT,
    ),
    (
        "payload-surrogate",
        {"payload": {"note": "caf\udce9"}},
        ValueError,
        r"^payload\['note'\] " + SURROGATE,
    ),
    (
        "payload-nested-surrogate",
        {"payload": {"a": ["ok", {"b": "\ud800"}]}},
        ValueError,
        r"^payload\['a'\]\[1\]\['b'\] " + SURROGATE,
    ),
    (
        "payload-str-subclass-surrogate",
        {"payload": {"note": Text("\ud800")}},
        ValueError,
        r"^payload\['note'\] " + SURROGATE,
    ),
    (
        "payload-surrogate-key",
        {"payload": {"caf\udce9": 1}},
        ValueError,
        "^payload has the key .* " + SURROGATE,
    ),
    (
        "payload-nested-surrogate-key",
        {"payload": {"a": {"\ud800": 1}}},
        ValueError,
        r"^payload\['a'\] has the key .* " + SURROGATE,
    ),
    # metadata
    ("metadata-set", {"metadata": {"when": {1}}}, TypeError, r"metadata\['when'\]"),
    ("metadata-bytes", {"metadata": {"when": b"x"}}, TypeError, r"metadata\['when'\]"),
    (
        "metadata-datetime",
        {"metadata": {"when": datetime.datetime.now(datetime.timezone.utc)}},
        TypeError,
        r"metadata\['when'\]",
    ),
    (
        "metadata-object",
        {"metadata": {"when": object()}},
        TypeError,
        r"metadata\['when'\]",
    ),
    (
        "metadata-lazy",
        {"metadata": {"when": lambda: "later"}},
        TypeError,
        r"metadata\['when'\]",
    ),
    ("metadata-int-key", {"metadata": {1: "x"}}, TypeError, "metadata"),
    ("metadata-nan", {"metadata": {"x": float("nan")}}, ValueError, r"metadata\['x'\]"),
    ("metadata-list", {"metadata": [1]}, TypeError, "metadata"),
    ("metadata-str", {"metadata": "text"}, TypeError, "metadata"),
    (
        "metadata-int-4301-digits",
        {"metadata": {"count": TOO_MANY_DIGITS}},
        ValueError,
        r"^metadata\['count'\] " + HUGE_INT,
    ),
    (
        "metadata-surrogate",
        {"metadata": {"agent": "\udcff"}},
        ValueError,
        r"^metadata\['agent'\] " + SURROGATE,
    ),
    (
        "metadata-surrogate-key",
        {"metadata": {"\ud800": "x"}},
        ValueError,
        "^metadata has the key .* " + SURROGATE,
    ),
]


@pytest.fixture
def discarded(emitter: AuditEmitter) -> Iterator[list[tuple[StagedEvent, str]]]:
    """The (event, reason) pairs ``audit_event_discarded`` sends for ``emitter``."""
    received: list[tuple[StagedEvent, str]] = []

    def receiver(sender: object, *, event: StagedEvent, reason: str) -> None:
        received.append((event, reason))

    signals.audit_event_discarded.connect(receiver, sender=emitter)
    yield received
    signals.audit_event_discarded.disconnect(receiver, sender=emitter)


def _assert_only_good_committed(recorder: Recorder, engine: Engine) -> None:
    assert recorder.names == ["good"]
    assert [len(batch) for batch in recorder.batches] == [1]
    assert stored_names(engine) == ["good"]


@pytest.mark.parametrize(
    ("fields", "error", "names"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_refused_naming_the_field(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    discarded: list[tuple[StagedEvent, str]],
    fields: dict[str, Any],
    error: type[Exception],
    names: str,
) -> None:
    """Bad input raises the right type naming the field; the next event commits alone."""
    with Session() as session:
        with pytest.raises(error, match=names) as raised:
            stage_event(session, **{**GOOD, **fields})
        assert type(raised.value) is error
        operation(session, "good")
        session.commit()
    _assert_only_good_committed(recorder, engine)
    assert discarded == []


@pytest.mark.parametrize(
    "fields",
    [
        {"event_type": "a" * 128},
        {"event_type": "a.b_2.c"},
        {"target_type": "t" * 128, "action": "c" * 128},
        {"target_type": "Group Member", "action": "add-member"},
        {"target_id": 0},
        {"target_id": uuid.UUID(int=7)},
        {"payload": {"tuple": (1, 2), "none": None, "float": 1.5, "ok": True}},
    ],
    ids=[
        "event_type-128",
        "event_type-dots-digits",
        "names-128",
        "names-inner-space-hyphen",
        "target_id-zero",
        "target_id-uuid",
        "payload-plain-json",
    ],
)
def test_edge_of_valid_input_is_accepted(
    Session: sessionmaker, recorder: Recorder, fields: dict[str, Any]
) -> None:
    """Values just inside the rules are staged and emitted unchanged (ids as str)."""
    with Session() as session:
        stage_event(session, **{**GOOD, **fields})
        session.commit()
    [envelope] = recorder.events
    for name, value in fields.items():
        if name == "target_id":
            assert envelope.target_id == str(value)
        elif name == "payload":
            assert envelope.payload == {**value, "tuple": [1, 2]}
        else:
            assert getattr(envelope, name) == value


@pytest.mark.parametrize(
    "fields",
    [
        {"payload": {"count": LARGEST_INT, "negative": -LARGEST_INT}},
        {"metadata": {"count": LARGEST_INT}},
        {"target_id": LARGEST_INT},
        {"target_id": lambda: LARGEST_INT, "payload": {"count": lambda: LARGEST_INT}},
        {
            "target_id": "ïd-☕",
            "target_name": "Zoë 😀",
            "reason": "café",
            "actor_id": "ü-7",
            "actor_email": "zoë@example.com",
            "payload": {"naïve": ["日本", {"ключ": "значение"}]},
            "metadata": {"agent": "Mozilla/5.0 (ñ)"},
        },
        {"event_type": "grp.member_added.v2"},
        {"event_type": "a._1.b2"},
    ],
    ids=[
        "payload-int-4300-digits",
        "metadata-int-4300-digits",
        "target_id-int-4300-digits",
        "lazy-int-4300-digits",
        "non-ascii-text",
        "event_type-dotted",
        "event_type-dotted-underscore-digit",
    ],
)
def test_values_at_the_limits_are_accepted_and_encode(
    Session: sessionmaker, recorder: Recorder, fields: dict[str, Any]
) -> None:
    """4,300-digit ints, non-ASCII text and dotted types stage and encode as UTF-8 JSON."""
    with Session() as session:
        stage_event(session, **{**GOOD, **fields})
        session.commit()
    [envelope] = recorder.events
    encoded = envelope.to_json(ensure_ascii=False).encode("utf-8")
    decoded = json.loads(encoded)
    for name, value in fields.items():
        if callable(value):
            value = value()
        elif name == "payload" and callable(value.get("count")):
            value = {"count": value["count"]()}
        if name == "target_id":
            value = str(value)
        assert getattr(envelope, name) == value
        assert decoded[name] == value


class Colour(str, enum.Enum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 3


def test_str_and_int_subclasses_become_plain_values(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Str/int enum members are accepted and arrive as plain ``str``/``int``."""
    with Session() as session:
        stage_event(
            session,
            **{**GOOD, "target_id": Size.BIG},
            payload={"colour": Colour.RED, "size": Size.BIG},
        )
        session.commit()
    [envelope] = recorder.events
    assert envelope.target_id == "3"
    assert type(envelope.payload["colour"]) is str
    assert type(envelope.payload["size"]) is int
    assert envelope.payload == {"colour": "red", "size": 3}


class _Hostile(int):
    """An int subclass whose conversions raise: its value is still an int."""

    def __int__(self) -> int:
        raise RuntimeError("__int__ of a hostile int")

    def __index__(self) -> int:
        raise RuntimeError("__index__ of a hostile int")

    def __str__(self) -> str:
        raise RuntimeError("__str__ of a hostile int")

    __repr__ = __str__


class _HostileFloat(float):
    def __float__(self) -> float:
        raise RuntimeError("__float__ of a hostile float")


class _HostileUUID(uuid.UUID):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of a hostile UUID")


def test_subclasses_are_taken_by_their_value_whatever_they_override(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """An int, float or UUID subclass whose ``__int__``, ``__float__`` or
    ``__str__`` raises is stored by its value, as ``json.dumps`` would write
    it: the subclass's own conversion is never asked (it raised out of
    ``stage_event`` naming nothing)."""
    key = uuid.UUID(int=7)
    with Session() as session:
        stage_event(
            session, **{**GOOD, "target_id": _Hostile(12)},
            payload={"n": _Hostile(5), "f": _HostileFloat(0.5), "l": [_Hostile(6)]},
        )  # fmt: skip
        stage_event(session, **{**GOOD, "target_id": _HostileUUID(int=7)})
        stage_event(session, **{**GOOD, "target_id": lambda: _Hostile(13)})
        session.commit()
    first, second, third = recorder.events
    assert first.target_id == "12"
    assert first.payload == {"n": 5, "f": 0.5, "l": [6]}
    assert [type(first.payload[name]) for name in ("n", "f")] == [int, float]
    assert type(first.payload["l"][0]) is int
    assert second.target_id == str(key)
    assert third.target_id == "13"


class _CaseBlind(str):
    """A case-insensitive str: equal to, and hashing as, its lower case."""

    def __hash__(self) -> int:
        return hash(self.lower())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.lower() == other.lower()


class _Unhashable(str):
    def __hash__(self) -> int:
        raise RuntimeError("__hash__ of a hostile str")

    def strip(self, chars: str | None = None) -> str:
        raise RuntimeError("strip of a hostile str")


def test_str_subclass_names_are_read_as_plain_str_whatever_they_override(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """``event_type``, ``target_type``, ``action`` and ``actor_id`` of a
    str subclass are read as the base type reads them: the names checked
    before are not looked up through the subclass's ``__hash__`` or
    ``__eq__`` (a case-insensitive str passed as a name staged before, and
    one that raises in them raised naming nothing), nor its ``strip()``."""
    with Session() as session:
        stage_event(session, **GOOD)  # the plain names, remembered
        with pytest.raises(ValueError, match="event_type 'Item_Created'"):
            stage_event(session, **{**GOOD, "event_type": _CaseBlind("Item_Created")})
        stage_event(
            session,
            **{
                **GOOD,
                "event_type": _Unhashable(GOOD["event_type"]),
                "target_type": _Unhashable(GOOD["target_type"]),
                "action": _Unhashable(GOOD["action"]),
                "actor_id": _Unhashable("admin-7"),
            },
        )
        session.commit()
    first, second = recorder.events
    fields = ("event_type", "target_type", "action")
    assert [getattr(second, name) for name in fields] == [
        getattr(first, name) for name in fields
    ]
    assert [type(getattr(second, name)) for name in fields] == [str] * 3
    assert (second.actor_id, type(second.actor_id)) == ("admin-7", str)


class Kind(str, enum.Enum):
    """A str-mixin enum, as apps name event types and targets."""

    CREATED = "item.created"
    item = "item"  # hashes as its name, equal to a name checked before
    CREATE = "create"
    ADMIN = "admin-7"


def test_str_enum_names_and_actor_arrive_as_plain_str(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """A str-mixin enum member as ``event_type``, ``target_type``,
    ``action`` or ``actor_id`` arrives as its plain value, as it does
    through the outbox: inline, ``str()`` and the CloudEvent of such an
    event said ``Kind.CREATED``, through the relay ``item.created``."""
    with Session() as session:
        stage_event(session, "item.created", target_type="item", target_id="0",
                    action="create")  # fmt: skip
        stage_event(
            session, Kind.CREATED, target_type=Kind.item, target_id="1",
            action=Kind.CREATE, actor_id=Kind.ADMIN, actor_email=Kind.ADMIN,
        )  # fmt: skip
        session.commit()
    envelope = recorder.events[-1]
    fields = ("event_type", "target_type", "action")
    assert [type(getattr(envelope, name)) for name in fields] == [str] * 3
    assert type(envelope.actor_id) is str and type(envelope.actor_email) is str
    assert f"{envelope.event_type} {envelope.target_type} {envelope.action}" == (
        "item.created item create"
    )
    assert (envelope.actor_id, envelope.actor_email) == ("admin-7", "admin-7")


def _raise() -> Any:
    raise ZeroDivisionError("the lazy value broke")


def _nan() -> float:
    return float("nan")


# (id, keyword arguments replacing GOOD's, exception type, regex the message matches)
BAD_LAZIES: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("target_id-raises", {"target_id": _raise}, ValueError, "target_id"),
    ("target_id-none", {"target_id": lambda: None}, TypeError, "target_id"),
    ("target_id-object", {"target_id": object}, TypeError, "target_id"),
    ("target_id-bool", {"target_id": lambda: True}, TypeError, "target_id"),
    ("target_id-empty", {"target_id": lambda: ""}, ValueError, "target_id"),
    ("target_name-raises", {"target_name": _raise}, ValueError, "target_name"),
    ("target_name-int", {"target_name": lambda: 5}, TypeError, "target_name"),
    (
        "payload-raises",
        {"payload": {"x": _raise}},
        ValueError,
        r"payload\['x'\]",
    ),
    (
        "payload-object",
        {"payload": {"x": object}},
        TypeError,
        r"payload\['x'\]",
    ),
    (
        "payload-bytes",
        {"payload": {"x": lambda: b"raw"}},
        TypeError,
        r"payload\['x'\]",
    ),
    ("payload-nan", {"payload": {"x": _nan}}, ValueError, r"payload\['x'\]"),
    (
        "target_id-int-5000-digits",
        {"target_id": lambda: 10**4999},
        ValueError,
        "^event 'item_created': target_id " + HUGE_INT,
    ),
    (
        "target_id-surrogate",
        {"target_id": lambda: "id-\ud800"},
        ValueError,
        "^event 'item_created': target_id " + SURROGATE,
    ),
    (
        "target_name-surrogate",
        {"target_name": lambda: "\udce9"},
        ValueError,
        "^event 'item_created': target_name " + SURROGATE,
    ),
    (
        "payload-int-4301-digits",
        {"payload": {"count": lambda: TOO_MANY_DIGITS}},
        ValueError,
        r"^event 'item_created': payload\['count'\] " + HUGE_INT,
    ),
    (
        "payload-surrogate",
        {"payload": {"x": lambda: ["ok", "\ud800"]}},
        ValueError,
        r"^event 'item_created': payload\['x'\]\[1\] " + SURROGATE,
    ),
    (
        "payload-surrogate-key",
        {"payload": {"x": lambda: {"\ud800": 1}}},
        ValueError,
        r"^event 'item_created': payload\['x'\] has the key .* " + SURROGATE,
    ),
    (
        "payload-nested-list",
        {"payload": {"ids": [lambda: 1, lambda: {1, 2}]}},
        TypeError,
        r"payload\['ids'\]\[1\]",
    ),
]


@pytest.mark.parametrize(
    ("fields", "error", "names"),
    [case[1:] for case in BAD_LAZIES],
    ids=[case[0] for case in BAD_LAZIES],
)
def test_bad_lazy_value_fails_commit_before_commit(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    discarded: list[tuple[StagedEvent, str]],
    fields: dict[str, Any],
    error: type[Exception],
    names: str,
) -> None:
    """A lazy that raises or returns garbage fails commit() before COMMIT; rollback heals."""
    with Session() as session:
        session.add(Item(name="doomed"))
        stage_event(session, **{**GOOD, **fields})
        with pytest.raises(error, match=names) as raised:
            session.commit()
        assert type(raised.value) is error
        if fields.get("target_id") is _raise or fields.get("target_name") is _raise:
            assert isinstance(raised.value.__cause__, ZeroDivisionError)
        assert recorder.events == []
        assert stored_names(engine) == []  # no COMMIT was sent
        session.rollback()
        assert stored_names(engine) == []
        assert recorder.events == []
        assert [event.event_type for event, _ in discarded] == ["item_created"]
        operation(session, "good")
        session.commit()
    _assert_only_good_committed(recorder, engine)
    assert len(discarded) == 1


async def _async_value() -> str:
    return "never awaited"


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"target_id": _async_value}, "target_id"),
        ({"target_name": _async_value}, "target_name"),
        ({"payload": {"ids": [1, _async_value]}}, r"payload\['ids'\]\[1\]"),
    ],
    ids=["target_id", "target_name", "payload"],
)
def test_an_async_function_as_a_lazy_value_is_refused_at_stage_time(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    fields: dict[str, Any],
    names: str,
) -> None:
    """A lazy value is called, never awaited: an ``async def`` one is refused
    when staged, naming the field, instead of failing the commit with a
    coroutine that is never awaited."""
    with Session() as session:
        session.add(Item(name="kept"))
        with pytest.raises(TypeError, match=names + " is an async function"):
            stage_event(session, **{**GOOD, **fields})
        session.commit()
    assert recorder.events == []
    assert stored_names(engine) == ["kept"]


def test_a_lazy_value_returning_a_coroutine_fails_the_commit_and_closes_it(
    Session: sessionmaker, engine: Engine
) -> None:
    """A plain function that returns a coroutine (one that cannot be told
    from others at stage time) fails the commit before COMMIT, naming the
    field; the coroutine is closed, so no "never awaited" warning follows."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Session() as session:
            session.add(Item(name="doomed"))
            stage_event(session, **{**GOOD, "target_id": lambda: _async_value()})
            with pytest.raises(ValueError, match=r"target_id .*returned a coroutine"):
                session.commit()
            session.rollback()
        gc.collect()
    assert stored_names(engine) == []
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []


@pytest.mark.parametrize("lazy", [False, True], ids=["staged", "lazy"])
def test_lone_surrogate_under_max_payload_bytes_names_the_field(
    engine: Engine,
    recorder: Recorder,
    lazy: bool,
) -> None:
    """With max_payload_bytes, a lone surrogate is refused naming the field, not a UnicodeEncodeError."""
    emitter = AuditEmitter([recorder], load_entrypoints=False, max_payload_bytes=1000)
    maker = sessionmaker(engine)
    emitter.attach(maker)
    note: object = (lambda: "caf\udce9") if lazy else "caf\udce9"
    message = r"payload\['note'\] " + SURROGATE
    with maker() as session:
        session.add(Item(name="doomed"))
        if lazy:
            stage_event(session, **GOOD, payload={"note": note})
            with pytest.raises(ValueError, match=message) as raised:
                session.commit()
            assert stored_names(engine) == []  # no COMMIT was sent
            session.rollback()
        else:
            with pytest.raises(ValueError, match=message) as raised:
                stage_event(session, **GOOD, payload={"note": note})
            session.rollback()
        assert type(raised.value) is ValueError
        operation(session, "good")
        session.commit()
    _assert_only_good_committed(recorder, engine)


needs_int_limit = pytest.mark.skipif(
    not hasattr(sys, "set_int_max_str_digits"),
    reason="this Python has no int-to-str digit limit",
)


@pytest.fixture
def int_digit_limit() -> Iterator[Callable[[int], None]]:
    """Sets this process's ``sys.set_int_max_str_digits`` for the test, then restores it."""
    before = sys.get_int_max_str_digits()
    yield sys.set_int_max_str_digits
    sys.set_int_max_str_digits(before)


@needs_int_limit
@pytest.mark.parametrize("limit", [0, 640, 100_000], ids=["off", "lowered", "raised"])
def test_int_digit_limit_does_not_follow_this_process(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    int_digit_limit: Callable[[int], None],
    limit: int,
) -> None:
    """4,300 digits pass and 4,301 are refused whatever this process's own limit is."""
    int_digit_limit(limit)
    with Session() as session:
        with pytest.raises(ValueError, match=r"^payload\['count'\] " + HUGE_INT):
            stage_event(session, **GOOD, payload={"count": TOO_MANY_DIGITS})
        with pytest.raises(ValueError, match="^target_id " + HUGE_INT):
            stage_event(session, **{**GOOD, "target_id": TOO_MANY_DIGITS})
        operation(session, "good", payload={"count": LARGEST_INT})
        session.commit()
    _assert_only_good_committed(recorder, engine)
    assert recorder.events[0].payload == {"count": LARGEST_INT}


@needs_int_limit
def test_int_target_id_beyond_a_lowered_process_limit_names_the_field(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    int_digit_limit: Callable[[int], None],
) -> None:
    """An int target_id this process cannot write as str is a ValueError naming it."""
    int_digit_limit(640)
    with Session() as session:
        with pytest.raises(ValueError, match=r"^target_id .*pass it as a str"):
            stage_event(session, **{**GOOD, "target_id": 10**1000})
        operation(session, "good")
        session.commit()
    _assert_only_good_committed(recorder, engine)


def test_bad_lazy_inside_open_savepoint_fails_commit_before_commit(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """commit() with a SAVEPOINT still open also fails before COMMIT on a bad lazy."""
    with Session() as session:
        session.add(Item(name="outer"))
        session.begin_nested()
        session.add(Item(name="inner"))
        stage_event(session, **{**GOOD, "target_id": _raise})
        with pytest.raises(ValueError, match="target_id"):
            session.commit()
        assert stored_names(engine) == []
        session.rollback()
        assert recorder.events == []
        operation(session, "good")
        session.commit()
    _assert_only_good_committed(recorder, engine)


def test_lazy_values_get_database_generated_keys(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """Lazy target_id, target_name and payload values see the id the INSERT made."""
    with Session() as session:
        item = Item(name="lazy")
        session.add(item)
        assert item.id is None  # not flushed: the id does not exist yet
        stage_event(
            session,
            "item_created",
            target_type="item",
            target_id=lambda: item.id,
            target_name=lambda: item.name,
            action="create",
            payload={
                "id": lambda: item.id,
                "nested": {"ids": [lambda: item.id, "fixed"]},
                "plain": 1,
            },
        )
        session.commit()
    with Session() as check:
        [stored_id] = check.scalars(select(Item.id).where(Item.name == "lazy"))
    [envelope] = recorder.events
    assert envelope.target_id == str(stored_id)
    assert envelope.target_name == "lazy"
    assert envelope.payload == {
        "id": stored_id,
        "nested": {"ids": [stored_id, "fixed"]},
        "plain": 1,
    }
    assert type(envelope.payload["id"]) is int
    assert isinstance(envelope.payload["nested"]["ids"], list)


class Counter:
    """A lazy value that counts its calls."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.value


def _stage_lazy(session: Any, name: str, counter: Counter) -> None:
    session.add(Item(name=name))
    stage_event(
        session,
        "item_created",
        target_type="item",
        target_id=counter,
        target_name=counter,
        action="create",
        payload={"name": counter, "list": [counter]},
    )


def test_each_lazy_is_called_once_per_commit(
    Session: sessionmaker, recorder: Recorder, engine: Engine
) -> None:
    """Lazies are resolved exactly once, however many flushes the commit makes."""
    counter = Counter("once")
    with Session() as session:
        _stage_lazy(session, "once", counter)
        session.flush()
        session.add(Item(name="second-flush"))
        session.flush()
        assert counter.calls == 0  # not before the commit
        session.commit()
        assert counter.calls == 4  # target_id, target_name and two payload values
        session.commit()
    assert counter.calls == 4
    [envelope] = recorder.events
    assert (envelope.target_id, envelope.target_name) == ("once", "once")
    assert envelope.payload == {"name": "once", "list": ["once"]}
    assert stored_names(engine) == ["once", "second-flush"]


def _end_rollback(session: Any, counter: Counter) -> None:
    _stage_lazy(session, "gone", counter)
    session.flush()
    session.rollback()


def _end_close(session: Any, counter: Counter) -> None:
    _stage_lazy(session, "gone", counter)
    session.flush()
    session.close()


def _end_begin_block_raises(session: Any, counter: Counter) -> None:
    with pytest.raises(LookupError), session.begin():
        _stage_lazy(session, "gone", counter)
        raise LookupError("the operation failed")


def _end_savepoint_rollback(session: Any, counter: Counter) -> None:
    savepoint = session.begin_nested()
    _stage_lazy(session, "gone", counter)
    session.flush()
    savepoint.rollback()
    session.commit()


def _end_released_then_rollback(session: Any, counter: Counter) -> None:
    with session.begin_nested():
        _stage_lazy(session, "gone", counter)
    session.rollback()


def _end_flush_error(session: Any, counter: Counter) -> None:
    _stage_lazy(session, "taken", counter)
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


ENDINGS: dict[str, Callable[[Any, Counter], None]] = {
    "rollback": _end_rollback,
    "close": _end_close,
    "begin-block-raises": _end_begin_block_raises,
    "savepoint-rollback": _end_savepoint_rollback,
    "released-savepoint-outer-rollback": _end_released_then_rollback,
    "commit-flush-error": _end_flush_error,
}


@pytest.mark.parametrize("ending", list(ENDINGS.values()), ids=list(ENDINGS))
def test_lazy_is_never_called_for_a_transaction_that_does_not_commit(
    Session: sessionmaker,
    recorder: Recorder,
    engine: Engine,
    ending: Callable[[Any, Counter], None],
) -> None:
    """A rolled-back or abandoned transaction never calls its lazies; the next works."""
    with Session() as session:
        operation(session, "taken")
        session.commit()
        recorder.clear()
        counter = Counter("gone")
        ending(session, counter)
        assert counter.calls == 0
        assert recorder.events == []
        assert stored_names(engine) == ["taken"]
        kept = Counter("kept")
        _stage_lazy(session, "kept", kept)
        session.commit()
    assert counter.calls == 0
    assert kept.calls == 4
    assert recorder.names == ["kept"]
    assert stored_names(engine) == ["kept", "taken"]
