"""Each SQLAlchemy internal that ``access_audit._sqla`` reads, checked by name.

An SQLAlchemy release that renames or reshapes one fails here, loudly,
instead of silently changing which events are delivered.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.engine import NestedTransaction, RootTransaction
from sqlalchemy.orm import Session

from access_audit._sqla import (
    checked_engine_options,
    connection_entry,
    encloses_foreign_savepoint,
    ends_outer_transaction,
    has_connections,
    inherits_options,
    is_autocommit,
    nested_transactions,
    session_connections,
    transaction_connections,
)


def test_nested_transactions_are_the_sessions_own_savepoints(engine: Engine) -> None:
    """``SessionTransaction._connections`` of each open level names its SAVEPOINT."""
    with engine.connect() as connection:
        connection.begin()
        foreign = connection.begin_nested()
        with Session(bind=connection, join_transaction_mode="create_savepoint") as s:
            s.connection()
            [joined] = nested_transactions(s, connection)
            assert joined is connection.get_nested_transaction()
            assert joined is not foreign
            s.begin_nested()
            s.connection()
            assert len(nested_transactions(s, connection)) == 2
        connection.rollback()


def test_session_transaction_connections_hold_connection_transaction_commits(
    engine: Engine,
) -> None:
    """``SessionTransaction._connections`` maps a connection to (conn, trans, commits, autoclose)."""
    with Session(engine) as session:
        session.begin()
        root = session.get_transaction()
        assert root is not None
        assert not has_connections(root)
        connection = session.connection()
        assert has_connections(root)
        entry = root._connections[connection]
        assert entry[0] is connection
        assert isinstance(entry[1], RootTransaction)
        assert entry[2] is True and entry[3] is True
        assert list(session_connections(root)) == [(connection, entry[1], True)]
        assert set(transaction_connections(root)) == {connection}
        assert connection_entry(root, connection) == (entry[1], True)


def test_joined_modes_are_told_apart(engine: Engine) -> None:
    """rollback_only does not commit; create_savepoint runs in a NestedTransaction."""
    with engine.connect() as connection:
        connection.begin()
        for mode, nested, commits in [
            ("rollback_only", False, False),
            ("create_savepoint", True, True),
            ("control_fully", False, True),
        ]:
            with Session(bind=connection, join_transaction_mode=mode) as session:  # type: ignore[arg-type]
                session.connection()
                root = session.get_transaction()
                assert root is not None
                [(_, transaction, found_commits)] = session_connections(root)
                assert isinstance(transaction, NestedTransaction) is nested
                assert found_commits is commits
                assert ends_outer_transaction(transaction, commits) is (
                    mode == "control_fully"
                )
                assert not encloses_foreign_savepoint(transaction, mode)
        connection.rollback()


def test_nested_transaction_knows_the_savepoint_enclosing_it(engine: Engine) -> None:
    """``NestedTransaction._previous_nested`` names the SAVEPOINT around it."""
    with engine.connect() as connection:
        connection.begin()
        outer = connection.begin_nested()
        inner = connection.begin_nested()
        assert inner._previous_nested is outer
        assert outer._previous_nested is None
        assert encloses_foreign_savepoint(inner, "create_savepoint")
        assert not encloses_foreign_savepoint(outer, "create_savepoint")
        assert encloses_foreign_savepoint(outer, "rollback_only")
        connection.rollback()


def test_autocommit_is_read_from_options_and_the_dialect(engine: Engine) -> None:
    """``Connection._is_autocommit_isolation`` and ``dialect._on_connect_isolation_level``."""
    assert not is_autocommit(engine)
    assert engine._execution_options.get("isolation_level") is None
    autocommit_options = engine.execution_options(isolation_level="AUTOCOMMIT")
    assert autocommit_options._execution_options["isolation_level"] == "AUTOCOMMIT"
    assert is_autocommit(autocommit_options)
    with engine.connect() as connection:
        assert not connection._is_autocommit_isolation()
        assert not is_autocommit(connection)
        connection.execution_options(isolation_level="AUTOCOMMIT")
        assert is_autocommit(connection)
    url = engine.url.render_as_string(hide_password=False)
    autocommit = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        assert autocommit.dialect._on_connect_isolation_level == "AUTOCOMMIT"
        assert is_autocommit(autocommit)
    finally:
        autocommit.dispose()


def test_a_connection_shares_its_engines_options_until_it_sets_its_own(
    engine: Engine,
) -> None:
    """``Connection._execution_options`` is the engine's object until replaced."""
    options = checked_engine_options(engine)
    assert options is engine._execution_options
    with engine.connect() as connection:
        assert inherits_options(connection, engine, options)
        connection.execution_options(isolation_level="AUTOCOMMIT")
        assert not inherits_options(connection, engine, options)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    assert checked_engine_options(autocommit) is None
    other = create_engine(engine.url.render_as_string(hide_password=False))
    try:
        with other.connect() as connection:
            # Engines without options share one empty options object.
            assert connection._execution_options is options
            assert not inherits_options(connection, engine, options)
    finally:
        other.dispose()


def test_in_greenlet_tells_sqlalchemys_greenlet_apart() -> None:
    """``in_greenlet`` is true inside ``greenlet_spawn`` only (await_only works there)."""
    import asyncio

    from sqlalchemy.util import greenlet_spawn

    from access_audit._sqla import await_only, in_greenlet

    async def main() -> tuple[bool, bool, int]:
        def inside() -> tuple[bool, int]:
            return in_greenlet(), await_only(asyncio.sleep(0, result=7))

        seen, value = await greenlet_spawn(inside)
        return in_greenlet(), seen, value

    assert asyncio.run(main()) == (False, True, 7)


def test_mapper_binds_are_the_binds_a_session_was_given(engine: Engine) -> None:
    """``mapper_binds`` reads ``Session(binds=...)`` (``binds`` from 2.1, private before)."""
    from support import Item

    from access_audit._sqla import mapper_binds

    with Session(engine) as plain:
        assert not mapper_binds(plain)
    with Session(binds={Item: engine}) as bound:
        assert Item in mapper_binds(bound)


def test_bind_of_is_how_the_session_holds_its_connection(engine: Engine) -> None:
    """``bind_of`` reads ``SessionTransaction._connections``: the engine a
    session took its connection from, or the connection it was given."""
    from access_audit._sqla import bind_of

    with Session(engine) as session:
        taken = session.connection()
        root = session.get_transaction()
        assert root is not None
        assert bind_of(root, engine) is engine
        assert bind_of(root, taken) is engine
    with engine.connect() as connection, Session(bind=connection) as joined:
        joined.connection()
        root = joined.get_transaction()
        assert root is not None
        assert bind_of(root, connection) is connection
        assert bind_of(root, engine) is connection
    with Session(engine) as idle:
        idle.begin()
        root = idle.get_transaction()
        assert root is not None
        assert bind_of(root, engine) is None


def test_flushed_mappers_are_those_of_objects_a_flush_really_wrote(
    engine: Engine,
) -> None:
    """``flushed_mappers`` reads ``UOWTransaction.states`` in ``after_flush``:
    an insert, an update and a delete count; an attribute set to the value
    it had does not."""
    from sqlalchemy import event
    from support import Item

    from access_audit._sqla import flushed_mappers

    seen: list[set[Any]] = []
    with Session(engine) as session:
        event.listen(
            session,
            "after_flush",
            lambda session, context: seen.append(flushed_mappers(session, context)),
        )
        item = Item(name="shim")
        session.add(item)
        session.flush()
        item.name = "shim"
        session.flush()
        item.name = "renamed"
        session.flush()
        session.delete(item)
        session.flush()
        session.rollback()
    mapper = inspect(Item)
    assert seen == [{mapper}, set(), {mapper}, {mapper}]
