"""The data: users, groups (members and owners), roles and role requests.

A subset of the Flask example's domain (``examples/access_app``), mapped for
``AsyncSession``: every relationship loads eagerly (``lazy="selectin"``), so
no attribute access does I/O outside an ``await``. Tables are prefixed
``fastapi_app_``, so the app can share a database with other applications.
"""

from __future__ import annotations

from sqlalchemy import Column, Connection, ForeignKey, String, Table, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship

from .errors import GroupLocked

__all__ = ["Base", "Group", "Membership", "Role", "RoleRequest", "User"]


class Base(DeclarativeBase):
    pass


def _link_table(name: str, left: str, right: str) -> Table:
    """The many-to-many table ``fastapi_app_<name>`` between two tables."""
    return Table(
        f"fastapi_app_{name}",
        Base.metadata,
        *(
            Column(
                f"{side}_id", ForeignKey(f"fastapi_app_{side}s.id"), primary_key=True
            )
            for side in (left, right)
        ),
    )


group_owners = _link_table("group_owners", "group", "user")
role_members = _link_table("role_members", "role", "user")
role_groups = _link_table("role_groups", "role", "group")


class User(Base):
    """A person. Users come from the identity provider: creating one is not audited."""

    __tablename__ = "fastapi_app_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(120))


class Group(Base):
    """A group of users, with owners who decide who may join.

    A ``locked`` group takes no new members, however they would come: the
    rule is checked when a new membership is flushed, after the operation
    has staged its events.
    """

    __tablename__ = "fastapi_app_groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    locked: Mapped[bool] = mapped_column(default=False)

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="group", cascade="all, delete-orphan", lazy="selectin"
    )
    owners: Mapped[list[User]] = relationship(secondary=group_owners, lazy="selectin")

    def is_member(self, user: User) -> bool:
        """Whether *user* is in the group."""
        return any(membership.user_id == user.id for membership in self.memberships)


class Membership(Base):
    """A user in a group; ``role_id`` is set when a role assignment added it."""

    __tablename__ = "fastapi_app_memberships"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("fastapi_app_groups.id"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("fastapi_app_users.id"), primary_key=True
    )
    role_id: Mapped[int | None] = mapped_column(ForeignKey("fastapi_app_roles.id"))

    group: Mapped[Group] = relationship(back_populates="memberships", lazy="selectin")
    user: Mapped[User] = relationship(lazy="selectin")


@event.listens_for(Membership, "before_insert")
def _locked_groups_take_no_new_members(
    mapper: Mapper[Membership], connection: Connection, membership: Membership
) -> None:
    # A model rule, as in the Flask example: it fires at flush time, after
    # the operation staged its events, whichever path added the member.
    group = membership.group
    if group.locked:
        raise GroupLocked(
            f"group {group.name!r} is locked: it takes no new members "
            f"({membership.user.email} was being added)"
        )


class Role(Base):
    """A set of users; assigning the role to a group makes them its members."""

    __tablename__ = "fastapi_app_roles"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)

    members: Mapped[list[User]] = relationship(secondary=role_members, lazy="selectin")
    groups: Mapped[list[Group]] = relationship(secondary=role_groups, lazy="selectin")


class RoleRequest(Base):
    """Someone asks that a role be assigned to a group; a group owner decides once.

    ``status`` is ``"pending"``, then ``"approved"`` or ``"rejected"``.
    """

    __tablename__ = "fastapi_app_role_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    requester_id: Mapped[int] = mapped_column(ForeignKey("fastapi_app_users.id"))
    role_id: Mapped[int] = mapped_column(ForeignKey("fastapi_app_roles.id"))
    group_id: Mapped[int] = mapped_column(ForeignKey("fastapi_app_groups.id"))
    reason: Mapped[str] = mapped_column(String(400), default="")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    resolver_id: Mapped[int | None] = mapped_column(ForeignKey("fastapi_app_users.id"))

    requester: Mapped[User] = relationship(foreign_keys=[requester_id], lazy="selectin")
    role: Mapped[Role] = relationship(lazy="selectin")
    group: Mapped[Group] = relationship(lazy="selectin")
