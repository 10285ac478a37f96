"""The data: users, groups (members and owners), roles, apps, tags and requests.

Every table is prefixed ``access_app_`` so the example can share a database
with other applications (and test suites). ``db`` is the one Flask-SQLAlchemy
extension of the package; :func:`access_app.create_app` initialises it.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Column, Connection, Enum, ForeignKey, String, Table, event
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Mapper,
    declared_attr,
    mapped_column,
    relationship,
)

from .errors import GroupLocked

__all__ = [
    "AccessRequest",
    "App",
    "Group",
    "Membership",
    "RequestStatus",
    "Role",
    "RoleRequest",
    "Tag",
    "User",
    "db",
]


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _link_table(name: str, left: str, right: str) -> Table:
    """The many-to-many table ``access_app_<name>``: ``<left>_id`` and
    ``<right>_id``, each a foreign key to the ``access_app_<left or right>s``
    table, together the primary key."""
    return Table(
        f"access_app_{name}",
        Base.metadata,
        *(
            Column(f"{side}_id", ForeignKey(f"access_app_{side}s.id"), primary_key=True)
            for side in (left, right)
        ),
    )


group_owners = _link_table("group_owners", "group", "user")
role_members = _link_table("role_members", "role", "user")
role_groups = _link_table("role_groups", "role", "group")
app_tags = _link_table("app_tags", "app", "tag")


class User(db.Model):  # type: ignore[name-defined,misc]
    """A person. Users come from the identity provider: creating one is not audited."""

    __tablename__ = "access_app_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(120))


class _Named:
    """Columns of a row known by a unique name: a group, role, tag or app."""

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)


class _Described(_Named):
    """A named row with a free-text description."""

    description: Mapped[str] = mapped_column(String(400), default="")


class Group(_Described, db.Model):  # type: ignore[name-defined,misc]
    """A group of users, with owners who decide who may join.

    A ``locked`` group (say, one mirrored from the HR system) takes no new
    members, however they would come: the rule is enforced when the new
    membership is flushed (see :func:`_locked_groups_take_no_new_members`).
    """

    __tablename__ = "access_app_groups"

    locked: Mapped[bool] = mapped_column(default=False)

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="group", cascade="all, delete-orphan"
    )
    owners: Mapped[list[User]] = relationship(secondary=group_owners)
    roles: Mapped[list[Role]] = relationship(
        secondary=role_groups, back_populates="groups"
    )
    # A deleted group's requests stay, with group_id NULL, for the record.
    access_requests: Mapped[list[AccessRequest]] = relationship(back_populates="group")
    role_requests: Mapped[list[RoleRequest]] = relationship(back_populates="group")

    @property
    def members(self) -> list[User]:
        """The users in the group, however they got in."""
        return [membership.user for membership in self.memberships]

    def membership_of(self, user: User) -> Membership | None:
        """The user's membership of this group, if any."""
        for membership in self.memberships:
            if membership.user_id == user.id:
                return membership
        return None


class Membership(db.Model):  # type: ignore[name-defined,misc]
    """A user in a group; ``role_id`` is set when a role assignment added it."""

    __tablename__ = "access_app_memberships"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("access_app_groups.id"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("access_app_users.id"), primary_key=True
    )
    role_id: Mapped[int | None] = mapped_column(ForeignKey("access_app_roles.id"))
    created_at: Mapped[datetime] = mapped_column(default=_now)

    group: Mapped[Group] = relationship(back_populates="memberships")
    user: Mapped[User] = relationship()


@event.listens_for(Membership, "before_insert")
def _locked_groups_take_no_new_members(
    mapper: Mapper[Membership], connection: Connection, membership: Membership
) -> None:
    # A model rule rather than a check in each operation: it holds for every
    # path that adds a member (by hand, by access request, by role), and it
    # fires at flush time, after the operation has staged its events.
    group = membership.group
    if group.locked:
        raise GroupLocked(
            f"group {group.name!r} is locked: it takes no new members "
            f"({membership.user.email} was being added)"
        )


class Role(_Named, db.Model):  # type: ignore[name-defined,misc]
    """A set of users; assigning the role to a group makes them its members."""

    __tablename__ = "access_app_roles"

    members: Mapped[list[User]] = relationship(secondary=role_members)
    groups: Mapped[list[Group]] = relationship(
        secondary=role_groups, back_populates="roles"
    )


class Tag(_Described, db.Model):  # type: ignore[name-defined,misc]
    """A label for apps (``prod``, ``pii``, ...)."""

    __tablename__ = "access_app_tags"

    apps: Mapped[list[App]] = relationship(secondary=app_tags, back_populates="tags")


class App(_Described, db.Model):  # type: ignore[name-defined,misc]
    """An application whose access is managed through groups."""

    __tablename__ = "access_app_apps"

    tags: Mapped[list[Tag]] = relationship(secondary=app_tags, back_populates="apps")


class RequestStatus(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


_STATUS = Enum(
    RequestStatus,
    name="access_app_request_status",
    native_enum=False,
    values_callable=lambda statuses: [status.value for status in statuses],
)


class _Request:
    """What access and role requests share: who asked, for which group, why,
    and who decided how.

    A request is created ``pending`` and decided once (``approved`` or
    ``rejected``) by a resolver, who may give a ``resolution``.
    """

    id: Mapped[int] = mapped_column(primary_key=True)
    requester_id: Mapped[int] = mapped_column(ForeignKey("access_app_users.id"))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("access_app_groups.id"))
    reason: Mapped[str] = mapped_column(String(400), default="")
    status: Mapped[RequestStatus] = mapped_column(
        _STATUS, default=RequestStatus.PENDING
    )
    resolver_id: Mapped[int | None] = mapped_column(ForeignKey("access_app_users.id"))
    resolution: Mapped[str | None] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(default=_now)

    # Two foreign keys to users: each relationship names its own.
    @declared_attr
    @classmethod
    def requester(cls) -> Mapped[User]:
        return relationship(foreign_keys=lambda: [cls.requester_id])

    @declared_attr
    @classmethod
    def resolver(cls) -> Mapped[User | None]:
        return relationship(foreign_keys=lambda: [cls.resolver_id])


class AccessRequest(_Request, db.Model):  # type: ignore[name-defined,misc]
    """A user asks to join a group; an owner of the group approves or rejects."""

    __tablename__ = "access_app_access_requests"

    group: Mapped[Group | None] = relationship(back_populates="access_requests")


class RoleRequest(_Request, db.Model):  # type: ignore[name-defined,misc]
    """Someone asks that a role be assigned to a group; a group owner decides."""

    __tablename__ = "access_app_role_requests"

    role_id: Mapped[int] = mapped_column(ForeignKey("access_app_roles.id"))

    role: Mapped[Role] = relationship()
    group: Mapped[Group | None] = relationship(back_populates="role_requests")
