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
from access_app.demo import EVENT_TYPES  # noqa: E402
from access_app.models import Membership, RoleRequest, role_groups  # noqa: E402
from flask import Flask  # noqa: E402
from sqlalchemy import create_engine, select, text  # noqa: E402

from access_audit.testing import AuditEventRecorder  # noqa: E402

POSTGRESQL_URL = os.environ.get(
    "ACCESS_AUDIT_TEST_POSTGRESQL_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)

ISSUE_EVENT_TYPES = {
    "access_create",
    "access_approve",
    "access_reject",
    "role_request_create",
    "role_request_approve",
    "role_request_reject",
    "app_create",
    "app_delete",
    "group_create",
    "group_delete",
    "tag_create",
    "tag_delete",
    "tag_update",
    "group_member_added",
    "group_member_removed",
    "group_owner_added",
    "group_owner_removed",
    "role_group_assigned",
    "role_group_unassigned",
}
"""The 19 event types issue 4 names."""

# The event types each end-to-end test emits, and asserts with target and actor.
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
        headers = {}
        if user is not None:
            headers["X-User-Id"] = str(user["id"])
        if request_id is not None:
            headers["X-Request-ID"] = request_id
        response = self.client.open(path, method=method, json=body, headers=headers)
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


def table_rows(app: Flask) -> dict[str, list[tuple[Any, ...]]]:
    """The rows an approval may change: memberships, role links, role requests."""
    with app.app_context():
        memberships = db.session.execute(
            select(Membership.group_id, Membership.user_id, Membership.role_id)
        )
        links = db.session.execute(select(role_groups))
        requests = db.session.execute(
            select(RoleRequest.id, RoleRequest.status, RoleRequest.resolver_id)
        )
        rows = {
            "memberships": sorted(tuple(row) for row in memberships),
            "role_groups": sorted(tuple(row) for row in links),
            "role_requests": sorted(
                (id_, status.value, resolver) for id_, status, resolver in requests
            ),
        }
    return rows


def emitted_types(audit_events: AuditEventRecorder) -> set[str]:
    return {envelope.event_type for envelope in audit_events.events}


def test_the_end_to_end_tests_cover_all_nineteen_event_types() -> None:
    """The app's event types are issue 4's 19, and the tests below cover each."""
    assert set(EVENT_TYPES) == ISSUE_EVENT_TYPES
    assert len(EVENT_TYPES) == 19
    covered = GROUP_EVENTS | TAG_AND_APP_EVENTS | ACCESS_EVENTS | ROLE_EVENTS
    assert covered == ISSUE_EVENT_TYPES


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
    target = {"target_type": "group", "target_id": gid, "target_name": "eng"}
    created = audit_events.assert_emitted(
        "group_create", **target, **actor(alice), reason="new team"
    )
    assert dict(created.payload) == {"description": "engineers", "locked": False}

    api("PUT", f"/groups/{gid}/owners/{bob['id']}", user=alice, body={"reason": "lead"})
    audit_events.assert_emitted(
        "group_owner_added",
        **target,
        **actor(alice),
        reason="lead",
        payload={"user_id": bob["id"], "user_email": bob["email"]},
    )
    api("PUT", f"/groups/{gid}/members/{alice['id']}", user=bob, body={"reason": "hi"})
    audit_events.assert_emitted(
        "group_member_added",
        **target,
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
        **target,
        **actor(bob),
        reason="bye",
        payload={"user_id": alice["id"]},
    )
    api("DELETE", f"/groups/{gid}/owners/{bob['id']}", user=alice, body={"reason": "x"})
    audit_events.assert_emitted(
        "group_owner_removed", **target, **actor(alice), payload={"user_id": bob["id"]}
    )
    shown = api("GET", f"/groups/{gid}")
    assert (shown["owner_ids"], shown["members"]) == ([], [])

    api("PUT", f"/groups/{gid}/members/{bob['id']}", user=alice)
    api("DELETE", f"/groups/{gid}", user=alice, body={"reason": "team disbanded"})
    deleted = audit_events.assert_emitted(
        "group_delete", **target, **actor(alice), reason="team disbanded"
    )
    assert deleted.payload["member_ids"] == [bob["id"]]
    api("GET", f"/groups/{gid}", status=404)
    assert table_rows(app)["memberships"] == []

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
        target_type="tag",
        target_id=prod["id"],
        target_name="prod",
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
        target_type="tag",
        target_id=prod["id"],
        target_name="production",
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
        target_type="app",
        target_id=wiki["id"],
        target_name="wiki",
        reason="docs",
        payload={"tags": ["production", "temp"]},
        **actor(alice),
    )
    api("DELETE", f"/tags/{temp['id']}", user=alice, body={"reason": "unused"})
    audit_events.assert_emitted(
        "tag_delete",
        target_type="tag",
        target_id=temp["id"],
        target_name="temp",
        payload={"app_ids": [wiki["id"]]},
        **actor(alice),
    )
    assert api("GET", f"/apps/{wiki['id']}")["tag_ids"] == [prod["id"]]
    api("DELETE", f"/apps/{wiki['id']}", user=alice, body={"reason": "retired"})
    audit_events.assert_emitted(
        "app_delete",
        target_type="app",
        target_id=wiki["id"],
        target_name="wiki",
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
        target_type="access_request",
        target_id=request["id"],
        target_name="bob@example.com -> eng",
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
    assert (approved["status"], approved["resolver_id"]) == ("approved", alice["id"])
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
        target_type="access_request",
        target_id=request["id"],
        target_name="bob@example.com -> eng",
        reason="welcome",
        metadata=metadata,
        **actor(alice),
    )
    audit_events.assert_emitted(
        "group_member_added",
        target_type="group",
        target_id=gid,
        target_name="eng",
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
        target_type="access_request",
        target_id=rejected["id"],
        target_name="erin@example.com -> eng",
        reason="not needed",
        **actor(alice),
    )
    assert api("GET", f"/access-requests/{rejected['id']}")["status"] == "rejected"
    assert [m[1] for m in table_rows(app)["memberships"]] == [bob["id"]]
    assert emitted_types(audit_events) == ACCESS_EVENTS


def test_role_requests_assign_and_unassign_roles(
    app: Flask, api: Api, audit_events: AuditEventRecorder
) -> None:
    """A role request's approval assigns the role, which adds each role member."""
    users = create_users(api, "alice", "carol", "dave", "erin")
    alice, carol, dave, erin = (users[n] for n in ("alice", "carol", "dave", "erin"))
    oncall = create_owned_group(api, alice, "oncall")
    gid = oncall["id"]
    role = api(
        "POST",
        "/roles",
        user=alice,
        body={"name": "sre", "member_ids": [carol["id"], dave["id"]]},
        status=201,
    )
    request = api(
        "POST",
        "/role-requests",
        user=carol,
        body={"role_id": role["id"], "group_id": gid, "reason": "SREs are on call"},
        status=201,
    )
    audit_events.assert_emitted(
        "role_request_create",
        target_type="role_request",
        target_id=request["id"],
        target_name="sre -> oncall",
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
        target_type="role_request",
        target_id=request["id"],
        target_name="sre -> oncall",
        reason="agreed",
        **actor(alice),
    )
    audit_events.assert_emitted(
        "role_group_assigned",
        target_type="role",
        target_id=role["id"],
        target_name="sre",
        payload={"group_id": gid, "member_ids_added": [carol["id"], dave["id"]]},
        **actor(alice),
    )
    for user in (carol, dave):
        audit_events.assert_emitted(
            "group_member_added",
            target_type="group",
            target_id=gid,
            target_name="oncall",
            payload={"user_id": user["id"], "role_id": role["id"]},
            **actor(alice),
        )
    assert table_rows(app)["memberships"] == [
        (gid, carol["id"], role["id"]),
        (gid, dave["id"], role["id"]),
    ]

    rejected = api(
        "POST",
        "/role-requests",
        user=erin,
        body={
            "role_id": role["id"],
            "group_id": create_owned_group(api, alice, "x")["id"],
            "reason": "why not",
        },
        status=201,
    )
    api(
        "POST",
        f"/role-requests/{rejected['id']}/reject",
        user=alice,
        body={"reason": "no"},
    )
    audit_events.assert_emitted(
        "role_request_reject",
        target_type="role_request",
        target_id=rejected["id"],
        target_name="sre -> x",
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
        target_type="role",
        target_id=role["id"],
        target_name="sre",
        reason="handed over",
        payload={"group_id": gid, "member_ids_removed": [carol["id"], dave["id"]]},
        **actor(alice),
    )
    for user in (carol, dave):
        audit_events.assert_emitted(
            "group_member_removed",
            target_type="group",
            target_id=gid,
            target_name="oncall",
            payload={"user_id": user["id"], "role_id": role["id"]},
            **actor(alice),
        )
    rows = table_rows(app)
    assert (rows["memberships"], rows["role_groups"]) == ([], [])
    assert emitted_types(audit_events) == ROLE_EVENTS


def test_a_failed_nested_role_assignment_emits_nothing_and_changes_nothing(
    app: Flask, api: Api, audit_events: AuditEventRecorder, tmp_path: Path
) -> None:
    """Approving a role request for a locked group fails: no event, no row changed."""
    users = create_users(api, "alice", "carol", "dave")
    alice, carol, dave = users["alice"], users["carol"], users["dave"]
    payroll = create_owned_group(api, alice, "payroll", locked=True)
    role = api(
        "POST",
        "/roles",
        user=alice,
        body={"name": "sre", "member_ids": [carol["id"], dave["id"]]},
        status=201,
    )
    request = api(
        "POST",
        "/role-requests",
        user=carol,
        body={"role_id": role["id"], "group_id": payroll["id"], "reason": "please"},
        status=201,
    )
    before = table_rows(app)
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
    assert table_rows(app) == before
    assert before["role_requests"] == [(request["id"], "pending", None)]
    log = (tmp_path / "audit.jsonl").read_text()
    assert "req-failed" not in log

    # The session is clean afterwards: the request can still be rejected.
    api("POST", f"/role-requests/{request['id']}/reject", user=alice)
    audit_events.assert_emitted(
        "role_request_reject", target_id=request["id"], **actor(alice)
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
    api(
        "POST",
        "/access-requests",
        user=users["alice"],
        body={"group_id": group["id"], "reason": "me too"},
        status=201,
    )
    before = table_rows(sqlite_app)
    audit_events.clear()
    client = sqlite_app.test_client()
    headers = {} if user is None else {"X-User-Id": user}
    response = client.open(path, method=method, json=body, headers=headers)
    assert response.status_code == status
    assert message.lower() in response.get_json()["message"].lower()
    assert audit_events.events == []
    assert table_rows(sqlite_app) == before


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
    assert set(counts) == ISSUE_EVENT_TYPES
    assert min(counts.values()) >= 1
    total = re.search(r"^events emitted: (\d+),", out, re.MULTILINE)
    assert total is not None and int(total.group(1)) == sum(counts.values())
    assert "all 19 event types emitted" in out
    assert "emitted exactly its events, in order" in out
    assert "holds the same" in out
