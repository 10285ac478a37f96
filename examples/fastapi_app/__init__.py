"""fastapi_app: the access-management example on FastAPI and ``AsyncSession``.

Users, groups with members and owners, roles and role requests, behind a
JSON API, on aiosqlite by default or PostgreSQL through asyncpg. Every
operation stages its audit event; ``async def`` plugins receive the events
only when the request's transaction commits. :func:`create_app` builds the
app; ``python -m fastapi_app.demo`` walks through it.
"""

from __future__ import annotations

from .app import create_app as create_app
from .app import get_session as get_session
from .plugins import ConsolePrinter as ConsolePrinter

__all__ = ["ConsolePrinter", "create_app", "get_session"]
