"""OpenTelemetry trace ids in metadata, and the CloudEvents ``traceparent``
(docs/changes-and-tracing.md).

Spans come from ``opentelemetry-sdk`` with an in-memory exporter, on a tracer
provider of the test's own (the global one is never set). SQLite only: the
database plays no part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker
from support import Recorder

from access_audit import AuditEmitter, AuditEventEnvelope, audit_context, stage_event

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
sampling = pytest.importorskip("opentelemetry.sdk.trace.sampling")
in_memory = pytest.importorskip(
    "opentelemetry.sdk.trace.export.in_memory_span_exporter"
)
span_export = pytest.importorskip("opentelemetry.sdk.trace.export")
cloudevents_json = pytest.importorskip("cloudevents.core.formats.json")

ROOT = Path(__file__).parent.parent
TRACE_KEYS = {"trace_id", "span_id", "trace_flags"}


@pytest.fixture
def engine(sqlite_file_engine: Engine) -> Engine:
    """SQLite only: tracing does not depend on the database."""
    return sqlite_file_engine


@pytest.fixture
def exporter() -> Any:
    return in_memory.InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: Any) -> Iterator[Any]:
    """A tracer that records every span, exported to ``exporter`` as it ends."""
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(span_export.SimpleSpanProcessor(exporter))
    yield provider.get_tracer("access_audit.tests")
    provider.shutdown()


def _stage(session: OrmSession, target_id: str, **fields: Any) -> None:
    stage_event(
        session,
        "item_changed",
        target_type="item",
        target_id=target_id,
        action="update",
        **fields,
    )


def _ids(span: Any) -> dict[str, str]:
    context = span.get_span_context()
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "trace_flags": f"{context.trace_flags:02x}",
    }


def _by_target(recorder: Recorder) -> dict[str, AuditEventEnvelope]:
    return {envelope.target_id: envelope for envelope in recorder.events}


def test_the_recording_span_at_stage_time_is_captured(
    Session: sessionmaker, recorder: Recorder, tracer: Any, exporter: Any
) -> None:
    """trace_id, span_id and trace_flags of the innermost recording span, as hex;
    nothing outside a span; the commit may come after the span has ended."""
    with Session() as session:
        _stage(session, "outside")
        with tracer.start_as_current_span("request") as request:
            _stage(session, "request", metadata={"ticket": "OPS-1"})
            with tracer.start_as_current_span("step") as step:
                _stage(session, "step")
        session.commit()

    events = _by_target(recorder)
    assert dict(events["outside"].metadata) == {}
    assert dict(events["request"].metadata) == {"ticket": "OPS-1", **_ids(request)}
    assert dict(events["step"].metadata) == _ids(step)
    assert _ids(step)["trace_id"] == _ids(request)["trace_id"]
    assert int(_ids(step)["trace_flags"], 16) & 1  # sampled
    exported = {span.name: span for span in exporter.get_finished_spans()}
    assert (
        events["step"].metadata["span_id"] == f"{exported['step'].context.span_id:016x}"
    )


def test_a_span_that_is_not_recording_is_not_captured(
    Session: sessionmaker, recorder: Recorder, tracer: Any
) -> None:
    """A propagated (remote) span context and a span sampled out leave the
    metadata alone; a recording span next to them is captured."""
    remote = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    )
    sampled_out = sdk_trace.TracerProvider(sampler=sampling.ALWAYS_OFF).get_tracer("t")
    with Session() as session:
        with trace.use_span(remote):
            _stage(session, "remote")
        with sampled_out.start_as_current_span("dropped") as dropped:
            assert not dropped.is_recording()
            _stage(session, "sampled_out")
        with tracer.start_as_current_span("kept"):
            _stage(session, "recording")
        session.commit()

    events = _by_target(recorder)
    assert dict(events["remote"].metadata) == {}
    assert dict(events["sampled_out"].metadata) == {}
    assert set(events["recording"].metadata) == TRACE_KEYS


@pytest.mark.parametrize(
    ("layer", "key"),
    [
        ("call", "trace_id"),
        ("call", "span_id"),
        ("call", "trace_flags"),
        ("audit_context", "trace_id"),
        ("metadata_provider", "span_id"),
    ],
    ids=lambda value: value,
)
def test_metadata_that_names_a_trace_key_wins_over_the_span(
    engine: Engine, recorder: Recorder, tracer: Any, layer: str, key: str
) -> None:
    """A trace key set by the call, audit_context or metadata_provider keeps
    all three captured ones out: a trace's ids are never mixed with another's."""
    given = {key: "from-the-application"}
    providing = [layer == "metadata_provider"]
    emitter = AuditEmitter(
        [recorder],
        load_entrypoints=False,
        metadata_provider=lambda: given if providing[0] else None,
    )
    maker = sessionmaker(engine)
    emitter.attach(maker)
    with maker() as session, tracer.start_as_current_span("request"):
        if layer == "audit_context":
            with audit_context(**given):
                _stage(session, "item")
        else:
            _stage(session, "item", metadata=given if layer == "call" else None)
        providing[0] = False
        _stage(session, "plain")
        session.commit()

    events = _by_target(recorder)
    assert dict(events["item"].metadata) == given
    assert set(events["plain"].metadata) == TRACE_KEYS


def test_to_cloudevent_carries_the_span_as_traceparent(
    Session: sessionmaker, recorder: Recorder, tracer: Any
) -> None:
    """The distributed tracing extension: 00-<trace_id>-<span_id>-<flags>,
    valid for the CloudEvents SDK; an event staged outside a span has none."""
    with Session() as session:
        with tracer.start_as_current_span("request") as span:
            _stage(session, "traced")
        _stage(session, "untraced")
        session.commit()

    events = _by_target(recorder)
    ids = _ids(span)
    structured = events["traced"].to_cloudevent(source="/services/access-app")
    expected = f"00-{ids['trace_id']}-{ids['span_id']}-{ids['trace_flags']}"
    assert structured["traceparent"] == expected
    parsed = cloudevents_json.JSONFormat().read(None, json.dumps(structured))
    assert parsed.get_extension("traceparent") == expected
    assert parsed.get_data()["metadata"] == ids
    assert "traceparent" not in events["untraced"].to_cloudevent(source="/s")


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


METADATA_TO_TRACEPARENT: dict[str, tuple[dict[str, Any], str | None]] = {
    "no-flags": (
        {"trace_id": TRACE_ID, "span_id": SPAN_ID},
        f"00-{TRACE_ID}-{SPAN_ID}-00",
    ),
    "sampled": (
        {"trace_id": TRACE_ID, "span_id": SPAN_ID, "trace_flags": "01"},
        f"00-{TRACE_ID}-{SPAN_ID}-01",
    ),
    "bad-flags": (
        {"trace_id": TRACE_ID, "span_id": SPAN_ID, "trace_flags": "sampled"},
        f"00-{TRACE_ID}-{SPAN_ID}-00",
    ),
    "no-span-id": ({"trace_id": TRACE_ID}, None),
    "upper-case": ({"trace_id": TRACE_ID.upper(), "span_id": SPAN_ID}, None),
    "zero-trace": ({"trace_id": "0" * 32, "span_id": SPAN_ID}, None),
    "zero-span": ({"trace_id": TRACE_ID, "span_id": "0" * 16}, None),
    "short": ({"trace_id": TRACE_ID[:-1], "span_id": SPAN_ID}, None),
    "not-text": ({"trace_id": TRACE_ID, "span_id": 42}, None),
    "x-ray-id": (
        {"trace_id": "1-5759e988-bd862e3fe1be46a994272793", "span_id": SPAN_ID},
        None,
    ),
}


def test_traceparent_comes_only_from_valid_w3c_ids(
    Session: sessionmaker, recorder: Recorder
) -> None:
    """Ids the application passed count too; anything that is not a W3C
    trace id and span id (lowercase hex, not all zeros) adds no traceparent,
    and unknown flags are 00."""
    with Session() as session:
        for name, (metadata, _expected) in METADATA_TO_TRACEPARENT.items():
            _stage(session, name, metadata=metadata)
        session.commit()
    found = {
        envelope.target_id: envelope.to_cloudevent(source="/s").get("traceparent")
        for envelope in recorder.events
    }
    assert found == {
        name: expected
        for name, (_metadata, expected) in METADATA_TO_TRACEPARENT.items()
    }
    for envelope in recorder.events:
        structured = envelope.to_cloudevent(source="/s")
        if "traceparent" in structured:
            parsed = cloudevents_json.JSONFormat().read(None, json.dumps(structured))
            assert parsed.get_extension("traceparent") == found[envelope.target_id]


def test_redacted_trace_ids_are_redacted_and_give_no_traceparent(
    engine: Engine, recorder: Recorder, tracer: Any
) -> None:
    """Captured ids are metadata like any other: redact_keys applies to them."""
    emitter = AuditEmitter([recorder], load_entrypoints=False, redact_keys=["span_id"])
    maker = sessionmaker(engine)
    emitter.attach(maker)
    with maker() as session, tracer.start_as_current_span("request"):
        _stage(session, "item")
        session.commit()
    envelope = recorder.events[0]
    assert envelope.metadata["span_id"] == "[REDACTED]"
    assert len(envelope.metadata["trace_id"]) == 32
    assert "traceparent" not in envelope.to_cloudevent(source="/s")


def test_a_failing_opentelemetry_never_fails_staging(
    Session: sessionmaker,
    recorder: Recorder,
    tracer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If OpenTelemetry raises (a half-imported module, an SDK bug), the event
    is staged without trace ids; once it works again, they are back."""

    def broken() -> Any:
        raise RuntimeError("tracer provider misconfigured")

    with Session() as session, tracer.start_as_current_span("request"):
        with monkeypatch.context() as patch:
            patch.setattr(trace, "get_current_span", broken)
            _stage(session, "broken")
        _stage(session, "working")
        session.commit()
    events = _by_target(recorder)
    assert dict(events["broken"].metadata) == {}
    assert set(events["working"].metadata) == TRACE_KEYS


ABSENT_THEN_IMPORTED = """
import importlib.abc, json, sys

attempts = []

class NoOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

blocker = NoOpenTelemetry()
sys.meta_path.insert(0, blocker)

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from access_audit import AuditEmitter, hookimpl, stage_event

class Keep:
    def __init__(self):
        self.events = []

    @hookimpl
    def audit_event_logged(self, envelope):
        self.events.append(envelope)

kept = Keep()
SessionLocal = sessionmaker(create_engine("sqlite://"))
AuditEmitter([kept], load_entrypoints=False).attach(SessionLocal)

def stage(target_id):
    with SessionLocal.begin() as session:
        stage_event(session, "item_changed", target_type="item",
                    target_id=target_id, action="update")
    event = kept.events[-1]
    return {"metadata": dict(event.metadata),
            "traceparent": event.to_cloudevent(source="/s").get("traceparent")}

absent = stage("absent")
report = {"absent": absent, "attempts": list(attempts),
          "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}

# The application imports OpenTelemetry later: spans are captured from then on.
sys.meta_path.remove(blocker)
from opentelemetry.sdk.trace import TracerProvider
tracer = TracerProvider().get_tracer("late")
with tracer.start_as_current_span("late"):
    report["imported_later"] = stage("later")
print(json.dumps(report))
"""


def test_without_opentelemetry_nothing_is_imported_and_it_works_once_imported() -> None:
    """With opentelemetry unimportable, staging never tries to import it and
    events carry no trace; imported by the application afterwards, it is
    picked up without any setting."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), environment.get("PYTHONPATH")])
    )
    result = subprocess.run(
        [sys.executable, "-c", ABSENT_THEN_IMPORTED],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["absent"] == {"metadata": {}, "traceparent": None}
    assert report["attempts"] == []
    assert report["loaded"] == []
    later = report["imported_later"]
    assert set(later["metadata"]) == TRACE_KEYS
    ids = later["metadata"]
    assert later["traceparent"] == (
        f"00-{ids['trace_id']}-{ids['span_id']}-{ids['trace_flags']}"
    )
