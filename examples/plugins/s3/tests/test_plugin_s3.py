"""The access-audit-s3 plugin package, delivering to moto's S3 server over HTTP.

The server runs in this process on 127.0.0.1 (a free port); every test gets
its own bucket and dummy AWS credentials, and commits through a real SQLite
session with the plugin registered on an emitter.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import json
import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import access_audit_s3
import boto3
import pytest
from access_audit_s3 import EnvironmentS3Sink, S3Sink, object_key
from access_audit_s3 import plugin as plugin_module
from access_audit_s3.plugin import Settings
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from support import Failures, Recorder, operation, stored_names

from access_audit import AuditEmitter, AuditEventEnvelope

Batch = tuple[AuditEventEnvelope, ...]


@pytest.fixture(scope="module")
def endpoint_url() -> Iterator[str]:
    """moto's S3 server, threaded in this process, on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials in us-east-1, no AWS config files, no S3 plugin settings."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("BUCKET", "PREFIX", "GZIP", "ENDPOINT_URL"):
        monkeypatch.delenv(f"ACCESS_AUDIT_S3_{name}", raising=False)


@pytest.fixture
def s3(endpoint_url: str) -> Iterator[Any]:
    """A boto3 S3 client for the test server."""
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    yield client
    client.close()


@pytest.fixture
def bucket(s3: Any) -> str:
    """A new, empty bucket of this test's own."""
    name = f"audit-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def failures() -> Failures:
    return Failures()


@pytest.fixture
def attach(
    memory_engine: Engine,
) -> Iterator[Callable[[AuditEmitter], sessionmaker[Session]]]:
    """Attach an emitter to a sessionmaker on ``memory_engine``; detached afterwards."""
    attached: list[tuple[AuditEmitter, sessionmaker[Session]]] = []

    def attach(emitter: AuditEmitter) -> sessionmaker[Session]:
        maker = sessionmaker(memory_engine)
        emitter.attach(maker)
        attached.append((emitter, maker))
        return maker

    yield attach
    for emitter, maker in attached:
        emitter.detach(maker)


def commit(maker: sessionmaker[Session], *names: str) -> None:
    """One transaction: an audited operation per name, then commit."""
    with maker() as session:
        for name in names:
            operation(session, name, payload={"name": name, "tags": ["x", 1]})
        session.commit()


def keys(s3: Any, bucket: str) -> list[str]:
    """Every key in *bucket*, sorted."""
    listing = s3.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", ()))


def expected_key(batch: Batch, prefix: str = "audit", suffix: str = ".ndjson") -> str:
    """The key the issue asks for: prefix/YYYY/MM/DD/HH/<transaction_id>, UTC."""
    committed = batch[0].timestamp.astimezone(timezone.utc)
    hour = f"{committed.year:04d}/{committed.month:02d}/{committed.day:02d}"
    hour += f"/{committed.hour:02d}"
    return f"{prefix}/{hour}/{batch[0].transaction_id}{suffix}"


def read_events(s3: Any, bucket: str, key: str, *, gzipped: bool) -> list[Any]:
    """Get the object, check its headers and lines; return the envelopes parsed."""
    stored = s3.get_object(Bucket=bucket, Key=key)
    body: bytes = stored["Body"].read()
    assert stored["ContentType"] == "application/x-ndjson"
    if gzipped:
        assert stored["ContentEncoding"] == "gzip"
        # Magic number, then a zero MTIME: the same batch gives the same bytes.
        assert body[:2] == b"\x1f\x8b"
        assert body[4:8] == b"\x00\x00\x00\x00"
        body = gzip.decompress(body)
    else:
        assert "ContentEncoding" not in stored
    text = body.decode("utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    assert all(lines)
    return [AuditEventEnvelope.from_dict(json.loads(line)) for line in lines]


def test_distribution_is_installed_and_its_entry_point_registered() -> None:
    """access-audit-s3 is installed and load_entrypoints=True registers its "s3" plugin."""
    distribution = importlib.metadata.distribution("access-audit-s3")
    entry_points = [
        ep for ep in distribution.entry_points if ep.group == "access_audit"
    ]
    assert [(ep.name, ep.value) for ep in entry_points] == [
        ("s3", "access_audit_s3.plugin:plugin")
    ]
    assert any(req.startswith("boto3") for req in distribution.requires or ())
    emitter = AuditEmitter(load_entrypoints=True)
    assert emitter.plugin_manager.get_plugin("s3") is plugin_module.plugin
    assert isinstance(plugin_module.plugin, EnvironmentS3Sink)
    assert access_audit_s3.S3Sink is S3Sink


def test_entry_point_plugin_is_inert_without_a_bucket(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    memory_engine: Engine,
    failures: Failures,
) -> None:
    """With ACCESS_AUDIT_S3_BUCKET unset the entry-point plugin makes no client, no
    connection, no error, and logs at most one debug line."""

    def no_client(endpoint_url: str | None = None) -> Any:
        raise AssertionError("the inert plugin made an S3 client")

    def no_connect(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"the inert plugin connected to {address!r}")

    monkeypatch.setattr("access_audit_s3._sink.make_client", no_client)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    caplog.set_level(logging.DEBUG, logger="access_audit_s3")
    recorder = Recorder()
    maker = attach(AuditEmitter([recorder, failures], load_entrypoints=True))
    commit(maker, "a")
    commit(maker, "b", "c")
    assert recorder.names == ["a", "b", "c"]
    assert stored_names(memory_engine) == ["a", "b", "c"]
    assert failures.calls == []
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert len([r for r in caplog.records if r.name == "access_audit_s3"]) <= 1

    # A fresh instance shows the one debug line is said once, not per commit.
    caplog.clear()
    fresh = EnvironmentS3Sink({})
    fresh.audit_events_committed(recorder.batches[0])
    fresh.audit_events_committed(recorder.batches[1])
    assert [r.levelno for r in caplog.records if r.name == "access_audit_s3"] == [
        logging.DEBUG
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"ACCESS_AUDIT_S3_BUCKET": "  "}, None),
        ({"ACCESS_AUDIT_S3_BUCKET": "bkt"}, Settings("bkt", "audit", False, None)),
        (
            {
                "ACCESS_AUDIT_S3_BUCKET": "bkt",
                "ACCESS_AUDIT_S3_PREFIX": "p/q",
                "ACCESS_AUDIT_S3_GZIP": "TRUE",
                "ACCESS_AUDIT_S3_ENDPOINT_URL": "http://127.0.0.1:9",
            },
            Settings("bkt", "p/q", True, "http://127.0.0.1:9"),
        ),
        (
            {"ACCESS_AUDIT_S3_BUCKET": "bkt", "ACCESS_AUDIT_S3_GZIP": "off"},
            Settings("bkt", "audit", False, None),
        ),
    ],
    ids=["unset", "blank-bucket", "bucket-only", "everything", "gzip-off"],
)
def test_settings_are_read_from_the_environment(
    environ: dict[str, str], expected: Settings | None
) -> None:
    """ACCESS_AUDIT_S3_* map to the sink's settings; no bucket means unconfigured."""
    assert Settings.from_environ(environ) == expected


def test_an_unparseable_gzip_flag_raises_from_the_hook() -> None:
    """A bad ACCESS_AUDIT_S3_GZIP is an error naming the variable, not ignored."""
    sink = EnvironmentS3Sink(
        {"ACCESS_AUDIT_S3_BUCKET": "bkt", "ACCESS_AUDIT_S3_GZIP": "maybe"}
    )
    with pytest.raises(ValueError, match="ACCESS_AUDIT_S3_GZIP='maybe'"):
        sink.audit_events_committed(())


def test_an_empty_bucket_name_is_refused() -> None:
    """S3Sink needs a bucket name."""
    with pytest.raises(ValueError, match="bucket"):
        S3Sink("", client=object())  # type: ignore[arg-type]


def test_entry_point_plugin_writes_where_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    endpoint_url: str,
    s3: Any,
    bucket: str,
    failures: Failures,
) -> None:
    """Configured by ACCESS_AUDIT_S3_*, the entry-point plugin writes each batch,
    and follows a changed setting at the next commit."""
    # Start without a cached sink and leave none behind for the other tests.
    monkeypatch.setattr(plugin_module.plugin, "_current", None)
    monkeypatch.setenv("ACCESS_AUDIT_S3_BUCKET", bucket)
    monkeypatch.setenv("ACCESS_AUDIT_S3_ENDPOINT_URL", endpoint_url)
    monkeypatch.setenv("ACCESS_AUDIT_S3_PREFIX", "/env/audit/")
    monkeypatch.setenv("ACCESS_AUDIT_S3_GZIP", "yes")
    recorder = Recorder()
    emitter = AuditEmitter([recorder, failures], load_entrypoints=True)
    assert emitter.plugin_manager.get_plugin("s3") is plugin_module.plugin
    maker = attach(emitter)
    commit(maker, "a", "b")
    monkeypatch.setenv("ACCESS_AUDIT_S3_GZIP", "0")
    commit(maker, "c")
    assert failures.calls == []
    first, second = recorder.batches
    gz_key = expected_key(first, "env/audit", ".ndjson.gz")
    plain_key = expected_key(second, "env/audit")
    assert keys(s3, bucket) == sorted([gz_key, plain_key])
    assert read_events(s3, bucket, gz_key, gzipped=True) == list(first)
    assert read_events(s3, bucket, plain_key, gzipped=False) == list(second)


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_each_committed_transaction_becomes_one_object(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    memory_engine: Engine,
    endpoint_url: str,
    s3: Any,
    bucket: str,
    failures: Failures,
    gzipped: bool,
) -> None:
    """Two commits write two objects at prefix/YYYY/MM/DD/HH/<transaction_id>,
    holding exactly the envelopes the other plugins got, in order."""
    recorder = Recorder()
    sink = S3Sink(bucket, gzip=gzipped, endpoint_url=endpoint_url)
    maker = attach(AuditEmitter([recorder, failures, sink], load_entrypoints=False))
    commit(maker, "a", "b", "c")
    commit(maker, "d")
    assert failures.calls == []
    assert stored_names(memory_engine) == ["a", "b", "c", "d"]
    assert [len(batch) for batch in recorder.batches] == [3, 1]
    suffix = ".ndjson.gz" if gzipped else ".ndjson"
    expected = [expected_key(batch, "audit", suffix) for batch in recorder.batches]
    assert expected[0] != expected[1]
    assert keys(s3, bucket) == sorted(expected)
    for key, batch in zip(expected, recorder.batches, strict=True):
        assert sink.key_for(batch) == key
        assert read_events(s3, bucket, key, gzipped=gzipped) == list(batch)


def test_injected_client_and_prefix(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    s3: Any,
    bucket: str,
    failures: Failures,
) -> None:
    """client= is the client used; the prefix loses its surrounding slashes."""
    recorder = Recorder()
    sink = S3Sink(bucket, prefix="/tenant-7/audit/", client=s3)
    assert sink.client is s3
    maker = attach(AuditEmitter([recorder, failures, sink], load_entrypoints=False))
    commit(maker, "a")
    assert failures.calls == []
    (batch,) = recorder.batches
    assert keys(s3, bucket) == [expected_key(batch, "tenant-7/audit")]
    assert keys(s3, bucket)[0].startswith("tenant-7/audit/2")


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("prefix", "committed", "gzipped", "expected"),
    [
        ("audit", "2024-12-31T23:59:59+00:00", False, "audit/2024/12/31/23/"),
        ("tenant/a/", "2025-01-01T01:30:00+02:00", True, "tenant/a/2024/12/31/23/"),
        ("/", "2025-03-04T05:06:07+00:00", False, "2025/03/04/05/"),
        ("", "2025-03-04T05:06:07-09:30", False, "2025/03/04/14/"),
    ],
    ids=["utc", "offset-crosses-year", "slash-prefix", "empty-prefix"],
)
def test_object_key_is_the_utc_commit_hour_and_transaction_id(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    prefix: str,
    committed: str,
    gzipped: bool,
    expected: str,
) -> None:
    """The key's date and hour are the commit time converted to UTC."""
    recorder = Recorder()
    commit(attach(AuditEmitter([recorder], load_entrypoints=False)), "a")
    (batch,) = recorder.batches
    moved = (dataclasses.replace(batch[0], timestamp=_moment(committed)),)
    suffix = ".ndjson.gz" if gzipped else ".ndjson"
    key = object_key(moved, prefix=prefix, gzip=gzipped)
    assert key == f"{expected}{batch[0].transaction_id}{suffix}"


def test_slices_of_one_transaction_are_objects_of_their_own(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    endpoint_url: str,
    s3: Any,
    bucket: str,
) -> None:
    """The relay delivers a transaction larger than its batch in slices, each
    its own ``audit_events_committed`` call: each slice is an object of its
    own, keyed by its first event's sequence after the first slice (each
    overwrote the one before, and only the last slice was kept)."""
    recorder = Recorder()
    sink = S3Sink(bucket, endpoint_url=endpoint_url)
    commit(attach(AuditEmitter([recorder], load_entrypoints=False)), "a", "b", "c")
    (batch,) = recorder.batches
    sink.audit_events_committed(batch[:2])
    sink.audit_events_committed(batch[2:])
    first, second = object_key(batch[:2]), object_key(batch[2:])
    assert first == object_key(batch)  # a whole transaction keeps its key
    assert second == first.replace(".ndjson", "-2.ndjson")
    assert keys(s3, bucket) == sorted([first, second])


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_a_redelivered_batch_overwrites_the_same_object(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    endpoint_url: str,
    s3: Any,
    bucket: str,
    gzipped: bool,
) -> None:
    """Delivering a batch again (as a relay would, rebuilt from its dicts) leaves
    one object with the same bytes: the transaction id is the key."""
    recorder = Recorder()
    sink = S3Sink(bucket, gzip=gzipped, endpoint_url=endpoint_url)
    commit(attach(AuditEmitter([recorder, sink], load_entrypoints=False)), "a", "b")
    (batch,) = recorder.batches
    (key,) = keys(s3, bucket)
    before = s3.get_object(Bucket=bucket, Key=key)
    before_body = before["Body"].read()

    rebuilt = tuple(AuditEventEnvelope.from_dict(e.to_dict()) for e in batch)
    sink.audit_events_committed(rebuilt)
    sink.audit_events_committed(batch)

    assert keys(s3, bucket) == [key]
    after = s3.get_object(Bucket=bucket, Key=key)
    assert after["Body"].read() == before_body
    assert after["ETag"] == before["ETag"]
    assert after["LastModified"] >= before["LastModified"]
    assert read_events(s3, bucket, key, gzipped=gzipped) == list(batch)


def _rollback(session: Session) -> None:
    operation(session, "gone")
    session.rollback()


def _raise_in_begin(session: Session) -> None:
    with pytest.raises(KeyError), session.begin():
        operation(session, "gone")
        raise KeyError("boom")


def _close(session: Session) -> None:
    operation(session, "gone")
    session.close()


@pytest.mark.parametrize(
    "abandon",
    [_rollback, _raise_in_begin, _close],
    ids=["rollback", "begin-block-raises", "close"],
)
def test_a_rolled_back_transaction_writes_nothing(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    memory_engine: Engine,
    endpoint_url: str,
    s3: Any,
    bucket: str,
    abandon: Callable[[Session], None],
) -> None:
    """No object for a transaction that did not commit; the next commit writes one."""
    recorder = Recorder()
    sink = S3Sink(bucket, endpoint_url=endpoint_url)
    maker = attach(AuditEmitter([recorder, sink], load_entrypoints=False))
    with maker() as session:
        abandon(session)
    assert recorder.events == []
    assert keys(s3, bucket) == []
    assert stored_names(memory_engine) == []

    commit(maker, "kept")
    (batch,) = recorder.batches
    assert keys(s3, bucket) == [expected_key(batch)]
    assert stored_names(memory_engine) == ["kept"]


def test_a_missing_bucket_raises_and_is_reported_while_the_commit_succeeds(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    memory_engine: Engine,
    endpoint_url: str,
    s3: Any,
    failures: Failures,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PutObject to a missing bucket raises from the hook; access_audit logs it and
    calls audit_delivery_failed, and the data is committed."""
    missing = f"missing-{uuid.uuid4().hex[:16]}"
    recorder = Recorder()
    sink = S3Sink(missing, endpoint_url=endpoint_url)
    emitter = AuditEmitter([recorder, failures, sink], load_entrypoints=False)
    maker = attach(emitter)
    with caplog.at_level(logging.ERROR, logger="access_audit"):
        commit(maker, "a", "b")
    assert stored_names(memory_engine) == ["a", "b"]
    (batch,) = recorder.batches
    assert [e.target_id for e in batch] == ["a", "b"]
    ((plugin_name, envelopes, error),) = failures.calls
    assert plugin_name == emitter.plugin_manager.get_name(sink)
    assert envelopes == batch
    assert isinstance(error, ClientError)
    assert error.response["Error"]["Code"] == "NoSuchBucket"
    assert any(
        record.levelno == logging.ERROR and str(batch[0].id) in record.getMessage()
        for record in caplog.records
    )
    with pytest.raises(ClientError, match="NoSuchBucket"):
        sink.audit_events_committed(batch)
    assert missing not in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    # The session machinery is unharmed: the next commit goes through.
    commit(maker, "c")
    assert stored_names(memory_engine) == ["a", "b", "c"]
    assert len(failures.calls) == 2


def test_commit_time_is_within_the_keyed_hour(
    attach: Callable[[AuditEmitter], sessionmaker[Session]],
    endpoint_url: str,
    s3: Any,
    bucket: str,
) -> None:
    """The key's hour is the real commit's UTC hour (checked against the clock)."""
    recorder = Recorder()
    sink = S3Sink(bucket, endpoint_url=endpoint_url)
    before = datetime.now(timezone.utc)
    commit(attach(AuditEmitter([recorder, sink], load_entrypoints=False)), "a")
    after = datetime.now(timezone.utc)
    (key,) = keys(s3, bucket)
    hour = datetime.strptime(key.split("/", 1)[1].rsplit("/", 1)[0], "%Y/%m/%d/%H")
    hour = hour.replace(tzinfo=timezone.utc)
    assert (
        before.replace(minute=0, second=0, microsecond=0)
        <= hour
        <= after.replace(minute=0, second=0, microsecond=0)
    )
    assert hour <= recorder.batches[0][0].timestamp < hour + timedelta(hours=1)
