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
means every check held. The steps are data (:data:`SECTIONS`); running and
checking them is :mod:`access_app.walk`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from access_audit import StagedEvent

from . import audit, create_app
from .models import db
from .operations import EVENT_TYPES
from .walk import PrintingPlugin, Ref, Step, Walk, printing_discards, snapshot

__all__ = ["SECTIONS", "main"]

# Who and what the walk creates first; each is saved under its name.
USERS = ("alice", "bob", "carol", "dave", "erin")
TAGS = (("prod", "classify production apps"), ("temp", "short-lived apps"))
GROUPS = (
    ("engineering", False),
    ("oncall", False),
    ("payroll", True),  # locked: the approval near the end fails on it
    ("sandbox", False),
)

SECTIONS: tuple[tuple[str, tuple[Step, ...]], ...] = (
    (
        "users (they come from the identity provider: not audited)",
        tuple(
            Step(
                f"create user {name}",
                None,
                "POST /users",
                {"email": f"{name}@example.com", "name": name.title()},
                status=201,
                save=name,
            )
            for name in USERS
        ),
    ),
    (
        "groups, owners, members",
        (
            *(
                Step(
                    f"alice creates group {name}" + (" (locked)" if locked else ""),
                    "alice",
                    "POST /groups",
                    {
                        "name": name,
                        "locked": locked,
                        "reason": f"new team space {name}",
                    },
                    ["group_create"],
                    status=201,
                    save=name,
                )
                for name, locked in GROUPS
            ),
            *(
                Step(
                    f"alice becomes an owner of {name}",
                    "alice",
                    f"PUT /groups/{{{name}}}/owners/{{alice}}",
                    {"reason": "team lead"},
                    ["group_owner_added"],
                )
                for name in ("engineering", "oncall", "payroll")
            ),
            Step(
                "alice makes bob an owner of oncall",
                "alice",
                "PUT /groups/{oncall}/owners/{bob}",
                {"reason": "covering while alice is away"},
                ["group_owner_added"],
            ),
            Step(
                "alice takes that ownership back",
                "alice",
                "DELETE /groups/{oncall}/owners/{bob}",
                {"reason": "alice is back"},
                ["group_owner_removed"],
            ),
            Step(
                "alice adds erin to engineering",
                "alice",
                "PUT /groups/{engineering}/members/{erin}",
                {"reason": "internship starts"},
                ["group_member_added"],
            ),
            Step(
                "alice removes erin again",
                "alice",
                "DELETE /groups/{engineering}/members/{erin}",
                {"reason": "added to the wrong group"},
                ["group_member_removed"],
            ),
        ),
    ),
    (
        "tags and an app",
        (
            *(
                Step(
                    f"alice creates tag {name}",
                    "alice",
                    "POST /tags",
                    {"name": name, "reason": reason},
                    ["tag_create"],
                    status=201,
                    save=name,
                )
                for name, reason in TAGS
            ),
            Step(
                "alice describes tag prod",
                "alice",
                "PATCH /tags/{prod}",
                {"description": "customer-facing", "reason": "clarify the policy"},
                ["tag_update"],
            ),
            Step(
                "alice registers the wiki app, tagged prod and temp",
                "alice",
                "POST /apps",
                {
                    "name": "wiki",
                    "tag_ids": [Ref("prod"), Ref("temp")],
                    "reason": "new internal wiki",
                },
                ["app_create"],
                status=201,
                save="wiki",
            ),
            Step(
                "alice deletes tag temp",
                "alice",
                "DELETE /tags/{temp}",
                {"reason": "nothing is temporary"},
                ["tag_delete"],
            ),
        ),
    ),
    (
        "access requests",
        (
            Step(
                "bob asks to join engineering",
                "bob",
                "POST /access-requests",
                {"group_id": Ref("engineering"), "reason": "I joined the team"},
                ["access_create"],
                status=201,
                save="bob_joins",
            ),
            Step(
                "alice approves: the approval adds bob as a member",
                "alice",
                "POST /access-requests/{bob_joins}/approve",
                {"reason": "welcome, bob"},
                ["access_approve", "group_member_added"],
            ),
            Step(
                "erin asks to join oncall",
                "erin",
                "POST /access-requests",
                {"group_id": Ref("oncall"), "reason": "curious"},
                ["access_create"],
                status=201,
                save="erin_joins",
            ),
            Step(
                "alice rejects",
                "alice",
                "POST /access-requests/{erin_joins}/reject",
                {"reason": "interns are not on call"},
                ["access_reject"],
            ),
        ),
    ),
    (
        "roles and role requests",
        (
            Step(
                "alice defines role sre: carol and dave (not audited: from the IdP)",
                "alice",
                "POST /roles",
                {"name": "sre", "member_ids": [Ref("carol"), Ref("dave")]},
                status=201,
                save="sre",
            ),
            Step(
                "carol asks that role sre be assigned to oncall",
                "carol",
                "POST /role-requests",
                {
                    "role_id": Ref("sre"),
                    "group_id": Ref("oncall"),
                    "reason": "SREs are on call",
                },
                ["role_request_create"],
                status=201,
                save="sre_oncall",
            ),
            Step(
                "alice approves: the role is assigned, which adds carol and dave",
                "alice",
                "POST /role-requests/{sre_oncall}/approve",
                {"reason": "agreed"},
                [
                    "role_request_approve",
                    "role_group_assigned",
                    "group_member_added",
                    "group_member_added",
                ],
            ),
            Step(
                "erin asks that role sre be assigned to engineering",
                "erin",
                "POST /role-requests",
                {
                    "role_id": Ref("sre"),
                    "group_id": Ref("engineering"),
                    "reason": "why not",
                },
                ["role_request_create"],
                status=201,
                save="sre_engineering",
            ),
            Step(
                "alice rejects",
                "alice",
                "POST /role-requests/{sre_engineering}/reject",
                {"reason": "engineering membership is personal"},
                ["role_request_reject"],
            ),
            Step(
                "alice unassigns sre from oncall: carol and dave leave it",
                "alice",
                "DELETE /roles/{sre}/groups/{oncall}",
                {"reason": "rotation handed to the platform team"},
                [
                    "role_group_unassigned",
                    "group_member_removed",
                    "group_member_removed",
                ],
            ),
        ),
    ),
    (
        "deletions",
        (
            Step(
                "alice deletes group sandbox",
                "alice",
                "DELETE /groups/{sandbox}",
                {"reason": "unused"},
                ["group_delete"],
            ),
            Step(
                "alice deletes the wiki app",
                "alice",
                "DELETE /apps/{wiki}",
                {"reason": "moved to a hosted wiki"},
                ["app_delete"],
            ),
        ),
    ),
    (
        "an approval whose nested role assignment fails",
        (
            Step(
                "carol asks that role sre be assigned to payroll (a locked group)",
                "carol",
                "POST /role-requests",
                {
                    "role_id": Ref("sre"),
                    "group_id": Ref("payroll"),
                    "reason": "SREs fix payroll",
                },
                ["role_request_create"],
                status=201,
                save="sre_payroll",
            ),
        ),
    ),
)
"""The walk before its failing approval: (heading, steps) per section."""

FAILING_APPROVAL = Step(
    "alice approves: role_request_approve, role_group_assigned and "
    "group_member_added are staged, then payroll refuses the new members",
    "alice",
    "POST /role-requests/{sre_payroll}/approve",
    {"reason": "fine by me"},
    [],
    status=409,
)
"""The approval that must emit nothing (it discards what it staged)."""

AFTERWARDS = Step(
    "the request is still pending: alice rejects it instead",
    "alice",
    "POST /role-requests/{sre_payroll}/reject",
    {"reason": "payroll is locked"},
    ["role_request_reject"],
)
"""The step that shows the failed approval left the request pending."""


def run_walk(walk: Walk) -> tuple[str, list[StagedEvent], bool]:
    """The scripted walk. Returns the failed approval's request id, the events
    it discarded, and whether the database was unchanged by it."""
    for heading, steps in SECTIONS:
        # The first heading follows the banner line directly.
        print(f"\n== {heading}" if walk.step else f"== {heading}")
        walk.run(steps)
    before = snapshot(walk.app)
    with printing_discards() as dropped:
        walk.run_step(FAILING_APPROVAL)
    failed_request_id = walk.request_id
    unchanged = snapshot(walk.app) == before
    walk.run_step(AFTERWARDS)
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
        walk.problem(f"event types never emitted: {missing}")
    else:
        print(f"all {len(EVENT_TYPES)} event types emitted")

    lines = log_path.read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    if [entry["id"] for entry in logged] == [str(e.id) for e in envelopes]:
        print(f"{log_path} holds the same {len(lines)} events, in the same order")
    else:
        walk.problem(f"{log_path} does not hold exactly the emitted events")
    approve = next(e for e in logged if e["event_type"] == "access_approve")
    print("one line of it, the access approval:")
    print(json.dumps(approve, indent=2))

    from_failed = [
        e for e in envelopes if e.metadata["request_id"] == failed_request_id
    ]
    staged = ", ".join(event.event_type for event in dropped)
    if from_failed or not dropped or not unchanged:
        walk.problem(
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
