"""Which emitter owns a session, and how attach targets map to Session classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

from sqlalchemy.orm import Session, scoped_session, sessionmaker

from ._errors import AuditConfigurationError
from ._sqla import mapper_binds

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import (
        AsyncSession,
        async_scoped_session,
        async_sessionmaker,
    )

    from ._owner import Owner

__all__ = [
    "AttachTarget",
    "attached_to_instance",
    "disown",
    "emitter_for",
    "listen_target",
    "own",
    "refuse_sharding",
    "select_by",
    "spans_databases",
    "sync_session_of",
]

ListenTarget = Union[Session, "type[Session]"]

AttachTarget = Union[
    Session,
    "type[Session]",
    "sessionmaker[Any]",
    "scoped_session[Any]",
    "AsyncSession",
    "type[AsyncSession]",
    "async_sessionmaker[Any]",
    "async_scoped_session[Any]",
]
"""What :meth:`AuditEmitter.attach <access_audit.AuditEmitter.attach>` accepts."""

# The owning emitter is kept as an attribute of the Session instance or class
# it was attached to: one getattr() then finds the most specific owner (the
# instance, then the classes in MRO order) at the cost of an attribute lookup.
_OWNER = "_access_audit_emitter"
# Session classes whose emitter depends on more than the class: a Flask-SQLAlchemy
# session class shared by several apps, each app with its own emitter.
_SELECTOR = "_access_audit_selector"

# Marks the Session subclass made for an async_sessionmaker, so that attaching
# to the same maker again finds it instead of making another.
_OWN_CLASS_MARK = "_access_audit_session_class"


def sync_session_of(session: Any) -> Session:
    """The plain :class:`~sqlalchemy.orm.Session` behind what a caller passes.

    Accepts a Session, a ``scoped_session`` (its current session), an
    ``AsyncSession`` (its ``sync_session``) or an ``async_scoped_session``.
    """
    if isinstance(session, Session):
        return session
    if isinstance(session, scoped_session):
        current: Session = session()
        return current
    sync = getattr(session, "sync_session", None)
    if isinstance(sync, Session):
        return sync
    if callable(getattr(session, "registry", None)):  # async_scoped_session
        return sync_session_of(session.registry())
    raise TypeError(
        "session must be a Session, scoped_session, AsyncSession or "
        f"async_scoped_session, got {type(session).__name__}"
    )


def emitter_for(session: Session) -> Owner:
    """The emitter attached to this session, most specific first.

    An emitter attached to the session itself wins over one attached to its
    class, and a subclass (a sessionmaker's, say) over its bases.

    :raises AuditConfigurationError: no emitter is attached.
    """
    emitter: Owner | None = getattr(session, _OWNER, None)
    if emitter is not None:
        return emitter
    selector = getattr(type(session), _SELECTOR, None)
    if selector is not None:
        emitter = selector(session)
        if emitter is not None:
            return emitter
    hint = ""
    if type(session) is Session:
        hint = (
            " (a Session made directly, or an AsyncSession an async_sessionmaker "
            "made before it was attached, is of the plain Session class, which "
            "attaching a maker does not reach: attach makers at start-up, "
            "before they make sessions)"
        )
    raise AuditConfigurationError(
        f"no AuditEmitter is attached to this {type(session).__name__}, so the "
        "event would be lost; call emitter.attach(...) on the session, its "
        f"sessionmaker or its Session class first{hint}"
    )


def listen_target(target: Any) -> ListenTarget:
    """Map anything ``AuditEmitter.attach`` accepts to a Session class or instance.

    A sessionmaker and a scoped_session map to the Session subclass the
    sessionmaker made; async targets map to the synchronous session or class
    behind them (SQLAlchemy has no async session events). An
    ``async_sessionmaker`` is given its own Session subclass so that attaching
    to it reaches only the sessions it makes.
    """
    if isinstance(target, Session):
        return target
    if isinstance(target, type) and issubclass(target, Session):
        return target
    if isinstance(target, sessionmaker):
        return target.class_
    if isinstance(target, scoped_session):
        return listen_target(target.session_factory)
    sync = getattr(target, "sync_session", None)
    if isinstance(sync, Session):  # AsyncSession instance
        return sync
    return _async_listen_target(target)


def _async_listen_target(target: Any) -> ListenTarget:
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncSession,
            async_scoped_session,
            async_sessionmaker,
        )
    except ImportError:  # pragma: no cover - greenlet missing
        AsyncSession = async_scoped_session = async_sessionmaker = None  # type: ignore[assignment,misc]
    if async_scoped_session is not None and isinstance(target, async_scoped_session):
        return _async_listen_target(target.session_factory)
    if async_sessionmaker is not None and isinstance(target, async_sessionmaker):
        current = (
            target.kw.get("sync_session_class") or target.class_.sync_session_class
        )
        if not getattr(current, _OWN_CLASS_MARK, False):
            current = type(current.__name__, (current,), {_OWN_CLASS_MARK: True})
            target.configure(sync_session_class=current)
        return current  # type: ignore[no-any-return]
    if (
        AsyncSession is not None
        and isinstance(target, type)
        and issubclass(target, AsyncSession)
    ):
        if target.sync_session_class is Session:
            raise TypeError(
                f"attach({target.__name__}) would attach to every Session in the "
                "process (its sync_session_class is Session); attach an "
                "async_sessionmaker or AsyncSession instance, give the class its "
                "own sync_session_class, or attach Session itself if you mean it"
            )
        sync_class: type[Session] = target.sync_session_class
        return sync_class
    raise TypeError(
        "attach() takes a Session (class or instance), sessionmaker, "
        "scoped_session, AsyncSession, async_sessionmaker or "
        f"async_scoped_session, got {target!r}"
    )


def spans_databases(target: Any, resolved: ListenTarget) -> bool:
    """Whether sessions of *target* (mapped to *resolved* by
    :func:`listen_target`) may work in several databases, as far as
    attaching can tell: binds given (``Session(binds=...)``, a
    sessionmaker's or async_sessionmaker's ``binds=``), or a ``get_bind`` of
    the session class's own (a session that routes). A plain Session class
    cannot tell: its sessions get their binds when made."""
    factory = getattr(target, "session_factory", None)
    while factory is not None:  # a scoped_session or async_scoped_session
        target = factory
        factory = getattr(target, "session_factory", None)
    kw = getattr(target, "kw", None)  # a sessionmaker or async_sessionmaker
    if isinstance(kw, dict) and kw.get("binds"):
        return True
    if isinstance(resolved, Session) and mapper_binds(resolved):
        return True
    session_class = resolved if isinstance(resolved, type) else type(resolved)
    return session_class.get_bind is not Session.get_bind


def refuse_sharding(resolved: ListenTarget) -> None:
    """Refuse an outbox for sessions of horizontal sharding's
    ``ShardedSession`` (its own ``get_bind``): it names a database only for
    an object or a shard id, so it cannot name the outbox table's, and the
    commit would fail there, its change lost with it.

    :raises AuditConfigurationError: *resolved* is such a session (class).
    """
    from sqlalchemy.ext.horizontal_shard import ShardedSession

    session_class = resolved if isinstance(resolved, type) else type(resolved)
    if (
        issubclass(session_class, ShardedSession)
        and session_class.get_bind is ShardedSession.get_bind
    ):
        raise AuditConfigurationError(
            "an outbox cannot store the events of a ShardedSession: its "
            "get_bind names a database only for an object or a shard id, so "
            "the commit would fail writing the outbox rows; give the session "
            "class a get_bind that returns the outbox database for "
            "clause=outbox.table, or use an emitter without an outbox"
        )


def own(target: ListenTarget, emitter: Owner) -> None:
    """Record that *emitter* owns sessions of *target*.

    :raises AuditConfigurationError: another emitter owns it already.
    """
    current = _own_attribute(target)
    if current is not None and current is not emitter:
        raise AuditConfigurationError(
            f"{target!r} already has another AuditEmitter attached; detach that "
            "one first (one emitter per session; register several plugins on it)"
        )
    setattr(target, _OWNER, emitter)


def select_by(cls: type[Session], selector: Callable[[Session], Owner | None]) -> None:
    """Let *selector* pick the emitter of sessions of *cls* at stage time.

    Used where one Session class serves several owners (Flask-SQLAlchemy's
    session class with several apps). An emitter attached to the class itself,
    or to a session, still wins. The selector returns None for "not mine".
    """
    setattr(cls, _SELECTOR, selector)


def disown(target: ListenTarget, emitter: Owner) -> None:
    """Forget *emitter* as the owner of *target*, if it is."""
    if _own_attribute(target) is emitter:
        delattr(target, _OWNER)


def attached_to_instance(session: Session) -> bool:
    """Whether an emitter is attached to *session* itself, not to its class."""
    return _OWNER in vars(session)


def _own_attribute(target: ListenTarget) -> Owner | None:
    """The emitter attached to *target* itself (not inherited), if any."""
    found: Owner | None = vars(target).get(_OWNER)
    return found
