"""Roles granted to groups: assigning a role adds its members to the group."""

from __future__ import annotations

from ..errors import Conflict, NotFound
from ..models import Group, Role, RoleRequest, User
from ._shared import key, stage
from .groups import add_member, remove_member

__all__ = ["assign_role", "ensure_not_assigned", "unassign_role"]


def ensure_not_assigned(role: Role, group: Group) -> None:
    """:raises Conflict: *role* is assigned to *group* already."""
    if group in role.groups:
        raise Conflict(
            f"role {role.name!r} is assigned to group {group.name!r} already"
        )


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
    ensure_not_assigned(role, group)
    newcomers = [user for user in role.members if group.membership_of(user) is None]
    role.groups.append(group)
    stage(
        "role_group_assigned",
        role,
        action="assign_group",
        reason=reason,
        payload={
            "group_id": key(group),
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
    stage(
        "role_group_unassigned",
        role,
        action="unassign_group",
        reason=reason,
        payload={
            "group_id": group.id,
            "group_name": group.name,
            "member_ids_removed": [user.id for user in granted],
        },
    )
    member_reason = f"role {role.name!r} was unassigned"
    for user in granted:
        remove_member(group, user, reason=member_reason, role=role)
