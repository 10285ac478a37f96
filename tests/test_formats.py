"""Redaction, payload limits and CloudEvents output (docs/sinks.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from support import Recorder

from access_audit import AuditEmitter, audit_context, signals, stage_event

cloudevents_json = pytest.importorskip("cloudevents.core.formats.json")


@pytest.fixture
def make_session(recorder: Recorder) -> Iterator[Any]:
    """A sessionmaker on SQLite in memory whose emitter has the given options."""
    engine = create_engine("sqlite://")

    def make(**options: Any) -> sessionmaker:
        emitter = AuditEmitter([recorder], load_entrypoints=False, **options)
        maker = sessionmaker(engine)
        emitter.attach(maker)
        return maker

    yield make
    engine.dispose()


SECRET_PAYLOAD = {
    "user": "ada",
    "Password": "hunter2",
    "nested": {"api_TOKEN": "t-1", "keep": 1, "deeper": [{"secret": "s", "ok": True}]},
}


def test_redact_keys_apply_at_any_depth_in_payload_and_metadata(
    make_session: Any, recorder: Recorder
) -> None:
    """Named keys (any case, any depth) become "[REDACTED]" for plugins and receivers."""
    Session = make_session(
        redact_keys=("password", "Api_Token", "secret", "session"),
        metadata_provider=lambda: {"session": "cookie-value", "ip": "10.0.0.1"},
    )
    seen_by_receiver: list[Any] = []

    def receiver(sender: object, envelope: Any) -> None:
        seen_by_receiver.append(envelope)

    with (
        signals.audit_event_committed.connected_to(receiver),
        Session.begin() as session,
        audit_context(actor_id="u-1", secret="from-context"),
    ):
        stage_event(
            session,
            "user_login",
            target_type="user",
            target_id="ada",
            action="login",
            payload=SECRET_PAYLOAD,
            metadata={"request": {"password": "x", "path": "/login"}},
        )
    expected_payload = {
        "user": "ada",
        "Password": "[REDACTED]",
        "nested": {
            "api_TOKEN": "[REDACTED]",
            "keep": 1,
            "deeper": [{"secret": "[REDACTED]", "ok": True}],
        },
    }
    expected_metadata = {
        "session": "[REDACTED]",
        "ip": "10.0.0.1",
        "secret": "[REDACTED]",
        "request": {"password": "[REDACTED]", "path": "/login"},
    }
    for envelope in (recorder.events[0], seen_by_receiver[0]):
        assert envelope.payload == expected_payload
        assert envelope.metadata == expected_metadata
    assert "hunter2" not in recorder.events[0].to_json()


def test_redaction_reaches_discarded_events_and_lazy_results(
    make_session: Any, recorder: Recorder
) -> None:
    """Dropped events are redacted too; a redacted lazy is never called."""
    Session = make_session(redact_keys=["token"])
    calls: list[str] = []

    def lazy_token() -> str:
        calls.append("token")
        return "t-2"

    discarded: list[Any] = []
    with signals.audit_event_discarded.connected_to(
        lambda sender, event, reason: discarded.append(event)
    ):
        session = Session()
        stage_event(
            session,
            "a",
            target_type="t",
            target_id=1,
            action="x",
            payload={"token": "t"},
        )
        session.rollback()
        stage_event(
            session,
            "b",
            target_type="t",
            target_id=2,
            action="x",
            payload={"token": lazy_token, "profile": lambda: {"token": "t-3", "n": 1}},
        )
        session.commit()
        session.close()
    assert discarded[0].payload == {"token": "[REDACTED]"}
    assert recorder.events[0].payload == {
        "token": "[REDACTED]",
        "profile": {"token": "[REDACTED]", "n": 1},
    }
    assert calls == []


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"redact_keys": "password"}, TypeError, "not one string"),
        ({"redact_keys": [1]}, TypeError, "redact_keys must hold str"),
        ({"max_payload_bytes": 0}, ValueError, "max_payload_bytes must be positive"),
        ({"max_payload_bytes": "10"}, TypeError, "max_payload_bytes must be an int"),
    ],
    ids=["string", "non-str-key", "zero", "not-int"],
)
def test_bad_emitter_options_are_refused(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Misconfigured redact_keys and max_payload_bytes fail at construction."""
    with pytest.raises(error, match=match):
        AuditEmitter(load_entrypoints=False, **options)


def test_oversized_payload_fails_at_stage_time(
    make_session: Any, recorder: Recorder
) -> None:
    """A payload larger than max_payload_bytes raises ValueError when staged."""
    Session = make_session(max_payload_bytes=64)
    fits = {"data": "x" * 40}  # {"data":"xxx..."} is 51 bytes
    assert len(json.dumps(fits, separators=(",", ":"))) <= 64
    with Session.begin() as session:
        with pytest.raises(
            ValueError,
            match=r"payload is 109 bytes as JSON, more than max_payload_bytes=64",
        ):
            stage_event(
                session,
                "big",
                target_type="t",
                target_id=1,
                action="x",
                payload={"data": "x" * 98},
            )
        stage_event(
            session, "small", target_type="t", target_id=2, action="x", payload=fits
        )
    assert [e.event_type for e in recorder.events] == ["small"]


ENCODER_CASES = [
    {"float": 2.7719147266578394e-05, "small": 1e-07, "big": 1e16, "zero": -0.0},
    # An int beyond 64 bits: orjson refuses it, the standard library writes it.
    {"int": 2**63 - 1, "negative": -(2**63), "beyond": 2**70},
    {"text": "tab\t nul\x00 del\x7f line\u2028 é 漢 😀", "quote": '"\\/'},
    {"nested": [{"a": [True, False, None]}, [], {}], "tiny": 5e-324},
]


@pytest.fixture(params=["orjson", "stdlib"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Encode through orjson (the ``fast`` extra) or, without it, the
    standard library."""
    if request.param == "stdlib":
        from access_audit import _values

        monkeypatch.setattr(_values, "_fast_dumps", None)
    else:
        pytest.importorskip("orjson")
    return str(request.param)


@pytest.mark.parametrize("value", ENCODER_CASES)
def test_compact_json_reads_back_as_it_was_and_is_measured_as_written(
    encoder: str, value: dict[str, Any]
) -> None:
    """Either encoder writes JSON that reads back to the value (ints beyond
    64 bits whole), compact and with non-ASCII text as it is; ``json_size``
    is the size of that very text."""
    from access_audit._values import compact_json, json_size

    text = compact_json(value)
    assert json.loads(text) == value
    assert ("-0.0" in text) == ("zero" in value)  # == cannot see the sign
    assert ": " not in text and ", " not in text
    assert "\\u00e9" not in text
    assert json_size(value) == len(text.encode())


def envelope_fields(**changes: Any) -> dict[str, Any]:
    """Every field of a hand-built envelope, with *changes*."""
    import datetime as dt
    import uuid

    on_the_second = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "event_type": "member_added",
        "timestamp": on_the_second,  # isoformat() leaves out zero microseconds
        "staged_at": on_the_second.replace(microsecond=5),
        "actor_id": "ada",
        "actor_email": None,
        "target_type": "group",
        "target_id": "漢",
        "target_name": "tab\t",
        "action": "add",
        "reason": None,
        "payload": {"n": 1},
        "metadata": {},
        "transaction_id": uuid.uuid4(),
        "sequence": 3,
    }
    return {**fields, **changes}


@pytest.mark.parametrize("value", ENCODER_CASES)
def test_an_envelope_is_stored_as_the_json_of_its_to_dict(
    encoder: str, value: dict[str, Any]
) -> None:
    """The outbox's JSON of an envelope: orjson writes the dataclass itself,
    the standard library its fields; either way, the text of ``to_dict()``
    with its fields in order (the same text but for the spelling of floats)."""
    from access_audit import AuditEventEnvelope
    from access_audit._envelope import stored_json

    envelope = AuditEventEnvelope(
        **envelope_fields(
            payload=value, metadata={"request_id": "r-1", "nested": value}
        )
    )
    text = stored_json(envelope)
    assert json.loads(text) == envelope.to_dict()
    if not any(isinstance(v, float) for v in value.values()):
        assert text == json.dumps(
            envelope.to_dict(), ensure_ascii=False, separators=(",", ":")
        )


def test_an_envelope_orjson_would_write_otherwise_is_stored_as_to_dict_writes_it(
    encoder: str,
) -> None:
    """orjson cuts an offset with seconds to minutes and writes a subclass's
    extra fields: such an envelope is stored as the text of ``to_dict()``
    all the same."""
    import dataclasses
    import datetime as dt

    from access_audit import AuditEventEnvelope
    from access_audit._envelope import stored_json

    @dataclasses.dataclass(frozen=True, slots=True)
    class Tagged(AuditEventEnvelope):
        tag: str = "extra"

    odd = dt.timezone(dt.timedelta(hours=1, seconds=7))
    fields = envelope_fields(timestamp=dt.datetime(2024, 5, 1, 12, tzinfo=odd))
    utc = envelope_fields()
    for envelope in (AuditEventEnvelope(**fields), Tagged(**utc)):
        assert stored_json(envelope) == json.dumps(
            envelope.to_dict(), ensure_ascii=False, separators=(",", ":")
        )


def test_max_payload_bytes_measures_the_json_as_the_outbox_writes_it(
    make_session: Any, recorder: Recorder, encoder: str
) -> None:
    """The size check uses the encoder that writes the payload: orjson spells
    this float one byte longer than the standard library, so a limit set to
    the standard library's size refuses it when orjson writes it."""
    from access_audit._values import compact_json

    payload = {"f": 2.7719147266578394e-05}
    written = len(compact_json(payload).encode())
    standard = len(json.dumps(payload, separators=(",", ":")))
    assert written == (standard + 1 if encoder == "orjson" else standard)
    for limit, fits in ((written, True), (written - 1, False)):
        Session = make_session(max_payload_bytes=limit)
        with Session.begin() as session:
            if fits:
                stage_event(
                    session, "f", target_type="t", target_id=1, action="x",
                    payload=payload,
                )  # fmt: skip
            else:
                with pytest.raises(ValueError, match=f"payload is {written} bytes"):
                    stage_event(
                        session, "f", target_type="t", target_id=1, action="x",
                        payload=payload,
                    )  # fmt: skip
    assert [envelope.payload for envelope in recorder.events] == [payload]


def test_lazy_payload_that_grows_too_large_fails_the_commit(
    make_session: Any, recorder: Recorder
) -> None:
    """A lazy value that makes the payload too large fails commit() before COMMIT."""
    Session = make_session(max_payload_bytes=100)
    session = Session()
    stage_event(
        session,
        "big",
        target_type="t",
        target_id=1,
        action="x",
        payload={"rows": lambda: ["r"] * 200},
    )
    with pytest.raises(ValueError, match="max_payload_bytes=100"):
        session.commit()
    session.rollback()
    session.close()
    assert recorder.events == []


@pytest.fixture
def committed(make_session: Any, recorder: Recorder) -> Any:
    Session = make_session()
    with Session.begin() as session:
        stage_event(
            session,
            "group_member_added",
            target_type="group",
            target_id=42,
            target_name="admins",
            action="add_member",
            actor_id="u-7",
            actor_email="ada@example.com",
            reason="approved",
            payload={"user_id": 7},
            metadata={"request_id": "r-1"},
        )
    return recorder.events[0]


def test_cloudevent_is_valid_structured_cloudevents_json(committed: Any) -> None:
    """to_cloudevent() output parses with the CloudEvents SDK, attributes mapped."""
    structured = committed.to_cloudevent(source="/services/access-app")
    event = cloudevents_json.JSONFormat().read(None, json.dumps(structured))
    assert event.get_specversion() == "1.0"
    assert event.get_id() == str(committed.id)
    assert event.get_source() == "/services/access-app"
    assert event.get_type() == "access_audit.group_member_added"
    assert event.get_subject() == "group/42"
    assert event.get_time() == committed.timestamp
    assert event.get_datacontenttype() == "application/json"
    assert event.get_extension("partitionkey") == "group:42"
    assert event.get_extension("audittransaction") == str(committed.transaction_id)
    data = event.get_data()
    assert data["actor_email"] == "ada@example.com"
    assert data["payload"] == {"user_id": 7}
    assert data["metadata"] == {"request_id": "r-1"}
    assert data["sequence"] == 0


def test_cloudevent_keeps_the_email_address_inside_data(committed: Any) -> None:
    """No attribute outside ``data`` carries the actor's e-mail address."""
    structured = committed.to_cloudevent(source="/s", type_prefix="com.example.audit.")
    outside = {key: value for key, value in structured.items() if key != "data"}
    assert "ada@example.com" not in json.dumps(outside)
    assert structured["type"] == "com.example.audit.group_member_added"


@pytest.mark.parametrize("source", ["", None, 5], ids=["empty", "None", "int"])
def test_cloudevent_needs_a_source(committed: Any, source: Any) -> None:
    """An empty or non-string source is refused with ValueError."""
    with pytest.raises(ValueError, match="source"):
        committed.to_cloudevent(source=source)


def test_every_event_type_of_the_example_app_is_valid_cloudevents(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo walk's events, all 19 types, each parse with the CloudEvents SDK."""
    import re
    import shutil
    from pathlib import Path

    from access_audit import AuditEventEnvelope

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "examples"))
    from access_app import demo
    from access_app.operations import EVENT_TYPES

    assert demo.main(["--keep"]) == 0
    kept = re.search(r"^kept (.+)$", capsys.readouterr().out, re.MULTILINE)
    assert kept is not None
    directory = Path(kept.group(1))
    try:
        lines = (directory / "audit.jsonl").read_text().splitlines()
    finally:
        shutil.rmtree(directory)
    seen = set()
    for line in lines:
        envelope = AuditEventEnvelope.from_dict(json.loads(line))
        structured = envelope.to_cloudevent(source="/examples/access-app")
        event = cloudevents_json.JSONFormat().read(None, json.dumps(structured))
        assert event.get_id() == str(envelope.id)
        assert event.get_type() == f"access_audit.{envelope.event_type}"
        assert event.get_subject() == f"{envelope.target_type}/{envelope.target_id}"
        assert event.get_data()["actor_id"] == envelope.actor_id
        seen.add(envelope.event_type)
    assert seen == set(EVENT_TYPES)
