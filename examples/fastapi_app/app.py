"""The FastAPI app: its engine and sessions, its emitter, its endpoints.

:func:`create_app` builds one app with its own ``AsyncEngine``,
``async_sessionmaker`` and :class:`~access_audit.AuditEmitter` (attached to
the sessionmaker), wired the way ``access_audit.fastapi`` is meant to be:

- :class:`~access_audit.fastapi.AccessAuditMiddleware` puts the request's
  metadata (``request_id``, ``method``, ``path``, ``endpoint`` template, ...)
  on every event staged while it is served;
- :func:`~access_audit.fastapi.audit_actor` over :func:`current_actor`, an
  app-level dependency, makes the ``X-User-Id`` user the actor of every
  event of the request;
- the lifespan creates the tables, then enters
  :func:`~access_audit.fastapi.audit_lifespan`, which closes the emitter
  (delivering what is queued) on shutdown, and disposes of the engine.

Each endpoint runs one operation (:mod:`fastapi_app.operations`) on the
request's session (:func:`get_session`) and commits once. An
:class:`~fastapi_app.errors.OperationError` answers
``{"error": ..., "message": ...}`` with its status; the session is then
closed without a commit, so the events the request staged are discarded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from access_audit import Actor, AuditEmitter
from access_audit.fastapi import AccessAuditMiddleware, audit_actor, audit_lifespan

from . import operations as ops
from .errors import NotFound, OperationError, Unauthorized
from .models import Base, Group, Role, RoleRequest, User

__all__ = [
    "DATABASE_URL_VARIABLE",
    "DEFAULT_DATABASE_URL",
    "create_app",
    "create_engine",
    "current_actor",
    "get_session",
]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///fastapi_app.db"
"""aiosqlite on ``fastapi_app.db`` in the working directory."""

DATABASE_URL_VARIABLE = "FASTAPI_APP_DATABASE_URL"
"""The environment variable naming the database when ``create_app`` is given none
(``postgresql+asyncpg://user@host/dbname`` for PostgreSQL)."""


def create_engine(url: str) -> AsyncEngine:
    """An ``AsyncEngine`` for *url*; on SQLite, with SAVEPOINTs that work.

    aiosqlite, like pysqlite, breaks SAVEPOINT (approving a role request
    uses one) with its own transaction handling: SQLAlchemy's documented
    recipe turns it off and emits BEGIN itself, on ``engine.sync_engine``.
    """
    engine = create_async_engine(url)
    if engine.url.get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA foreign_keys = ON")

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN")

    return engine


def create_app(
    database_url: str | None = None,
    *,
    plugins: Sequence[object] = (),
    create_tables: bool = True,
) -> FastAPI:
    """Create the app on *database_url* with *plugins* (no entry points).

    *database_url* defaults to ``$FASTAPI_APP_DATABASE_URL``, else
    :data:`DEFAULT_DATABASE_URL`. ``app.state`` holds ``engine``,
    ``sessions`` (the attached ``async_sessionmaker``) and ``emitter``.
    With *create_tables*, the lifespan creates missing tables at start-up.
    """
    url = database_url or os.environ.get(DATABASE_URL_VARIABLE) or DEFAULT_DATABASE_URL
    engine = create_engine(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    emitter = AuditEmitter(plugins, load_entrypoints=False)
    emitter.attach(sessions)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if create_tables:
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
        try:
            async with audit_lifespan(emitter, timeout=10):
                yield
        finally:
            await engine.dispose()

    app = FastAPI(
        title="fastapi_app",
        lifespan=lifespan,
        dependencies=[Depends(audit_actor(current_actor))],
    )
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.emitter = emitter
    app.add_middleware(AccessAuditMiddleware)
    app.add_exception_handler(OperationError, _operation_failed)  # type: ignore[arg-type]
    app.include_router(router)
    return app


# -- dependencies: the session, the acting user


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session, from the app's sessionmaker; closed after the
    request (rolled back if the endpoint did not commit).

    Tests override it (``app.dependency_overrides``) with a session joined to
    their own connection: see the FastAPI recipe in ``docs/testing.md``.
    """
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with sessions() as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(get_session)]
"""An endpoint's parameter: the request's session."""


async def current_user(
    session: DbSession, x_user_id: Annotated[int | None, Header()] = None
) -> User | None:
    """The user named by the ``X-User-Id`` header (a real app would
    authenticate the request), or None without the header.

    :raises Unauthorized: the header names no user.
    """
    if x_user_id is None:
        return None
    try:
        return await ops.get(session, User, x_user_id)
    except NotFound:
        raise Unauthorized(f"X-User-Id {x_user_id} names no user") from None


def current_actor(user: Annotated[User | None, Depends(current_user)]) -> Actor | None:
    """The actor of the request's events: the current user, or None ("system")."""
    return None if user is None else Actor(str(user.id), user.email)


def acting_user(user: Annotated[User | None, Depends(current_user)]) -> User:
    """The current user, who must be there.

    :raises Unauthorized: no ``X-User-Id`` header.
    """
    if user is None:
        raise Unauthorized("send the acting user's id in the X-User-Id header")
    return user


Me = Annotated[User, Depends(acting_user)]


async def _operation_failed(request: Request, error: OperationError) -> JSONResponse:
    return JSONResponse(
        {"error": type(error).__name__, "message": error.message}, error.status
    )


# -- bodies and answers


class NewUser(BaseModel):
    email: str
    name: str


class NewGroup(BaseModel):
    name: str
    locked: bool = False
    reason: str | None = None


class NewRole(BaseModel):
    name: str
    member_ids: list[int] = []


class NewRoleRequest(BaseModel):
    role_id: int
    group_id: int
    reason: str


class Reason(BaseModel):
    reason: str | None = None


def _reason(body: Reason | None) -> str | None:
    return None if body is None else body.reason


def _user(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name}


def _group(group: Group) -> dict[str, Any]:
    return {
        "id": group.id,
        "name": group.name,
        "locked": group.locked,
        "member_ids": sorted(m.user_id for m in group.memberships),
        "owner_ids": sorted(user.id for user in group.owners),
    }


def _role_request(request: RoleRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "role_id": request.role_id,
        "group_id": request.group_id,
        "status": request.status,
    }


# -- endpoints: each runs one operation and commits once

router = APIRouter()


@router.post("/users", status_code=201)
async def create_user(body: NewUser, session: DbSession) -> dict[str, Any]:
    """Add a user; open to anyone (users come from the identity provider)."""
    user = await ops.create_user(session, body.email, body.name)
    await session.commit()
    return _user(user)


@router.post("/groups", status_code=201)
async def create_group(body: NewGroup, session: DbSession, me: Me) -> dict[str, Any]:
    """Create a group: ``group_create``."""
    group = await ops.create_group(
        session, body.name, locked=body.locked, reason=body.reason
    )
    await session.commit()
    return _group(group)


@router.get("/groups/{group_id}")
async def read_group(group_id: int, session: DbSession) -> dict[str, Any]:
    """A group with its member and owner ids."""
    return _group(await ops.get(session, Group, group_id))


@router.put("/groups/{group_id}/owners/{user_id}")
async def add_owner(
    group_id: int, user_id: int, session: DbSession, me: Me, body: Reason | None = None
) -> dict[str, Any]:
    """Make a user an owner of the group: ``group_owner_added``."""
    group = await ops.get(session, Group, group_id)
    user = await ops.get(session, User, user_id)
    await ops.add_owner(session, group, user, reason=_reason(body))
    await session.commit()
    return _group(group)


@router.put("/groups/{group_id}/members/{user_id}")
async def add_member(
    group_id: int, user_id: int, session: DbSession, me: Me, body: Reason | None = None
) -> dict[str, Any]:
    """Put a user in the group: ``group_member_added`` (409 if it is locked)."""
    group = await ops.get(session, Group, group_id)
    user = await ops.get(session, User, user_id)
    ops.add_member(session, group, user, reason=_reason(body))
    await session.commit()
    return _group(group)


@router.post("/roles", status_code=201)
async def create_role(body: NewRole, session: DbSession, me: Me) -> dict[str, Any]:
    """Define a role and its members (not audited: from the identity provider)."""
    members = [await ops.get(session, User, user_id) for user_id in body.member_ids]
    role = await ops.create_role(session, body.name, members)
    await session.commit()
    return {"id": role.id, "name": role.name, "member_ids": body.member_ids}


@router.post("/role-requests", status_code=201)
async def request_role(
    body: NewRoleRequest, session: DbSession, me: Me
) -> dict[str, Any]:
    """Ask that a role be assigned to a group: ``role_request_create``."""
    role = await ops.get(session, Role, body.role_id)
    group = await ops.get(session, Group, body.group_id)
    request = await ops.request_role(session, me, role, group, reason=body.reason)
    await session.commit()
    return _role_request(request)


@router.post("/role-requests/{request_id}/approve")
async def approve_role_request(
    request_id: int, session: DbSession, me: Me, body: Reason | None = None
) -> dict[str, Any]:
    """Approve: ``role_request_approve``, ``role_group_assigned`` and a
    ``group_member_added`` per new member, or 409 and nothing at all."""
    request = await ops.get(session, RoleRequest, request_id)
    added = await ops.approve_role_request(session, request, me, reason=_reason(body))
    await session.commit()
    return {**_role_request(request), "member_ids_added": [u.id for u in added]}


@router.post("/role-requests/{request_id}/reject")
async def reject_role_request(
    request_id: int, session: DbSession, me: Me, body: Reason | None = None
) -> dict[str, Any]:
    """Reject: ``role_request_reject``."""
    request = await ops.get(session, RoleRequest, request_id)
    ops.reject_role_request(session, request, me, reason=_reason(body))
    await session.commit()
    return _role_request(request)
