"""access_audit.sinks: LoggingSink and JsonLinesSink, the ready-made plugins.

End-to-end tests commit through an in-memory SQLite engine (the sinks do not
depend on the database); the file-locking tests call the hook directly with
hand-built envelopes, from several processes at once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker
from support import Failures, Recorder, operation, stored_names

from access_audit import AuditEmitter, AuditEventEnvelope
from access_audit.sinks import JsonLinesSink, LoggingSink

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

needs_flock = pytest.mark.skipif(fcntl is None, reason="needs fcntl.flock (POSIX)")

PROCESSES, BATCHES, BATCH_SIZE = 4, 200, 5


def _session_maker(engine: Any, *plugins: object) -> sessionmaker:  # type: ignore[type-arg]
    maker = sessionmaker(engine)
    AuditEmitter(plugins, load_entrypoints=False).attach(maker)
    return maker


def _commit(maker: sessionmaker, *names: str) -> None:  # type: ignore[type-arg]
    """One transaction that commits an audited operation per name."""
    with maker() as session, session.begin():
        for name in names:
            operation(session, name, payload={"note": "line\nbreak ☃"})


def _envelope(worker: int, batch: int, index: int) -> AuditEventEnvelope:
    now = datetime.now(timezone.utc)
    return AuditEventEnvelope(
        id=uuid.uuid4(),
        event_type="item_created",
        timestamp=now,
        staged_at=now,
        actor_id=f"worker-{worker}",
        actor_email=None,
        target_type="item",
        target_id=f"{worker}-{batch}-{index}",
        target_name=None,
        action="create",
        reason=None,
        payload={"pad": "x" * 400},
        metadata={},
        transaction_id=uuid.uuid4(),
        sequence=index,
    )


def _append_batches(path: str, worker: int, barrier: Any) -> None:
    """Child process: wait for the others, then append BATCHES batches."""
    sink = JsonLinesSink(path)
    batches = [
        tuple(_envelope(worker, batch, index) for index in range(BATCH_SIZE))
        for batch in range(BATCHES)
    ]
    barrier.wait()
    for batch in batches:
        sink.audit_events_committed(batch)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


# LoggingSink


@pytest.mark.parametrize(
    "level", [logging.INFO, logging.WARNING, 5], ids=["info", "warning", "custom"]
)
def test_logging_sink_logs_one_json_record_per_event(
    memory_engine: Any, caplog: pytest.LogCaptureFixture, level: int
) -> None:
    """Each committed event is one record at the level, its message the envelope's JSON."""
    recorder = Recorder()
    maker = _session_maker(memory_engine, recorder, LoggingSink(level=level))
    caplog.set_level(level, logger="access_audit.events")
    _commit(maker, "a", "b")
    _commit(maker, "c")

    records = [r for r in caplog.records if r.name == "access_audit.events"]
    assert [r.levelno for r in records] == [level] * 3
    assert [json.loads(r.getMessage()) for r in records] == [
        envelope.to_dict() for envelope in recorder.events
    ]
    assert [r.audit_event for r in records] == [  # type: ignore[attr-defined]
        envelope.to_dict() for envelope in recorder.events
    ]
    assert stored_names(memory_engine) == ["a", "b", "c"]


def test_logging_sink_uses_the_named_logger_and_adds_no_handlers(
    memory_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A custom logger name is used as given, and the sink adds no handler to it."""
    sink = LoggingSink("myapp.audit", logging.ERROR)
    maker = _session_maker(memory_engine, sink)
    caplog.set_level(logging.ERROR, logger="myapp.audit")
    _commit(maker, "a")

    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("myapp.audit", logging.ERROR)
    ]
    assert logging.getLogger("myapp.audit").handlers == []
    assert repr(sink) == "<LoggingSink logger='myapp.audit' level=ERROR>"


def test_logging_sink_logs_nothing_below_the_logger_level(
    memory_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An event at a level the logger drops produces no record."""
    maker = _session_maker(memory_engine, LoggingSink(level=logging.DEBUG))
    caplog.set_level(logging.INFO, logger="access_audit.events")
    _commit(maker, "a")
    assert [r for r in caplog.records if r.name == "access_audit.events"] == []
    assert stored_names(memory_engine) == ["a"]


# JsonLinesSink, end to end


def test_json_lines_sink_appends_committed_batches_in_order(
    memory_engine: Any, tmp_path: Path
) -> None:
    """Two commits append one line per event, in order, that parse back to the envelopes."""
    path = tmp_path / "audit.jsonl"
    recorder = Recorder()
    maker = _session_maker(memory_engine, recorder, JsonLinesSink(path))
    _commit(maker, "a", "b")
    _commit(maker, "c")

    text = path.read_text("utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 3
    assert [
        AuditEventEnvelope.from_dict(json.loads(line)) for line in lines
    ] == recorder.events
    assert [envelope.target_id for envelope in recorder.events] == ["a", "b", "c"]


def test_json_lines_sink_appends_to_an_existing_file(
    memory_engine: Any, tmp_path: Path
) -> None:
    """Lines already in the file are kept; new batches go after them."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n', "utf-8")
    recorder = Recorder()
    _commit(_session_maker(memory_engine, recorder, JsonLinesSink(path)), "a")
    assert _lines(path) == [{"earlier": True}, recorder.events[0].to_dict()]


def test_json_lines_sink_writes_nothing_for_a_rollback(
    memory_engine: Any, tmp_path: Path
) -> None:
    """A rolled-back transaction creates no file and writes no line."""
    path = tmp_path / "audit.jsonl"
    recorder = Recorder()
    maker = _session_maker(memory_engine, recorder, JsonLinesSink(path))
    with maker() as session:
        operation(session, "gone")
        session.rollback()
    assert not path.exists()
    _commit(maker, "kept")
    assert [line["target_id"] for line in _lines(path)] == ["kept"]
    assert recorder.names == ["kept"]
    assert stored_names(memory_engine) == ["kept"]


@pytest.mark.parametrize(
    ("fsync", "expected"), [(True, 2), (False, 0)], ids=["fsync", "no-fsync"]
)
def test_json_lines_sink_fsyncs_once_per_batch(
    memory_engine: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fsync: bool,
    expected: int,
) -> None:
    """fsync=True syncs once per committed batch, after its bytes are written; False never."""
    path = tmp_path / "audit.jsonl"
    synced_sizes: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced_sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    maker = _session_maker(memory_engine, JsonLinesSink(path, fsync=fsync))
    _commit(maker, "a", "b", "c")
    first_size = path.stat().st_size
    _commit(maker, "d", "e")

    assert len(synced_sizes) == expected
    if fsync:
        assert synced_sizes == [first_size, path.stat().st_size]
    assert len(_lines(path)) == 5


def test_json_lines_sink_creates_the_file_private(tmp_path: Path) -> None:
    """A new file is created with mode 0o600."""
    path = tmp_path / "audit.jsonl"
    old_umask = os.umask(0)
    try:
        JsonLinesSink(path).audit_events_committed([_envelope(0, 0, 0)])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_json_lines_sink_refuses_a_missing_directory(tmp_path: Path) -> None:
    """A path whose directory does not exist fails at construction, naming the path."""
    path = tmp_path / "missing" / "audit.jsonl"
    with pytest.raises(FileNotFoundError) as raised:
        JsonLinesSink(path)
    assert str(path) in str(raised.value)
    assert str(tmp_path / "missing") in str(raised.value)


def test_json_lines_sink_keeps_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path is resolved at construction, so a later chdir does not move the file."""
    monkeypatch.chdir(tmp_path)
    sink = JsonLinesSink("audit.jsonl", fsync=False)
    assert (
        repr(sink)
        == f"<JsonLinesSink path={str(tmp_path / 'audit.jsonl')!r} fsync=False>"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sink.audit_events_committed([_envelope(0, 0, 0)])
    assert len(_lines(tmp_path / "audit.jsonl")) == 1
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_json_lines_sink_follows_rotation(tmp_path: Path) -> None:
    """After the file is moved away, the next batch creates a new file at the path."""
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(path, fsync=False)
    sink.audit_events_committed([_envelope(0, 0, 0)])
    path.rename(tmp_path / "audit.jsonl.1")
    sink.audit_events_committed([_envelope(0, 1, 0)])
    assert [line["target_id"] for line in _lines(path)] == ["0-1-0"]
    assert [line["target_id"] for line in _lines(tmp_path / "audit.jsonl.1")] == [
        "0-0-0"
    ]


def test_json_lines_sink_completes_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the OS writes fewer bytes than asked, the rest is written too."""
    path = tmp_path / "audit.jsonl"
    real_write = os.write
    calls: list[int] = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, data[:100])

    monkeypatch.setattr(os, "write", short_write)
    batch = [_envelope(0, 0, index) for index in range(3)]
    JsonLinesSink(path, fsync=False).audit_events_committed(batch)
    monkeypatch.undo()

    assert len(calls) > 3
    assert [AuditEventEnvelope.from_dict(line) for line in _lines(path)] == batch


def test_json_lines_sink_takes_back_a_batch_the_disk_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills after part of a batch was written: the part is taken
    back before the error is raised, so the file stays whole lines, and the
    batch delivered again (the relay's retry) reads as whole events. A torn
    line was left, and the next append joined onto it."""
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(path, fsync=False)
    first = [_envelope(0, 0, 0)]
    sink.audit_events_committed(first)
    real_write = os.write
    calls: list[int] = []

    def filling(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:100])  # part of the batch fits
        raise OSError(28, "No space left on device")

    batch = [_envelope(0, 0, index) for index in range(1, 3)]
    monkeypatch.setattr(os, "write", filling)
    with pytest.raises(OSError, match="No space"):
        sink.audit_events_committed(batch)
    monkeypatch.undo()
    assert len(calls) == 2
    assert [AuditEventEnvelope.from_dict(line) for line in _lines(path)] == first
    sink.audit_events_committed(batch)  # delivered again
    assert [AuditEventEnvelope.from_dict(line) for line in _lines(path)] == [
        *first,
        *batch,
    ]


def test_json_lines_sink_write_failure_reaches_the_emitter(
    memory_engine: Any, tmp_path: Path
) -> None:
    """A failed write raises to the emitter, which reports it; the commit still succeeds."""
    directory = tmp_path / "logs"
    directory.mkdir()
    sink = JsonLinesSink(directory / "audit.jsonl")
    failures = Failures()
    maker = _session_maker(memory_engine, failures, sink)
    directory.rmdir()
    _commit(maker, "a", "b")

    assert [
        (len(envelopes), type(error)) for _, envelopes, error in failures.calls
    ] == [(2, FileNotFoundError)]
    assert stored_names(memory_engine) == ["a", "b"]


# JsonLinesSink, several writers


@needs_flock
def test_json_lines_sink_waits_for_another_writers_lock(tmp_path: Path) -> None:
    """A batch is not written while another writer holds the file's exclusive lock."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    sink = JsonLinesSink(path, fsync=False)
    with path.open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        writer = threading.Thread(
            target=sink.audit_events_committed, args=([_envelope(0, 0, 0)],)
        )
        writer.start()
        writer.join(0.3)
        assert writer.is_alive()
        assert path.read_bytes() == b""
        other.write(b'{"other": 1}\n')
        other.flush()
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    writer.join(5)
    assert not writer.is_alive()
    assert [line.get("target_id") for line in _lines(path)] == [None, "0-0-0"]


@needs_flock
def test_json_lines_sink_processes_append_without_interleaving(
    tmp_path: Path,
) -> None:
    """Four processes appending 200 batches each leave every batch whole and contiguous."""
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    processes = [
        context.Process(target=_append_batches, args=(str(path), number, barrier))
        for number in range(PROCESSES)
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [process.exitcode for process in processes] == [0] * PROCESSES
    assert time.monotonic() - started < 30

    lines = _lines(path)
    assert len(lines) == PROCESSES * BATCHES * BATCH_SIZE
    batches = [lines[i : i + BATCH_SIZE] for i in range(0, len(lines), BATCH_SIZE)]
    for batch in batches:
        worker, batch_number, _ = batch[0]["target_id"].split("-")
        assert [line["target_id"] for line in batch] == [
            f"{worker}-{batch_number}-{index}" for index in range(BATCH_SIZE)
        ]
    for number in range(PROCESSES):
        numbers = [
            int(batch[0]["target_id"].split("-")[1])
            for batch in batches
            if batch[0]["actor_id"] == f"worker-{number}"
        ]
        assert numbers == list(range(BATCHES))


def test_import_access_audit_does_not_import_sinks() -> None:
    """``import access_audit`` leaves access_audit.sinks unimported."""
    code = "import sys, access_audit; print('access_audit.sinks' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
