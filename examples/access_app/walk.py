"""The machinery of the demo walk: steps, the checks on what each emitted, printing.

A :class:`Step` is one HTTP request through Flask's test client, made as a
user (``X-User-Id``) with a request id (``X-Request-ID``), and the events it
must emit. :class:`Walk` runs steps and records a problem for every step
whose status, event types (in order), actor or request metadata differ from
what it stated. :func:`request_as` and :func:`snapshot` serve the tests too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from access_audit import AuditEventEnvelope, StagedEvent, hookimpl, signals

from .models import Membership, RoleRequest, db, role_groups

__all__ = [
    "PrintingPlugin",
    "Ref",
    "Step",
    "Walk",
    "printing_discards",
    "request_as",
    "snapshot",
]


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


@contextmanager
def printing_discards() -> Iterator[list[StagedEvent]]:
    """Print (and collect) every staged event that is discarded in the block."""
    dropped: list[StagedEvent] = []

    def receiver(sender: object, event: StagedEvent, reason: str) -> None:
        dropped.append(event)
        print(f"     discarded: {event.event_type:<22} ({reason})")

    with signals.audit_event_discarded.connected_to(receiver):
        yield dropped


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


def request_as(
    client: FlaskClient,
    method: str,
    path: str,
    *,
    user: Mapping[str, Any] | None = None,
    body: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> TestResponse:
    """Send *body* as JSON, as *user* (a user's JSON: its ``id`` goes in
    ``X-User-Id``) and with *request_id* (``X-Request-ID``), if given."""
    headers = {}
    if user is not None:
        headers["X-User-Id"] = str(user["id"])
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return client.open(path, method=method, json=body, headers=headers)


@dataclasses.dataclass(frozen=True, slots=True)
class Ref:
    """In a step's body: the id of the response an earlier step saved as *name*."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One request of the walk, and what it must answer and emit.

    *request* is ``"METHOD /path"``; a ``{name}`` in the path, like a
    :class:`Ref` in *body* (or in a list there), stands for the id of the
    response saved as *name*. *user* names the acting user: a saved user's
    response. *save* keeps this step's response under that name.
    """

    title: str
    user: str | None
    request: str
    body: Mapping[str, Any] | None = None
    expect: Sequence[str] = ()
    status: int = 200
    save: str | None = None


def _resolve(value: Any, ids: Mapping[str, int]) -> Any:
    """*value* with each :class:`Ref`, also in a list, replaced by its id."""
    if isinstance(value, Ref):
        return ids[value.name]
    if isinstance(value, list):
        return [_resolve(item, ids) for item in value]
    return value


class Walk:
    """Drives the API one request per step and checks what each step emitted."""

    def __init__(self, app: Flask, plugin: PrintingPlugin) -> None:
        self.app = app
        self.client = app.test_client()
        self.plugin = plugin
        self.step = 0
        self.saved: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []

    @property
    def request_id(self) -> str:
        """The ``X-Request-ID`` of the latest step."""
        return f"walk-{self.step:02d}"

    def run(self, steps: Sequence[Step]) -> None:
        """Run *steps* in order."""
        for step in steps:
            self.run_step(step)

    def run_step(self, step: Step) -> dict[str, Any]:
        """Make *step*'s request and check its status and emitted events.

        Returns the response's JSON (saved as ``step.save`` if set).
        """
        self.step += 1
        method, template = step.request.split(" ", 1)
        ids = {name: saved["id"] for name, saved in self.saved.items()}
        path = template.format_map(ids)
        body = None
        if step.body is not None:
            body = {key: _resolve(value, ids) for key, value in step.body.items()}
        actor = None if step.user is None else self.saved[step.user]
        print(f"\n[{self.step:02d}] {step.title}")
        print(f"     {method} {path}" + (f" as {step.user}" if step.user else ""))
        before = len(self.plugin.envelopes)
        response = request_as(
            self.client,
            method,
            path,
            user=actor,
            body=body,
            request_id=self.request_id,
        )
        emitted = self.plugin.envelopes[before:]
        data: dict[str, Any] = response.get_json()
        if response.status_code != step.status:
            self.problem(
                f"{self.request_id} {method} {path}: status {response.status_code}, "
                f"not {step.status}"
            )
        self._check_events(method, path, actor, emitted, step.expect)
        if response.status_code >= 400:
            print(f"     -> {response.status_code} {data['error']}: {data['message']}")
        else:
            print(f"     -> {response.status_code}, {len(emitted)} event(s) emitted")
        if step.save is not None:
            self.saved[step.save] = data
        return data

    def _check_events(
        self,
        method: str,
        path: str,
        actor: Mapping[str, Any] | None,
        emitted: Sequence[AuditEventEnvelope],
        expect: Sequence[str],
    ) -> None:
        request_id = self.request_id
        types = [envelope.event_type for envelope in emitted]
        if types != list(expect):
            self.problem(f"{request_id}: emitted {types}, expected {list(expect)}")
        for envelope in emitted:
            meta = envelope.metadata
            request_of_event = (meta["request_id"], meta["method"], meta["path"])
            if request_of_event != (request_id, method, path):
                self.problem(f"{request_id}: {envelope.event_type} has {meta}")
            if actor is not None and (envelope.actor_id, envelope.actor_email) != (
                str(actor["id"]),
                actor["email"],
            ):
                self.problem(f"{request_id}: {envelope.event_type} has a wrong actor")

    def problem(self, message: str) -> None:
        """Record (and print) a check that failed."""
        self.problems.append(message)
        print(f"     !! {message}")
