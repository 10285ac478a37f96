"""``audit_actor``: the authenticated user as the actor for the rest of the request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends

from .._context import ActorLike, audit_context, to_actor

__all__ = ["audit_actor"]


def audit_actor(
    dependency: Callable[..., ActorLike | Awaitable[ActorLike]],
) -> Callable[..., AsyncIterator[None]]:
    """A FastAPI dependency making *dependency*'s user the actor of the request.

    *dependency* is any FastAPI dependency (a plain or ``async`` function,
    which may take ``Depends(...)`` parameters of its own) that returns an
    :class:`~access_audit.Actor`, an ``(id, email)`` tuple or None. Its
    actor applies, as in :func:`~access_audit.audit_context`, to every event
    staged afterwards in the request: in the endpoint and in dependencies
    resolved after this one. None (no
    logged-in user) leaves the actor as it was (the emitter's
    ``actor_resolver``, else ``"system"``); an explicit ``actor_id=`` on
    :func:`~access_audit.stage_event` still wins.

    Use it as an app-, router- or path-level dependency::

        app = FastAPI(dependencies=[Depends(audit_actor(current_user))])

    FastAPI resolves *dependency* once per request, shared with other uses of
    it (``Depends`` caches it per request).

    :raises TypeError: (at request time) *dependency* returned something else.
    """
    resolved = Depends(dependency)

    async def apply_actor(user: Any = resolved) -> AsyncIterator[None]:
        actor = to_actor(user, f"audit_actor({_name(dependency)})")
        if actor is None:
            yield
            return
        # A dependency with yield: FastAPI enters it in the task that runs
        # the endpoint and leaves it after, in the same task.
        with audit_context(actor_id=actor.id, actor_email=actor.email):
            yield

    return apply_actor


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
