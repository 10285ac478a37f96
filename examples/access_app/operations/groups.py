"""Groups, their members and their owners."""

from __future__ import annotations

from ..errors import Conflict, NotFound
from ..models import AccessRequest, Group, Membership, Role, User
from ._shared import create_row, delete_row, ensure_not_member, stage, user_fields

__all__ = [
    "add_member",
    "add_owner",
    "create_group",
    "delete_group",
    "remove_member",
    "remove_owner",
]


def _stage(
    event_type: str,
    action: str,
    group: Group,
    user: User,
    reason: str | None,
    **fields: int | None,
) -> None:
    """Stage *event_type* about *group*, whose payload names *user*, then *fields*."""
    stage(
        event_type,
        group,
        action=action,
        reason=reason,
        payload={**user_fields(user), **fields},
    )


def create_group(
    name: str, *, description: str = "", locked: bool = False, reason: str | None = None
) -> Group:
    """Create a group: ``group_create``."""
    return create_row(
        Group,
        "group_create",
        reason=reason,
        payload={"description": description, "locked": locked},
        name=name,
        description=description,
        locked=locked,
    )


def delete_group(group: Group, *, reason: str | None = None) -> None:
    """Delete a group with its memberships, ownerships and role links: ``group_delete``.

    Its access and role requests stay, without a group, for the record. The
    payload lists who lost membership and ownership.
    """
    delete_row(
        "group_delete",
        group,
        reason=reason,
        payload={
            "member_ids": sorted(user.id for user in group.members),
            "owner_ids": sorted(user.id for user in group.owners),
            "role_ids": sorted(role.id for role in group.roles),
        },
    )


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
    passed by :func:`~access_app.operations.assign_role` and
    :func:`~access_app.operations.approve_access`).

    :raises Conflict: the user is a member already.
    :raises GroupLocked: at flush time, if the group is locked.
    """
    ensure_not_member(group, user)
    role_id = None if role is None else role.id
    membership = Membership(user=user, role_id=role_id)
    group.memberships.append(membership)
    _stage(
        "group_member_added",
        "add_member",
        group,
        user,
        reason,
        role_id=role_id,
        access_request_id=None if access_request is None else access_request.id,
    )
    return membership


def remove_member(
    group: Group, user: User, *, reason: str | None = None, role: Role | None = None
) -> None:
    """Take *user* out of *group*: ``group_member_removed``.

    *role* is passed by :func:`~access_app.operations.unassign_role`.

    :raises NotFound: the user is not a member.
    """
    membership = group.membership_of(user)
    if membership is None:
        raise NotFound(f"{user.email} is not a member of group {group.name!r}")
    group.memberships.remove(membership)
    role_id = None if role is None else role.id
    _stage(
        "group_member_removed", "remove_member", group, user, reason, role_id=role_id
    )


def add_owner(group: Group, user: User, *, reason: str | None = None) -> None:
    """Make *user* an owner of *group*: ``group_owner_added``.

    :raises Conflict: the user owns the group already.
    """
    if user in group.owners:
        raise Conflict(f"{user.email} is an owner of group {group.name!r} already")
    group.owners.append(user)
    _stage("group_owner_added", "add_owner", group, user, reason)


def remove_owner(group: Group, user: User, *, reason: str | None = None) -> None:
    """Take *user*'s ownership of *group* away: ``group_owner_removed``.

    :raises NotFound: the user is not an owner.
    """
    if user not in group.owners:
        raise NotFound(f"{user.email} is not an owner of group {group.name!r}")
    group.owners.remove(user)
    _stage("group_owner_removed", "remove_owner", group, user, reason)
