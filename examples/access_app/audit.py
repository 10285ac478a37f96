"""The app's audit set-up: the ``AccessAudit`` extension, its actor loader, its sink.

The acting user of a request is loaded by :mod:`access_app.api` from the
``X-User-Id`` header into :data:`flask.g`; the actor loader hands it to
access_audit when an event is staged.
"""

from __future__ import annotations

from flask import Flask, g

from access_audit.flask import AccessAudit
from access_audit.sinks import JsonLinesSink

from .models import db

__all__ = ["audit", "init_audit"]

audit = AccessAudit()


@audit.actor_loader
def current_actor() -> tuple[str, str | None] | None:
    """The ``(id, email)`` of the request's user, or None (the actor is "system")."""
    actor: tuple[str, str | None] | None = g.get("actor")
    return actor


def init_audit(app: Flask) -> None:
    """Initialise :data:`audit` on *app*, with a JSON-lines sink if configured.

    ``ACCESS_APP_AUDIT_LOG`` is the path of the JSON-lines file every committed
    event is appended to (None: no file; ignored when ``ACCESS_AUDIT_ENABLED``
    is False). The ``ACCESS_AUDIT_*`` keys are read by
    :meth:`AccessAudit.init_app`.
    """
    audit.init_app(app, db)
    path = app.config.setdefault("ACCESS_APP_AUDIT_LOG", None)
    if path is not None and app.config["ACCESS_AUDIT_ENABLED"]:
        # ACCESS_AUDIT_PLUGINS takes import strings of ready objects; a sink
        # that needs a path from the config is registered here instead.
        AccessAudit.emitter_of(app).register(
            JsonLinesSink(path), name="access_app.jsonl"
        )
