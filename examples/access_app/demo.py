"""A scripted walk through access_app: watch audit events arrive as requests commit.

Run it with ``./scripts/demo`` from the repository, or
``cd examples && python -m access_app.demo [--keep]``. It needs no server: the
app runs on an SQLite file in a temporary directory, with a JSON-lines sink
next to it and a plugin that prints each event the moment it is emitted.

Every step is one HTTP request through Flask's test client, made as a user
(``X-User-Id``) with a request id (``X-Request-ID``), and states the events it
must emit. The walk checks that each step emitted exactly those, in order,
with that actor and that request's metadata. Near the end, approving a role
request fails inside its nested role assignment (the group is locked): that
request must emit nothing and leave the database as it was. Exit status 0
means every check held.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import select

from access_audit import AuditEventEnvelope, StagedEvent, hookimpl, signals

from . import audit, create_app
from .models import Membership, RoleRequest, db, role_groups

__all__ = ["EVENT_TYPES", "main", "snapshot"]

EVENT_TYPES = (
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
)
"""Every event type the app stages; the walk emits each at least once."""


class PrintingPlugin:
    """Prints each committed event as it arrives, and keeps it."""

    def __init__(self) -> None:
        self.envelopes: list[AuditEventEnvelope] = []

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        """Print *envelope*: what, who, why, and the request it came from."""
        self.envelopes.append(envelope)
        meta = envelope.metadata
        target = f"{envelope.target_type} {envelope.target_id}"
        if envelope.target_name:
            target += f" {envelope.target_name!r}"
        print(
            f"     event {len(self.envelopes):>2}  {envelope.event_type:<22} {target}"
            f"  by {envelope.actor_id} <{envelope.actor_email}>"
        )
        print(
            f"               reason: {envelope.reason!r}  request: "
            f"{meta.get('request_id')} {meta.get('method')} {meta.get('path')} "
            f"from {meta.get('ip_address')}"
        )


def snapshot(app: Flask) -> dict[str, list[tuple[Any, ...]]]:
    """The rows an approval may change: memberships, role links, role requests."""
    with app.app_context():
        session = db.session
        memberships = session.execute(
            select(Membership.group_id, Membership.user_id, Membership.role_id)
        )
        links = session.execute(select(role_groups.c.role_id, role_groups.c.group_id))
        requests = session.execute(
            select(RoleRequest.id, RoleRequest.status, RoleRequest.resolver_id)
        )
        return {
            "memberships": sorted(tuple(row) for row in memberships),
            "role_groups": sorted(tuple(row) for row in links),
            "role_requests": sorted(
                (id_, status.value, resolver) for id_, status, resolver in requests
            ),
        }


class Walk:
    """Drives the API one request per step and checks what each step emitted."""

    def __init__(self, app: Flask, plugin: PrintingPlugin) -> None:
        self.app = app
        self.client = app.test_client()
        self.plugin = plugin
        self.step = 0
        self.users: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []

    def call(
        self,
        title: str,
        method: str,
        path: str,
        *,
        user: str | None = None,
        body: dict[str, Any] | None = None,
        expect: Sequence[str] = (),
        status: int = 200,
    ) -> dict[str, Any]:
        """Make one request as *user* and check its status and emitted events."""
        self.step += 1
        request_id = f"walk-{self.step:02d}"
        actor = self.users[user] if user is not None else None
        headers = {"X-Request-ID": request_id}
        if actor is not None:
            headers["X-User-Id"] = str(actor["id"])
        print(f"\n[{self.step:02d}] {title}")
        print(f"     {method} {path}" + (f" as {user}" if user else ""))
        before = len(self.plugin.envelopes)
        response = self.client.open(path, method=method, json=body, headers=headers)
        emitted = self.plugin.envelopes[before:]
        data: dict[str, Any] = response.get_json()
        if response.status_code != status:
            self._problem(
                f"{request_id} {method} {path}: status {response.status_code}, "
                f"not {status}"
            )
        self._check_events(request_id, method, path, actor, emitted, expect)
        if response.status_code >= 400:
            print(f"     -> {response.status_code} {data['error']}: {data['message']}")
        else:
            print(f"     -> {response.status_code}, {len(emitted)} event(s) emitted")
        return data

    def _check_events(
        self,
        request_id: str,
        method: str,
        path: str,
        actor: dict[str, Any] | None,
        emitted: Sequence[AuditEventEnvelope],
        expect: Sequence[str],
    ) -> None:
        types = [envelope.event_type for envelope in emitted]
        if types != list(expect):
            self._problem(f"{request_id}: emitted {types}, expected {list(expect)}")
        for envelope in emitted:
            meta = envelope.metadata
            request_of_event = (meta["request_id"], meta["method"], meta["path"])
            if request_of_event != (request_id, method, path):
                self._problem(f"{request_id}: {envelope.event_type} has {meta}")
            if actor is not None and (envelope.actor_id, envelope.actor_email) != (
                str(actor["id"]),
                actor["email"],
            ):
                self._problem(f"{request_id}: {envelope.event_type} has a wrong actor")

    def _problem(self, message: str) -> None:
        self.problems.append(message)
        print(f"     !! {message}")


@contextmanager
def printing_discards() -> Iterator[list[StagedEvent]]:
    """Print (and collect) every staged event that is discarded in the block."""
    dropped: list[StagedEvent] = []

    def receiver(sender: object, event: StagedEvent, reason: str) -> None:
        dropped.append(event)
        print(f"     discarded: {event.event_type:<22} ({reason})")

    with signals.audit_event_discarded.connected_to(receiver):
        yield dropped


def run_walk(walk: Walk) -> tuple[str, list[StagedEvent], bool]:
    """The scripted walk. Returns the failed approval's request id, the events
    it discarded, and whether the database was unchanged by it."""
    call = walk.call
    print("== users (they come from the identity provider: not audited)")
    for name in ("alice", "bob", "carol", "dave", "erin"):
        walk.users[name] = call(
            f"create user {name}",
            "POST",
            "/users",
            body={"email": f"{name}@example.com", "name": name.title()},
            status=201,
        )

    print("\n== groups, owners, members")
    groups = {}
    for name, locked in (
        ("engineering", False),
        ("oncall", False),
        ("payroll", True),
        ("sandbox", False),
    ):
        groups[name] = call(
            f"alice creates group {name}" + (" (locked)" if locked else ""),
            "POST",
            "/groups",
            user="alice",
            body={"name": name, "locked": locked, "reason": f"new team space {name}"},
            expect=["group_create"],
            status=201,
        )["id"]
    alice, bob, carol, erin = (
        walk.users[n]["id"] for n in ("alice", "bob", "carol", "erin")
    )
    for name in ("engineering", "oncall", "payroll"):
        call(
            f"alice becomes an owner of {name}",
            "PUT",
            f"/groups/{groups[name]}/owners/{alice}",
            user="alice",
            body={"reason": "team lead"},
            expect=["group_owner_added"],
        )
    call(
        "alice makes bob an owner of oncall",
        "PUT",
        f"/groups/{groups['oncall']}/owners/{bob}",
        user="alice",
        body={"reason": "covering while alice is away"},
        expect=["group_owner_added"],
    )
    call(
        "alice takes that ownership back",
        "DELETE",
        f"/groups/{groups['oncall']}/owners/{bob}",
        user="alice",
        body={"reason": "alice is back"},
        expect=["group_owner_removed"],
    )
    call(
        "alice adds erin to engineering",
        "PUT",
        f"/groups/{groups['engineering']}/members/{erin}",
        user="alice",
        body={"reason": "internship starts"},
        expect=["group_member_added"],
    )
    call(
        "alice removes erin again",
        "DELETE",
        f"/groups/{groups['engineering']}/members/{erin}",
        user="alice",
        body={"reason": "added to the wrong group"},
        expect=["group_member_removed"],
    )

    print("\n== tags and an app")
    prod = call(
        "alice creates tag prod",
        "POST",
        "/tags",
        user="alice",
        body={"name": "prod", "reason": "classify production apps"},
        expect=["tag_create"],
        status=201,
    )["id"]
    temp = call(
        "alice creates tag temp",
        "POST",
        "/tags",
        user="alice",
        body={"name": "temp", "reason": "short-lived apps"},
        expect=["tag_create"],
        status=201,
    )["id"]
    call(
        "alice describes tag prod",
        "PATCH",
        f"/tags/{prod}",
        user="alice",
        body={"description": "customer-facing", "reason": "clarify the policy"},
        expect=["tag_update"],
    )
    wiki = call(
        "alice registers the wiki app, tagged prod and temp",
        "POST",
        "/apps",
        user="alice",
        body={"name": "wiki", "tag_ids": [prod, temp], "reason": "new internal wiki"},
        expect=["app_create"],
        status=201,
    )["id"]
    call(
        "alice deletes tag temp",
        "DELETE",
        f"/tags/{temp}",
        user="alice",
        body={"reason": "nothing is temporary"},
        expect=["tag_delete"],
    )

    print("\n== access requests")
    request = call(
        "bob asks to join engineering",
        "POST",
        "/access-requests",
        user="bob",
        body={"group_id": groups["engineering"], "reason": "I joined the team"},
        expect=["access_create"],
        status=201,
    )["id"]
    call(
        "alice approves: the approval adds bob as a member",
        "POST",
        f"/access-requests/{request}/approve",
        user="alice",
        body={"reason": "welcome, bob"},
        expect=["access_approve", "group_member_added"],
    )
    request = call(
        "erin asks to join oncall",
        "POST",
        "/access-requests",
        user="erin",
        body={"group_id": groups["oncall"], "reason": "curious"},
        expect=["access_create"],
        status=201,
    )["id"]
    call(
        "alice rejects",
        "POST",
        f"/access-requests/{request}/reject",
        user="alice",
        body={"reason": "interns are not on call"},
        expect=["access_reject"],
    )

    print("\n== roles and role requests")
    sre = call(
        "alice defines role sre: carol and dave (not audited: from the IdP)",
        "POST",
        "/roles",
        user="alice",
        body={"name": "sre", "member_ids": [carol, walk.users["dave"]["id"]]},
        status=201,
    )["id"]
    request = call(
        "carol asks that role sre be assigned to oncall",
        "POST",
        "/role-requests",
        user="carol",
        body={
            "role_id": sre,
            "group_id": groups["oncall"],
            "reason": "SREs are on call",
        },
        expect=["role_request_create"],
        status=201,
    )["id"]
    call(
        "alice approves: the role is assigned, which adds carol and dave",
        "POST",
        f"/role-requests/{request}/approve",
        user="alice",
        body={"reason": "agreed"},
        expect=[
            "role_request_approve",
            "role_group_assigned",
            "group_member_added",
            "group_member_added",
        ],
    )
    request = call(
        "erin asks that role sre be assigned to engineering",
        "POST",
        "/role-requests",
        user="erin",
        body={"role_id": sre, "group_id": groups["engineering"], "reason": "why not"},
        expect=["role_request_create"],
        status=201,
    )["id"]
    call(
        "alice rejects",
        "POST",
        f"/role-requests/{request}/reject",
        user="alice",
        body={"reason": "engineering membership is personal"},
        expect=["role_request_reject"],
    )
    call(
        "alice unassigns sre from oncall: carol and dave leave it",
        "DELETE",
        f"/roles/{sre}/groups/{groups['oncall']}",
        user="alice",
        body={"reason": "rotation handed to the platform team"},
        expect=[
            "role_group_unassigned",
            "group_member_removed",
            "group_member_removed",
        ],
    )

    print("\n== deletions")
    call(
        "alice deletes group sandbox",
        "DELETE",
        f"/groups/{groups['sandbox']}",
        user="alice",
        body={"reason": "unused"},
        expect=["group_delete"],
    )
    call(
        "alice deletes the wiki app",
        "DELETE",
        f"/apps/{wiki}",
        user="alice",
        body={"reason": "moved to a hosted wiki"},
        expect=["app_delete"],
    )

    print("\n== an approval whose nested role assignment fails")
    request = call(
        "carol asks that role sre be assigned to payroll (a locked group)",
        "POST",
        "/role-requests",
        user="carol",
        body={
            "role_id": sre,
            "group_id": groups["payroll"],
            "reason": "SREs fix payroll",
        },
        expect=["role_request_create"],
        status=201,
    )["id"]
    before = snapshot(walk.app)
    with printing_discards() as dropped:
        call(
            "alice approves: role_request_approve, role_group_assigned and "
            "group_member_added are staged, then payroll refuses the new members",
            "POST",
            f"/role-requests/{request}/approve",
            user="alice",
            body={"reason": "fine by me"},
            expect=[],
            status=409,
        )
    failed_request_id = f"walk-{walk.step:02d}"
    unchanged = snapshot(walk.app) == before
    call(
        "the request is still pending: alice rejects it instead",
        "POST",
        f"/role-requests/{request}/reject",
        user="alice",
        body={"reason": "payroll is locked"},
        expect=["role_request_reject"],
    )
    return failed_request_id, dropped, unchanged


def summarise(
    walk: Walk,
    log_path: Path,
    failed_request_id: str,
    dropped: Sequence[StagedEvent],
    unchanged: bool,
) -> None:
    """Print the counts and the proofs; add a problem for each that failed."""
    envelopes = walk.plugin.envelopes
    print("\n== summary")
    batches = len({envelope.transaction_id for envelope in envelopes})
    print(f"events emitted: {len(envelopes)}, in {batches} committed transactions")
    counts = Counter(envelope.event_type for envelope in envelopes)
    for event_type in sorted(EVENT_TYPES):
        print(f"  {event_type:<22} {counts[event_type]}")
    missing = [t for t in EVENT_TYPES if counts[t] == 0]
    if missing:
        walk._problem(f"event types never emitted: {missing}")
    else:
        print(f"all {len(EVENT_TYPES)} event types emitted")

    lines = log_path.read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    if [entry["id"] for entry in logged] == [str(e.id) for e in envelopes]:
        print(f"{log_path} holds the same {len(lines)} events, in the same order")
    else:
        walk._problem(f"{log_path} does not hold exactly the emitted events")
    approve = next(e for e in logged if e["event_type"] == "access_approve")
    print("one line of it, the access approval:")
    print(json.dumps(approve, indent=2))

    from_failed = [
        e for e in envelopes if e.metadata["request_id"] == failed_request_id
    ]
    staged = ", ".join(event.event_type for event in dropped)
    if from_failed or not dropped or not unchanged:
        walk._problem(
            f"the failed approval ({failed_request_id}) emitted {len(from_failed)} "
            f"event(s), discarded {len(dropped)}, database unchanged: {unchanged}"
        )
    else:
        print(
            f"the failed approval ({failed_request_id}) emitted nothing: its "
            f"{len(dropped)} staged events were discarded ({staged}), "
            "and the database is unchanged"
        )
    if walk.problems:
        print(f"{len(walk.problems)} check(s) FAILED:")
        for problem in walk.problems:
            print(f"  - {problem}")
    else:
        print(
            f"every one of the {walk.step} requests emitted exactly its events, "
            "in order, with its actor and request metadata"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the walk; return 0 if every check held, else 1."""
    parser = argparse.ArgumentParser(prog="python -m access_app.demo")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (database and JSON-lines file)",
    )
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="access_app_demo_"))
    try:
        log_path = directory / "audit.jsonl"
        app = create_app(
            {
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{directory / 'access_app.db'}",
                "ACCESS_APP_AUDIT_LOG": str(log_path),
                # Only this demo's plugins: none from installed packages.
                "ACCESS_AUDIT_LOAD_ENTRYPOINTS": False,
            }
        )
        plugin = PrintingPlugin()
        audit.emitter_of(app).register(plugin, name="demo.print")
        print(f"access_app demo: database and {log_path.name} in {directory}")
        walk = Walk(app, plugin)
        failed_request_id, dropped, unchanged = run_walk(walk)
        summarise(walk, log_path, failed_request_id, dropped, unchanged)
        with app.app_context():
            db.engine.dispose()
    finally:
        if options.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 1 if walk.problems else 0


if __name__ == "__main__":
    sys.exit(main())
