"""access_app: a small access-management service that audits with access_audit.

Users, groups with members and owners, roles granted to groups, apps, tags,
access requests and role requests, behind a JSON API. Every operation stages
its audit event; events reach the plugins (here a JSON-lines file) only when
the request's transaction commits. :func:`create_app` builds the app.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask
from sqlalchemy import Engine, event

from .api import bp
from .audit import audit, init_audit
from .models import db

__all__ = ["audit", "create_app", "db"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Create the app, its tables (if missing) and its audit set-up.

    *config* updates the defaults: ``SQLALCHEMY_DATABASE_URI`` (an SQLite
    file in the instance folder), ``ACCESS_APP_AUDIT_LOG`` (path of a JSON-lines
    file for the committed events; None for none) and the ``ACCESS_AUDIT_*``
    keys of :class:`access_audit.flask.AccessAudit`.
    """
    app = Flask(__name__)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI="sqlite:///access_app.db",
        ACCESS_APP_AUDIT_LOG=None,
    )
    if config is not None:
        app.config.update(config)
    db.init_app(app)
    init_audit(app)
    app.register_blueprint(bp)
    with app.app_context():
        if db.engine.url.get_backend_name() == "sqlite":
            _fix_pysqlite_savepoints(db.engine)
        db.create_all()
    return app


def _fix_pysqlite_savepoints(engine: Engine) -> None:
    """Apply SQLAlchemy's documented pysqlite recipe, so SAVEPOINTs work.

    pysqlite's own transaction handling breaks SAVEPOINT (approving a role
    request uses one): turn it off and emit BEGIN ourselves. Listeners cannot
    be passed through ``SQLALCHEMY_ENGINE_OPTIONS``, so they go on the engine
    Flask-SQLAlchemy made, before its first connection. Foreign keys are
    switched on as on other databases.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")
