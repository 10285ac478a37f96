"""Fixtures for the FastAPI example's tests: the rollback-per-test recipe of
``docs/testing.md`` ("FastAPI and AsyncSession"), on aiosqlite.

One app (and its aiosqlite file) serves the whole session, its lifespan
entered; each test gets a ``client`` whose requests run on a session joined
to the test's own outer transaction, rolled back at the end. Everything runs
on the session's event loop: an engine's connections belong to one loop.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

EXAMPLES = Path(__file__).resolve().parents[2]
# The example app is a package in examples/, not an installed distribution.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from fastapi_app import ConsolePrinter, create_app, get_session  # noqa: E402


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FastAPI]:
    """The app on an aiosqlite file, its tables created by its lifespan."""
    path = tmp_path_factory.mktemp("fastapi_app") / "app.db"
    app = create_app(
        f"sqlite+aiosqlite:///{path}", plugins=[ConsolePrinter(quiet=True)]
    )
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(loop_scope="session")
async def client(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests' sessions join this test's outer transaction.

    Each endpoint's ``commit()`` releases a SAVEPOINT; the emitter delivers on
    it (``joined_transactions="session"``), as it would on a real commit.
    """
    monkeypatch.setattr(app.state.emitter, "joined_transactions", "session")
    async with app.state.engine.connect() as connection:
        transaction = await connection.begin()

        async def joined_session() -> AsyncIterator[AsyncSession]:
            async with app.state.sessions(
                bind=connection, join_transaction_mode="create_savepoint"
            ) as session:
                yield session

        app.dependency_overrides[get_session] = joined_session
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test"
            ) as client:
                yield client
        finally:
            app.dependency_overrides.clear()
            await transaction.rollback()
