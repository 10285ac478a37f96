"""The FastAPI example's API: what its requests emit, with which request and actor.

The fixtures are the rollback-per-test recipe of ``docs/testing.md`` ("FastAPI
and AsyncSession"), on aiosqlite: one app (and its aiosqlite file) serves the
module, its lifespan entered; each test gets a ``client`` whose requests run on
a session joined to the test's own outer transaction, rolled back at its end.
Everything runs on one event loop: an engine's connections belong to one loop.
(They are here, not in a ``conftest.py``: the core suite imports its own
``conftest`` by that name.)
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from access_audit.testing import AuditEventRecorder

EXAMPLES = Path(__file__).resolve().parents[2]
# The example app is a package in examples/, not an installed distribution.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from fastapi_app import ConsolePrinter, create_app, get_session  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    """The app on an aiosqlite file, its tables created by its lifespan."""
    path = tmp_path_factory.mktemp("fastapi_app") / "app.db"
    app = create_app(
        f"sqlite+aiosqlite:///{path}", plugins=[ConsolePrinter(quiet=True)]
    )
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(loop_scope="module")
async def client(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests' sessions join this test's outer transaction.

    Each endpoint's ``commit()`` releases a SAVEPOINT; the emitter delivers on
    it (``joined_transactions="session"``), as it would on a real commit.
    """
    monkeypatch.setattr(app.state.emitter, "joined_transactions", "session")
    async with app.state.engine.connect() as connection:
        transaction = await connection.begin()

        async def joined_session() -> AsyncIterator[AsyncSession]:
            async with app.state.sessions(
                bind=connection, join_transaction_mode="create_savepoint"
            ) as session:
                yield session

        app.dependency_overrides[get_session] = joined_session
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test"
            ) as client:
                yield client
        finally:
            app.dependency_overrides.clear()
            await transaction.rollback()


async def call(
    client: httpx.AsyncClient,
    request: str,
    user: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
    status: int = 200,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Send *request* (``"METHOD /path"``) as *user*; check the status."""
    method, path = request.split(" ", 1)
    headers = {} if user is None else {"X-User-Id": str(user["id"])}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    response = await client.request(method, path, json=body, headers=headers)
    assert response.status_code == status, response.text
    data: dict[str, Any] = response.json()
    return data


async def user(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    body = {"email": f"{name}@example.com", "name": name}
    return await call(client, "POST /users", body=body, status=201)


async def role_request_for(
    client: httpx.AsyncClient, *, locked: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """alice owns a group (*locked* or not); carol asks that role sre
    (carol, dave) be assigned to it. Returns alice, the group, the request."""
    alice, carol, dave = [await user(client, n) for n in ("alice", "carol", "dave")]
    group = await call(
        client, "POST /groups", alice, {"name": "payroll", "locked": locked}, 201
    )
    await call(client, f"PUT /groups/{group['id']}/owners/{alice['id']}", alice)
    ids = [carol["id"], dave["id"]]
    role = await call(
        client, "POST /roles", alice, {"name": "sre", "member_ids": ids}, 201
    )
    body = {"role_id": role["id"], "group_id": group["id"], "reason": "fixes"}
    request = await call(client, "POST /role-requests", carol, body, 201)
    return alice, group, request


async def test_events_carry_request_metadata_and_actor(
    client: httpx.AsyncClient, audit_events: AuditEventRecorder
) -> None:
    """An approval's events carry its request id, method, endpoint template and actor."""
    alice, group, request = await role_request_for(client, locked=False)
    answer = await call(
        client,
        f"POST /role-requests/{request['id']}/approve",
        alice,
        {"reason": "agreed"},
        request_id="approve-1",
    )
    assert len(answer["member_ids_added"]) == 2
    approval = audit_events.filter(metadata={"request_id": "approve-1"})
    assert [e.event_type for e in approval] == [
        "role_request_approve",
        "role_group_assigned",
        "group_member_added",
        "group_member_added",
    ]
    for envelope in approval:
        assert envelope.metadata == {
            **envelope.metadata,
            "method": "POST",
            "path": f"/role-requests/{request['id']}/approve",
            "endpoint": "/role-requests/{request_id}/approve",
        }
        assert (envelope.actor_id, envelope.actor_email) == (
            str(alice["id"]),
            "alice@example.com",
        )
    audit_events.assert_emitted(
        "role_request_approve", target_id=request["id"], reason="agreed"
    )
    created = audit_events.assert_emitted(
        "group_create",
        target_id=group["id"],
        actor_id=str(alice["id"]),
        metadata={"endpoint": "/groups", "path": "/groups"},
    )
    # Sent without X-Request-ID: the middleware generated one.
    assert len(created.metadata["request_id"]) == 32


async def test_failed_approval_emits_nothing(
    client: httpx.AsyncClient, audit_events: AuditEventRecorder
) -> None:
    """An approval whose nested role assignment fails emits nothing and changes nothing."""
    alice, group, request = await role_request_for(client, locked=True)
    audit_events.clear()
    answer = await call(
        client, f"POST /role-requests/{request['id']}/approve", alice, status=409
    )
    assert "payroll" in answer["message"] and "locked" in answer["message"]
    assert audit_events.events == []
    assert sorted((d.event.event_type, d.reason) for d in audit_events.discarded) == [
        ("group_member_added", "savepoint_rollback"),
        ("group_member_added", "savepoint_rollback"),
        ("role_group_assigned", "savepoint_rollback"),
        ("role_request_approve", "close"),
    ]
    assert (await call(client, f"GET /groups/{group['id']}"))["member_ids"] == []
    await call(client, f"POST /role-requests/{request['id']}/reject", alice)
    audit_events.assert_emitted("role_request_reject", target_id=request["id"])


async def test_each_test_starts_clean(client: httpx.AsyncClient) -> None:
    """The previous tests' rows were rolled back: the same users can be created again."""
    assert (await user(client, "alice"))["id"] == 1


async def test_a_change_needs_an_acting_user(
    client: httpx.AsyncClient, audit_events: AuditEventRecorder
) -> None:
    """Without X-User-Id, or with one naming nobody, a change is refused: 401, no event."""
    await call(client, "POST /groups", None, {"name": "admins"}, 401)
    await call(client, "POST /groups", {"id": 99}, {"name": "admins"}, 401)
    audit_events.assert_not_emitted()
