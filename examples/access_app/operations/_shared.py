"""What every operation module shares: loading rows, the checks, staging an event.

:func:`stage` is the one place an operation's event is built: the target's
type comes from the row's model, its id from :func:`key`, so each operation
states only what differs (event type, action, reason, payload).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import select

from access_audit import stage_event

from ..errors import Conflict, Forbidden, InvalidInput, NotFound
from ..models import AccessRequest, App, Group, Role, RoleRequest, Tag, User, db

__all__ = [
    "EVENT_TYPES",
    "create_row",
    "delete_row",
    "ensure_not_member",
    "ensure_owner",
    "ensure_unique_name",
    "get",
    "key",
    "stage",
    "user_fields",
]

EVENT_TYPES = (
    "access_create",
    "access_approve",
    "access_reject",
    "role_request_create",
    "role_request_approve",
    "role_request_reject",
    "app_create",
    "app_delete",
    "group_create",
    "group_delete",
    "tag_create",
    "tag_delete",
    "tag_update",
    "group_member_added",
    "group_member_removed",
    "group_owner_added",
    "group_owner_removed",
    "role_group_assigned",
    "role_group_unassigned",
)
"""Every event type the operations stage."""

_MAX_ID = 2**31 - 1
"""The largest INTEGER id (PostgreSQL would fail on a larger one: none exists)."""

_Row = TypeVar("_Row", User, Group, Role, Tag, App, AccessRequest, RoleRequest)
_Named = TypeVar("_Named", Group, Tag, App)

Audited = Group | Role | Tag | App | AccessRequest | RoleRequest
"""The rows an event may be about."""

_TARGET_TYPES: dict[type[Audited], str] = {
    Group: "group",
    Role: "role",
    Tag: "tag",
    App: "app",
    AccessRequest: "access_request",
    RoleRequest: "role_request",
}


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


def key(row: Audited) -> int | Callable[[], int]:
    """The row's id, or, for a row not flushed yet, a callable for the id.

    The database generates ids at flush time; access_audit resolves a callable
    ``target_id`` (or payload value) after the commit's final flush.
    """
    if row.id is not None:
        return int(row.id)
    return lambda: int(row.id)


def stage(
    event_type: str,
    row: Audited,
    *,
    action: str,
    reason: str | None,
    payload: Mapping[str, Any],
    name: str | None = None,
) -> None:
    """Stage *event_type* about *row* on the request's session.

    The target is *row*: its type by model, its id by :func:`key`, its name
    *name* or else the row's ``name``. The actor and the request metadata are
    added by access_audit (see :mod:`access_app.audit`).
    """
    stage_event(
        db.session,
        event_type,
        target_type=_TARGET_TYPES[type(row)],
        target_id=key(row),
        target_name=name if name is not None else getattr(row, "name", None),
        action=action,
        reason=reason,
        payload=payload,
    )


def create_row(
    model: type[_Named],
    event_type: str,
    *,
    reason: str | None,
    payload: Mapping[str, Any],
    **columns: Any,
) -> _Named:
    """Add a row of *model* with *columns*, and stage *event_type* (action
    ``create``) about it; its id is resolved when the transaction commits.

    :raises InvalidInput, Conflict: ``columns["name"]`` is blank or taken.
    """
    ensure_unique_name(model, columns["name"])
    row = model(**columns)
    db.session.add(row)
    stage(event_type, row, action="create", reason=reason, payload=payload)
    return row


def delete_row(
    event_type: str, row: Audited, *, reason: str | None, payload: Mapping[str, Any]
) -> None:
    """Stage *event_type* (action ``delete``) about *row*, then delete the row."""
    stage(event_type, row, action="delete", reason=reason, payload=payload)
    db.session.delete(row)


def user_fields(user: User) -> dict[str, Any]:
    """The payload fields naming *user*."""
    return {"user_id": user.id, "user_email": user.email}


def ensure_unique_name(model: type[Group | Role | Tag | App], name: str) -> None:
    """:raises InvalidInput: *name* is blank.
    :raises Conflict: a row of *model* has that name already.
    """
    if not name.strip():
        raise InvalidInput(f"a {model.__name__} name must not be empty")
    if db.session.scalar(select(model.id).where(model.name == name)) is not None:
        raise Conflict(f"a {model.__name__} named {name!r} exists already")


def ensure_owner(group: Group, user: User) -> None:
    """:raises Forbidden: *user* does not own *group*."""
    if user not in group.owners:
        raise Forbidden(f"{user.email} is not an owner of group {group.name!r}")


def ensure_not_member(group: Group, user: User) -> None:
    """:raises Conflict: *user* is in *group* already."""
    if group.membership_of(user) is not None:
        raise Conflict(f"{user.email} is a member of group {group.name!r} already")
