"""The domain operations, async: each changes rows and stages its audit event.

Each takes the request's ``AsyncSession`` and none commits: the endpoint
commits once, so an operation and everything it ran are committed, and their
events emitted, together or not at all. ``stage_event`` does no I/O, so it is
a plain call; only loading and flushing are awaited. The actor and request
metadata come from ``access_audit.fastapi`` (see :mod:`fastapi_app.app`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from access_audit import stage_event

from .errors import Conflict, Forbidden, NotFound, OperationError
from .models import Group, Membership, Role, RoleRequest, User

__all__ = [
    "EVENT_TYPES",
    "add_member",
    "add_owner",
    "approve_role_request",
    "create_group",
    "create_role",
    "create_user",
    "get",
    "reject_role_request",
    "request_role",
]

EVENT_TYPES = (
    "group_create",
    "group_owner_added",
    "group_member_added",
    "role_group_assigned",
    "role_request_create",
    "role_request_approve",
    "role_request_reject",
)
"""Every event type the operations stage."""

_Row = TypeVar("_Row", User, Group, Role, RoleRequest)
_TARGET_TYPES = {Group: "group", Role: "role", RoleRequest: "role_request"}


async def get(session: AsyncSession, model: type[_Row], row_id: int) -> _Row:
    """The row of *model* with this id.

    :raises NotFound: there is none.
    """
    row = await session.get(model, row_id) if 0 < row_id < 2**31 else None
    if row is None:
        raise NotFound(f"{model.__name__} {row_id} does not exist")
    return row


def _key(row: Group | Role | RoleRequest) -> int | Callable[[], int]:
    """The row's id, or a callable access_audit resolves after the final flush."""
    return row.id if row.id is not None else lambda: row.id


def _stage(
    session: AsyncSession,
    event_type: str,
    row: Group | Role | RoleRequest,
    *,
    action: str,
    reason: str | None,
    payload: Mapping[str, Any],
    name: str | None = None,
) -> None:
    """Stage *event_type* about *row* (target type by model, id, name)."""
    stage_event(
        session,
        event_type,
        target_type=_TARGET_TYPES[type(row)],
        target_id=_key(row),
        target_name=name if name is not None else getattr(row, "name", None),
        action=action,
        reason=reason,
        payload=payload,
    )


async def _ensure_unique(
    session: AsyncSession, model: type[Group | Role], name: str
) -> None:
    """:raises Conflict: a row of *model* is named *name* already."""
    if await session.scalar(select(model.id).where(model.name == name)) is not None:
        raise Conflict(f"a {model.__name__} named {name!r} exists already")


async def create_user(session: AsyncSession, email: str, name: str) -> User:
    """Add a user (not audited: users come from the identity provider).

    :raises Conflict: the e-mail address is taken.
    """
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict(f"a user with e-mail {email!r} exists already")
    user = User(email=email, name=name)
    session.add(user)
    return user


async def create_role(
    session: AsyncSession, name: str, members: Sequence[User]
) -> Role:
    """Define a role and its members (not audited: from the identity provider).

    :raises Conflict: the name is taken.
    """
    await _ensure_unique(session, Role, name)
    role = Role(name=name, members=list(members), groups=[])
    session.add(role)
    return role


async def create_group(
    session: AsyncSession, name: str, *, locked: bool = False, reason: str | None = None
) -> Group:
    """Create a group: ``group_create`` (its id resolved at commit).

    :raises Conflict: the name is taken.
    """
    await _ensure_unique(session, Group, name)
    # Empty collections, not unloaded ones: reading them later does no I/O.
    group = Group(name=name, locked=locked, memberships=[], owners=[])
    session.add(group)
    _stage(
        session,
        "group_create",
        group,
        action="create",
        reason=reason,
        payload={"locked": locked},
    )
    return group


async def add_owner(
    session: AsyncSession, group: Group, user: User, *, reason: str | None = None
) -> None:
    """Make *user* an owner of *group*: ``group_owner_added``.

    :raises Conflict: the user owns the group already.
    """
    if user in group.owners:
        raise Conflict(f"{user.email} is an owner of group {group.name!r} already")
    group.owners.append(user)
    _stage(
        session,
        "group_owner_added",
        group,
        action="add_owner",
        reason=reason,
        payload={"user_id": user.id, "user_email": user.email},
    )


def add_member(
    session: AsyncSession,
    group: Group,
    user: User,
    *,
    reason: str | None = None,
    role: Role | None = None,
) -> None:
    """Put *user* in *group*: ``group_member_added``. Plain (no I/O): the
    membership is inserted, and a locked group refuses it, at the next flush.

    :raises Conflict: the user is a member already.
    """
    if group.is_member(user):
        raise Conflict(f"{user.email} is a member of group {group.name!r} already")
    role_id = None if role is None else role.id
    group.memberships.append(Membership(user=user, role_id=role_id))
    _stage(
        session,
        "group_member_added",
        group,
        action="add_member",
        reason=reason,
        payload={"user_id": user.id, "user_email": user.email, "role_id": role_id},
    )


async def request_role(
    session: AsyncSession, requester: User, role: Role, group: Group, *, reason: str
) -> RoleRequest:
    """*requester* asks that *role* be assigned to *group*: ``role_request_create``.

    :raises Conflict: the role is assigned to the group already.
    """
    if group in role.groups:
        raise Conflict(
            f"role {role.name!r} is assigned to group {group.name!r} already"
        )
    request = RoleRequest(requester=requester, role=role, group=group, reason=reason)
    session.add(request)
    _stage_request(session, "role_request_create", request, "create", reason)
    return request


def _stage_request(
    session: AsyncSession,
    event_type: str,
    request: RoleRequest,
    action: str,
    reason: str | None,
) -> None:
    """Stage *event_type* about *request*, named ``"<role> -> <group>"``."""
    _stage(
        session,
        event_type,
        request,
        action=action,
        reason=reason,
        name=f"{request.role.name} -> {request.group.name}",
        payload={
            "requester_id": request.requester.id,
            "role_id": request.role.id,
            "group_id": request.group.id,
        },
    )


def _decide(
    session: AsyncSession,
    request: RoleRequest,
    approver: User,
    status: str,
    reason: str | None,
) -> None:
    """Record *approver*'s decision and stage ``role_request_<approve|reject>``.

    :raises Conflict: the request is decided already.
    :raises Forbidden: *approver* does not own the group, or approves their
        own request.
    """
    if request.status != "pending":
        raise Conflict(f"role request #{request.id} is {request.status} already")
    if approver not in request.group.owners:
        raise Forbidden(
            f"{approver.email} is not an owner of group {request.group.name!r}"
        )
    if status == "approved" and request.requester_id == approver.id:
        raise Forbidden("nobody may approve their own role request")
    request.status = status
    request.resolver_id = approver.id
    action = "approve" if status == "approved" else "reject"
    _stage_request(session, f"role_request_{action}", request, action, reason)


async def approve_role_request(
    session: AsyncSession,
    request: RoleRequest,
    approver: User,
    *,
    reason: str | None = None,
) -> list[User]:
    """An owner approves: ``role_request_approve``, then the role is assigned
    to the group, ``role_group_assigned``, and each role member not in the group
    yet is added, ``group_member_added``. Returns the users added.

    The assignment runs in a SAVEPOINT. When it fails (a locked group refuses
    its new members at flush time), its rows and the events it staged are
    discarded together, and a :class:`Conflict` is raised: the caller must not
    commit the approval either, so the whole request emits nothing.

    :raises Conflict, Forbidden: as :func:`_decide`; or the assignment failed.
    """
    _decide(session, request, approver, "approved", reason)
    role, group = request.role, request.group
    newcomers = [user for user in role.members if not group.is_member(user)]
    try:
        async with session.begin_nested():
            role.groups.append(group)
            _stage(
                session,
                "role_group_assigned",
                role,
                action="assign_group",
                reason=f"role request #{request.id} approved",
                payload={
                    "group_id": group.id,
                    "member_ids_added": [user.id for user in newcomers],
                },
            )
            for user in newcomers:
                add_member(
                    session,
                    group,
                    user,
                    role=role,
                    reason=f"granted by role {role.name!r}",
                )
    except OperationError as error:
        raise Conflict(
            f"role request #{request.id} cannot be approved: {error.message}"
        ) from error
    return newcomers


def reject_role_request(
    session: AsyncSession,
    request: RoleRequest,
    approver: User,
    *,
    reason: str | None = None,
) -> None:
    """An owner rejects: ``role_request_reject``.

    :raises Conflict, Forbidden: as for an approval.
    """
    _decide(session, request, approver, "rejected", reason)
