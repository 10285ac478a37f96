"""The JSON HTTP API: one route per operation; each route commits once.

The acting user is named by the ``X-User-Id`` header (a real deployment
would authenticate it). Every request that changes something needs it,
except ``POST /users``. Errors are JSON: ``{"error": ..., "message": ...}``
with 400, 401, 403, 404 or 409. A JSON body may carry a ``reason``; for
``DELETE`` it may also be the ``reason`` query parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, g, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, Unauthorized

from . import operations as ops
from .errors import InvalidInput, NotFound, OperationError
from .models import (
    AccessRequest,
    App,
    Group,
    Role,
    RoleRequest,
    Tag,
    User,
    db,
)

__all__ = ["bp"]

bp = Blueprint("api", __name__)

_Request = TypeVar("_Request", AccessRequest, RoleRequest)
_Result = TypeVar("_Result")

_OPEN_ENDPOINTS = {"api.create_user"}
"""Endpoints that change something without an acting user."""


# -- the acting user and errors


@bp.before_request
def load_acting_user() -> None:
    """Put the ``X-User-Id`` user in ``g.current_user`` and ``g.actor``.

    :raises Unauthorized: the header names no user, or is missing on a
        request that changes something.
    """
    g.current_user = None
    header = request.headers.get("X-User-Id")
    if header is None:
        if request.method != "GET" and request.endpoint not in _OPEN_ENDPOINTS:
            raise Unauthorized("send the acting user's id in the X-User-Id header")
        return
    try:
        user = ops.get(User, int(header))
    except (ValueError, NotFound):
        raise Unauthorized(f"X-User-Id {header!r} names no user") from None
    g.current_user = user
    g.actor = (str(user.id), user.email)


def _acting_user() -> User:
    user: User = g.current_user
    return user


@bp.app_errorhandler(OperationError)
def operation_failed(error: OperationError) -> ResponseReturnValue:
    """Roll the request's transaction back (its staged events are dropped)."""
    db.session.rollback()
    return {"error": type(error).__name__, "message": error.message}, error.status


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> ResponseReturnValue:
    """Answer HTTP errors (404 for an unknown URL, ...) in JSON too."""
    db.session.rollback()
    return {"error": error.name, "message": error.description}, error.code or 500


# -- reading the request body


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        what = "is required" if value is None else "must be a string"
        raise InvalidInput(f"{key!r} {what}")
    return value


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else _text(body, key)


def _id(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{key!r} must be an integer id")
    return value


def _ids(body: dict[str, Any], key: str) -> list[int]:
    values = body.get(key, [])
    if not isinstance(values, list):
        raise InvalidInput(f"{key!r} must be a list of integer ids")
    return [_id({key: value}, key) for value in values]


def _reason(body: dict[str, Any]) -> str | None:
    if "reason" in body:
        return _optional_text(body, "reason")
    return request.args.get("reason")


# -- JSON views of the rows


def _user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name}


def _group_json(group: Group) -> dict[str, Any]:
    return {
        "id": group.id,
        "name": group.name,
        "description": group.description,
        "locked": group.locked,
        "members": [
            {"user_id": m.user_id, "role_id": m.role_id}
            for m in sorted(group.memberships, key=lambda m: m.user_id)
        ],
        "owner_ids": sorted(user.id for user in group.owners),
        "role_ids": sorted(role.id for role in group.roles),
    }


def _role_json(role: Role) -> dict[str, Any]:
    return {
        "id": role.id,
        "name": role.name,
        "member_ids": sorted(user.id for user in role.members),
        "group_ids": sorted(group.id for group in role.groups),
    }


def _tag_json(tag: Tag) -> dict[str, Any]:
    return {"id": tag.id, "name": tag.name, "description": tag.description}


def _app_json(app: App) -> dict[str, Any]:
    return {
        "id": app.id,
        "name": app.name,
        "description": app.description,
        "tag_ids": sorted(tag.id for tag in app.tags),
    }


def _request_json(req: AccessRequest | RoleRequest) -> dict[str, Any]:
    found = {
        "id": req.id,
        "requester_id": req.requester_id,
        "group_id": req.group_id,
        "reason": req.reason,
        "status": req.status.value,
        "resolver_id": req.resolver_id,
        "resolution": req.resolution,
    }
    if isinstance(req, RoleRequest):
        found["role_id"] = req.role_id
    return found


# -- what several routes do: run one operation on the URL's rows, commit once


def _change_group(
    operation: Callable[..., object], group_id: int, user_id: int
) -> ResponseReturnValue:
    """Run ``operation(group, user, reason=...)``, commit, answer the group."""
    group = ops.get(Group, group_id)
    operation(group, ops.get(User, user_id), reason=_reason(_body()))
    db.session.commit()
    return _group_json(group)


def _delete(
    operation: Callable[..., object], model: type[Group | App | Tag], row_id: int
) -> ResponseReturnValue:
    """Run ``operation(row, reason=...)``, commit, answer what was deleted."""
    operation(ops.get(model, row_id), reason=_reason(_body()))
    db.session.commit()
    return {"deleted": {"type": model.__name__.lower(), "id": row_id}}


def _decide(
    decision: Callable[..., _Result],
    model: type[_Request],
    request_id: int,
) -> tuple[_Request, _Result]:
    """Run ``decision(request, acting user, reason=...)`` and commit.

    Returns the request and what the decision returned.
    """
    req = ops.get(model, request_id)
    result = decision(req, _acting_user(), reason=_reason(_body()))
    db.session.commit()
    return req, result


# -- users and roles (not audited)


@bp.post("/users")
def create_user() -> ResponseReturnValue:
    body = _body()
    user = ops.create_user(_text(body, "email"), _text(body, "name"))
    db.session.commit()
    return _user_json(user), 201


@bp.get("/users/<int:user_id>")
def show_user(user_id: int) -> ResponseReturnValue:
    return _user_json(ops.get(User, user_id))


@bp.post("/roles")
def create_role() -> ResponseReturnValue:
    body = _body()
    members = [ops.get(User, user_id) for user_id in _ids(body, "member_ids")]
    role = ops.create_role(_text(body, "name"), members)
    db.session.commit()
    return _role_json(role), 201


@bp.get("/roles/<int:role_id>")
def show_role(role_id: int) -> ResponseReturnValue:
    return _role_json(ops.get(Role, role_id))


@bp.put("/roles/<int:role_id>/groups/<int:group_id>")
def assign_role(role_id: int, group_id: int) -> ResponseReturnValue:
    added = ops.assign_role(
        ops.get(Role, role_id), ops.get(Group, group_id), reason=_reason(_body())
    )
    db.session.commit()
    return {"member_ids_added": [user.id for user in added]}


@bp.delete("/roles/<int:role_id>/groups/<int:group_id>")
def unassign_role(role_id: int, group_id: int) -> ResponseReturnValue:
    ops.unassign_role(
        ops.get(Role, role_id), ops.get(Group, group_id), reason=_reason(_body())
    )
    db.session.commit()
    return _role_json(ops.get(Role, role_id))


# -- groups


@bp.post("/groups")
def create_group() -> ResponseReturnValue:
    body = _body()
    locked = body.get("locked", False)
    if not isinstance(locked, bool):
        raise InvalidInput("'locked' must be true or false")
    group = ops.create_group(
        _text(body, "name"),
        description=_text(body, "description", ""),
        locked=locked,
        reason=_reason(body),
    )
    db.session.commit()
    return _group_json(group), 201


@bp.get("/groups/<int:group_id>")
def show_group(group_id: int) -> ResponseReturnValue:
    return _group_json(ops.get(Group, group_id))


@bp.delete("/groups/<int:group_id>")
def delete_group(group_id: int) -> ResponseReturnValue:
    return _delete(ops.delete_group, Group, group_id)


@bp.put("/groups/<int:group_id>/members/<int:user_id>")
def add_member(group_id: int, user_id: int) -> ResponseReturnValue:
    return _change_group(ops.add_member, group_id, user_id)


@bp.delete("/groups/<int:group_id>/members/<int:user_id>")
def remove_member(group_id: int, user_id: int) -> ResponseReturnValue:
    return _change_group(ops.remove_member, group_id, user_id)


@bp.put("/groups/<int:group_id>/owners/<int:user_id>")
def add_owner(group_id: int, user_id: int) -> ResponseReturnValue:
    return _change_group(ops.add_owner, group_id, user_id)


@bp.delete("/groups/<int:group_id>/owners/<int:user_id>")
def remove_owner(group_id: int, user_id: int) -> ResponseReturnValue:
    return _change_group(ops.remove_owner, group_id, user_id)


# -- apps and tags


@bp.post("/apps")
def create_app() -> ResponseReturnValue:
    body = _body()
    tags = [ops.get(Tag, tag_id) for tag_id in _ids(body, "tag_ids")]
    app = ops.create_application(
        _text(body, "name"),
        description=_text(body, "description", ""),
        tags=tags,
        reason=_reason(body),
    )
    db.session.commit()
    return _app_json(app), 201


@bp.get("/apps/<int:app_id>")
def show_app(app_id: int) -> ResponseReturnValue:
    return _app_json(ops.get(App, app_id))


@bp.delete("/apps/<int:app_id>")
def delete_app(app_id: int) -> ResponseReturnValue:
    return _delete(ops.delete_application, App, app_id)


@bp.post("/tags")
def create_tag() -> ResponseReturnValue:
    body = _body()
    tag = ops.create_tag(
        _text(body, "name"),
        description=_text(body, "description", ""),
        reason=_reason(body),
    )
    db.session.commit()
    return _tag_json(tag), 201


@bp.get("/tags/<int:tag_id>")
def show_tag(tag_id: int) -> ResponseReturnValue:
    return _tag_json(ops.get(Tag, tag_id))


@bp.patch("/tags/<int:tag_id>")
def update_tag(tag_id: int) -> ResponseReturnValue:
    body = _body()
    tag = ops.get(Tag, tag_id)
    ops.update_tag(
        tag,
        name=_optional_text(body, "name"),
        description=_optional_text(body, "description"),
        reason=_reason(body),
    )
    db.session.commit()
    return _tag_json(tag)


@bp.delete("/tags/<int:tag_id>")
def delete_tag(tag_id: int) -> ResponseReturnValue:
    return _delete(ops.delete_tag, Tag, tag_id)


# -- access requests


@bp.post("/access-requests")
def request_access() -> ResponseReturnValue:
    body = _body()
    req = ops.request_access(
        _acting_user(),
        ops.get(Group, _id(body, "group_id")),
        reason=_text(body, "reason"),
    )
    db.session.commit()
    return _request_json(req), 201


@bp.get("/access-requests/<int:request_id>")
def show_access_request(request_id: int) -> ResponseReturnValue:
    return _request_json(ops.get(AccessRequest, request_id))


@bp.post("/access-requests/<int:request_id>/approve")
def approve_access(request_id: int) -> ResponseReturnValue:
    req, _ = _decide(ops.approve_access, AccessRequest, request_id)
    return _request_json(req)


@bp.post("/access-requests/<int:request_id>/reject")
def reject_access(request_id: int) -> ResponseReturnValue:
    req, _ = _decide(ops.reject_access, AccessRequest, request_id)
    return _request_json(req)


# -- role requests


@bp.post("/role-requests")
def request_role() -> ResponseReturnValue:
    body = _body()
    req = ops.request_role(
        _acting_user(),
        ops.get(Role, _id(body, "role_id")),
        ops.get(Group, _id(body, "group_id")),
        reason=_text(body, "reason"),
    )
    db.session.commit()
    return _request_json(req), 201


@bp.get("/role-requests/<int:request_id>")
def show_role_request(request_id: int) -> ResponseReturnValue:
    return _request_json(ops.get(RoleRequest, request_id))


@bp.post("/role-requests/<int:request_id>/approve")
def approve_role_request(request_id: int) -> ResponseReturnValue:
    req, added = _decide(ops.approve_role_request, RoleRequest, request_id)
    return {**_request_json(req), "member_ids_added": [user.id for user in added]}


@bp.post("/role-requests/<int:request_id>/reject")
def reject_role_request(request_id: int) -> ResponseReturnValue:
    req, _ = _decide(ops.reject_role_request, RoleRequest, request_id)
    return _request_json(req)
