"""AUTOCOMMIT isolation: each statement commits on its own, so staging is refused.

A rollback there keeps the change and would drop its event: an audit trail
that silently misses committed changes is worse than none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session
from support import Item, Recorder, operation, stored_names

from access_audit import AuditConfigurationError, AuditEmitter, staged_events
from access_audit.testing import capture_audit_events


def _engine_option(engine: Engine) -> tuple[Any, Callable[[], None]]:
    return engine.execution_options(isolation_level="AUTOCOMMIT"), lambda: None


def _connection_option(engine: Engine) -> tuple[Any, Callable[[], None]]:
    connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    return connection, connection.close


def _create_engine_argument(engine: Engine) -> tuple[Any, Callable[[], None]]:
    url = engine.url.render_as_string(hide_password=False)
    autocommit = create_engine(url, isolation_level="AUTOCOMMIT")
    return autocommit, autocommit.dispose


BINDS = [_engine_option, _connection_option, _create_engine_argument]
BIND_IDS = ["engine.execution_options", "connection", "create_engine"]


@pytest.mark.parametrize("make_bind", BINDS, ids=BIND_IDS)
def test_staging_on_an_autocommit_bind_is_refused(
    engine: Engine,
    emitter: AuditEmitter,
    recorder: Recorder,
    make_bind: Callable[[Engine], tuple[Any, Callable[[], None]]],
) -> None:
    """stage_event raises AuditConfigurationError naming AUTOCOMMIT; nothing is parked."""
    bind, cleanup = make_bind(engine)
    try:
        with Session(bind) as session:
            emitter.attach(session)
            with pytest.raises(AuditConfigurationError, match="AUTOCOMMIT"):
                operation(session, "refused")
            assert staged_events(session) == ()
            session.commit()
    finally:
        cleanup()
    assert recorder.events == []


def test_staging_after_connecting_is_refused(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A session that already holds an AUTOCOMMIT connection refuses staging too."""
    session = Session(engine.execution_options(isolation_level="AUTOCOMMIT"))
    emitter.attach(session)
    session.connection()
    with pytest.raises(AuditConfigurationError, match="AUTOCOMMIT"):
        operation(session, "refused")
    session.close()
    assert recorder.events == []


def test_autocommit_connection_found_when_connecting_fails_the_flush(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """A per-mapper AUTOCOMMIT bind is checked as the flush connects: it raises."""
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    session = Session(binds={Item: autocommit})
    emitter.attach(session)
    with capture_audit_events() as audit_events:
        operation(session, "late")  # no session-wide bind to check yet
        with pytest.raises(AuditConfigurationError, match="AUTOCOMMIT"):
            session.flush()
        # The connection stays the session's: nothing staged may ride on it.
        assert staged_events(session) == ()
        assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
            ("late", "refused")
        ]
        with pytest.raises(AuditConfigurationError, match="AUTOCOMMIT"):
            operation(session, "retry")
    session.close()
    assert recorder.events == []
    assert stored_names(engine) == []


def test_transactional_isolation_levels_are_accepted(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An explicit transactional isolation level stages and emits as usual."""
    level = "SERIALIZABLE"
    with Session(engine.execution_options(isolation_level=level)) as session:
        emitter.attach(session)
        operation(session, "accepted")
        session.commit()
    assert recorder.names == ["accepted"]


def test_autocommit_connection_asked_for_before_staging_is_refused(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """session.connection(execution_options=AUTOCOMMIT), then staging: refused."""
    with Session(engine) as session:
        emitter.attach(session)
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        with pytest.raises(AuditConfigurationError, match="AUTOCOMMIT"):
            operation(session, "refused")
    assert recorder.events == []


def test_autocommit_set_by_an_engine_connect_listener_is_refused_on_connecting(
    engine: Engine, emitter: AuditEmitter, recorder: Recorder
) -> None:
    """An ``engine_connect`` listener puts each connection of the engine in
    AUTOCOMMIT, where the engine's own options do not say so: staging before
    the session's first statement is checked as the session connects, which
    raises before any statement runs, and nothing staged stays."""
    from sqlalchemy import event

    def autocommit(connection: Any) -> None:
        connection.execution_options(isolation_level="AUTOCOMMIT")

    event.listen(engine, "engine_connect", autocommit)
    try:
        with capture_audit_events() as audit_events, Session(engine) as session:
            emitter.attach(session)
            operation(session, "refused")  # no connection yet
            with pytest.raises(AuditConfigurationError, match="AUTOCOMMIT"):
                session.flush()
            assert staged_events(session) == ()
            assert [(d.event.target_id, d.reason) for d in audit_events.discarded] == [
                ("refused", "refused")
            ]
            session.rollback()
    finally:
        event.remove(engine, "engine_connect", autocommit)
    assert recorder.events == []
    assert stored_names(engine) == []
