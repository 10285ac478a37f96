"""examples/plugins/webhook: the access-audit-webhook package (issue 7, item 4).

Installed into the test environment, discovered by its entry point, and driven
through real commits (SQLite in memory) against a real HTTP server running in
this process (``http.server.ThreadingHTTPServer`` on 127.0.0.1), scripted to
answer, fail, drop the connection or stall, and counting TCP connections
(keep-alive). AsyncWebhookPlugin runs under AsyncSession commits on aiosqlite;
signatures are checked with the ``standardwebhooks`` package's own verifier.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.metadata
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import access_audit_webhook
import pytest
from access_audit_webhook import (
    DEFAULT_SOURCE,
    ENVIRONMENT_VARIABLES,
    AsyncWebhookPlugin,
    WebhookDeliveryError,
    WebhookPlugin,
)
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import sessionmaker
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from support import (
    Base,
    Failures,
    Recorder,
    aiosqlite_engine,
    operation,
    stored_names,
)

from access_audit import AuditEmitter, AuditEventEnvelope

NAME = "webhook-under-test"
SECRET = "whsec_" + base64.b64encode(b"s3cr3t-shared-key-of-32-bytes!!!").decode()
ENV_SECRET = "whsec_" + base64.b64encode(b"from-the-environment").decode()
FAST: dict[str, Any] = {"backoff": 0.001, "timeout": 2.0}
"""Plugin options for tests: tiny backoff; a timeout no local answer hits."""


# -- the HTTP endpoint ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    """One request as the server read it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def verified(self, secret: str = SECRET) -> bool:
        """Whether standardwebhooks' own verifier accepts the request."""
        try:
            Webhook(secret).verify(self.body, self.headers, json_parse=False)
        except WebhookVerificationError:
            return False
        return True


class Endpoint:
    """The script the server follows, and every request it received.

    Answers are consumed in order, then ``default`` applies: an HTTP status
    ("200", "500", ...), "drop" (close the connection without answering) or
    "slow" (wait ``slow_seconds``, then 200).
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Received] = []
        self.answers: list[str] = []
        self.default = "200"
        self.slow_seconds = 1.0
        self.stop = threading.Event()
        self.connections = 0  # TCP connections accepted
        self._lock = threading.Lock()

    def script(self, *answers: str, default: str = "200") -> None:
        with self._lock:
            self.answers = list(answers)
            self.default = default

    def connected(self) -> None:
        with self._lock:
            self.connections += 1

    def take(self, request: Received) -> str:
        with self._lock:
            self.requests.append(request)
            return self.answers.pop(0) if self.answers else self.default


class _Server(ThreadingHTTPServer):
    # Join the handler threads on server_close(): nothing outlives the test.
    daemon_threads = False
    endpoint: Endpoint


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Keep-alive (a connection serves requests until the client closes it),
    # so that a pooled client's reuse shows; an idle one is dropped after 5 s.
    protocol_version = "HTTP/1.1"
    timeout = 5

    def setup(self) -> None:
        super().setup()
        self.server.endpoint.connected()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        endpoint = self.server.endpoint
        answer = endpoint.take(
            Received(self.command, self.path, dict(self.headers.items()), body)
        )
        if answer == "drop":
            self.close_connection = True
            return
        if answer == "slow":
            endpoint.stop.wait(endpoint.slow_seconds)
            answer = "200"
        try:
            self.send_response(int(answer))
            if answer.startswith("3"):
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the client gave up (timed out) first

    do_POST = do_GET = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    """A live HTTP server on a free port of 127.0.0.1, shut down afterwards."""
    monkeypatch.setenv("no_proxy", "*")  # never route 127.0.0.1 through a proxy
    endpoint = Endpoint()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.endpoint = endpoint
    host, port = server.server_address[:2]
    endpoint.url = f"http://{host!s}:{port}/hooks/audit?token=t0k3n"
    # A short poll interval: shutdown() waits for the loop's next poll.
    thread = threading.Thread(
        target=server.serve_forever, args=(0.01,), name="webhook-endpoint"
    )
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the application side ------------------------------------------------------


@dataclasses.dataclass
class App:
    """An emitter with a recorder and a failure recorder, attached to a sessionmaker."""

    engine: Engine
    emitter: AuditEmitter
    Session: sessionmaker[Any]
    recorder: Recorder
    failures: Failures

    def commit(self, *names: str) -> tuple[AuditEventEnvelope, ...]:
        """Commit one Item per name, one event each; return the committed batch."""
        before = len(self.recorder.batches)
        with self.Session() as session:
            for name in names:
                operation(session, name)
            session.commit()
        assert len(self.recorder.batches) == before + 1
        return self.recorder.batches[-1]


@pytest.fixture
def make_app(memory_engine: Engine) -> Iterator[Callable[..., App]]:
    """Build an App: ``make_app(plugin)`` registers it as NAME, no entry points;
    ``make_app(load_entrypoints=True)`` loads the installed entry points instead."""
    made: list[App] = []

    def make(plugin: object | None = None, *, load_entrypoints: bool = False) -> App:
        recorder, failures = Recorder(), Failures()
        emitter = AuditEmitter([recorder, failures], load_entrypoints=load_entrypoints)
        if plugin is not None:
            assert emitter.register(plugin, name=NAME) == NAME
        maker = sessionmaker(memory_engine)
        emitter.attach(maker)
        app = App(memory_engine, emitter, maker, recorder, failures)
        made.append(app)
        return app

    yield make
    for app in made:
        app.emitter.detach(app.Session)


def webhook(endpoint: Endpoint, **options: Any) -> WebhookPlugin:
    return WebhookPlugin(endpoint.url, **{"secret": SECRET, **FAST, **options})


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# -- installation and entry point ----------------------------------------------


def test_the_distribution_is_installed_with_its_entry_point() -> None:
    """pip installed access-audit-webhook: no runtime dependencies, entry point ``webhook``."""
    distribution = importlib.metadata.distribution("access-audit-webhook")
    assert distribution.metadata["Name"] == "access-audit-webhook"
    # Standard library only: httpx is the ``async`` extra, the rest for tests.
    assert all("extra ==" in req for req in distribution.requires or ())
    assert any(
        req.startswith("httpx") and 'extra == "async"' in req
        for req in distribution.requires or ()
    )
    points = [
        point
        for point in distribution.entry_points
        if point.group == "access_audit" and point.name == "webhook"
    ]
    assert [point.value for point in points] == [
        "access_audit_webhook:environment_plugin"
    ]
    assert points[0].load() is access_audit_webhook.environment_plugin


def test_entry_point_plugin_is_registered_by_its_name(clean_environment: None) -> None:
    """AuditEmitter(load_entrypoints=True) registers the plugin as ``webhook``."""
    emitter = AuditEmitter(load_entrypoints=True)
    plugin = emitter.plugin_manager.get_plugin("webhook")
    assert plugin is access_audit_webhook.environment_plugin
    callers = [
        caller.name for caller in emitter.plugin_manager.get_hookcallers(plugin) or ()
    ]
    assert callers == ["audit_events_committed"]
    assert (
        AuditEmitter(load_entrypoints=False).plugin_manager.get_plugin("webhook")
        is None
    )


def test_entry_point_plugin_is_inert_without_a_url(
    clean_environment: None,
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No ACCESS_AUDIT_WEBHOOK_URL: no request, no error, at most one debug line."""
    opened: list[object] = []

    def open_(self: object, request: object, *args: Any, **kwargs: Any) -> None:
        opened.append(request)
        raise AssertionError("the inert webhook plugin opened a URL")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", open_)
    caplog.set_level(logging.DEBUG, logger="access_audit.webhook")
    app = make_app(load_entrypoints=True)
    assert app.emitter.plugin_manager.get_plugin("webhook") is (
        access_audit_webhook.environment_plugin
    )
    batch = app.commit("a", "b")
    assert [envelope.target_id for envelope in batch] == ["a", "b"]
    assert stored_names(app.engine) == ["a", "b"]
    assert opened == []
    assert app.failures.named("webhook") == []
    lines = [
        record for record in caplog.records if record.name == "access_audit.webhook"
    ]
    assert [record.levelno for record in lines] == [logging.DEBUG]
    assert access_audit_webhook.environment_plugin.configured() is None


def test_entry_point_plugin_is_configured_from_the_environment(
    clean_environment: None,
    endpoint: Endpoint,
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ACCESS_AUDIT_WEBHOOK_* variables configure the entry-point plugin."""
    for name, value in {
        "URL": endpoint.url,
        "SECRET": ENV_SECRET,
        "TIMEOUT": "2",
        "ATTEMPTS": "2",
        "BACKOFF": "0",
        "CLOUDEVENTS": "true",
        "SOURCE": "/env/source",
    }.items():
        monkeypatch.setenv(f"ACCESS_AUDIT_WEBHOOK_{name}", value)
    endpoint.script("503")  # retried once, as ATTEMPTS=2 allows
    app = make_app(load_entrypoints=True)
    (envelope,) = app.commit("from-env")
    assert app.failures.named("webhook") == []
    assert len(endpoint.requests) == 2
    request = endpoint.requests[-1]
    assert request.header("Content-Type") == "application/cloudevents+json"
    assert request.json() == envelope.to_cloudevent("/env/source")
    assert request.verified(ENV_SECRET)
    assert not request.verified(SECRET)
    configured = access_audit_webhook.environment_plugin.configured()
    assert configured is not None
    assert (configured.timeout, configured.attempts, configured.backoff) == (2, 2, 0)
    # Unset again: the plugin goes back to sending nothing.
    monkeypatch.delenv("ACCESS_AUDIT_WEBHOOK_URL")
    app.commit("after-unset")
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TIMEOUT", "soon", "ACCESS_AUDIT_WEBHOOK_TIMEOUT='soon' is not a number"),
        ("ATTEMPTS", "0", "attempts must be an int >= 1"),
        ("CLOUDEVENTS", "maybe", "ACCESS_AUDIT_WEBHOOK_CLOUDEVENTS='maybe'"),
        ("URL", "ftp://example.com/audit", "url must be an http:// or https://"),
    ],
    ids=[
        "timeout-not-a-number",
        "attempts-zero",
        "cloudevents-not-a-boolean",
        "ftp-url",
    ],
)
def test_invalid_environment_is_reported_at_each_commit(
    clean_environment: None,
    endpoint: Endpoint,
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    message: str,
) -> None:
    """A bad ACCESS_AUDIT_WEBHOOK_* value fails delivery loudly; commits still work."""
    monkeypatch.setenv("ACCESS_AUDIT_WEBHOOK_URL", endpoint.url)
    monkeypatch.setenv(f"ACCESS_AUDIT_WEBHOOK_{variable}", value)
    app = make_app(load_entrypoints=True)
    first, second = app.commit("a"), app.commit("b")
    assert stored_names(app.engine) == ["a", "b"]
    assert app.failures.named("webhook") == [("webhook", first), ("webhook", second)]
    errors = [error for name, _, error in app.failures.calls if name == "webhook"]
    assert all(isinstance(error, ValueError) for error in errors)
    assert message in str(errors[0])
    assert endpoint.requests == []


# -- what is sent --------------------------------------------------------------


def test_each_committed_event_is_posted_once_signed(
    endpoint: Endpoint, make_app: Callable[..., App]
) -> None:
    """One POST per event, in order, body to_json(), with id, time and signature."""
    app = make_app(webhook(endpoint))
    first = app.commit("a", "b", "c")
    second = app.commit("d")
    envelopes = [*first, *second]
    assert app.failures.calls == []
    assert [request.method for request in endpoint.requests] == ["POST"] * 4
    for request, envelope in zip(endpoint.requests, envelopes, strict=True):
        assert request.path == "/hooks/audit?token=t0k3n"
        assert request.body == envelope.to_json().encode()
        assert request.json() == envelope.to_dict()
        assert request.header("Content-Type") == "application/json"
        assert request.header("webhook-id") == str(envelope.id)
        assert request.header("X-Audit-Transaction-Id") == str(envelope.transaction_id)
        assert request.header("User-Agent") == "access-audit-webhook"
        timestamp = request.header("webhook-timestamp")
        assert timestamp is not None and timestamp.isdigit()
        assert abs(int(timestamp) - time.time()) <= 5
        signature = request.header("webhook-signature")
        assert signature is not None and signature.startswith("v1,")
        assert request.verified()
    ids = [request.header("webhook-id") for request in endpoint.requests]
    assert len(set(ids)) == 4


def test_without_a_secret_requests_are_unsigned(
    endpoint: Endpoint, make_app: Callable[..., App]
) -> None:
    """secret=None sends no X-Audit-Signature, and the rest as usual."""
    app = make_app(WebhookPlugin(endpoint.url, **FAST))
    (envelope,) = app.commit("a")
    (request,) = endpoint.requests
    assert request.header("webhook-signature") is None
    assert request.header("webhook-timestamp") is not None
    assert request.header("webhook-id") == str(envelope.id)


def test_cloudevents_mode_posts_structured_cloudevents(
    endpoint: Endpoint, make_app: Callable[..., App]
) -> None:
    """cloudevents=True: application/cloudevents+json, specversion 1.0, id = envelope id."""
    app = make_app(webhook(endpoint, cloudevents=True, source="/tests/webhook"))
    batch = app.commit("a", "b")
    assert app.failures.calls == []
    assert len(endpoint.requests) == 2
    for request, envelope in zip(endpoint.requests, batch, strict=True):
        assert request.header("Content-Type") == "application/cloudevents+json"
        body = request.json()
        assert body == envelope.to_cloudevent("/tests/webhook")
        assert body["specversion"] == "1.0"
        assert body["id"] == str(envelope.id) == request.header("webhook-id")
        assert request.verified()
        event = from_http(
            HTTPMessage(headers=request.headers, body=request.body), JSONFormat()
        )
        assert event.get_specversion() == "1.0"
        assert event.get_id() == str(envelope.id)
        assert event.get_source() == "/tests/webhook"
        assert event.get_type() == "access_audit.item_created"
        assert event.get_subject() == f"item/{envelope.target_id}"


@pytest.mark.parametrize(
    ("cloudevents", "content_type"),
    [(False, "application/json"), (True, "application/cloudevents-batch+json")],
    ids=["json", "cloudevents"],
)
def test_batch_mode_posts_one_array_per_commit(
    endpoint: Endpoint,
    make_app: Callable[..., App],
    cloudevents: bool,
    content_type: str,
) -> None:
    """batch=True: one signed POST per commit, a JSON array of its events in order."""
    app = make_app(webhook(endpoint, batch=True, cloudevents=cloudevents))
    batches = [app.commit("a", "b", "c"), app.commit("d")]
    assert app.failures.calls == []
    assert len(endpoint.requests) == 2
    for request, batch in zip(endpoint.requests, batches, strict=True):
        expected = [
            envelope.to_cloudevent("/access_audit")
            if cloudevents
            else envelope.to_dict()
            for envelope in batch
        ]
        assert request.json() == expected
        assert request.header("Content-Type") == content_type
        assert request.header("X-Audit-Transaction-Id") == str(batch[0].transaction_id)
        # The batch's webhook-id: the transaction id, one per commit.
        assert request.header("webhook-id") == str(batch[0].transaction_id)
        assert request.verified()


def test_batch_slices_of_one_transaction_have_webhook_ids_of_their_own(
    endpoint: Endpoint, make_app: Callable[..., App]
) -> None:
    """The relay delivers a transaction larger than its batch in slices: each
    slice is another body, so another ``webhook-id`` (the transaction id,
    then its first event's sequence). One id for all of them made a
    receiver that de-duplicates by it keep the first slice only."""
    plugin = webhook(endpoint, batch=True)
    app = make_app(plugin)
    batch = app.commit("a", "b", "c")
    plugin.audit_events_committed(batch[:2])
    plugin.audit_events_committed(batch[2:])
    whole, first, second = (
        request.header("webhook-id") for request in endpoint.requests
    )
    assert whole == first == str(batch[0].transaction_id)
    assert second == f"{batch[0].transaction_id}-2"
    assert [len(request.json()) for request in endpoint.requests] == [3, 2, 1]


def test_rolled_back_transactions_send_nothing(
    endpoint: Endpoint, make_app: Callable[..., App]
) -> None:
    """rollback(), an exception in begin(), close() without commit: no request."""
    app = make_app(webhook(endpoint))
    with app.Session() as session:
        operation(session, "rolled-back")
        session.rollback()
    with pytest.raises(RuntimeError, match="boom"), app.Session.begin() as session:
        operation(session, "raised")
        raise RuntimeError("boom")
    with app.Session() as session:
        operation(session, "closed")
    assert endpoint.requests == []
    (kept,) = app.commit("kept")
    assert [request.header("webhook-id") for request in endpoint.requests] == [
        str(kept.id)
    ]
    assert stored_names(app.engine) == ["kept"]


# -- retries and failures ------------------------------------------------------


@pytest.mark.parametrize(
    "answers",
    [("500", "500"), ("503", "429"), ("drop", "502")],
    ids=["500-500", "503-429", "dropped-connection-502"],
)
def test_a_server_failing_twice_gets_the_event_on_the_third_attempt(
    endpoint: Endpoint,
    make_app: Callable[..., App],
    caplog: pytest.LogCaptureFixture,
    answers: tuple[str, str],
) -> None:
    """Two retryable failures, then 200: delivered on attempt 3, nothing reported."""
    endpoint.script(*answers)
    app = make_app(webhook(endpoint, attempts=3))
    (envelope,) = app.commit("a")
    assert app.failures.calls == []
    assert len(endpoint.requests) == 3
    for request in endpoint.requests:
        assert request.body == envelope.to_json().encode()
        assert request.header("webhook-id") == str(envelope.id)
        assert request.verified()
    retries = [
        record for record in caplog.records if record.name == "access_audit.webhook"
    ]
    assert [record.levelno for record in retries] == [logging.WARNING] * 2
    assert "token" not in caplog.text  # the query string stays out of the logs
    assert not [record for record in caplog.records if record.name == "access_audit"]


@pytest.mark.parametrize(
    ("answers", "delivered", "sent"),
    [(("500",), 0, [0, 0, 0]), (("200",), 1, [0, 1, 1, 1])],
    ids=["first-event-fails", "second-event-fails"],
)
def test_a_server_that_keeps_failing_is_reported_and_the_commit_stands(
    endpoint: Endpoint,
    make_app: Callable[..., App],
    caplog: pytest.LogCaptureFixture,
    answers: tuple[str, ...],
    delivered: int,
    sent: list[int],
) -> None:
    """After ``attempts`` tries the hook raises; audit_delivery_failed names the
    plugin; the rest of the batch is not sent; data committed, session usable."""
    endpoint.script(*answers, default="500")
    app = make_app(webhook(endpoint, attempts=3))
    batch = app.commit("a", "b")
    assert stored_names(app.engine) == ["a", "b"]
    assert app.recorder.batches == [batch]
    assert [request.header("webhook-id") for request in endpoint.requests] == [
        str(batch[index].id) for index in sent
    ]
    ((name, envelopes, error),) = app.failures.calls
    assert (name, envelopes) == (NAME, batch)
    assert isinstance(error, WebhookDeliveryError)
    assert (error.attempts, error.status) == (3, 500)
    assert error.delivered == batch[:delivered]
    assert error.undelivered == batch[delivered:]
    assert isinstance(error.__cause__, urllib.error.HTTPError)
    assert error.__cause__.code == 500
    assert "token" not in str(error)
    logged = [record for record in caplog.records if record.name == "access_audit"]
    assert len(logged) == 1 and NAME in logged[0].getMessage()
    # The next commit goes through once the endpoint recovers.
    endpoint.script(default="200")
    (later,) = app.commit("c")
    assert endpoint.requests[-1].header("webhook-id") == str(later.id)
    assert len(app.failures.calls) == 1


@pytest.mark.parametrize(
    "status", ["400", "401", "404", "302"], ids=["400", "401", "404", "302-redirect"]
)
def test_client_errors_and_redirects_are_not_retried(
    endpoint: Endpoint, make_app: Callable[..., App], status: str
) -> None:
    """A 4xx (or a 3xx, not followed) fails at once: one request, reported."""
    endpoint.script(default=status)
    app = make_app(webhook(endpoint, attempts=3))
    (envelope,) = app.commit("a")
    assert [request.method for request in endpoint.requests] == ["POST"]
    ((name, envelopes, error),) = app.failures.calls
    assert (name, envelopes) == (NAME, (envelope,))
    assert isinstance(error, WebhookDeliveryError)
    assert (error.attempts, error.status) == (1, int(status))
    assert error.undelivered == (envelope,)
    assert stored_names(app.engine) == ["a"]


@pytest.mark.parametrize(
    ("default", "reported"), [("200", False), ("slow", True)], ids=["once", "always"]
)
def test_a_timeout_is_retried_then_reported(
    endpoint: Endpoint, make_app: Callable[..., App], default: str, reported: bool
) -> None:
    """A server slower than ``timeout`` is retried; when it stays slow, reported."""
    endpoint.script("slow", default=default)
    endpoint.slow_seconds = 2.0
    app = make_app(webhook(endpoint, attempts=2, timeout=0.25))
    started = time.monotonic()
    (envelope,) = app.commit("a")
    elapsed = time.monotonic() - started
    assert elapsed < 1.5  # the timeout cut both waits short
    assert len(endpoint.requests) == 2
    assert {request.header("webhook-id") for request in endpoint.requests} == {
        str(envelope.id)
    }
    if not reported:
        assert app.failures.calls == []
        return
    ((name, envelopes, error),) = app.failures.calls
    assert (name, envelopes) == (NAME, (envelope,))
    assert isinstance(error, WebhookDeliveryError)
    assert (error.attempts, error.status) == (2, None)
    cause = error.__cause__
    if isinstance(cause, urllib.error.URLError):
        cause = cause.reason  # type: ignore[assignment]
    assert isinstance(cause, TimeoutError)
    assert stored_names(app.engine) == ["a"]


@pytest.mark.parametrize("jitter", [False, True], ids=["exact", "jitter"])
def test_backoff_doubles_after_each_failure(
    endpoint: Endpoint,
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
    jitter: bool,
) -> None:
    """Waits are backoff * 2**(n-1); with jitter, a random time up to each."""
    waits: list[float] = []
    monkeypatch.setattr(access_audit_webhook._plugin, "sleep", waits.append)
    endpoint.script(default="500")
    app = make_app(webhook(endpoint, attempts=4, backoff=0.5, jitter=jitter))
    app.commit("a")
    assert len(endpoint.requests) == 4
    assert len(app.failures.calls) == 1
    if not jitter:
        assert waits == [0.5, 1.0, 2.0]
    else:
        assert len(waits) == 3
        assert all(
            0 <= wait <= cap for wait, cap in zip(waits, [0.5, 1.0, 2.0], strict=True)
        )
        assert waits != [0.5, 1.0, 2.0]


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("ftp://example.com/audit", {}, "url must be an http:// or https:// URL"),
        ("file:///etc/passwd", {}, "url must be an http:// or https:// URL"),
        ("example.com/audit", {}, "url must be an http:// or https:// URL"),
        ("http:///audit", {}, "names no host"),
        ("https://user:pw@example.com/", {}, "must not carry credentials"),
        ("https://example.com/", {"timeout": 0}, "timeout must be > 0"),
        ("https://example.com/", {"timeout": float("nan")}, "timeout must be > 0"),
        ("https://example.com/", {"attempts": 0}, "attempts must be an int >= 1"),
        ("https://example.com/", {"attempts": 1.5}, "attempts must be an int >= 1"),
        ("https://example.com/", {"backoff": -1}, "backoff must be >= 0"),
        ("https://example.com/", {"source": ""}, "source must be a non-empty"),
        ("https://example.com/", {"secret": ""}, "secret must not be empty"),
        ("https://example.com/", {"secret": b""}, "secret must not be empty"),
        ("https://example.com/", {"secret": "whsec_not base64!"}, "whsec_"),
    ],
    ids=[
        "ftp",
        "file",
        "no-scheme",
        "no-host",
        "credentials",
        "timeout-zero",
        "timeout-nan",
        "attempts-zero",
        "attempts-float",
        "backoff-negative",
        "source-empty",
        "secret-empty",
        "secret-empty-bytes",
        "secret-not-base64",
    ],
)
def test_the_constructor_refuses_bad_settings(
    url: str, options: dict[str, Any], message: str
) -> None:
    """A non-http(s) URL or an impossible setting fails at construction, named."""
    with pytest.raises(ValueError, match=message):
        WebhookPlugin(url, **options)


def test_repr_shows_neither_secret_nor_query() -> None:
    """repr() names the endpoint without its query string or the secret."""
    plugin = WebhookPlugin(
        "HTTPS://Example.com/in?token=abc", secret="hush", batch=True
    )
    text = repr(plugin)
    assert "https://example.com/in" in text.lower()
    assert "abc" not in text and "hush" not in text
    assert "batch=True" in text


# -- the signature, checked by standardwebhooks ----------------------------------


@pytest.mark.parametrize(
    "secret",
    [SECRET, SECRET.removeprefix("whsec_"), b"raw-key-bytes"],
    ids=["whsec", "bare-base64", "raw-bytes"],
)
def test_the_signature_verifies_with_standardwebhooks(
    endpoint: Endpoint, make_app: Callable[..., App], secret: str | bytes
) -> None:
    """standardwebhooks' Webhook.verify accepts each request, and nothing changed."""
    app = make_app(webhook(endpoint, secret=secret))
    (envelope,) = app.commit("a")
    (request,) = endpoint.requests
    signature = request.header("webhook-signature") or ""
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]+={0,2}", signature)
    assert request.header("webhook-id") == str(envelope.id)
    assert abs(int(request.header("webhook-timestamp") or 0) - time.time()) < 60
    verifier = Webhook(secret)
    assert verifier.verify(request.body, request.headers) == envelope.to_dict()
    tampered = [
        (request.body + b" ", request.headers),
        (request.body, {**request.headers, "Webhook-Id": str(uuid.uuid4())}),
        (request.body, {**request.headers, "Webhook-Timestamp": "1700000000"}),
    ]
    for body, headers in tampered:
        with pytest.raises(WebhookVerificationError):
            verifier.verify(body, headers)
    assert not request.verified("whsec_" + base64.b64encode(b"another-key").decode())


# -- the receiver recipe ---------------------------------------------------------

PACKAGE_README = Path(__file__).parent.parent / "README.md"

Receive = Callable[[Message, bytes], int]


@pytest.fixture
def recipe() -> dict[str, Any]:
    """The package README's receiver recipe, run: its ``receive`` and ``received``."""
    blocks = re.findall(r"```python\n(.*?)```", PACKAGE_README.read_text(), re.DOTALL)
    (code,) = [block for block in blocks if "def receive(" in block]
    namespace: dict[str, Any] = {"__name__": "receiver_recipe", "SECRET": SECRET}
    exec(
        compile(code, "examples/plugins/webhook/README.md[receive]", "exec"), namespace
    )
    return namespace


def as_received(
    request: Received, changes: Mapping[str, str | None] | None = None
) -> Message:
    """*request*'s headers as a web framework hands them over (any-case lookup),
    with *changes* applied: a value replaces the header, None removes it."""
    message = Message()
    for name, value in request.headers.items():
        message[name] = value
    for name, changed in (changes or {}).items():
        del message[name]
        if changed is not None:
            message[name] = changed
    return message


@pytest.mark.parametrize(
    "options",
    [{}, {"cloudevents": True}, {"batch": True}],
    ids=["json", "cloudevents", "batch"],
)
def test_the_receiver_recipe_stores_retries_and_replays_once(
    endpoint: Endpoint,
    make_app: Callable[..., App],
    recipe: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """Retries and a replayed request store each event once, keyed by its id."""
    endpoint.script("500")  # the first request is sent again, signed afresh
    app = make_app(webhook(endpoint, **options))
    batch = app.commit("a", "b")
    assert app.failures.calls == []
    receive: Receive = recipe["receive"]
    for request in endpoint.requests:
        assert receive(as_received(request), request.body) == 200
    # Captured and replayed inside the window: the signature still holds.
    first = endpoint.requests[0]
    assert receive(as_received(first), first.body) == 200
    assert recipe["received"] == {
        str(envelope.id): envelope.to_cloudevent(DEFAULT_SOURCE)
        if options.get("cloudevents")
        else envelope.to_dict()
        for envelope in batch
    }


def _stale(request: Received) -> tuple[dict[str, str | None], bytes]:
    timestamp = str(int(time.time()) - 301)
    msg_id = request.header("webhook-id") or ""
    signature = access_audit_webhook.sign(SECRET, msg_id, timestamp, request.body)
    return {"webhook-timestamp": timestamp, "webhook-signature": signature}, (
        request.body
    )


REFUSED: dict[str, Callable[[Received], tuple[dict[str, str | None], bytes]]] = {
    "unsigned": lambda r: ({"webhook-signature": None}, r.body),
    "no-timestamp": lambda r: ({"webhook-timestamp": None}, r.body),
    "no-id": lambda r: ({"webhook-id": None}, r.body),
    "id-forged": lambda r: ({"webhook-id": str(uuid.uuid4())}, r.body),
    "signature-garbled": lambda r: ({"webhook-signature": "v1,xyz"}, r.body),
    "body-changed": lambda r: ({}, r.body.replace(b'"a"', b'"z"')),
    "stale": _stale,
}


@pytest.mark.parametrize("change", list(REFUSED.values()), ids=list(REFUSED))
def test_the_receiver_recipe_answers_401_and_stores_nothing_unverified(
    endpoint: Endpoint,
    make_app: Callable[..., App],
    recipe: dict[str, Any],
    change: Callable[[Received], tuple[dict[str, str | None], bytes]],
) -> None:
    """A missing or forged header, a changed body or an old request: 401."""
    app = make_app(webhook(endpoint))
    (envelope,) = app.commit("a")
    (request,) = endpoint.requests
    receive: Receive = recipe["receive"]
    changes, body = change(request)
    assert receive(as_received(request, changes), body) == 401
    assert recipe["received"] == {}
    assert receive(as_received(request), request.body) == 200
    assert recipe["received"] == {str(envelope.id): envelope.to_dict()}


# -- AsyncWebhookPlugin: the async def hook, pooled ------------------------------


def async_webhook(endpoint: Endpoint, **options: Any) -> AsyncWebhookPlugin:
    return AsyncWebhookPlugin(endpoint.url, **{"secret": SECRET, **FAST, **options})


AsyncBody = Callable[[async_sessionmaker[AsyncSession]], Awaitable[None]]


def run_async(
    tmp_path: Path, emitter: AuditEmitter, plugin: AsyncWebhookPlugin, body: AsyncBody
) -> None:
    """Run *body* with an async_sessionmaker on aiosqlite, attached to *emitter*,
    in a fresh event loop; close the plugin's clients and the engine after."""

    async def main() -> None:
        engine: AsyncEngine = aiosqlite_engine(tmp_path / "webhook.db")
        maker = async_sessionmaker(engine)
        emitter.attach(maker)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
            await body(maker)
        finally:
            await plugin.aclose()
            emitter.detach(maker)
            await engine.dispose()

    asyncio.run(main())


async def commit_async(
    maker: async_sessionmaker[AsyncSession], *names: str, rollback: bool = False
) -> None:
    async with maker() as session:
        for name in names:
            operation(session.sync_session, name)
        if rollback:
            await session.rollback()
        else:
            await session.commit()


def async_emitter(
    plugin: AsyncWebhookPlugin,
) -> tuple[AuditEmitter, Recorder, Failures]:
    recorder, failures = Recorder(), Failures()
    emitter = AuditEmitter([recorder, failures], load_entrypoints=False)
    assert emitter.register(plugin, name=NAME) == NAME
    return emitter, recorder, failures


def test_an_async_session_commit_delivers_once(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """await session.commit() (aiosqlite) POSTs each event once, before it returns."""
    plugin = async_webhook(endpoint)
    emitter, recorder, failures = async_emitter(plugin)

    async def body(maker: async_sessionmaker[AsyncSession]) -> None:
        await commit_async(maker, "rolled-back", rollback=True)
        assert endpoint.requests == []
        await commit_async(maker, "a")
        assert len(endpoint.requests) == 1  # delivered before commit() returned

    run_async(tmp_path, emitter, plugin, body)
    ((envelope,),) = recorder.batches
    (request,) = endpoint.requests
    assert request.header("webhook-id") == str(envelope.id)
    assert request.body == envelope.to_json().encode()
    assert request.verified()
    assert failures.calls == []


def test_async_deliveries_reuse_one_pooled_connection(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    """Several commits on one loop: one TCP connection carries every request."""
    plugin = async_webhook(endpoint)
    emitter, recorder, failures = async_emitter(plugin)

    async def body(maker: async_sessionmaker[AsyncSession]) -> None:
        for index in range(5):
            await commit_async(maker, f"item-{index}")
        await commit_async(maker, "x", "y")

    run_async(tmp_path, emitter, plugin, body)
    assert failures.calls == []
    envelopes = [envelope for batch in recorder.batches for envelope in batch]
    assert [request.header("webhook-id") for request in endpoint.requests] == [
        str(envelope.id) for envelope in envelopes
    ]
    assert len(endpoint.requests) == 7
    assert all(request.verified() for request in endpoint.requests)
    assert endpoint.connections == 1


def test_async_plugin_from_a_sync_session_and_aclose_on_its_loop(
    endpoint: Endpoint, make_app: Callable[..., App]
) -> None:
    """A sync Session: delivered on the emitter's loop, its client reused there;
    aclose() from another loop closes it on its own."""
    plugin = async_webhook(endpoint)
    app = make_app(plugin)
    app.commit("a")
    app.commit("b", "c")
    assert app.failures.calls == []
    assert len(endpoint.requests) == 3
    assert all(request.verified() for request in endpoint.requests)
    assert endpoint.connections == 1
    (client,) = plugin._clients.values()
    asyncio.run(plugin.aclose())
    assert client.is_closed
    assert plugin._clients == {}
    asyncio.run(plugin.aclose())  # idempotent


def _refused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks/audit"  # nothing listens there now


@pytest.mark.parametrize("failure", ["http-500", "refused", "timeout"])
def test_async_failures_reach_audit_delivery_failed(
    endpoint: Endpoint, tmp_path: Path, failure: str
) -> None:
    """HTTP 500, a refused connection, a timeout: retried, then reported."""
    options: dict[str, Any] = {"attempts": 2}
    if failure == "http-500":
        endpoint.script(default="500")
    elif failure == "refused":
        options["url"] = _refused_url()
    else:
        endpoint.slow_seconds = 2.0
        endpoint.script(default="slow")
        options["timeout"] = 0.2
    url = options.pop("url", endpoint.url)
    plugin = AsyncWebhookPlugin(url, **{"secret": SECRET, **FAST, **options})
    emitter, recorder, failures = async_emitter(plugin)

    async def body(maker: async_sessionmaker[AsyncSession]) -> None:
        await commit_async(maker, "a", "b")

    run_async(tmp_path, emitter, plugin, body)
    (batch,) = recorder.batches
    ((name, envelopes, error),) = failures.calls
    assert name == NAME
    assert envelopes == batch
    assert isinstance(error, WebhookDeliveryError)
    assert error.attempts == 2
    assert error.delivered == () and error.undelivered == batch
    assert error.status == (500 if failure == "http-500" else None)
    expected = 0 if failure == "refused" else 2
    assert len(endpoint.requests) == expected
