"""Engines for every database the suite runs on, and an attached emitter.

Every test that takes ``engine`` (or ``emitter``/``Session``) runs on SQLite,
PostgreSQL and MariaDB. A server that cannot be reached skips its tests,
except under ``CI=true``, where it fails them: CI must prove all three.
Override the URLs with ``ACCESS_AUDIT_TEST_POSTGRESQL_URL`` and
``ACCESS_AUDIT_TEST_MARIADB_URL``.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool
from support import Base, Recorder, reach, sqlite_engine

from access_audit import AuditEmitter
from access_audit.outbox import Outbox

pytest_plugins = ["pytester"]

SERVER_URLS = {
    "postgresql": os.environ.get(
        "ACCESS_AUDIT_TEST_POSTGRESQL_URL",
        "postgresql+psycopg://root@127.0.0.1:5432/test",
    ),
    "mariadb": os.environ.get(
        "ACCESS_AUDIT_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
    ),
}
DATABASES = ["sqlite", *SERVER_URLS]

# Each run works in a namespace of its own (a PostgreSQL schema, a MariaDB
# database), so runs on one machine at the same time cannot trip over each
# other's tables; it is dropped at the end of the run.
RUN_NAMESPACE = f"audit_run_{os.getpid()}_{uuid.uuid4().hex[:8]}"

_server_engines: dict[str, Engine] = {}


def _execute_once(name: str, statement: str) -> None:
    admin = create_engine(SERVER_URLS[name], poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(text(statement))
            connection.commit()
    finally:
        admin.dispose()


def _connected_engine(name: str) -> Engine:
    if name == "postgresql":
        _execute_once(name, f"CREATE SCHEMA {RUN_NAMESPACE}")
        url = make_url(SERVER_URLS[name]).update_query_dict(
            {"options": f"-csearch_path={RUN_NAMESPACE}"}
        )
    else:
        _execute_once(name, f"CREATE DATABASE {RUN_NAMESPACE}")
        url = make_url(SERVER_URLS[name]).set(database=RUN_NAMESPACE)
    # The URL alone names the run's namespace, so code given only the URL
    # (a Flask app's SQLALCHEMY_DATABASE_URI) lands in it too.
    engine = create_engine(url, pool_pre_ping=True)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    _server_engines[name] = engine
    return engine


def server_engine(name: str) -> Engine:
    """One engine per server for the whole run; skip/fail if it is down."""
    return reach(name, functools.partial(_connected_engine, name))


@pytest.fixture(scope="session", autouse=True)
def _drop_run_namespaces() -> Iterator[None]:
    yield
    for name, engine in _server_engines.items():
        engine.dispose()
        drop = "SCHEMA {} CASCADE" if name == "postgresql" else "DATABASE {}"
        _execute_once(name, "DROP " + drop.format(RUN_NAMESPACE))


@pytest.fixture(params=DATABASES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine with the test tables freshly created, on each database."""
    if request.param == "sqlite":
        engine = sqlite_engine(tmp_path / "test.db")
    else:
        engine = server_engine(request.param)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    if request.param == "sqlite":
        engine.dispose()


@pytest.fixture
def sqlite_file_engine(tmp_path: Path) -> Iterator[Engine]:
    """A file SQLite engine with the test tables.

    A module whose behaviour does not depend on the database runs on SQLite
    only by overriding ``engine`` with this one.
    """
    engine = sqlite_engine(tmp_path / "test.db")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def emitter(recorder: Recorder) -> AuditEmitter:
    """An emitter with the recording plugin, no entry-point plugins."""
    return AuditEmitter([recorder], load_entrypoints=False)


@pytest.fixture
def Session(engine: Engine, emitter: AuditEmitter) -> Iterator[sessionmaker]:
    """A sessionmaker on ``engine`` with ``emitter`` attached."""
    maker = sessionmaker(engine)
    emitter.attach(maker)
    yield maker
    emitter.detach(maker)


@pytest.fixture
def outbox(engine: Engine) -> Iterator[Outbox]:
    """The outbox table, created fresh on ``engine`` and dropped afterwards."""
    table = Outbox()
    table.drop(engine)
    table.create(engine)
    yield table
    table.drop(engine)


@pytest.fixture
def emitters() -> Iterator[list[AuditEmitter]]:
    """Emitters made by a test; closed afterwards so no worker outlives it."""
    made: list[AuditEmitter] = []
    yield made
    for emitter in made:
        emitter.close(timeout=30)
