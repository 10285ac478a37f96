"""The catalog: apps and the tags that label them."""

from __future__ import annotations

from collections.abc import Sequence

from ..models import App, Tag
from ._shared import create_row, delete_row, ensure_unique_name, stage

__all__ = [
    "create_application",
    "create_tag",
    "delete_application",
    "delete_tag",
    "update_tag",
]


def create_application(
    name: str,
    *,
    description: str = "",
    tags: Sequence[Tag] = (),
    reason: str | None = None,
) -> App:
    """Register an app: ``app_create``."""
    return create_row(
        App,
        "app_create",
        reason=reason,
        payload={"description": description, "tags": [tag.name for tag in tags]},
        name=name,
        description=description,
        tags=list(tags),
    )


def delete_application(app: App, *, reason: str | None = None) -> None:
    """Delete an app: ``app_delete``."""
    delete_row(
        "app_delete",
        app,
        reason=reason,
        payload={"tags": sorted(tag.name for tag in app.tags)},
    )


def create_tag(name: str, *, description: str = "", reason: str | None = None) -> Tag:
    """Create a tag: ``tag_create``."""
    return create_row(
        Tag,
        "tag_create",
        reason=reason,
        payload={"description": description},
        name=name,
        description=description,
    )


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
        ensure_unique_name(Tag, name)
        changes["name"] = {"old": tag.name, "new": name}
        tag.name = name
    if description is not None and description != tag.description:
        changes["description"] = {"old": tag.description, "new": description}
        tag.description = description
    if changes:
        stage(
            "tag_update",
            tag,
            action="update",
            reason=reason,
            payload={"changes": changes},
        )
    return changes


def delete_tag(tag: Tag, *, reason: str | None = None) -> None:
    """Delete a tag, removing it from its apps: ``tag_delete``."""
    delete_row(
        "tag_delete",
        tag,
        reason=reason,
        payload={"app_ids": sorted(app.id for app in tag.apps)},
    )
