"""Users and role definitions: not audited, for in a real deployment they come
from the identity provider."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from ..errors import Conflict
from ..models import Role, User, db
from ._shared import ensure_unique_name

__all__ = ["create_role", "create_user"]


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
    ensure_unique_name(Role, name)
    role = Role(name=name, members=list(members))
    db.session.add(role)
    return role
