"""The example app (examples/access_app) end to end, through Flask's test client.

Each test drives the JSON API on SQLite and PostgreSQL and checks, with the
``audit_events`` fixture, the events emitted (target, actor, reason, request
metadata) and the rows in the database.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The example app is a package in examples/, not an installed distribution.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import pytest  # noqa: E402
from access_app import create_app, db  # noqa: E402
from access_app.operations import EVENT_TYPES  # noqa: E402
from access_app.walk import request_as, snapshot  # noqa: E402
from flask import Flask  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from access_audit.testing import AuditEventRecorder  # noqa: E402

POSTGRESQL_URL = os.environ.get(
    "ACCESS_AUDIT_TEST_POSTGRESQL_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)

# The event types each end-to-end test emits, and asserts with target and actor:
# together, the app's 19 (issue 4).
GROUP_EVENTS = {
    "group_create",
    "group_delete",
    "group_owner_added",
    "group_owner_removed",
    "group_member_added",
    "group_member_removed",
}
TAG_AND_APP_EVENTS = {
    "tag_create",
    "tag_update",
    "tag_delete",
    "app_create",
    "app_delete",
}
ACCESS_EVENTS = {
    "group_create",
    "group_owner_added",
    "access_create",
    "access_approve",
    "access_reject",
    "group_member_added",
}
ROLE_EVENTS = {
    "group_create",
    "group_owner_added",
    "role_request_create",
    "role_request_approve",
    "role_request_reject",
    "role_group_assigned",
    "role_group_unassigned",
    "group_member_added",
    "group_member_removed",
}


def unavailable(what: str, error: BaseException) -> None:
    """Skip locally, fail under CI: a missing server must not pass CI silently."""
    message = f"{what} is not reachable: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true requires every database)", pytrace=False)
    pytest.skip(message)


Database = tuple[str, dict[str, Any]]
"""A database URL and Flask-SQLAlchemy engine options for it."""


@pytest.fixture(scope="module")
def postgresql() -> Iterator[Database]:
    """The PostgreSQL test server, with a schema of this test process for the tables.

    Other test runs may use the same database at the same time; a schema per
    process keeps their ``access_app_`` tables apart. It is dropped at the end.
    """
    schema = f"access_app_test_{os.getpid()}"
    engine = create_engine(POSTGRESQL_URL)
    try:
        with engine.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    except Exception as error:
        engine.dispose()
        unavailable("postgresql", error)
    yield POSTGRESQL_URL, {"connect_args": {"options": f"-c search_path={schema}"}}
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """The app's database: an SQLite file, or the PostgreSQL test server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'access_app.db'}", {}
    found: Database = request.getfixturevalue("postgresql")
    return found


def make_app(database: Database, log_path: Path) -> Flask:
    """The example app on *database*, with fresh tables and strict plugins."""
    url, engine_options = database
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": url,
            "SQLALCHEMY_ENGINE_OPTIONS": engine_options,
            "ACCESS_APP_AUDIT_LOG": str(log_path),
            "ACCESS_AUDIT_LOAD_ENTRYPOINTS": False,
            "ACCESS_AUDIT_RAISE_PLUGIN_ERRORS": True,
        }
    )
    with app.app_context():
        # Tables a crashed earlier run left on a server start empty.
        db.drop_all()
        db.create_all()
    return app


@pytest.fixture
def app(database: Database, tmp_path: Path) -> Iterator[Flask]:
    """The example app; its tables are dropped afterwards."""
    app = make_app(database, tmp_path / "audit.jsonl")
    yield app
    with app.app_context():
        db.session.remove()
        db.drop_all()
        db.engine.dispose()


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Iterator[Flask]:
    """The example app on SQLite only, for behaviour that does not vary by database."""
    app = make_app(
        (f"sqlite:///{tmp_path / 'access_app.db'}", {}), tmp_path / "audit.jsonl"
    )
    yield app
    with app.app_context():
        db.engine.dispose()


class Api:
    """Flask's test client: one request as a user, its status checked."""

    def __init__(self, app: Flask) -> None:
        self.client = app.test_client()

    def __call__(
        self,
        method: str,
        path: str,
        *,
        user: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        status: int = 200,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        response = request_as(
            self.client, method, path, user=user, body=body, request_id=request_id
        )
        data: dict[str, Any] = response.get_json()
        assert response.status_code == status, data
        return data


@pytest.fixture
def api(app: Flask) -> Api:
    return Api(app)


def create_users(api: Api, *names: str) -> dict[str, dict[str, Any]]:
    """Users by name (creating users is not audited)."""
    return {
        name: api(
            "POST",
            "/users",
            body={"email": f"{name}@example.com", "name": name.title()},
            status=201,
        )
        for name in names
    }


def target(target_type: str, target_id: int, target_name: str) -> dict[str, Any]:
    """The envelope fields naming an event's target."""
    return {
        "target_type": target_type,
        "target_id": target_id,
        "target_name": target_name,
    }


def actor(user: dict[str, Any]) -> dict[str, str]:
    """The envelope fields naming *user* as the actor."""
    return {"actor_id": str(user["id"]), "actor_email": user["email"]}


def create_owned_group(
    api: Api, owner: dict[str, Any], name: str, *, locked: bool = False
) -> dict[str, Any]:
    """A group that *owner* created and owns."""
    group = api(
        "POST", "/groups", user=owner, body={"name": name, "locked": locked}, status=201
    )
    return api("PUT", f"/groups/{group['id']}/owners/{owner['id']}", user=owner)


def create_role(
    api: Api, definer: dict[str, Any], name: str, members: list[dict[str, Any]]
) -> dict[str, Any]:
    """A role of *members* (defining roles is not audited)."""
    member_ids = [member["id"] for member in members]
    body = {"name": name, "member_ids": member_ids}
    return api("POST", "/roles", user=definer, body=body, status=201)


def request_role(
    api: Api,
    requester: dict[str, Any],
    role: dict[str, Any],
    group: dict[str, Any],
    reason: str,
) -> dict[str, Any]:
    """A pending request from *requester* that *role* be assigned to *group*."""
    body = {"role_id": role["id"], "group_id": group["id"], "reason": reason}
    return api("POST", "/role-requests", user=requester, body=body, status=201)


def emitted_types(audit_events: AuditEventRecorder) -> set[str]:
    return {envelope.event_type for envelope in audit_events.events}


def test_the_end_to_end_tests_cover_all_nineteen_event_types() -> None:
    """The app's 19 event types are exactly those the tests below emit and assert."""
    assert len(set(EVENT_TYPES)) == len(EVENT_TYPES) == 19
    covered = GROUP_EVENTS | TAG_AND_APP_EVENTS | ACCESS_EVENTS | ROLE_EVENTS
    assert covered == set(EVENT_TYPES)


def test_groups_owners_and_members(
    app: Flask, api: Api, audit_events: AuditEventRecorder, tmp_path: Path
) -> None:
    """Group, owner and member operations emit their events; the JSON-lines log gets them."""
    users = create_users(api, "alice", "bob")
    alice, bob = users["alice"], users["bob"]
    group = api(
        "POST",
        "/groups",
        user=alice,
        body={"name": "eng", "description": "engineers", "reason": "new team"},
        status=201,
    )
    gid = group["id"]
    eng = target("group", gid, "eng")
    created = audit_events.assert_emitted(
        "group_create", action="create", **eng, **actor(alice), reason="new team"
    )
    assert dict(created.payload) == {"description": "engineers", "locked": False}

    api("PUT", f"/groups/{gid}/owners/{bob['id']}", user=alice, body={"reason": "lead"})
    audit_events.assert_emitted(
        "group_owner_added",
        action="add_owner",
        **eng,
        **actor(alice),
        reason="lead",
        payload={"user_id": bob["id"], "user_email": bob["email"]},
    )
    api("PUT", f"/groups/{gid}/members/{alice['id']}", user=bob, body={"reason": "hi"})
    audit_events.assert_emitted(
        "group_member_added",
        action="add_member",
        **eng,
        **actor(bob),
        reason="hi",
        payload={"user_id": alice["id"], "role_id": None, "access_request_id": None},
    )
    shown = api("GET", f"/groups/{gid}")
    assert shown["owner_ids"] == [bob["id"]]
    assert shown["members"] == [{"user_id": alice["id"], "role_id": None}]

    api("DELETE", f"/groups/{gid}/members/{alice['id']}?reason=bye", user=bob)
    audit_events.assert_emitted(
        "group_member_removed",
        action="remove_member",
        **eng,
        **actor(bob),
        reason="bye",
        payload={"user_id": alice["id"]},
    )
    api("DELETE", f"/groups/{gid}/owners/{bob['id']}", user=alice, body={"reason": "x"})
    audit_events.assert_emitted(
        "group_owner_removed",
        action="remove_owner",
        **eng,
        **actor(alice),
        payload={"user_id": bob["id"]},
    )
    shown = api("GET", f"/groups/{gid}")
    assert (shown["owner_ids"], shown["members"]) == ([], [])

    api("PUT", f"/groups/{gid}/members/{bob['id']}", user=alice)
    deleted = api(
        "DELETE", f"/groups/{gid}", user=alice, body={"reason": "team disbanded"}
    )
    assert deleted == {"deleted": {"type": "group", "id": gid}}
    event = audit_events.assert_emitted(
        "group_delete", action="delete", **eng, **actor(alice), reason="team disbanded"
    )
    assert event.payload["member_ids"] == [bob["id"]]
    api("GET", f"/groups/{gid}", status=404)
    assert snapshot(app)["memberships"] == []

    assert emitted_types(audit_events) == GROUP_EVENTS
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [
        str(envelope.id) for envelope in audit_events.events
    ]


def test_tags_and_apps(api: Api, audit_events: AuditEventRecorder) -> None:
    """Tag and app operations emit their events; a tag update carries its changes."""
    alice = create_users(api, "alice")["alice"]
    prod = api("POST", "/tags", user=alice, body={"name": "prod"}, status=201)
    temp = api("POST", "/tags", user=alice, body={"name": "temp"}, status=201)
    audit_events.assert_emitted(
        "tag_create",
        action="create",
        **target("tag", prod["id"], "prod"),
        **actor(alice),
    )
    api(
        "PATCH",
        f"/tags/{prod['id']}",
        user=alice,
        body={"name": "production", "description": "live", "reason": "clearer"},
    )
    updated = audit_events.assert_emitted(
        "tag_update",
        action="update",
        **target("tag", prod["id"], "production"),
        reason="clearer",
        **actor(alice),
    )
    assert updated.payload["changes"] == {
        "name": {"old": "prod", "new": "production"},
        "description": {"old": "", "new": "live"},
    }

    wiki = api(
        "POST",
        "/apps",
        user=alice,
        body={"name": "wiki", "tag_ids": [prod["id"], temp["id"]], "reason": "docs"},
        status=201,
    )
    audit_events.assert_emitted(
        "app_create",
        action="create",
        **target("app", wiki["id"], "wiki"),
        reason="docs",
        payload={"tags": ["production", "temp"]},
        **actor(alice),
    )
    deleted = api(
        "DELETE", f"/tags/{temp['id']}", user=alice, body={"reason": "unused"}
    )
    assert deleted == {"deleted": {"type": "tag", "id": temp["id"]}}
    audit_events.assert_emitted(
        "tag_delete",
        action="delete",
        **target("tag", temp["id"], "temp"),
        payload={"app_ids": [wiki["id"]]},
        **actor(alice),
    )
    assert api("GET", f"/apps/{wiki['id']}")["tag_ids"] == [prod["id"]]
    deleted = api(
        "DELETE", f"/apps/{wiki['id']}", user=alice, body={"reason": "retired"}
    )
    assert deleted == {"deleted": {"type": "app", "id": wiki["id"]}}
    audit_events.assert_emitted(
        "app_delete",
        action="delete",
        **target("app", wiki["id"], "wiki"),
        reason="retired",
        **actor(alice),
    )
    api("GET", f"/apps/{wiki['id']}", status=404)
    api("GET", f"/tags/{temp['id']}", status=404)
    assert emitted_types(audit_events) == TAG_AND_APP_EVENTS


def test_access_requests(
    app: Flask, api: Api, audit_events: AuditEventRecorder
) -> None:
    """Requesting, approving (which adds the member) and rejecting access emit, in order."""
    users = create_users(api, "alice", "bob", "erin")
    alice, bob, erin = users["alice"], users["bob"], users["erin"]
    group = create_owned_group(api, alice, "eng")
    gid = group["id"]
    request = api(
        "POST",
        "/access-requests",
        user=bob,
        body={"group_id": gid, "reason": "joined the team"},
        status=201,
        request_id="req-create",
    )
    audit_events.assert_emitted(
        "access_create",
        action="create",
        **target("access_request", request["id"], "bob@example.com -> eng"),
        reason="joined the team",
        metadata={"request_id": "req-create", "method": "POST"},
        **actor(bob),
    )
    api(
        "POST",
        f"/access-requests/{request['id']}/approve",
        user=bob,
        body={"reason": "self-service"},
        status=403,
    )
    path = f"/access-requests/{request['id']}/approve"
    approved = api(
        "POST", path, user=alice, body={"reason": "welcome"}, request_id="req-approve"
    )
    decision = (approved["status"], approved["resolver_id"], approved["resolution"])
    assert decision == ("approved", alice["id"], "welcome")
    approve, added = audit_events.filter(metadata={"request_id": "req-approve"})
    assert (approve.event_type, added.event_type) == (
        "access_approve",
        "group_member_added",
    )
    assert approve.transaction_id == added.transaction_id
    assert (approve.sequence, added.sequence) == (0, 1)
    metadata = {
        "request_id": "req-approve",
        "method": "POST",
        "path": path,
        "endpoint": "api.approve_access",
        "ip_address": "127.0.0.1",
    }
    audit_events.assert_emitted(
        "access_approve",
        action="approve",
        **target("access_request", request["id"], "bob@example.com -> eng"),
        reason="welcome",
        metadata=metadata,
        **actor(alice),
    )
    audit_events.assert_emitted(
        "group_member_added",
        action="add_member",
        **target("group", gid, "eng"),
        reason=f"access request #{request['id']} approved: welcome",
        payload={"user_id": bob["id"], "access_request_id": request["id"]},
        metadata=metadata,
        **actor(alice),
    )
    assert api("GET", f"/groups/{gid}")["members"] == [
        {"user_id": bob["id"], "role_id": None}
    ]
    api("POST", path, user=alice, status=409)

    rejected = api(
        "POST",
        "/access-requests",
        user=erin,
        body={"group_id": gid, "reason": "curious"},
        status=201,
    )
    api(
        "POST",
        f"/access-requests/{rejected['id']}/reject",
        user=alice,
        body={"reason": "not needed"},
    )
    audit_events.assert_emitted(
        "access_reject",
        action="reject",
        **target("access_request", rejected["id"], "erin@example.com -> eng"),
        reason="not needed",
        **actor(alice),
    )
    assert api("GET", f"/access-requests/{rejected['id']}")["status"] == "rejected"
    assert [m[1] for m in snapshot(app)["memberships"]] == [bob["id"]]
    assert emitted_types(audit_events) == ACCESS_EVENTS


def test_role_requests_assign_and_unassign_roles(
    app: Flask, api: Api, audit_events: AuditEventRecorder
) -> None:
    """A role request's approval assigns the role, which adds each role member."""
    users = create_users(api, "alice", "carol", "dave", "erin")
    alice, carol, dave, erin = (users[n] for n in ("alice", "carol", "dave", "erin"))
    oncall = create_owned_group(api, alice, "oncall")
    gid = oncall["id"]
    role = create_role(api, alice, "sre", [carol, dave])
    request = request_role(api, carol, role, oncall, "SREs are on call")
    audit_events.assert_emitted(
        "role_request_create",
        action="create",
        **target("role_request", request["id"], "sre -> oncall"),
        reason="SREs are on call",
        payload={"role_id": role["id"], "group_id": gid},
        **actor(carol),
    )
    approved = api(
        "POST",
        f"/role-requests/{request['id']}/approve",
        user=alice,
        body={"reason": "agreed"},
        request_id="req-approve",
    )
    assert approved["member_ids_added"] == [carol["id"], dave["id"]]
    approval = audit_events.filter(metadata={"request_id": "req-approve"})
    assert [e.event_type for e in approval] == [
        "role_request_approve",
        "role_group_assigned",
        "group_member_added",
        "group_member_added",
    ]
    assert len({e.transaction_id for e in approval}) == 1
    audit_events.assert_emitted(
        "role_request_approve",
        action="approve",
        **target("role_request", request["id"], "sre -> oncall"),
        reason="agreed",
        **actor(alice),
    )
    audit_events.assert_emitted(
        "role_group_assigned",
        action="assign_group",
        **target("role", role["id"], "sre"),
        payload={"group_id": gid, "member_ids_added": [carol["id"], dave["id"]]},
        **actor(alice),
    )
    for user in (carol, dave):
        audit_events.assert_emitted(
            "group_member_added",
            action="add_member",
            **target("group", gid, "oncall"),
            payload={"user_id": user["id"], "role_id": role["id"]},
            **actor(alice),
        )
    assert snapshot(app)["memberships"] == [
        (gid, carol["id"], role["id"]),
        (gid, dave["id"], role["id"]),
    ]

    rejected = request_role(
        api, erin, role, create_owned_group(api, alice, "x"), "why not"
    )
    api(
        "POST",
        f"/role-requests/{rejected['id']}/reject",
        user=alice,
        body={"reason": "no"},
    )
    audit_events.assert_emitted(
        "role_request_reject",
        action="reject",
        **target("role_request", rejected["id"], "sre -> x"),
        reason="no",
        **actor(alice),
    )

    api(
        "DELETE",
        f"/roles/{role['id']}/groups/{gid}",
        user=alice,
        body={"reason": "handed over"},
    )
    audit_events.assert_emitted(
        "role_group_unassigned",
        action="unassign_group",
        **target("role", role["id"], "sre"),
        reason="handed over",
        payload={"group_id": gid, "member_ids_removed": [carol["id"], dave["id"]]},
        **actor(alice),
    )
    for user in (carol, dave):
        audit_events.assert_emitted(
            "group_member_removed",
            action="remove_member",
            **target("group", gid, "oncall"),
            payload={"user_id": user["id"], "role_id": role["id"]},
            **actor(alice),
        )
    rows = snapshot(app)
    assert (rows["memberships"], rows["role_groups"]) == ([], [])
    assert emitted_types(audit_events) == ROLE_EVENTS


def test_a_failed_nested_role_assignment_emits_nothing_and_changes_nothing(
    app: Flask, api: Api, audit_events: AuditEventRecorder, tmp_path: Path
) -> None:
    """Approving a role request for a locked group fails: no event, no row changed."""
    users = create_users(api, "alice", "carol", "dave")
    alice, carol, dave = users["alice"], users["carol"], users["dave"]
    payroll = create_owned_group(api, alice, "payroll", locked=True)
    role = create_role(api, alice, "sre", [carol, dave])
    request = request_role(api, carol, role, payroll, "please")
    before = snapshot(app)
    audit_events.clear()

    failed = api(
        "POST",
        f"/role-requests/{request['id']}/approve",
        user=alice,
        body={"reason": "fine"},
        status=409,
        request_id="req-failed",
    )

    assert failed["error"] == "Conflict"
    assert "'payroll' is locked" in failed["message"]
    assert audit_events.events == []
    for event_type in (
        "role_request_approve",
        "role_group_assigned",
        "group_member_added",
    ):
        audit_events.assert_not_emitted(event_type)
    # The assignment's SAVEPOINT rolled back first, then the request's transaction.
    assert [(d.event_type, d.reason) for d in audit_events.discarded] == [
        ("role_group_assigned", "savepoint_rollback"),
        ("group_member_added", "savepoint_rollback"),
        ("group_member_added", "savepoint_rollback"),
        ("role_request_approve", "rollback"),
    ]
    staged = [d.event for d in audit_events.discarded]
    assert {event.metadata["request_id"] for event in staged} == {"req-failed"}
    assert {event.actor_id for event in staged} == {str(alice["id"])}
    assert [event.payload["user_id"] for event in staged[1:3]] == [
        carol["id"],
        dave["id"],
    ]
    assert snapshot(app) == before
    assert before["role_requests"] == [(request["id"], "pending", None)]
    log = (tmp_path / "audit.jsonl").read_text()
    assert "req-failed" not in log

    # The session is clean afterwards: the request can still be rejected.
    api("POST", f"/role-requests/{request['id']}/reject", user=alice)
    audit_events.assert_emitted(
        "role_request_reject", action="reject", target_id=request["id"], **actor(alice)
    )
    assert [e.event_type for e in audit_events.events] == ["role_request_reject"]


@pytest.mark.parametrize(
    ("method", "path", "user", "body", "status", "message"),
    [
        ("POST", "/groups", None, {"name": "g"}, 401, "X-User-Id"),
        ("POST", "/groups", "99", {"name": "g"}, 401, "names no user"),
        ("POST", "/groups", "1", {"description": "no name"}, 400, "'name' is required"),
        ("POST", "/groups", "1", {"name": "eng"}, 409, "exists already"),
        ("PUT", "/groups/42/members/1", "1", None, 404, "Group 42 does not exist"),
        ("PUT", "/groups/1/members/2", "1", None, 409, "is a member of group"),
        ("POST", "/access-requests/1/approve", "1", None, 403, "is not an owner"),
        ("DELETE", "/tags/7", "1", None, 404, "Tag 7 does not exist"),
        ("PUT", "/groups/2/members/2", "1", None, 409, "'payroll' is locked"),
        ("GET", "/nowhere", None, None, 404, "not found"),
        ("POST", "/access-requests/2/approve", "1", None, 403, "their own access"),
        ("POST", "/role-requests/1/approve", "1", None, 403, "their own role"),
    ],
    ids=[
        "no-actor",
        "unknown-actor",
        "missing-field",
        "duplicate-name",
        "unknown-group",
        "already-member",
        "not-an-owner",
        "unknown-tag",
        "locked-group",
        "unknown-url",
        "own-access-request",
        "own-role-request",
    ],
)
def test_api_errors_are_json_and_emit_nothing(
    sqlite_app: Flask,
    audit_events: AuditEventRecorder,
    method: str,
    path: str,
    user: str | None,
    body: dict[str, Any] | None,
    status: int,
    message: str,
) -> None:
    """A refused request answers a JSON error, emits nothing and changes nothing."""
    api = Api(sqlite_app)
    users = create_users(api, "alice", "bob")
    group = api(
        "POST", "/groups", user=users["alice"], body={"name": "eng"}, status=201
    )
    api(
        "PUT",
        f"/groups/{group['id']}/members/{users['bob']['id']}",
        user=users["alice"],
    )
    api(
        "POST",
        "/groups",
        user=users["alice"],
        body={"name": "payroll", "locked": True},
        status=201,
    )
    ops = create_owned_group(api, users["alice"], "ops")
    for requested in (group, ops):
        api(
            "POST",
            "/access-requests",
            user=users["alice"],
            body={"group_id": requested["id"], "reason": "me too"},
            status=201,
        )
    role = create_role(api, users["alice"], "sre", [users["bob"]])
    request_role(api, users["alice"], role, ops, "me too")
    before = snapshot(sqlite_app)
    audit_events.clear()
    client = sqlite_app.test_client()
    headers = {} if user is None else {"X-User-Id": user}
    response = client.open(path, method=method, json=body, headers=headers)
    assert response.status_code == status
    assert message.lower() in response.get_json()["message"].lower()
    assert audit_events.events == []
    assert snapshot(sqlite_app) == before


def test_the_demo_walk_reports_the_failed_approval_and_the_counts() -> None:
    """``python -m access_app.demo`` succeeds, shows every event type and the empty failure."""
    environment = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    result = subprocess.run(
        [sys.executable, "-m", "access_app.demo"],
        cwd=EXAMPLES,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAILED" not in out and "!!" not in out
    assert re.search(
        r"the failed approval \(walk-\d+\) emitted nothing: its 4 staged events "
        r"were discarded \(.*\), and the database is unchanged",
        out,
    )
    assert "discarded: role_request_approve" in out
    counts = {
        event_type: int(number)
        for event_type, number in re.findall(r"^  ([a-z_]+) +(\d+)$", out, re.MULTILINE)
    }
    assert set(counts) == set(EVENT_TYPES)
    assert min(counts.values()) >= 1
    total = re.search(r"^events emitted: (\d+),", out, re.MULTILINE)
    assert total is not None and int(total.group(1)) == sum(counts.values())
    assert "all 19 event types emitted" in out
    assert "emitted exactly its events, in order" in out
    assert "holds the same" in out
