"""access_audit.fastapi: the middleware, ``audit_actor`` and ``audit_lifespan``.

Apps run on an AsyncSession over aiosqlite and are called through httpx's
``ASGITransport`` inside :func:`asyncio.run` (no pytest-asyncio), as in
tests/test_async.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp
from support import Base, Item, Recorder, aiosqlite_engine
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from access_audit import (
    Actor,
    AuditEmitter,
    AuditEventEnvelope,
    audit_context,
    hookimpl,
    stage_event,
)
from access_audit.fastapi import AccessAuditMiddleware, audit_actor, audit_lifespan

REQUEST_KEYS = {"ip_address", "user_agent", "request_id", "method", "path", "endpoint"}
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
MODES = ["ambient", "emitter"]
"""The middleware without ``emitter=`` (ambient metadata), and with it."""


class Audited:
    """An emitter with a recording plugin, attached to an aiosqlite sessionmaker."""

    def __init__(self, path: Path, **emitter_options: Any) -> None:
        self.engine = aiosqlite_engine(path / "fastapi.db")
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.recorder = Recorder()
        self.emitter = AuditEmitter(
            [self.recorder], load_entrypoints=False, **emitter_options
        )
        self.emitter.attach(self.sessions)

    async def session(self) -> AsyncIterator[AsyncSession]:
        """The request's session (a FastAPI dependency)."""
        async with self.sessions() as session:
            yield session

    def by_type(self, event_type: str) -> list[AuditEventEnvelope]:
        return [e for e in self.recorder.events if e.event_type == event_type]


@contextlib.asynccontextmanager
async def audited(tmp_path: Path, **emitter_options: Any) -> AsyncIterator[Audited]:
    """An :class:`Audited` with its tables, its engine disposed on this loop."""
    audit = Audited(tmp_path, **emitter_options)
    async with audit.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    try:
        yield audit
    finally:
        await audit.engine.dispose()


def build_app(
    audit: Audited,
    mode: str = "ambient",
    dependencies: list[Any] | None = None,
    **app_options: Any,
) -> FastAPI:
    """An app with ``POST /groups/{group_id}``: a dependency resolved after the
    app's own stages ``dependency_seen``, the endpoint stages ``group_create``
    and commits an Item."""
    app = FastAPI(dependencies=dependencies or [], **app_options)

    def staged_in_dependency(
        session: AsyncSession = Depends(audit.session),
    ) -> None:
        # A plain def: FastAPI runs it on a worker thread; staging does no I/O.
        stage_event(
            session, "dependency_seen", target_type="dep", target_id="d", action="see"
        )

    @app.post("/groups/{group_id}", dependencies=[Depends(staged_in_dependency)])
    async def create_group(
        group_id: str, session: AsyncSession = Depends(audit.session)
    ) -> dict[str, str]:
        session.add(Item(name=group_id))
        stage_event(
            session, "group_create", target_type="group", target_id=group_id,
            action="create",
        )  # fmt: skip
        await session.commit()
        return {"group": group_id}

    if mode == "emitter":
        app.add_middleware(AccessAuditMiddleware, emitter=audit.emitter)
    else:
        app.add_middleware(AccessAuditMiddleware)
    return app


def client(app: ASGIApp, ip: str = "203.0.113.5", **options: Any) -> httpx.AsyncClient:
    """An httpx client calling *app* as a server would, from *ip*."""
    transport = httpx.ASGITransport(app=app, client=(ip, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://test", **options)


async def post(
    app: ASGIApp, path: str, ip: str = "203.0.113.5", **options: Any
) -> httpx.Response:
    async with client(app, ip) as http:
        response = await http.post(path, **options)
    assert response.status_code == 200, response.text
    return response


async def stage_outside(audit: Audited, name: str) -> None:
    async with audit.sessions.begin() as session:
        session.add(Item(name=name))
        stage_event(session, "outside", target_type="job", target_id=name, action="run")


# -- request metadata ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_events_carry_every_request_key(tmp_path: Path, mode: str) -> None:
    """Events staged in the endpoint and in a dependency carry all six keys."""

    async def main() -> list[AuditEventEnvelope]:
        async with audited(tmp_path) as audit:
            app = build_app(audit, mode)
            await post(
                app,
                "/groups/g-1",
                headers={"User-Agent": "probe/1.0", "X-Request-ID": "req-1"},
            )
            return audit.recorder.events

    events = asyncio.run(main())
    assert [e.event_type for e in events] == ["dependency_seen", "group_create"]
    for envelope in events:
        assert dict(envelope.metadata) == {
            "ip_address": "203.0.113.5",
            "user_agent": "probe/1.0",
            "request_id": "req-1",
            "method": "POST",
            "path": "/groups/g-1",
            "endpoint": "/groups/{group_id}",
        }


@pytest.mark.parametrize("mode", MODES)
def test_events_outside_a_request_have_no_request_keys(
    tmp_path: Path, mode: str
) -> None:
    """An event committed outside any request, after one ran, has none of the keys."""

    async def main() -> list[AuditEventEnvelope]:
        async with audited(tmp_path) as audit:
            app = build_app(audit, mode)
            await post(app, "/groups/g-1")
            await stage_outside(audit, "job-1")
            return audit.by_type("outside")

    [envelope] = asyncio.run(main())
    assert not REQUEST_KEYS & set(envelope.metadata)


def test_endpoint_is_the_template_of_a_route_under_a_prefix(tmp_path: Path) -> None:
    """A route of a router included with a prefix gives its full path template."""

    async def main() -> AuditEventEnvelope:
        async with audited(tmp_path) as audit:
            router = APIRouter()

            @router.put("/{item_id}/members/{member_id}")
            async def add_member(
                item_id: str,
                member_id: str,
                session: AsyncSession = Depends(audit.session),
            ) -> None:
                stage_event(
                    session, "member_add", target_type="item", target_id=item_id,
                    action="add",
                )  # fmt: skip
                await session.commit()

            app = FastAPI()
            app.include_router(router, prefix="/items")
            app.add_middleware(AccessAuditMiddleware)
            async with client(app) as http:
                assert (await http.put("/items/7/members/9")).status_code == 200
            [envelope] = audit.recorder.events
            return envelope

    envelope = asyncio.run(main())
    assert envelope.metadata["endpoint"] == "/items/{item_id}/members/{member_id}"
    assert envelope.metadata["path"] == "/items/7/members/9"


@pytest.mark.parametrize("mode", MODES)
def test_call_metadata_wins_over_request_keys(tmp_path: Path, mode: str) -> None:
    """``metadata=`` on stage_event overrides a request key of the same name."""

    async def main() -> AuditEventEnvelope:
        async with audited(tmp_path) as audit:
            app = FastAPI()

            @app.post("/x")
            async def endpoint(session: AsyncSession = Depends(audit.session)) -> None:
                stage_event(
                    session, "x", target_type="x", target_id="x", action="x",
                    metadata={"path": "/rewritten"},
                )  # fmt: skip
                await session.commit()

            options = {"emitter": audit.emitter} if mode == "emitter" else {}
            app.add_middleware(AccessAuditMiddleware, **options)
            await post(app, "/x")
            [envelope] = audit.recorder.events
            return envelope

    envelope = asyncio.run(main())
    assert envelope.metadata["path"] == "/rewritten"
    assert envelope.metadata["method"] == "POST"


def test_emitter_option_keeps_the_keys_to_that_emitter(tmp_path: Path) -> None:
    """With ``emitter=``, only its events get request keys, under its own
    metadata_provider's values; another emitter's events get none."""

    async def main() -> tuple[AuditEventEnvelope, AuditEventEnvelope]:
        async with audited(
            tmp_path, metadata_provider=lambda: {"method": "PROVIDED", "tenant": "t1"}
        ) as audit:
            other = Recorder()
            other_emitter = AuditEmitter([other], load_entrypoints=False)
            other_sessions = async_sessionmaker(audit.engine)
            other_emitter.attach(other_sessions)
            app = FastAPI()

            @app.post("/both")
            async def both(session: AsyncSession = Depends(audit.session)) -> None:
                stage_event(session, "mine", target_type="x", target_id="1", action="x")
                await session.commit()
                async with other_sessions.begin() as other_session:
                    stage_event(
                        other_session, "theirs", target_type="x", target_id="2",
                        action="x",
                    )  # fmt: skip

            app.add_middleware(AccessAuditMiddleware, emitter=audit.emitter)
            await post(app, "/both")
            return audit.recorder.events[0], other.events[0]

    mine, theirs = asyncio.run(main())
    assert mine.metadata["method"] == "PROVIDED"
    assert mine.metadata["tenant"] == "t1"
    assert mine.metadata["endpoint"] == "/both"
    assert not REQUEST_KEYS & set(theirs.metadata)


# -- request ids --------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    ["r" * 128, "A-z_0.9:x", "7f0c1d2e-0a1b-4c3d-8e9f-0a1b2c3d4e5f"],
    ids=["128-chars", "every-allowed-kind", "uuid"],
)
def test_a_sane_request_id_is_kept_and_echoed(tmp_path: Path, sent: str) -> None:
    """A sent X-Request-ID of allowed characters, up to 128, is the events' and
    the response's."""

    async def main() -> tuple[httpx.Response, list[AuditEventEnvelope]]:
        async with audited(tmp_path) as audit:
            response = await post(
                build_app(audit), "/groups/g", headers={"X-Request-ID": sent}
            )
            return response, audit.recorder.events

    response, events = asyncio.run(main())
    assert response.headers["X-Request-ID"] == sent
    assert {e.metadata["request_id"] for e in events} == {sent}


@pytest.mark.parametrize(
    "sent",
    ["r" * 129, "has space", "semi;colon", "slash/", "caf\xe9", ""],
    ids=["129-chars", "space", "semicolon", "slash", "latin-1", "empty"],
)
def test_an_unusable_request_id_is_replaced(tmp_path: Path, sent: str) -> None:
    """Too long, empty or with other characters: a new id is generated, shared
    by the request's events and echoed instead."""

    async def main() -> tuple[httpx.Response, list[AuditEventEnvelope]]:
        async with audited(tmp_path) as audit:
            response = await post(
                build_app(audit), "/groups/g",
                headers=[(b"X-Request-ID", sent.encode("latin-1"))],
            )  # fmt: skip
            return response, audit.recorder.events

    response, events = asyncio.run(main())
    echoed = response.headers["X-Request-ID"]
    assert echoed != sent
    assert GENERATED_ID.fullmatch(echoed)
    assert {e.metadata["request_id"] for e in events} == {echoed}


def test_each_request_without_an_id_gets_its_own(tmp_path: Path) -> None:
    """Two requests sending no X-Request-ID get two ids; an app's own
    X-Request-ID response header is replaced by the events' id."""

    async def main() -> tuple[list[str], list[str]]:
        async with audited(tmp_path) as audit:
            app = build_app(audit)

            @app.get("/own-header")
            async def own_header() -> Any:
                from fastapi.responses import JSONResponse

                return JSONResponse({}, headers={"X-Request-ID": "from-the-app"})

            echoed = [
                (await post(app, "/groups/a")).headers["X-Request-ID"],
                (await post(app, "/groups/b")).headers["X-Request-ID"],
            ]
            async with client(app) as http:
                response = await http.get("/own-header")
            echoed.append(response.headers["X-Request-ID"])
            assert response.headers.get_list("X-Request-ID") == [echoed[-1]]
            return echoed, [
                e.metadata["request_id"] for e in audit.by_type("group_create")
            ]

    echoed, recorded = asyncio.run(main())
    assert recorded == echoed[:2]
    assert len(set(echoed)) == 3
    assert "from-the-app" not in echoed


# -- the client's address -----------------------------------------------------


def test_x_forwarded_for_is_ignored(tmp_path: Path) -> None:
    """A raw X-Forwarded-For header does not change ``ip_address``."""

    async def main() -> str:
        async with audited(tmp_path) as audit:
            await post(
                build_app(audit), "/groups/g", ip="198.51.100.2",
                headers={"X-Forwarded-For": "203.0.113.9"},
            )  # fmt: skip
            ip: str = audit.recorder.events[0].metadata["ip_address"]
            return ip

    assert asyncio.run(main()) == "198.51.100.2"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [("10.0.0.1", "203.0.113.9"), ("198.51.100.2", "198.51.100.2")],
    ids=["trusted-proxy", "untrusted-peer"],
)
def test_uvicorn_proxy_headers_give_the_client_address(
    tmp_path: Path, peer: str, expected: str
) -> None:
    """Behind uvicorn's ProxyHeadersMiddleware, the forwarded client is the
    ``ip_address`` only when the peer is a trusted proxy."""

    async def main() -> str:
        async with audited(tmp_path) as audit:
            # uvicorn types ASGI apps more narrowly than Starlette does.
            app: Any = ProxyHeadersMiddleware(
                cast(Any, build_app(audit)), trusted_hosts=["10.0.0.1"]
            )
            await post(
                app, "/groups/g", ip=peer, headers={"X-Forwarded-For": "203.0.113.9"}
            )
            ip: str = audit.recorder.events[0].metadata["ip_address"]
            return ip

    assert asyncio.run(main()) == expected


# -- the actor ----------------------------------------------------------------


def sync_actor(x_user: str = Header()) -> Actor:
    return Actor(x_user, f"{x_user}@example.com")


async def async_actor(x_user: str = Header()) -> tuple[str, str]:
    await asyncio.sleep(0)
    return (x_user, f"{x_user}@example.com")


def header_user(x_user: str = Header()) -> str:
    return x_user


async def actor_using_depends(user: str = Depends(header_user)) -> Actor:
    return Actor(user, f"{user}@example.com")


@pytest.mark.parametrize(
    "dependency",
    [sync_actor, async_actor, actor_using_depends],
    ids=["sync", "async", "with-depends"],
)
def test_audit_actor_applies_to_the_rest_of_the_request(
    tmp_path: Path, dependency: Callable[..., Any]
) -> None:
    """The actor reaches the endpoint's events and those of a dependency
    resolved after it (on a worker thread), and not a later job's."""

    async def main() -> list[AuditEventEnvelope]:
        async with audited(tmp_path) as audit:
            app = build_app(audit, dependencies=[Depends(audit_actor(dependency))])
            await post(app, "/groups/g", headers={"X-User": "u-7"})
            await stage_outside(audit, "job")
            return audit.recorder.events

    events = asyncio.run(main())
    assert [(e.event_type, e.actor_id, e.actor_email) for e in events] == [
        ("dependency_seen", "u-7", "u-7@example.com"),
        ("group_create", "u-7", "u-7@example.com"),
        ("outside", "system", None),
    ]


def test_audit_actor_none_leaves_the_actor_as_it_was(tmp_path: Path) -> None:
    """A dependency returning None (no user) keeps the enclosing actor."""

    async def main() -> list[AuditEventEnvelope]:
        async with audited(tmp_path) as audit:
            app = build_app(audit, dependencies=[Depends(audit_actor(lambda: None))])
            with audit_context(actor_id="service"):
                await post(app, "/groups/g")
            return audit.recorder.events

    assert {e.actor_id for e in asyncio.run(main())} == {"service"}


def test_audit_actor_refuses_what_is_not_an_actor(tmp_path: Path) -> None:
    """A dependency returning another type fails the request, naming it."""

    def bad_actor() -> Any:
        return "u-7"

    async def main() -> None:
        async with audited(tmp_path) as audit:
            app = build_app(audit, dependencies=[Depends(audit_actor(bad_actor))])
            await post(app, "/groups/g")

    with pytest.raises(TypeError, match=r"audit_actor\(.*bad_actor\) must return"):
        asyncio.run(main())


# -- concurrency --------------------------------------------------------------


def test_concurrent_requests_never_see_each_others_metadata(tmp_path: Path) -> None:
    """Requests interleaved at an await point each keep their own id, path,
    address and actor, before and after the switch."""
    count = 8

    async def main() -> list[AuditEventEnvelope]:
        async with audited(tmp_path) as audit:
            arrived = 0
            everyone_in = asyncio.Event()
            app = FastAPI(dependencies=[Depends(audit_actor(sync_actor))])

            @app.post("/concurrent/{n}")
            async def concurrent(
                n: str, session: AsyncSession = Depends(audit.session)
            ) -> None:
                nonlocal arrived
                stage_event(session, "before", target_type="n", target_id=n, action="x")
                arrived += 1
                if arrived == count:
                    everyone_in.set()
                await everyone_in.wait()  # every request is in flight here
                stage_event(session, "after", target_type="n", target_id=n, action="x")
                await session.commit()

            app.add_middleware(AccessAuditMiddleware)

            async def one(n: int) -> None:
                await post(
                    app, f"/concurrent/{n}", ip=f"192.0.2.{n}",
                    headers={"X-Request-ID": f"req-{n}", "X-User": f"u-{n}"},
                )  # fmt: skip

            await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(count))), 10)
            return audit.recorder.events

    events = asyncio.run(main())
    assert len(events) == 2 * count
    for envelope in events:
        n = envelope.target_id
        assert envelope.metadata["request_id"] == f"req-{n}"
        assert envelope.metadata["path"] == f"/concurrent/{n}"
        assert envelope.metadata["ip_address"] == f"192.0.2.{n}"
        assert envelope.actor_id == f"u-{n}"


# -- shutdown -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[None]:
    """Start *app* and shut it down through the ASGI lifespan protocol."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[Any] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.ensure_future(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    yield
    await to_app.put({"type": "lifespan.shutdown"})
    assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
    await task


class Slow:
    """A plugin whose deliveries wait until :attr:`release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.delivered: list[str] = []

    @hookimpl
    def audit_event_logged(self, envelope: AuditEventEnvelope) -> None:
        self.release.wait(5)
        self.delivered.append(envelope.event_type)


def own_lifespan(emitter: AuditEmitter) -> Callable[[Any], Any]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with audit_lifespan(emitter):
            yield

    return lifespan


@pytest.mark.parametrize(
    "make_lifespan",
    [lambda emitter: audit_lifespan(emitter), own_lifespan],
    ids=["as-the-lifespan", "inside-an-app-lifespan"],
)
def test_shutdown_delivers_what_background_dispatch_queued(
    tmp_path: Path, make_lifespan: Callable[[AuditEmitter], Any]
) -> None:
    """Events still queued when shutdown starts are delivered before it ends."""
    slow = Slow()

    async def main() -> tuple[list[str], list[str]]:
        async with audited(tmp_path, dispatch="background") as audit:
            audit.emitter.register(slow)
            app = build_app(audit, lifespan=make_lifespan(audit.emitter))
            async with running(app):
                await post(app, "/groups/g")
                queued = list(slow.delivered)
                # Delivery can finish only now, while shutdown waits for it.
                asyncio.get_running_loop().call_later(0.05, slow.release.set)
            return queued, slow.delivered

    queued, delivered = asyncio.run(main())
    assert queued == []
    assert delivered == ["dependency_seen", "group_create"]


@pytest.mark.parametrize("dispatch", ["background", "asyncio"])
def test_an_app_started_again_in_the_same_process_goes_on_auditing(
    tmp_path: Path, dispatch: str
) -> None:
    """A module-level app and emitter with ``audit_lifespan``, run once per
    test (a test client each): each run's shutdown delivers what is queued
    and leaves the emitter open, so the next run's events are delivered."""

    async def main() -> list[str]:
        async with audited(tmp_path, dispatch=dispatch) as audit:
            app = build_app(audit, lifespan=audit_lifespan(audit.emitter))
            for group in ("first", "second"):
                async with running(app):
                    await post(app, f"/groups/{group}")
            return [e.target_id for e in audit.by_type("group_create")]

    assert asyncio.run(main()) == ["first", "second"]


def test_shutdown_past_its_timeout_logs_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A delivery outlasting ``timeout`` is logged as an error; shutdown completes."""
    slow = Slow()

    async def main() -> list[str]:
        async with audited(tmp_path, dispatch="background") as audit:
            audit.emitter.register(slow)
            app = build_app(audit, lifespan=audit_lifespan(audit.emitter, timeout=0.05))
            try:
                async with running(app):
                    await post(app, "/groups/g")
            finally:
                slow.release.set()
            return list(slow.delivered)

    with caplog.at_level(logging.ERROR, logger="access_audit"):
        delivered = asyncio.run(main())
    assert delivered == []
    assert "did not deliver what it had queued within 0.05 seconds" in caplog.text


# -- layering -----------------------------------------------------------------


def test_importing_access_audit_imports_neither_fastapi_nor_starlette() -> None:
    """``import access_audit`` leaves FastAPI and Starlette unimported."""
    code = (
        "import sys, access_audit, access_audit.testing, access_audit.outbox; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'fastapi', 'starlette'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_one_emitter_given_to_many_apps_is_wrapped_once(tmp_path: Path) -> None:
    """An app factory run per test with one shared emitter does not stack
    request-metadata providers on it."""
    audit = Audited(tmp_path)
    first = AccessAuditMiddleware(FastAPI(), emitter=audit.emitter)
    provider = audit.emitter.metadata_provider
    AccessAuditMiddleware(FastAPI(), emitter=audit.emitter)
    assert first.emitter is audit.emitter
    assert audit.emitter.metadata_provider is provider
