"""The domain operations: each changes rows and stages the audit event describing it.

Operations compose: approving an access request runs :func:`add_member`;
assigning a role to a group runs :func:`add_member` for each of the role's
members; approving a role request runs :func:`assign_role`. No operation
commits. The caller (an API route) commits once, so a top-level operation and
everything it ran are committed, and their events emitted, together or not at
all. The actor of every event comes from the app's ``@audit.actor_loader``;
request metadata is added by access_audit's Flask extension.

The operations live in one module per domain: :mod:`.identity` (users and
role definitions, not audited), :mod:`.groups` (groups, members, owners),
:mod:`.roles` (roles granted to groups), :mod:`.catalog` (apps and tags) and
:mod:`.requests` (access and role requests); :mod:`._shared` holds what they
share (loading a row, the checks, staging an event).
"""

from __future__ import annotations

from ._shared import EVENT_TYPES as EVENT_TYPES
from ._shared import get as get
from .catalog import create_application as create_application
from .catalog import create_tag as create_tag
from .catalog import delete_application as delete_application
from .catalog import delete_tag as delete_tag
from .catalog import update_tag as update_tag
from .groups import add_member as add_member
from .groups import add_owner as add_owner
from .groups import create_group as create_group
from .groups import delete_group as delete_group
from .groups import remove_member as remove_member
from .groups import remove_owner as remove_owner
from .identity import create_role as create_role
from .identity import create_user as create_user
from .requests import approve_access as approve_access
from .requests import approve_role_request as approve_role_request
from .requests import reject_access as reject_access
from .requests import reject_role_request as reject_role_request
from .requests import request_access as request_access
from .requests import request_role as request_role
from .roles import assign_role as assign_role
from .roles import unassign_role as unassign_role

__all__ = [
    "EVENT_TYPES",
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
