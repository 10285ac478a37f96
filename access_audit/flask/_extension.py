"""``AccessAudit``: one emitter per Flask app, attached to Flask-SQLAlchemy's session."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pluggy
from flask import Flask, current_app, has_app_context, has_request_context

from .._context import ActorLike, ActorResolver, to_actor
from .._emitter import AuditEmitter
from .._errors import AuditConfigurationError
from .._imports import import_plugin
from .._registry import listen_target, select_by
from .._request_metadata import provide_request_metadata
from ._cli import cli
from ._request import request_metadata

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.orm import Session

    from .._context import Actor

__all__ = ["AccessAudit"]

EXTENSION_KEY = "access_audit"


@dataclasses.dataclass(slots=True)
class _AppState:
    """What ``app.extensions["access_audit"]`` holds for one app."""

    emitter: AuditEmitter
    db: SQLAlchemy | None


class AccessAudit:
    """The Flask extension: an :class:`~access_audit.AuditEmitter` per app.

    :param app: a Flask app to initialise now; or call :meth:`init_app` later.
    :param db: a ``flask_sqlalchemy.SQLAlchemy``; its ``db.session`` is
        attached, so operations call ``stage_event(db.session, ...)``.
    :param emitter_options: passed to each app's
        :class:`~access_audit.AuditEmitter` (``plugins``, ``actor_resolver``,
        ...). ``load_entrypoints`` and ``raise_plugin_errors`` are the defaults
        of their config keys, which win; ``ACCESS_AUDIT_PLUGINS`` adds plugins.

    The actor of an event staged in a request comes from the function
    registered with :meth:`actor_loader` (then from an ``actor_resolver``
    option); request metadata is captured at stage time, merged under what a
    ``metadata_provider`` option returns. Config keys (read once by
    :meth:`init_app`):

    ``ACCESS_AUDIT_ENABLED`` (True)
        False registers no plugins at all; staging still checks its input and
        the signals (so the ``audit_events`` test fixture) still see events.
    ``ACCESS_AUDIT_LOAD_ENTRYPOINTS`` (True)
        Register plugins from installed packages' ``access_audit`` entry points.
    ``ACCESS_AUDIT_PLUGINS`` (``[]``)
        Import strings (``"package.module:object"``) of plugins to register;
        a class is instantiated with no arguments.
    ``ACCESS_AUDIT_RAISE_PLUGIN_ERRORS`` (False)
        Strict mode for tests: a plugin error is raised out of the commit.
    """

    def __init__(
        self,
        app: Flask | None = None,
        db: SQLAlchemy | None = None,
        **emitter_options: Any,
    ) -> None:
        self._emitter_options = emitter_options
        self._actor_loader: Callable[[], ActorLike] | None = None
        if app is not None:
            self.init_app(app, db)

    def init_app(
        self, app: Flask, db: SQLAlchemy | None = None, **emitter_options: Any
    ) -> None:
        """Create this app's emitter and attach it to ``db.session`` if given.

        ``emitter_options`` apply to this app only, over the constructor's
        (with an app factory and a module-level ``AccessAudit()``, this is
        where per-app ``plugins=`` or ``outbox=`` go).

        :raises RuntimeError: the app already has an ``AccessAudit``.
        :raises AuditConfigurationError: an ``ACCESS_AUDIT_PLUGINS`` entry
            cannot be imported; the message names the key and the string.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "An AccessAudit instance is already registered on this Flask app. "
                "Import and use that instance instead."
            )
        options = {**self._emitter_options, **emitter_options}
        config = app.config
        # Constructor options are the defaults of the matching config keys.
        enabled = _flag(config, "ACCESS_AUDIT_ENABLED", True)
        options["load_entrypoints"] = _flag(
            config,
            "ACCESS_AUDIT_LOAD_ENTRYPOINTS",
            options.get("load_entrypoints", True),
        )
        options["raise_plugin_errors"] = _flag(
            config,
            "ACCESS_AUDIT_RAISE_PLUGIN_ERRORS",
            options.get("raise_plugin_errors", False),
        )
        given = list(options.pop("plugins", ()))
        configured = _import_plugins(config.setdefault("ACCESS_AUDIT_PLUGINS", []))
        options["actor_resolver"] = functools.partial(
            self._resolve_actor, options.get("actor_resolver")
        )
        options["metadata_provider"] = functools.partial(
            provide_request_metadata, request_metadata, options.get("metadata_provider")
        )
        if not enabled:
            given, configured, options["load_entrypoints"] = [], [], False
        # The emitter registers the plugins in this order, then the entry
        # points; the entry it was taking when it refused one is named.
        taking: list[str] = []

        def plugins() -> Iterator[object]:
            yield from given
            for string, plugin in configured:
                taking[:] = [string]
                yield plugin
            taking.clear()

        try:
            emitter = AuditEmitter(plugins(), **options)
        except (ValueError, TypeError, pluggy.PluginValidationError) as error:
            if not taking:
                raise
            raise AuditConfigurationError(
                f"ACCESS_AUDIT_PLUGINS: {taking[0]!r} cannot be registered: {error}"
            ) from error
        app.extensions[EXTENSION_KEY] = _AppState(emitter, db)
        app.cli.add_command(cli)
        if db is not None:
            # Statements that write are noted only where the app has binds
            # (the outbox puts a commit's rows in the database it changed).
            several = bool(config.get("SQLALCHEMY_BINDS"))
            _attach_to_flask_sqlalchemy(db, emitter, several=several)

    def actor_loader(
        self, function: Callable[[], ActorLike]
    ) -> Callable[[], ActorLike]:
        """Register the function that returns the current actor (a decorator).

        It is called at stage time, inside the request, and returns an
        :class:`~access_audit.Actor`, an ``(id, email)`` tuple, or None (no
        logged-in user: the actor falls back to ``"system"``). An explicit
        actor on the call and :func:`~access_audit.audit_context` win over it.
        """
        self._actor_loader = function
        return function

    @property
    def emitter(self) -> AuditEmitter:
        """The current app's emitter (needs an app context)."""
        return self.emitter_of(current_app)

    @staticmethod
    def emitter_of(app: Flask) -> AuditEmitter:
        """The emitter of *app*.

        :raises AuditConfigurationError: AccessAudit was not initialised on it.
        """
        state = app.extensions.get(EXTENSION_KEY)
        if state is None:
            raise AuditConfigurationError(
                f"AccessAudit is not initialised on the app {app.name!r}; "
                "call audit.init_app(app) first"
            )
        emitter: AuditEmitter = state.emitter
        return emitter

    @staticmethod
    def outbox_engine_of(app: Flask, bind_key: str | None = None) -> Any:
        """The engine that holds *app*'s outbox table, or that of the
        Flask-SQLAlchemy bind *bind_key* (a transaction that changes only
        that database writes its outbox rows there, when it has the table);
        needs an app context.

        :raises AuditConfigurationError: no outbox, no ``db`` to find it in,
            or no such bind.
        """
        state = app.extensions.get(EXTENSION_KEY)
        emitter = AccessAudit.emitter_of(app)
        if emitter.outbox is None or state is None or state.db is None:
            raise AuditConfigurationError(
                "the relay needs AccessAudit(app, db, outbox=Outbox(db.metadata))"
            )
        if bind_key is not None:
            engines = state.db.engines
            if bind_key not in engines:
                raise AuditConfigurationError(
                    f"no Flask-SQLAlchemy bind {bind_key!r}; this app's binds: "
                    f"{sorted(key for key in engines if key is not None)}"
                )
            return engines[bind_key]
        return state.db.session.get_bind(clause=emitter.outbox.table)

    def _resolve_actor(self, resolver: ActorResolver | None) -> Actor | None:
        # The actor loader (inside a request), then an actor_resolver option.
        if self._actor_loader is not None and has_request_context():
            actor = to_actor(self._actor_loader(), "actor_loader")
            if actor is not None:
                return actor
        return None if resolver is None else to_actor(resolver(), "actor_resolver")


def _flag(config: Any, key: str, default: bool) -> bool:
    """The boolean config *key*, set to *default* (the constructor's
    option, as Python takes it) if missing.

    :raises AuditConfigurationError: the key's value is not a bool: a string
        such as ``"false"`` (from the environment, say) is true to Python,
        and would do the opposite of what it says.
    """
    if key not in config:
        value = config[key] = bool(default)
        return value
    value = config[key]
    if not isinstance(value, bool):
        raise AuditConfigurationError(
            f"{key} must be True or False, got {value!r} (app.config."
            "from_prefixed_env() reads 'false' from the environment as False)"
        )
    return value


def _import_plugins(names: Iterable[str]) -> list[tuple[str, object]]:
    """Each import string with the plugin it names."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise AuditConfigurationError(
            f"ACCESS_AUDIT_PLUGINS must be a list of import strings, got "
            f"{'the string ' if isinstance(names, str) else ''}{names!r}"
        )
    return [(name, import_plugin(name, "ACCESS_AUDIT_PLUGINS")) for name in names]


def _attach_to_flask_sqlalchemy(
    db: SQLAlchemy, emitter: AuditEmitter, *, several: bool
) -> None:
    # One SQLAlchemy() may serve several apps with one scoped session (and one
    # Session class), while each app has its own emitter: install this
    # emitter's listeners on that class and pick the emitter by current app
    # when an event is staged.
    session_class = listen_target(db.session)
    assert isinstance(session_class, type)
    select_by(session_class, _current_app_emitter)
    emitter._listen_to_class(session_class, several=several)


def _current_app_emitter(session: Session) -> AuditEmitter | None:
    """The current app's emitter, if it listens to *session*'s class: not
    once detached from it, nor for an app given no ``db`` (another app's
    ``SQLAlchemy()``); staging there is refused, as on any session no
    emitter listens to."""
    if not has_app_context():
        return None
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        return None
    emitter: AuditEmitter = state.emitter
    return emitter if emitter._listeners.listens_to(type(session)) else None
