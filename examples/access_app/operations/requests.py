"""Access requests (a user asks to join a group) and role requests (someone
asks that a role be assigned to a group); an owner of the group decides.

Both kinds share one life cycle: created pending, then decided once by an
owner of the group, who may reject but not approve their own request.
:func:`_decide` is that decision; the public functions add what approving
does (a membership, a role assignment).
"""

from __future__ import annotations

from typing import Any

from ..errors import Conflict, Forbidden, OperationError
from ..models import (
    AccessRequest,
    Group,
    Membership,
    RequestStatus,
    Role,
    RoleRequest,
    User,
    db,
)
from ._shared import ensure_not_member, ensure_owner, stage, user_fields
from .groups import add_member
from .roles import assign_role, ensure_not_assigned

__all__ = [
    "approve_access",
    "approve_role_request",
    "reject_access",
    "reject_role_request",
    "request_access",
    "request_role",
]

_ACTIONS = {RequestStatus.APPROVED: "approve", RequestStatus.REJECTED: "reject"}


def _what(request: AccessRequest | RoleRequest) -> str:
    """How messages and reasons name the request's kind."""
    return "role request" if isinstance(request, RoleRequest) else "access request"


def _stage(
    event_type: str,
    request: AccessRequest | RoleRequest,
    group: Group,
    *,
    action: str,
    reason: str | None,
) -> None:
    """Stage *event_type* about *request* for *group*.

    The target is named ``"<requester e-mail> -> <group>"`` for an access
    request, ``"<role> -> <group>"`` for a role request; the payload names
    the requester, the role (for a role request) and the group.
    """
    payload: dict[str, Any] = user_fields(request.requester)
    if isinstance(request, RoleRequest):
        name = f"{request.role.name} -> {group.name}"
        payload["role_id"] = request.role.id
    else:
        name = f"{request.requester.email} -> {group.name}"
    payload["group_id"] = group.id
    stage(event_type, request, action=action, reason=reason, payload=payload, name=name)


def _decide(
    request: AccessRequest | RoleRequest,
    approver: User,
    status: RequestStatus,
    event_type: str,
    reason: str | None,
) -> Group:
    """Record *approver*'s decision on the request and stage *event_type*.

    Returns the request's group.

    :raises Conflict: the request is decided already, or its group is gone.
    :raises Forbidden: *approver* does not own the group, or approves their
        own request.
    """
    what = _what(request)
    if request.status is not RequestStatus.PENDING:
        raise Conflict(f"{what} #{request.id} is {request.status.value} already")
    group = request.group
    if group is None:
        raise Conflict(f"the group of {what} #{request.id} has been deleted")
    ensure_owner(group, approver)
    if status is RequestStatus.APPROVED and request.requester_id == approver.id:
        raise Forbidden(f"nobody may approve their own {what}")
    request.status = status
    request.resolver = approver
    request.resolution = reason
    _stage(event_type, request, group, action=_ACTIONS[status], reason=reason)
    return group


def _approved_reason(request: AccessRequest | RoleRequest, reason: str | None) -> str:
    """The reason of what an approval runs in turn."""
    return f"{_what(request)} #{request.id} approved: {reason or 'no reason given'}"


# -- access requests


def request_access(requester: User, group: Group, *, reason: str) -> AccessRequest:
    """*requester* asks to join *group*: ``access_create``.

    :raises Conflict: the requester is a member already.
    """
    ensure_not_member(group, requester)
    request = AccessRequest(requester=requester, group=group, reason=reason)
    db.session.add(request)
    _stage("access_create", request, group, action="create", reason=reason)
    return request


def approve_access(
    request: AccessRequest, approver: User, *, reason: str | None = None
) -> Membership:
    """An owner of the group approves: ``access_approve``, then
    ``group_member_added`` through :func:`~access_app.operations.add_member`.

    :raises Conflict: the request is decided already, or its group is gone.
    :raises Forbidden: *approver* does not own the group, or is the requester.
    """
    group = _decide(request, approver, RequestStatus.APPROVED, "access_approve", reason)
    return add_member(
        group,
        request.requester,
        reason=_approved_reason(request, reason),
        access_request=request,
    )


def reject_access(
    request: AccessRequest, approver: User, *, reason: str | None = None
) -> None:
    """An owner of the group rejects: ``access_reject``.

    :raises Conflict: the request is decided already, or its group is gone.
    :raises Forbidden: *approver* does not own the group.
    """
    _decide(request, approver, RequestStatus.REJECTED, "access_reject", reason)


# -- role requests


def request_role(
    requester: User, role: Role, group: Group, *, reason: str
) -> RoleRequest:
    """*requester* asks that *role* be assigned to *group*: ``role_request_create``.

    :raises Conflict: the role is assigned to the group already.
    """
    ensure_not_assigned(role, group)
    request = RoleRequest(requester=requester, role=role, group=group, reason=reason)
    db.session.add(request)
    _stage("role_request_create", request, group, action="create", reason=reason)
    return request


def approve_role_request(
    request: RoleRequest, approver: User, *, reason: str | None = None
) -> list[User]:
    """An owner of the group approves: ``role_request_approve``, then what
    :func:`~access_app.operations.assign_role` stages. Returns the users
    added to the group.

    :raises Conflict: the request is decided already, its group is gone, or
        the assignment failed (a locked group, for one); then nothing of the
        approval may be committed.
    :raises Forbidden: *approver* does not own the group, or is the requester.
    """
    group = _decide(
        request, approver, RequestStatus.APPROVED, "role_request_approve", reason
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
                reason=_approved_reason(request, reason),
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

    Raises as :func:`reject_access` does.
    """
    _decide(request, approver, RequestStatus.REJECTED, "role_request_reject", reason)
