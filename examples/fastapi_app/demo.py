"""A scripted walk through fastapi_app: watch audit events arrive as requests commit.

Run it with ``./scripts/demo-fastapi`` from the repository, or
``cd examples && python -m fastapi_app.demo [--database-url URL] [--keep]``.
Without a URL (option or ``$FASTAPI_APP_DATABASE_URL``) the app runs on
aiosqlite in a temporary directory; with one, for instance
``postgresql+asyncpg://user@localhost/dbname``, it creates its
``fastapi_app_*`` tables there and drops them at the end (unless ``--keep``).

The app runs in-process: its lifespan is entered, and each step is one
request through ``httpx.AsyncClient`` over ``httpx.ASGITransport``, made as a
user (``X-User-Id``) with a request id (``X-Request-ID``). An ``async def``
plugin prints each event the moment it is delivered. Every step states the
events it must emit; the walk checks that it emitted exactly those, in
order, with that actor, request id and endpoint template. Near the end,
approving a role request fails inside its nested role assignment (the group
is locked): that request must emit nothing and leave the database as it
was. Exit status 0 means every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from access_audit import StagedEvent, signals

from .app import DATABASE_URL_VARIABLE, create_app
from .models import Base, Membership, RoleRequest, role_groups
from .operations import EVENT_TYPES
from .plugins import ConsolePrinter

__all__ = ["FAILING_APPROVAL", "STEPS", "Step", "Walk", "main", "printing_discards"]


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One request of the walk, and what it must answer and emit.

    *request* is ``"METHOD /path"``; ``{name}`` in the path, or a ``"{name}"``
    value in *body*, stands for the id in the response saved as *name*.
    *user* names the acting user (a saved response). *endpoint* is the route
    template the events must carry (default: *request*'s path).
    """

    title: str
    user: str | None
    request: str
    body: Mapping[str, Any] | None = None
    expect: Sequence[str] = ()
    status: int = 200
    save: str | None = None
    endpoint: str | None = None


def _group(name: str, locked: bool = False) -> Step:
    return Step(
        f"alice creates group {name}" + (" (locked)" if locked else ""),
        "alice",
        "POST /groups",
        {"name": name, "locked": locked, "reason": f"new team space {name}"},
        ["group_create"],
        status=201,
        save=name,
    )


def _owner(group: str) -> Step:
    return Step(
        f"alice becomes an owner of {group}",
        "alice",
        f"PUT /groups/{{{group}}}/owners/{{alice}}",
        {"reason": "team lead"},
        ["group_owner_added"],
        endpoint="/groups/{group_id}/owners/{user_id}",
    )


def _role_request(group: str, reason: str) -> Step:
    return Step(
        f"carol asks that role sre be assigned to {group}",
        "carol",
        "POST /role-requests",
        {"role_id": "{sre}", "group_id": f"{{{group}}}", "reason": reason},
        ["role_request_create"],
        status=201,
        save=f"sre_{group}",
    )


STEPS: tuple[Step, ...] = (
    *(
        Step(
            f"create user {name} (users come from the identity provider: not audited)",
            None,
            "POST /users",
            {"email": f"{name}@example.com", "name": name.title()},
            status=201,
            save=name,
        )
        for name in ("alice", "bob", "carol", "dave")
    ),
    _group("oncall"),
    _group("payroll", locked=True),
    _owner("oncall"),
    _owner("payroll"),
    Step(
        "alice adds bob to oncall",
        "alice",
        "PUT /groups/{oncall}/members/{bob}",
        {"reason": "joins the rotation"},
        ["group_member_added"],
        endpoint="/groups/{group_id}/members/{user_id}",
    ),
    Step(
        "alice defines role sre: carol and dave (not audited: from the IdP)",
        "alice",
        "POST /roles",
        {"name": "sre", "member_ids": ["{carol}", "{dave}"]},
        status=201,
        save="sre",
    ),
    _role_request("oncall", "SREs are on call"),
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
        endpoint="/role-requests/{request_id}/approve",
    ),
    _role_request("payroll", "SREs fix payroll"),
)
"""The walk before its failing approval."""

FAILING_APPROVAL = Step(
    "alice approves: role_request_approve, role_group_assigned and "
    "group_member_added are staged, then payroll refuses the new members",
    "alice",
    "POST /role-requests/{sre_payroll}/approve",
    {"reason": "fine by me"},
    [],
    status=409,
    endpoint="/role-requests/{request_id}/approve",
)
"""The approval that must emit nothing (it discards what it staged)."""

AFTERWARDS = Step(
    "the request is still pending: alice rejects it instead",
    "alice",
    "POST /role-requests/{sre_payroll}/reject",
    {"reason": "payroll is locked"},
    ["role_request_reject"],
    endpoint="/role-requests/{request_id}/reject",
)
"""The step that shows the failed approval left the request pending."""


@contextmanager
def printing_discards() -> Iterator[list[StagedEvent]]:
    """Print (and collect) every staged event discarded in the block."""
    dropped: list[StagedEvent] = []

    def receiver(sender: object, event: StagedEvent, reason: str) -> None:
        dropped.append(event)
        print(f"     discarded: {event.event_type:<21} ({reason})")

    with signals.audit_event_discarded.connected_to(receiver):
        yield dropped


async def snapshot(sessions: async_sessionmaker[AsyncSession]) -> list[list[Any]]:
    """The rows an approval may change: memberships, role links, role requests."""
    queries = (
        select(Membership.group_id, Membership.user_id, Membership.role_id),
        select(role_groups.c.role_id, role_groups.c.group_id),
        select(RoleRequest.id, RoleRequest.status, RoleRequest.resolver_id),
    )
    async with sessions() as session:
        return [sorted(map(tuple, await session.execute(q))) for q in queries]


class Walk:
    """Drives the app one request per step and checks what each step emitted."""

    def __init__(self, client: httpx.AsyncClient, printer: ConsolePrinter) -> None:
        self.client = client
        self.printer = printer
        self.step = 0
        self.saved: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []

    @property
    def request_id(self) -> str:
        """The ``X-Request-ID`` of the latest step."""
        return f"walk-{self.step:02d}"

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self._resolve(item) for item in value]
        if isinstance(value, str) and value.startswith("{"):
            return self.saved[value.strip("{}")]["id"]
        return value

    async def run(self, step: Step) -> dict[str, Any]:
        """Make *step*'s request; check its status and the events it emitted."""
        self.step += 1
        method, template = step.request.split(" ", 1)
        path = template.format_map({k: v["id"] for k, v in self.saved.items()})
        body = None
        if step.body is not None:
            body = {key: self._resolve(value) for key, value in step.body.items()}
        headers = {"X-Request-ID": self.request_id}
        actor = None if step.user is None else self.saved[step.user]
        if actor is not None:
            headers["X-User-Id"] = str(actor["id"])
        print(f"\n[{self.step:02d}] {step.title}")
        print(f"     {method} {path}" + (f" as {step.user}" if step.user else ""))
        before = len(self.printer.envelopes)
        response = await self.client.request(method, path, json=body, headers=headers)
        emitted = self.printer.envelopes[before:]
        data: dict[str, Any] = response.json()
        if response.status_code != step.status:
            self.problem(f"status {response.status_code}, not {step.status}")
        if response.headers.get("X-Request-ID") != self.request_id:
            self.problem("the response does not echo X-Request-ID")
        types = [envelope.event_type for envelope in emitted]
        if types != list(step.expect):
            self.problem(f"emitted {types}, expected {list(step.expect)}")
        endpoint = step.endpoint or template
        for envelope in emitted:
            meta = envelope.metadata
            seen = (meta["request_id"], meta["method"], meta["endpoint"])
            if seen != (self.request_id, method, endpoint):
                self.problem(f"{envelope.event_type} has request metadata {seen}")
            if actor and (envelope.actor_id, envelope.actor_email) != (
                str(actor["id"]),
                actor["email"],
            ):
                self.problem(f"{envelope.event_type} has a wrong actor")
        if response.status_code >= 400:
            print(f"     -> {response.status_code} {data['error']}: {data['message']}")
        else:
            print(f"     -> {response.status_code}, {len(emitted)} event(s) emitted")
        if step.save is not None:
            self.saved[step.save] = data
        return data

    def problem(self, message: str) -> None:
        """Record (and print) a check that failed."""
        self.problems.append(f"{self.request_id}: {message}")
        print(f"     !! {message}")


async def walk_through(app: FastAPI, printer: ConsolePrinter) -> list[str]:
    """Run the whole walk on *app* (whose plugins include *printer*), its
    lifespan entered; return the problems found (none: every check held)."""
    sessions: async_sessionmaker[AsyncSession] = app.state.sessions
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
    ):
        walk = Walk(client, printer)
        for step in STEPS:
            await walk.run(step)
        before = await snapshot(sessions)
        with printing_discards() as dropped:
            await walk.run(FAILING_APPROVAL)
        failed = walk.request_id
        unchanged = await snapshot(sessions) == before
        await walk.run(AFTERWARDS)
        summarise(walk, failed, dropped, unchanged)
    return walk.problems


def summarise(
    walk: Walk, failed: str, dropped: Sequence[StagedEvent], unchanged: bool
) -> None:
    """Print the counts and the proofs; add a problem for each that failed."""
    envelopes = walk.printer.envelopes
    print("\n== summary")
    batches = len({envelope.transaction_id for envelope in envelopes})
    print(f"events emitted: {len(envelopes)}, in {batches} committed transactions")
    counts = Counter(envelope.event_type for envelope in envelopes)
    for event_type in EVENT_TYPES:
        print(f"  {event_type:<21} {counts[event_type]}")
    from_failed = [e for e in envelopes if e.metadata["request_id"] == failed]
    if from_failed or not dropped or not unchanged:
        walk.problem(
            f"the failed approval ({failed}) emitted {len(from_failed)} event(s), "
            f"discarded {len(dropped)}, database unchanged: {unchanged}"
        )
    else:
        print(
            f"the failed approval ({failed}) emitted nothing: its {len(dropped)} "
            "staged events were discarded, and the database is unchanged"
        )
    if walk.problems:
        print(f"{len(walk.problems)} check(s) FAILED:")
        for problem in walk.problems:
            print(f"  - {problem}")
    else:
        print(
            f"every one of the {walk.step} requests emitted exactly its events, "
            "in order, with its actor, request id and endpoint"
        )


async def _drop_tables(app: FastAPI) -> None:
    async with app.state.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
    await app.state.engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the walk; return 0 if every check held, else 1."""
    parser = argparse.ArgumentParser(prog="python -m fastapi_app.demo")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_VARIABLE),
        help=f"an async database URL (default: ${DATABASE_URL_VARIABLE}, else "
        "aiosqlite in a temporary directory), e.g. postgresql+asyncpg://...",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the tables (and the temporary directory)",
    )
    options = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="fastapi_app_demo_"))
    url = options.database_url or f"sqlite+aiosqlite:///{directory / 'app.db'}"
    printer = ConsolePrinter()
    app = create_app(url, plugins=[printer])
    print(f"fastapi_app demo on {app.state.engine.url!r}")
    try:
        problems = asyncio.run(walk_through(app, printer))
        if not options.keep:
            asyncio.run(_drop_tables(app))
    finally:
        if options.keep:
            print(f"kept the tables (and {directory})")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
