"""access_audit.flask: the AccessAudit extension."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column
from support import Recorder, wait_until
from werkzeug.middleware.proxy_fix import ProxyFix

from access_audit import (
    Actor,
    AuditConfigurationError,
    AuditEventEnvelope,
    audit_context,
    hookimpl,
    stage_event,
)
from access_audit._listeners import _weak_hooks
from access_audit.flask import AccessAudit
from access_audit.testing import AuditEventRecorder, capture_audit_events

IMPORTED = Recorder()
"""Registered through ACCESS_AUDIT_PLUGINS = ["test_flask:IMPORTED"]."""

REQUEST_KEYS = {"ip_address", "user_agent", "request_id", "method", "path", "endpoint"}


class Flaky:
    """A plugin that raises while ``broken``, then records the target ids."""

    def __init__(self) -> None:
        self.broken = True
        self.received: list[str] = []

    @hookimpl
    def audit_event_logged(self, envelope: Any) -> None:
        if self.broken:
            raise ConnectionError("sink down")
        self.received.append(envelope.target_id)


def make_app(
    tmp_path: Path, name: str = "app", **config: Any
) -> tuple[Flask, SQLAlchemy]:
    """A Flask app with its own Flask-SQLAlchemy database and a ``/tags`` route."""
    app = Flask(name)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / name}.db"
    app.config["ACCESS_AUDIT_LOAD_ENTRYPOINTS"] = False
    app.config.update(config)
    db = SQLAlchemy(app)

    class Tag(db.Model):  # type: ignore[name-defined,misc]
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(40), unique=True)

    @app.post("/tags/<name>")
    def create_tag(name: str) -> dict[str, Any]:
        tag = Tag(name=name)
        db.session.add(tag)
        stage_event(
            db.session,
            "tag_create",
            target_type="tag",
            target_id=lambda: tag.id,
            target_name=name,
            action="create",
        )
        stage_event(
            db.session, "tag_seen", target_type="tag", target_id=name, action="see"
        )
        db.session.commit()
        return {"id": tag.id}

    with app.app_context():
        db.create_all()
    return app, db


@pytest.fixture
def audit_events() -> Iterator[AuditEventRecorder]:
    with capture_audit_events() as recorder:
        yield recorder


def test_events_staged_in_a_request_carry_request_metadata(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """ip, user agent, request id, method, path and endpoint are captured at stage time."""
    app, db = make_app(tmp_path)
    recorder = Recorder()
    AccessAudit(app, db, plugins=[recorder])
    response = app.test_client().post(
        "/tags/red",
        headers={"User-Agent": "pytest-agent"},
        environ_base={"REMOTE_ADDR": "203.0.113.9"},
    )
    assert response.status_code == 200
    envelope = audit_events.assert_emitted("tag_create", target_id=response.json["id"])
    assert set(envelope.metadata) == REQUEST_KEYS
    assert envelope.metadata["ip_address"] == "203.0.113.9"
    assert envelope.metadata["user_agent"] == "pytest-agent"
    assert envelope.metadata["method"] == "POST"
    assert envelope.metadata["path"] == "/tags/red"
    assert envelope.metadata["endpoint"] == "create_tag"
    assert [e.event_type for e in recorder.events] == ["tag_create", "tag_seen"]


def test_request_id_is_stable_within_a_request_and_new_per_request(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """One generated request id per request; a sent X-Request-ID is used as is."""
    app, db = make_app(tmp_path)
    AccessAudit(app, db)
    client = app.test_client()
    client.post("/tags/a")
    client.post("/tags/b")
    client.post("/tags/c", headers={"X-Request-ID": "req-123"})
    ids = [e.metadata["request_id"] for e in audit_events.events]
    assert ids[0] == ids[1] and ids[2] == ids[3]
    assert ids[0] != ids[2] and len(ids[0]) == 32
    assert ids[4:] == ["req-123", "req-123"]


def test_a_forwarded_for_header_is_not_trusted(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """A client-sent X-Forwarded-For does not change ip_address."""
    app, db = make_app(tmp_path)
    AccessAudit(app, db)
    app.test_client().post(
        "/tags/a",
        headers={"X-Forwarded-For": "198.51.100.66"},
        environ_base={"REMOTE_ADDR": "203.0.113.9"},
    )
    assert audit_events.events[0].metadata["ip_address"] == "203.0.113.9"


def test_proxy_fix_gives_the_client_address(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """Behind werkzeug's ProxyFix, ip_address is the address the proxy reports."""
    app, db = make_app(tmp_path)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    AccessAudit(app, db)
    app.test_client().post(
        "/tags/a",
        headers={"X-Forwarded-For": "198.51.100.66"},
        environ_base={"REMOTE_ADDR": "10.0.0.1"},
    )
    assert audit_events.events[0].metadata["ip_address"] == "198.51.100.66"


def test_outside_a_request_metadata_is_absent_and_audit_context_gives_the_actor(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """A CLI job or worker has no request keys; audit_context supplies its actor."""
    app, db = make_app(tmp_path)
    audit = AccessAudit(app, db)
    audit.actor_loader(lambda: Actor("never-called-outside-a-request"))
    with app.app_context(), audit_context(actor_id="nightly-job", job="sync"):
        stage_event(
            db.session, "tag_delete", target_type="tag", target_id=1, action="d"
        )
        db.session.commit()
    envelope = audit_events.assert_emitted("tag_delete", actor_id="nightly-job")
    assert dict(envelope.metadata) == {"job": "sync"}


@pytest.mark.parametrize(
    ("loaded", "actor"),
    [
        (Actor("u-1", "ada@example.com"), ("u-1", "ada@example.com")),
        (("u-2", None), ("u-2", None)),
        (None, ("system", None)),
    ],
    ids=["Actor", "tuple", "None"],
)
def test_actor_loader_supplies_the_actor_of_request_events(
    tmp_path: Path,
    audit_events: AuditEventRecorder,
    loaded: Any,
    actor: tuple[str, str | None],
) -> None:
    """The actor loader is called at stage time; None falls back to "system"."""
    app, db = make_app(tmp_path)
    audit = AccessAudit(app, db)

    @audit.actor_loader
    def current_user() -> Any:
        return loaded

    app.test_client().post("/tags/a")
    envelope = audit_events.events[0]
    assert (envelope.actor_id, envelope.actor_email) == actor


def test_two_apps_in_one_process_each_have_their_own_emitter(tmp_path: Path) -> None:
    """Separate apps (and databases) send only to their own plugins."""
    first, first_db = make_app(tmp_path, "first")
    second, second_db = make_app(tmp_path, "second")
    first_recorder, second_recorder = Recorder(), Recorder()
    audit = AccessAudit()
    first.config["ACCESS_AUDIT_PLUGINS"] = []
    AccessAudit(first, first_db, plugins=[first_recorder])
    audit.init_app(second, second_db)
    audit.emitter_of(second).register(second_recorder)
    first.test_client().post("/tags/one")
    second.test_client().post("/tags/two")
    assert first_recorder.names[1:] == ["one"]
    assert second_recorder.names[1:] == ["two"]
    assert audit.emitter_of(first) is not audit.emitter_of(second)


def test_one_database_shared_by_two_apps_routes_by_current_app(tmp_path: Path) -> None:
    """With one SQLAlchemy() on two apps, each app's events go to its own emitter."""
    db = SQLAlchemy()

    class Note(db.Model):  # type: ignore[name-defined,misc]
        id: Mapped[int] = mapped_column(primary_key=True)

    audit = AccessAudit()
    recorders = {}
    apps = {}
    for name in ("left", "right"):
        app = Flask(name)
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / name}.db"
        app.config["ACCESS_AUDIT_LOAD_ENTRYPOINTS"] = False
        db.init_app(app)
        audit.init_app(app, db)
        recorders[name] = Recorder()
        audit.emitter_of(app).register(recorders[name])
        with app.app_context():
            db.create_all()
        apps[name] = app
    for name, app in apps.items():
        with app.app_context():
            db.session.add(Note())
            stage_event(
                db.session, "note_add", target_type="note", target_id=name, action="a"
            )
            db.session.commit()
    assert recorders["left"].names == ["left"]
    assert recorders["right"].names == ["right"]


@pytest.mark.parametrize("dispatch", ["inline", "background"])
def test_an_app_factory_per_test_leaves_no_emitter_behind(
    tmp_path: Path, dispatch: str
) -> None:
    """A module-level SQLAlchemy() and AccessAudit(), and a new app per test:
    each app's emitter goes once its app does (the listeners on the shared
    session class held every one of them, with its plugins, and every commit
    called them all), and so does its background thread (whose last job
    held the emitter); the current app's events still reach its own."""
    import threading

    db = SQLAlchemy()

    class Row(db.Model):  # type: ignore[name-defined,misc]
        id: Mapped[int] = mapped_column(primary_key=True)

    threads = threading.active_count()
    audit = AccessAudit(load_entrypoints=False, dispatch=dispatch)
    emitters: list[weakref.ref[Any]] = []
    session_class = None
    for number in range(30):
        app = Flask(f"app{number}")
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'db'}.db"
        db.init_app(app)
        recorder = Recorder()
        audit.init_app(app, db, plugins=[recorder])
        emitters.append(weakref.ref(audit.emitter_of(app)))
        with app.app_context():
            db.create_all()
            db.session.add(Row())
            stage_event(
                db.session, "row_add", target_type="row", target_id=number, action="a"
            )
            db.session.commit()
            session_class = type(db.session())
            db.session.remove()
        assert audit.emitter_of(app).flush(timeout=10)
        assert recorder.names == [str(number)]
        del app, recorder
        gc.collect()
    assert [ref() is not None for ref in emitters].count(True) <= 1
    wait_until(lambda: threading.active_count() <= threads + 1, 10)
    assert session_class is not None
    installed = [entry[1] for entry in _weak_hooks[session_class]]
    assert 1 <= installed.count("after_commit") <= 2, installed


def test_registering_twice_raises_a_clear_error(tmp_path: Path) -> None:
    """A second init_app on the same app raises RuntimeError saying what to do."""
    app, db = make_app(tmp_path)
    AccessAudit(app, db)
    with pytest.raises(RuntimeError, match=r"already registered.*use that instance"):
        AccessAudit(app, db)


def test_config_keys_are_read_with_defaults(tmp_path: Path) -> None:
    """init_app sets every ACCESS_AUDIT_* default in app.config."""
    app = Flask("defaults")
    AccessAudit(app)
    assert app.config["ACCESS_AUDIT_ENABLED"] is True
    assert app.config["ACCESS_AUDIT_LOAD_ENTRYPOINTS"] is True
    assert app.config["ACCESS_AUDIT_PLUGINS"] == []
    assert app.config["ACCESS_AUDIT_RAISE_PLUGIN_ERRORS"] is False


def test_plugins_config_key_registers_import_strings(tmp_path: Path) -> None:
    """ACCESS_AUDIT_PLUGINS imports "module:object" plugins and registers them."""
    IMPORTED.clear()
    app, db = make_app(tmp_path, ACCESS_AUDIT_PLUGINS=["test_flask:IMPORTED"])
    AccessAudit(app, db)
    app.test_client().post("/tags/imported")
    assert IMPORTED.names[1:] == ["imported"]


@pytest.mark.parametrize(
    "value",
    [["no_such_module_xyz:plugin"], ["test_flask:NO_SUCH_NAME"], "test_flask:IMPORTED"],
    ids=["missing-module", "missing-attribute", "not-a-list"],
)
def test_bad_plugin_import_string_fails_at_init_app(tmp_path: Path, value: Any) -> None:
    """A bad ACCESS_AUDIT_PLUGINS entry fails init_app naming the key and string."""
    app = Flask("bad")
    app.config["ACCESS_AUDIT_PLUGINS"] = value
    with pytest.raises(AuditConfigurationError, match="ACCESS_AUDIT_PLUGINS") as caught:
        AccessAudit(app)
    assert "test_flask:" in str(caught.value) or "no_such_module_xyz" in str(
        caught.value
    )
    assert "access_audit" not in app.extensions


class Misspelt:
    """A plugin whose hook name is misspelt: pluggy refuses it."""

    @hookimpl
    def audit_event_loged(self, envelope: AuditEventEnvelope) -> None:
        """Never called."""


MISSPELT = Misspelt()


@pytest.mark.parametrize(
    ("value", "string"),
    [
        (["test_flask:MISSPELT"], "test_flask:MISSPELT"),
        (["test_flask:IMPORTED", "test_flask:IMPORTED"], "test_flask:IMPORTED"),
    ],
    ids=["unknown-hook", "listed-twice"],
)
def test_a_plugin_refused_at_registration_fails_init_app_naming_it(
    tmp_path: Path, value: list[str], string: str
) -> None:
    """An ACCESS_AUDIT_PLUGINS entry that imports but is refused when
    registered (a misspelt hook, the same object twice) names the key and
    the string too: pluggy's error named neither."""
    app = Flask("refused")
    app.config["ACCESS_AUDIT_LOAD_ENTRYPOINTS"] = False
    app.config["ACCESS_AUDIT_PLUGINS"] = value
    with pytest.raises(AuditConfigurationError) as caught:
        AccessAudit(app)
    message = str(caught.value)
    assert message.startswith(f"ACCESS_AUDIT_PLUGINS: {string!r} ")
    assert "access_audit" not in app.extensions


def test_load_entrypoints_config_key(tmp_path: Path) -> None:
    """ACCESS_AUDIT_LOAD_ENTRYPOINTS controls discovery of installed plugins."""
    on = Flask("on")
    off = Flask("off")
    off.config["ACCESS_AUDIT_LOAD_ENTRYPOINTS"] = False
    audit = AccessAudit()
    audit.init_app(on)
    audit.init_app(off)
    assert audit.emitter_of(on).plugin_manager.has_plugin("eggsample")
    assert not audit.emitter_of(off).plugin_manager.has_plugin("eggsample")


def test_disabled_registers_no_plugins_but_still_records(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """ACCESS_AUDIT_ENABLED=False: no plugins get events; test recording still works."""
    recorder = Recorder()
    app, db = make_app(
        tmp_path, ACCESS_AUDIT_ENABLED=False, ACCESS_AUDIT_LOAD_ENTRYPOINTS=True
    )
    AccessAudit(app, db, plugins=[recorder])
    app.test_client().post("/tags/quiet")
    assert recorder.events == []
    assert AccessAudit.emitter_of(app).plugin_manager.get_plugins() == set()
    audit_events.assert_emitted("tag_create", target_name="quiet")


def test_raise_plugin_errors_config_key(tmp_path: Path) -> None:
    """ACCESS_AUDIT_RAISE_PLUGIN_ERRORS makes a plugin error fail the request."""

    class Buggy:
        @hookimpl
        def audit_event_logged(self, envelope: object) -> None:
            raise KeyError("plugin bug")

    app, db = make_app(tmp_path, ACCESS_AUDIT_RAISE_PLUGIN_ERRORS=True)
    AccessAudit(app, db, plugins=[Buggy()])
    app.testing = True
    with pytest.raises(KeyError, match="plugin bug"):
        app.test_client().post("/tags/strict")
    lenient, lenient_db = make_app(tmp_path, "lenient")
    AccessAudit(lenient, lenient_db, plugins=[Buggy()])
    assert lenient.test_client().post("/tags/ok").status_code == 200


def test_staging_where_the_apps_emitter_does_not_listen_is_refused(
    tmp_path: Path,
) -> None:
    """The app's emitter detached from db.session, or an app given no db
    while another app's SQLAlchemy() is used: staging raises, as on any
    session no emitter listens to. It was accepted, and the event of a
    committed change was never sent (reported discarded, much later)."""
    app, db = make_app(tmp_path)
    audit = AccessAudit(app, db)
    other = Flask("other")
    audit.init_app(other)  # no db: its emitter listens to nothing
    for each in (other, app):
        with each.app_context():
            if each is app:
                audit.emitter_of(app).detach(db.session)
            with pytest.raises(AuditConfigurationError, match="no AuditEmitter"):
                stage_event(
                    db.session, "tag_seen", target_type="tag", target_id=1, action="a"
                )


def test_detaching_db_session_as_a_plugin_is_delivered_to_keeps_the_request(
    tmp_path: Path,
) -> None:
    """A plugin that detaches the app's emitter from db.session as it is
    delivered to: the request that committed still answers 200 (its
    ``commit()`` raised "deque mutated during iteration"), later staging is
    refused, and the listener SQLAlchemy was running goes at the next detach."""
    app, db = make_app(tmp_path)
    recorder = Recorder()
    audit = AccessAudit(app, db, plugins=[recorder])
    emitter = audit.emitter_of(app)

    class KillSwitch:
        @hookimpl
        def audit_event_logged(self, envelope: Any) -> None:
            if envelope.event_type == "tag_seen":
                emitter.detach(db.session)

    emitter.register(KillSwitch(), name="kill-switch")
    assert app.test_client().post("/tags/red").status_code == 200
    assert sorted(e.event_type for e in recorder.events) == ["tag_create", "tag_seen"]
    with app.app_context():
        with pytest.raises(AuditConfigurationError, match="no AuditEmitter"):
            stage_event(
                db.session, "tag_seen", target_type="tag", target_id=1, action="a"
            )
        session_class = type(db.session())
    left = [
        entry[1]
        for entry in _weak_hooks.get(session_class, ())
        if entry[2]() is emitter._listeners
    ]
    assert left == ["after_transaction_end"]
    with app.app_context():
        emitter.detach(db.session)
    left = [
        entry[1]
        for entry in _weak_hooks.get(session_class, ())
        if entry[2]() is emitter._listeners
    ]
    assert left == []


def test_a_sessionmaker_of_the_apps_session_class_is_audited(tmp_path: Path) -> None:
    """A test fixture's sessionmaker(class_=<db.session's class>, ...) makes
    a subclass of it, which SQLAlchemy's class listeners reach: its events
    are the app's (checking the exact class refused them)."""
    from sqlalchemy.orm import sessionmaker

    recorder = Recorder()
    app, db = make_app(tmp_path)
    AccessAudit(app, db, plugins=[recorder])
    with app.app_context():
        maker = sessionmaker(class_=type(db.session()), db=db, bind=db.engine)
        with maker() as session:
            assert type(session) is not type(db.session())
            stage_event(session, "tag_seen", target_type="tag", target_id=1, action="a")
            session.commit()
    assert recorder.names == ["1"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ACCESS_AUDIT_RAISE_PLUGIN_ERRORS", "false"),
        ("ACCESS_AUDIT_ENABLED", "0"),
        ("ACCESS_AUDIT_LOAD_ENTRYPOINTS", None),
        ("ACCESS_AUDIT_PLUGINS", None),
        ("ACCESS_AUDIT_PLUGINS", 5),
        ("ACCESS_AUDIT_PLUGINS", "mod:Plugin"),
    ],
)
def test_a_config_value_of_the_wrong_type_fails_init_app_naming_the_key(
    tmp_path: Path, key: str, value: object
) -> None:
    """Strings from the environment (``"false"`` is true to Python: a plugin
    failure then failed the request) and values that are not lists fail
    init_app with the key's name, not a TypeError."""
    app = Flask("config")
    app.config[key] = value
    with pytest.raises(AuditConfigurationError, match=key):
        AccessAudit(app)


def test_emitter_of_an_app_without_the_extension_raises(tmp_path: Path) -> None:
    """Asking for the emitter of an app AccessAudit does not know names the fix."""
    with pytest.raises(AuditConfigurationError, match="init_app"):
        AccessAudit.emitter_of(Flask("bare"))


def test_cli_lists_plugins_with_their_hooks(tmp_path: Path) -> None:
    """``flask access-audit plugins`` lists entry-point and app plugins and hooks."""
    app = Flask("cli")
    AccessAudit(app, plugins=[Recorder()])
    result = app.test_cli_runner().invoke(args=["access-audit", "plugins"])
    assert result.exit_code == 0, result.output
    assert "eggsample  (entry point of access-audit-eggsample" in result.output
    assert "registered by the app" in result.output
    assert "hooks: audit_event_logged, audit_events_committed" in result.output


def test_init_app_takes_per_app_emitter_options(tmp_path: Path) -> None:
    """Options given to init_app apply to that app only, over the constructor's."""
    shared, only_first = Recorder(), Recorder()
    audit = AccessAudit(plugins=[shared], actor_resolver=lambda: ("from-option", None))
    first, first_db = make_app(tmp_path, "first")
    second, second_db = make_app(tmp_path, "second")
    audit.init_app(first, first_db, plugins=[shared, only_first])
    audit.init_app(second, second_db)
    first.test_client().post("/tags/one")
    second.test_client().post("/tags/two")
    assert only_first.names[1:] == ["one"]
    assert shared.names[1::2] == ["one", "two"]
    assert {e.actor_id for e in shared.events} == {"from-option"}


def test_flask_relay_command_redelivers_from_the_outbox(tmp_path: Path) -> None:
    """``flask access-audit relay --once`` delivers what a failing plugin missed."""
    from access_audit.outbox import Outbox

    flaky = Flaky()
    app, db = make_app(tmp_path)
    outbox = Outbox(db.metadata)
    with app.app_context():
        outbox.create(db.engine)
    audit = AccessAudit()
    audit.init_app(app, db, outbox=outbox)
    audit.emitter_of(app).register(flaky, name="flaky")
    app.test_client().post("/tags/red")
    assert flaky.received == []
    # The failure is recorded off the request path; a relay in another
    # process sees it a moment later.
    assert audit.emitter_of(app).flush(timeout=10)
    flaky.broken = False
    result = app.test_cli_runner().invoke(
        args=["access-audit", "relay", "--once", "--backoff", "0"]
    )
    assert result.exit_code == 0, result.output
    assert flaky.received[1:] == ["red"]
    assert "2 delivered" in result.output
    again = app.test_cli_runner().invoke(args=["access-audit", "relay", "--once"])
    assert "0 delivered" in again.output


def test_flask_relay_command_delivers_a_relay_only_apps_events_at_once(
    tmp_path: Path,
) -> None:
    """With ``dispatch="relay"`` nothing but the relay delivers: the command
    takes fresh rows at once (no ``relay_after`` to wait), unless
    ``--relay-after`` says otherwise."""
    from access_audit.outbox import Outbox

    received = Flaky()
    received.broken = False
    app, db = make_app(tmp_path)
    outbox = Outbox(db.metadata)  # relay_after: 60 s
    with app.app_context():
        outbox.create(db.engine)
    AccessAudit(app, db, outbox=outbox, dispatch="relay", plugins=[received])
    app.test_client().post("/tags/red")
    assert received.received == []
    runner = app.test_cli_runner()
    waiting = runner.invoke(
        args=["access-audit", "relay", "--once", "--relay-after", "60"]
    )
    assert waiting.exit_code == 0, waiting.output
    assert received.received == []  # fresh rows left for 60 s
    result = runner.invoke(args=["access-audit", "relay", "--once"])
    assert result.exit_code == 0, result.output
    assert received.received[1:] == ["red"]
    assert "2 delivered" in result.output
    assert outbox.relay_after == timedelta(seconds=60)  # the app's, after the run


def test_flask_relay_command_needs_an_outbox(tmp_path: Path) -> None:
    """Without an outbox the relay command fails with a clear message: a
    configuration error, exit status 2 (it was 1, a database error's)."""
    app, db = make_app(tmp_path)
    AccessAudit(app, db)
    result = app.test_cli_runner().invoke(args=["access-audit", "relay", "--once"])
    assert result.exit_code == 2, result.output
    assert "no outbox" in result.output


def test_request_id_is_per_request_even_inside_one_app_context(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """Requests made while a test holds an app context still get their own ids."""
    app, db = make_app(tmp_path)
    AccessAudit(app, db)
    with app.app_context():
        client = app.test_client()
        client.post("/tags/a")
        client.post("/tags/b")
    ids = [e.metadata["request_id"] for e in audit_events.events]
    assert ids[0] == ids[1] != ids[2] == ids[3]


def test_flask_relay_command_offers_every_relay_option(tmp_path: Path) -> None:
    """``flask access-audit relay --help`` lists each option the relay CLI has."""
    from access_audit.outbox._cli import relay_cli_options

    app, db = make_app(tmp_path)
    AccessAudit(app, db)
    result = app.test_cli_runner().invoke(args=["access-audit", "relay", "--help"])
    assert result.exit_code == 0, result.output
    flags = ["--" + option.name.replace("_", "-") for option in relay_cli_options()]
    assert len(flags) >= 10
    assert [flag for flag in flags if flag not in result.output] == []


def test_flask_relay_command_refuses_another_delivery_store(tmp_path: Path) -> None:
    """An outbox that is not an access_audit Outbox is refused with a clear message."""
    from access_audit.outbox import Outbox

    class OwnStore(Outbox):
        pass

    class Foreign:
        table = OwnStore().table

    app, db = make_app(tmp_path)
    AccessAudit(app, db, outbox=Foreign())  # type: ignore[arg-type]
    result = app.test_cli_runner().invoke(args=["access-audit", "relay", "--once"])
    assert result.exit_code == 2, result.output
    assert "Outbox" in result.output


def test_actor_loader_is_not_called_outside_a_request(
    tmp_path: Path, audit_events: AuditEventRecorder
) -> None:
    """A CLI command or script in an app context has no request: a loader
    that reads the request (as login code does) is not called there."""
    app, db = make_app(tmp_path)
    audit = AccessAudit(app, db)

    @audit.actor_loader
    def from_the_request() -> Actor:
        return Actor(request.headers["X-User"])

    with app.app_context():
        stage_event(
            db.session, "tag_delete", target_type="tag", target_id=1, action="d"
        )
        db.session.commit()
    app.test_client().post("/tags/a", headers={"X-User": "u-7"})
    audit_events.assert_emitted("tag_delete", actor_id="system")
    audit_events.assert_emitted("tag_create", actor_id="u-7")


def test_flask_relay_command_errors_are_one_line(tmp_path: Path) -> None:
    """A missing outbox table and an option out of range: one line each, exit
    status 2 (as ``access-audit relay``), no traceback."""
    from access_audit.outbox import Outbox

    app, db = make_app(tmp_path)
    AccessAudit(app, db, outbox=Outbox(db.metadata))  # tables never created
    runner = app.test_cli_runner()
    missing = runner.invoke(args=["access-audit", "relay", "--once"])
    zero = runner.invoke(args=["access-audit", "relay", "--once", "--batch-size", "0"])
    unknown = runner.invoke(args=["access-audit", "relay", "--once", "--bind", "nope"])
    assert (missing.exit_code, zero.exit_code, unknown.exit_code) == (2, 2, 2)
    assert "does not exist" in missing.output
    assert "batch" in zero.output
    assert "no Flask-SQLAlchemy bind 'nope'" in unknown.output
    after = runner.invoke(args=["access-audit", "relay", "--relay-after", "-1"])
    assert after.exit_code == 2
    assert "--relay-after must be a number of seconds" in after.output
    for result in (missing, zero, unknown, after):
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    created = runner.invoke(args=["access-audit", "relay", "--once", "--create-table"])
    assert created.exit_code == 0, created.output
    assert "0 delivered" in created.output


def test_flask_relay_command_that_gives_up_on_the_database_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--once`` run that gave up on a database error it waits out (the
    database locked by another process, throughout) ends with one line and
    exit status 1, as ``access-audit relay`` does, not a traceback."""
    import sqlite3

    from access_audit.outbox import Outbox

    monkeypatch.setattr("access_audit.outbox._relay._MAX_RECONNECT_DELAY", 0.0)
    app, db = make_app(
        tmp_path, SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": 0}}
    )
    AccessAudit(app, db, outbox=Outbox(db.metadata))
    with app.app_context():
        db.create_all()
        database = db.engine.url.database
        db.engine.dispose()
    assert database is not None
    other = sqlite3.connect(database, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # every read waits: "database is locked"
        result = app.test_cli_runner().invoke(args=["access-audit", "relay", "--once"])
    finally:
        other.close()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: the database: database is locked"
    )


def test_flask_relay_command_exits_2_on_a_database_that_cannot_be_opened(
    tmp_path: Path,
) -> None:
    """A database that cannot be opened at all (its directory gone) is a
    configuration error: exit status 2 at once, one line, as ``access-audit
    relay`` does."""
    import shutil

    from access_audit.outbox import Outbox

    gone = tmp_path / "gone"
    gone.mkdir()
    app, db = make_app(gone)
    AccessAudit(app, db, outbox=Outbox(db.metadata))
    with app.app_context():
        db.engine.dispose()
    shutil.rmtree(gone)  # the database's directory with it: cannot be opened
    result = app.test_cli_runner().invoke(args=["access-audit", "relay", "--once"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(
            "Error: the database refused the relay's connection (unable to open"
        )
    )


def test_flask_relay_stopped_at_once_exits_as_the_relay_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second SIGINT raises KeyboardInterrupt in the relay: the command
    says the batch rolled back and exits 130, as ``access-audit relay``
    (click's own handling would print "Aborted!" and exit 1)."""
    from access_audit.flask import _cli
    from access_audit.outbox import Outbox

    def interrupted(*arguments: Any, **keywords: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "run_command", interrupted)
    app, db = make_app(tmp_path)
    AccessAudit(app, db, outbox=Outbox(db.metadata))
    result = app.test_cli_runner().invoke(
        args=["access-audit", "relay", "--create-table"]
    )
    assert result.exit_code == 130, result.output
    assert "interrupted; the batch in hand was rolled back" in result.output


def test_a_change_on_another_bind_has_its_rows_there_and_bind_relays_them(
    tmp_path: Path,
) -> None:
    """SQLALCHEMY_BINDS: a change on the "other" bind, whose database has
    the outbox table, writes its outbox row there (so they commit together);
    ``relay --bind other`` delivers it, and the default database has
    nothing to relay."""
    from access_audit.outbox import Outbox

    app, db = make_app(
        tmp_path, SQLALCHEMY_BINDS={"other": f"sqlite:///{tmp_path / 'other'}.db"}
    )

    class Note(db.Model):  # type: ignore[name-defined,misc]
        __bind_key__ = "other"
        id: Mapped[int] = mapped_column(primary_key=True)

    outbox = Outbox(db.metadata)
    flaky = Flaky()
    audit = AccessAudit(app, db, outbox=outbox)
    audit.emitter_of(app).register(flaky, name="flaky")
    runner = app.test_cli_runner()
    created = runner.invoke(
        args=["access-audit", "relay", "--once", "--create-table", "--bind", "other"]
    )
    assert created.exit_code == 0, created.output
    with app.app_context():
        db.create_all()
        db.session.add(Note())
        stage_event(db.session, "note_add", target_type="note", target_id=1, action="a")
        db.session.commit()
        assert audit.emitter_of(app).flush(timeout=10)
    flaky.broken = False
    default = runner.invoke(args=["access-audit", "relay", "--once", "--backoff", "0"])
    other = runner.invoke(
        args=["access-audit", "relay", "--once", "--backoff", "0", "--bind", "other"]
    )
    assert default.exit_code == other.exit_code == 0, default.output + other.output
    assert "0 delivered" in default.output
    assert "1 delivered" in other.output
    assert flaky.received == ["1"]
