"""The domain operations: each changes rows and stages the audit event describing it.

Operations compose: approving an access request runs :func:`add_member`;
assigning a role to a group runs :func:`add_member` for each of the role's
members; approving a role request runs :func:`assign_role`. No operation
commits. The caller (an API route) commits once, so a top-level operation and
everything it ran are committed, and their events emitted, together or not at
all. The actor of every event comes from the app's ``@audit.actor_loader``;
request metadata is added by access_audit's Flask extension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import select

from access_audit import stage_event

from .errors import Conflict, Forbidden, InvalidInput, NotFound, OperationError
from .models import (
    AccessRequest,
    App,
    Group,
    Membership,
    RequestStatus,
    Role,
    RoleRequest,
    Tag,
    User,
    db,
)

__all__ = [
    "add_member",
    "add_owner",
    "approve_access",
    "approve_role_request",
    "assign_role",
    "create_application",
    "create_group",
    "create_role",
    "create_tag",
    "create_user",
    "delete_application",
    "delete_group",
    "delete_tag",
    "get",
    "reject_access",
    "reject_role_request",
    "remove_member",
    "remove_owner",
    "request_access",
    "request_role",
    "unassign_role",
    "update_tag",
]

_MAX_ID = 2**31 - 1
"""The largest INTEGER id (PostgreSQL would fail on a larger one: none exists)."""

_Row = TypeVar("_Row", User, Group, Role, Tag, App, AccessRequest, RoleRequest)


def _key(row: Any) -> int | Callable[[], int]:
    """The row's id, or, for a row not flushed yet, a callable for the id.

    The database generates ids at flush time; access_audit resolves a callable
    ``target_id`` after the commit's final flush.
    """
    if row.id is not None:
        return int(row.id)
    return lambda: int(row.id)


def get(model: type[_Row], row_id: int) -> _Row:
    """The row of *model* with this id.

    :raises NotFound: there is none.
    """
    if not 0 < row_id <= _MAX_ID:
        raise NotFound(f"{model.__name__} {row_id} does not exist")
    row = db.session.get(model, row_id)
    if row is None:
        raise NotFound(f"{model.__name__} {row_id} does not exist")
    return row


def _ensure_unique_name(model: type[Group | Role | Tag | App], name: str) -> None:
    if not name.strip():
        raise InvalidInput(f"a {model.__name__} name must not be empty")
    if db.session.scalar(select(model.id).where(model.name == name)) is not None:
        raise Conflict(f"a {model.__name__} named {name!r} exists already")


def _ensure_owner(group: Group, user: User) -> None:
    if user not in group.owners:
        raise Forbidden(f"{user.email} is not an owner of group {group.name!r}")


def _ensure_pending(request: AccessRequest | RoleRequest, what: str) -> Group:
    if request.status is not RequestStatus.PENDING:
        raise Conflict(f"{what} #{request.id} is {request.status.value} already")
    if request.group is None:
        raise Conflict(f"the group of {what} #{request.id} has been deleted")
    return request.group


def _user_fields(user: User) -> dict[str, Any]:
    return {"user_id": user.id, "user_email": user.email}


# -- users and roles (not audited: users and role definitions come from the
# -- identity provider in a real deployment)


def create_user(email: str, name: str) -> User:
    """Add a user.

    :raises Conflict: the e-mail address is taken.
    """
    if db.session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict(f"a user with e-mail {email!r} exists already")
    user = User(email=email, name=name)
    db.session.add(user)
    return user


def create_role(name: str, members: Sequence[User]) -> Role:
    """Define a role and its members."""
    _ensure_unique_name(Role, name)
    role = Role(name=name, members=list(members))
    db.session.add(role)
    return role


# -- groups, members and owners


def create_group(
    name: str, *, description: str = "", locked: bool = False, reason: str | None = None
) -> Group:
    """Create a group: ``group_create``."""
    _ensure_unique_name(Group, name)
    group = Group(name=name, description=description, locked=locked)
    db.session.add(group)
    stage_event(
        db.session,
        "group_create",
        target_type="group",
        target_id=_key(group),
        target_name=name,
        action="create",
        reason=reason,
        payload={"description": description, "locked": locked},
    )
    return group


def delete_group(group: Group, *, reason: str | None = None) -> None:
    """Delete a group with its memberships, ownerships and role links: ``group_delete``.

    Its access and role requests stay, without a group, for the record. The
    payload lists who lost membership and ownership.
    """
    stage_event(
        db.session,
        "group_delete",
        target_type="group",
        target_id=group.id,
        target_name=group.name,
        action="delete",
        reason=reason,
        payload={
            "member_ids": sorted(user.id for user in group.members),
            "owner_ids": sorted(user.id for user in group.owners),
            "role_ids": sorted(role.id for role in group.roles),
        },
    )
    db.session.delete(group)


def add_member(
    group: Group,
    user: User,
    *,
    reason: str | None = None,
    role: Role | None = None,
    access_request: AccessRequest | None = None,
) -> Membership:
    """Put *user* in *group*: ``group_member_added``.

    *role* or *access_request* says how the membership came about (they are
    passed by :func:`assign_role` and :func:`approve_access`).

    :raises Conflict: the user is a member already.
    :raises GroupLocked: at flush time, if the group is locked.
    """
    if group.membership_of(user) is not None:
        raise Conflict(f"{user.email} is a member of group {group.name!r} already")
    membership = Membership(user=user, role_id=None if role is None else role.id)
    group.memberships.append(membership)
    stage_event(
        db.session,
        "group_member_added",
        target_type="group",
        target_id=_key(group),
        target_name=group.name,
        action="add_member",
        reason=reason,
        payload={
            **_user_fields(user),
            "role_id": None if role is None else role.id,
            "access_request_id": None if access_request is None else access_request.id,
        },
    )
    return membership


def remove_member(
    group: Group, user: User, *, reason: str | None = None, role: Role | None = None
) -> None:
    """Take *user* out of *group*: ``group_member_removed``.

    :raises NotFound: the user is not a member.
    """
    membership = group.membership_of(user)
    if membership is None:
        raise NotFound(f"{user.email} is not a member of group {group.name!r}")
    group.memberships.remove(membership)
    stage_event(
        db.session,
        "group_member_removed",
        target_type="group",
        target_id=group.id,
        target_name=group.name,
        action="remove_member",
        reason=reason,
        payload={**_user_fields(user), "role_id": None if role is None else role.id},
    )


def add_owner(group: Group, user: User, *, reason: str | None = None) -> None:
    """Make *user* an owner of *group*: ``group_owner_added``.

    :raises Conflict: the user owns the group already.
    """
    if user in group.owners:
        raise Conflict(f"{user.email} is an owner of group {group.name!r} already")
    group.owners.append(user)
    stage_event(
        db.session,
        "group_owner_added",
        target_type="group",
        target_id=_key(group),
        target_name=group.name,
        action="add_owner",
        reason=reason,
        payload=_user_fields(user),
    )


def remove_owner(group: Group, user: User, *, reason: str | None = None) -> None:
    """Take *user*'s ownership of *group* away: ``group_owner_removed``.

    :raises NotFound: the user is not an owner.
    """
    if user not in group.owners:
        raise NotFound(f"{user.email} is not an owner of group {group.name!r}")
    group.owners.remove(user)
    stage_event(
        db.session,
        "group_owner_removed",
        target_type="group",
        target_id=group.id,
        target_name=group.name,
        action="remove_owner",
        reason=reason,
        payload=_user_fields(user),
    )


# -- roles granted to groups


def assign_role(
    role: Role,
    group: Group,
    *,
    reason: str | None = None,
    role_request: RoleRequest | None = None,
) -> list[User]:
    """Assign *role* to *group* and add its members: ``role_group_assigned``,
    then ``group_member_added`` for each role member not in the group yet.

    Returns the users added. Memberships added this way remember the role,
    so :func:`unassign_role` takes exactly them away again.

    :raises Conflict: the role is assigned to the group already.
    :raises GroupLocked: at flush time, if the group is locked.
    """
    if group in role.groups:
        raise Conflict(
            f"role {role.name!r} is assigned to group {group.name!r} already"
        )
    newcomers = [user for user in role.members if group.membership_of(user) is None]
    role.groups.append(group)
    stage_event(
        db.session,
        "role_group_assigned",
        target_type="role",
        target_id=role.id,
        target_name=role.name,
        action="assign_group",
        reason=reason,
        payload={
            "group_id": _key(group),
            "group_name": group.name,
            "member_ids_added": [user.id for user in newcomers],
            "role_request_id": None if role_request is None else role_request.id,
        },
    )
    member_reason = f"granted by role {role.name!r}"
    if role_request is not None:
        member_reason += f" (role request #{role_request.id})"
    for user in newcomers:
        add_member(group, user, reason=member_reason, role=role)
    return newcomers


def unassign_role(role: Role, group: Group, *, reason: str | None = None) -> None:
    """Take *role* from *group*: ``role_group_unassigned``, then
    ``group_member_removed`` for each membership the role had granted.

    :raises NotFound: the role is not assigned to the group.
    """
    if group not in role.groups:
        raise NotFound(f"role {role.name!r} is not assigned to group {group.name!r}")
    granted = [m.user for m in group.memberships if m.role_id == role.id]
    role.groups.remove(group)
    stage_event(
        db.session,
        "role_group_unassigned",
        target_type="role",
        target_id=role.id,
        target_name=role.name,
        action="unassign_group",
        reason=reason,
        payload={
            "group_id": group.id,
            "group_name": group.name,
            "member_ids_removed": [user.id for user in granted],
        },
    )
    for user in granted:
        remove_member(
            group, user, reason=f"role {role.name!r} was unassigned", role=role
        )


# -- apps and tags


def create_application(
    name: str,
    *,
    description: str = "",
    tags: Sequence[Tag] = (),
    reason: str | None = None,
) -> App:
    """Register an app: ``app_create``."""
    _ensure_unique_name(App, name)
    app = App(name=name, description=description, tags=list(tags))
    db.session.add(app)
    stage_event(
        db.session,
        "app_create",
        target_type="app",
        target_id=_key(app),
        target_name=name,
        action="create",
        reason=reason,
        payload={"description": description, "tags": [tag.name for tag in tags]},
    )
    return app


def delete_application(app: App, *, reason: str | None = None) -> None:
    """Delete an app: ``app_delete``."""
    stage_event(
        db.session,
        "app_delete",
        target_type="app",
        target_id=app.id,
        target_name=app.name,
        action="delete",
        reason=reason,
        payload={"tags": sorted(tag.name for tag in app.tags)},
    )
    db.session.delete(app)


def create_tag(name: str, *, description: str = "", reason: str | None = None) -> Tag:
    """Create a tag: ``tag_create``."""
    _ensure_unique_name(Tag, name)
    tag = Tag(name=name, description=description)
    db.session.add(tag)
    stage_event(
        db.session,
        "tag_create",
        target_type="tag",
        target_id=_key(tag),
        target_name=name,
        action="create",
        reason=reason,
        payload={"description": description},
    )
    return tag


def update_tag(
    tag: Tag,
    *,
    name: str | None = None,
    description: str | None = None,
    reason: str | None = None,
) -> dict[str, dict[str, str]]:
    """Rename or re-describe a tag: ``tag_update``, whose payload holds the changes.

    Returns the changes, ``{field: {"old": ..., "new": ...}}``; a call that
    changes nothing stages nothing.
    """
    changes: dict[str, dict[str, str]] = {}
    if name is not None and name != tag.name:
        _ensure_unique_name(Tag, name)
        changes["name"] = {"old": tag.name, "new": name}
        tag.name = name
    if description is not None and description != tag.description:
        changes["description"] = {"old": tag.description, "new": description}
        tag.description = description
    if changes:
        stage_event(
            db.session,
            "tag_update",
            target_type="tag",
            target_id=tag.id,
            target_name=tag.name,
            action="update",
            reason=reason,
            payload={"changes": changes},
        )
    return changes


def delete_tag(tag: Tag, *, reason: str | None = None) -> None:
    """Delete a tag, removing it from its apps: ``tag_delete``."""
    stage_event(
        db.session,
        "tag_delete",
        target_type="tag",
        target_id=tag.id,
        target_name=tag.name,
        action="delete",
        reason=reason,
        payload={"app_ids": sorted(app.id for app in tag.apps)},
    )
    db.session.delete(tag)


# -- access requests


def request_access(requester: User, group: Group, *, reason: str) -> AccessRequest:
    """*requester* asks to join *group*: ``access_create``.

    :raises Conflict: the requester is a member already.
    """
    if group.membership_of(requester) is not None:
        raise Conflict(f"{requester.email} is a member of group {group.name!r} already")
    request = AccessRequest(requester=requester, group=group, reason=reason)
    db.session.add(request)
    stage_event(
        db.session,
        "access_create",
        target_type="access_request",
        target_id=_key(request),
        target_name=f"{requester.email} -> {group.name}",
        action="create",
        reason=reason,
        payload={**_user_fields(requester), "group_id": group.id},
    )
    return request


def approve_access(
    request: AccessRequest, approver: User, *, reason: str | None = None
) -> Membership:
    """An owner of the group approves: ``access_approve``, then
    ``group_member_added`` through :func:`add_member`.

    :raises Conflict: the request is decided already, or its group is gone.
    :raises Forbidden: *approver* does not own the group, or is the requester.
    """
    group = _ensure_pending(request, "access request")
    _ensure_owner(group, approver)
    if request.requester_id == approver.id:
        raise Forbidden("nobody may approve their own access request")
    request.status = RequestStatus.APPROVED
    request.resolver = approver
    request.resolution = reason
    stage_event(
        db.session,
        "access_approve",
        target_type="access_request",
        target_id=request.id,
        target_name=f"{request.requester.email} -> {group.name}",
        action="approve",
        reason=reason,
        payload={**_user_fields(request.requester), "group_id": group.id},
    )
    return add_member(
        group,
        request.requester,
        reason=f"access request #{request.id} approved: {reason or 'no reason given'}",
        access_request=request,
    )


def reject_access(
    request: AccessRequest, approver: User, *, reason: str | None = None
) -> None:
    """An owner of the group rejects: ``access_reject``.

    :raises Conflict: the request is decided already, or its group is gone.
    :raises Forbidden: *approver* does not own the group.
    """
    group = _ensure_pending(request, "access request")
    _ensure_owner(group, approver)
    request.status = RequestStatus.REJECTED
    request.resolver = approver
    request.resolution = reason
    stage_event(
        db.session,
        "access_reject",
        target_type="access_request",
        target_id=request.id,
        target_name=f"{request.requester.email} -> {group.name}",
        action="reject",
        reason=reason,
        payload={**_user_fields(request.requester), "group_id": group.id},
    )


# -- role requests


def request_role(
    requester: User, role: Role, group: Group, *, reason: str
) -> RoleRequest:
    """*requester* asks that *role* be assigned to *group*: ``role_request_create``.

    :raises Conflict: the role is assigned to the group already.
    """
    if group in role.groups:
        raise Conflict(
            f"role {role.name!r} is assigned to group {group.name!r} already"
        )
    request = RoleRequest(requester=requester, role=role, group=group, reason=reason)
    db.session.add(request)
    stage_event(
        db.session,
        "role_request_create",
        target_type="role_request",
        target_id=_key(request),
        target_name=f"{role.name} -> {group.name}",
        action="create",
        reason=reason,
        payload={**_user_fields(requester), "role_id": role.id, "group_id": group.id},
    )
    return request


def approve_role_request(
    request: RoleRequest, approver: User, *, reason: str | None = None
) -> list[User]:
    """An owner of the group approves: ``role_request_approve``, then what
    :func:`assign_role` stages. Returns the users added to the group.

    :raises Conflict: the request is decided already, its group is gone, or
        the assignment failed (a locked group, for one); then nothing of the
        approval may be committed.
    :raises Forbidden: *approver* does not own the group, or is the requester.
    """
    group = _ensure_pending(request, "role request")
    _ensure_owner(group, approver)
    if request.requester_id == approver.id:
        raise Forbidden("nobody may approve their own role request")
    request.status = RequestStatus.APPROVED
    request.resolver = approver
    request.resolution = reason
    stage_event(
        db.session,
        "role_request_approve",
        target_type="role_request",
        target_id=request.id,
        target_name=f"{request.role.name} -> {group.name}",
        action="approve",
        reason=reason,
        payload={
            **_user_fields(request.requester),
            "role_id": request.role.id,
            "group_id": group.id,
        },
    )
    # The assignment runs in a SAVEPOINT: when it fails (a locked group
    # refuses its new members at flush time), its rows and the events it
    # staged are undone together, at once, and the session stays usable; the
    # caller gets a Conflict and must not commit the approval either.
    try:
        with db.session.begin_nested():
            return assign_role(
                request.role,
                group,
                reason=f"role request #{request.id} approved: "
                f"{reason or 'no reason given'}",
                role_request=request,
            )
    except OperationError as error:
        raise Conflict(
            f"role request #{request.id} cannot be approved: {error.message}"
        ) from error


def reject_role_request(
    request: RoleRequest, approver: User, *, reason: str | None = None
) -> None:
    """An owner of the group rejects: ``role_request_reject``.

    :raises Conflict: the request is decided already, or its group is gone.
    :raises Forbidden: *approver* does not own the group.
    """
    group = _ensure_pending(request, "role request")
    _ensure_owner(group, approver)
    request.status = RequestStatus.REJECTED
    request.resolver = approver
    request.resolution = reason
    stage_event(
        db.session,
        "role_request_reject",
        target_type="role_request",
        target_id=request.id,
        target_name=f"{request.role.name} -> {group.name}",
        action="reject",
        reason=reason,
        payload={
            **_user_fields(request.requester),
            "role_id": request.role.id,
            "group_id": group.id,
        },
    )
