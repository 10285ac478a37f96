"""Who acts, and the ambient context that fills in what a caller leaves out."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any, TypeVar, Union

from ._values import check_text

__all__ = [
    "Actor",
    "ActorLike",
    "AmbientContext",
    "audit_context",
    "current_context",
    "to_actor",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Actor:
    """The user or system on whose behalf an operation runs."""

    id: str
    email: str | None = None

    def __post_init__(self) -> None:
        check_actor_fields(self.id, self.email, "Actor")
        # A str subclass (an enum member) is kept as its plain value, as
        # the outbox stores it.
        if type(self.id) is not str:
            object.__setattr__(self, "id", str.__str__(self.id))
        if self.email is not None and type(self.email) is not str:
            object.__setattr__(self, "email", str.__str__(self.email))


_F = TypeVar("_F", bound=Callable[..., Any])

ActorLike = Union[Actor, "tuple[str, str | None]", None]
"""What an actor resolver or loader may return."""


def check_actor_fields(actor_id: object, actor_email: object, where: str) -> None:
    """Raise if an actor's id or e-mail is not a usable string."""
    if not isinstance(actor_id, str):
        raise TypeError(
            f"{where}: actor_id must be a str, got {type(actor_id).__name__}"
        )
    if not str.strip(actor_id):
        raise ValueError(f"{where}: actor_id must not be empty, got {actor_id!r}")
    if actor_email is not None and not isinstance(actor_email, str):
        raise TypeError(
            f"{where}: actor_email must be a str or None, "
            f"got {type(actor_email).__name__}"
        )
    check_text(actor_id, f"{where}: actor_id")
    if actor_email is not None:
        check_text(actor_email, f"{where}: actor_email")


def to_actor(value: object, where: str) -> Actor | None:
    """Normalise what a resolver returned: an Actor, an ``(id, email)`` pair or None.

    :raises TypeError: any other value; ``where`` names the resolver.
    """
    if value is None or isinstance(value, Actor):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        actor_id, actor_email = value
        check_actor_fields(actor_id, actor_email, where)
        return Actor(actor_id, actor_email)
    raise TypeError(
        f"{where} must return an Actor, an (id, email) tuple or None, "
        f"got {type(value).__name__}"
    )


SYSTEM_ACTOR = Actor("system")


@dataclasses.dataclass(frozen=True, slots=True)
class AmbientContext:
    """What the innermost :func:`audit_context` sets: its actor (or None) and
    the metadata merged from every enclosing block."""

    actor: Actor | None
    metadata: Mapping[str, Any]


_EMPTY = AmbientContext(actor=None, metadata=MappingProxyType({}))
_current: ContextVar[AmbientContext] = ContextVar(
    "access_audit_context", default=_EMPTY
)

current_context: Callable[[], AmbientContext] = _current.get
"""The :class:`AmbientContext` in effect here (one C call: it runs per staged event)."""


@contextlib.contextmanager
def ambient(context: AmbientContext) -> Iterator[None]:
    """Make *context* the one in effect inside the block (an integration's
    way in: :func:`audit_context` builds its own from keyword arguments)."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


class audit_context:  # lower case: used like a function, as contextlib.suppress is
    """Set defaults for every event staged inside the block.

    Events staged inside take ``actor_id``/``actor_email`` unless the call to
    :func:`~access_audit.stage_event` names an actor itself, and ``metadata``
    merged under the call's own metadata. Blocks nest: the innermost actor
    wins and metadata merges outward-in. The state lives in a
    :class:`~contextvars.ContextVar`, so threads and asyncio tasks each see
    their own. Use it where there is no request to take an actor from: CLI
    commands, workers, schedulers.

    Also a decorator, of plain and ``async`` functions alike; each call runs
    in a context of its own. One ``audit_context`` object should not be
    entered by several threads or tasks at once: create one per block.

    :raises ValueError: ``actor_email`` without ``actor_id``, or an empty
        ``actor_id`` (checked here, not when the block is entered).
    :raises TypeError: ``actor_id`` or ``actor_email`` is not a str.
    """

    __slots__ = ("_actor", "_metadata", "_tokens")

    def __init__(
        self,
        *,
        actor_id: str | None = None,
        actor_email: str | None = None,
        **metadata: Any,
    ) -> None:
        if actor_id is None and actor_email is not None:
            raise ValueError("audit_context: actor_email was given without actor_id")
        self._actor: Actor | None = None
        if actor_id is not None:
            check_actor_fields(actor_id, actor_email, "audit_context")
            self._actor = Actor(actor_id, actor_email)
        self._metadata = metadata
        self._tokens: list[Token[AmbientContext]] = []

    def __enter__(self) -> None:
        parent = _current.get()
        context = AmbientContext(
            actor=self._actor or parent.actor,
            metadata=MappingProxyType({**parent.metadata, **self._metadata}),
        )
        self._tokens.append(_current.set(context))

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._tokens.pop())

    def __call__(self, function: _F) -> _F:
        def fresh() -> audit_context:
            copy = audit_context.__new__(audit_context)
            copy._actor, copy._metadata, copy._tokens = self._actor, self._metadata, []
            return copy

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with fresh():
                    return await function(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with fresh():
                return function(*args, **kwargs)

        return run  # type: ignore[return-value]


ActorResolver = Callable[[], ActorLike]
MetadataProvider = Callable[[], "Mapping[str, Any] | None"]
