"""Building the ASGI application that `kilde serve` runs."""

from __future__ import annotations

import gc
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kilde.web.privacy_api as privacy_api
from kilde import __version__
from kilde.collect import segment_api
from kilde.collect import website as website_routes
from kilde.collect.forms import admin as form_admin
from kilde.collect.forms import routes as form_routes
from kilde.collect.importers import api as import_routes
from kilde.config import Settings
from kilde.pipeline import Pipeline
from kilde.plan import Plan, load_plan
from kilde.plan.models import Source
from kilde.store import Store, Writer
from kilde.web import activate_api, admin_api, email_api, insights_api, profiles_api
from kilde.web.admin_token import TokenCheck
from kilde.web.dashboard import routes as dashboard
from kilde.web.errors import HttpProblem, JsonResponse, problem_response

log = logging.getLogger("kilde.http")


@dataclass
class WriteKeys:
    active: dict[str, Source] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, plan: Plan) -> WriteKeys:
        keys = cls()
        for source in plan.sources:
            for key in source.write_keys:
                keys.active[key] = source
            keys.revoked.update(source.revoked_write_keys)
        return keys


class CorsForCollection:
    """Browsers may post events from any site; the admin API stays same-origin."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=["*"],
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            max_age=86400,
        )
        # The server-set cookie needs credentialed requests: the origin is echoed, never '*'.
        # Its cookie is SameSite=Lax, so only the website's own (sub)domains get it.
        self.cors_credentials = CORSMiddleware(
            app,
            allow_origin_regex=r"https?://.+",
            allow_methods=["POST", "OPTIONS"],
            allow_headers=["*"],
            allow_credentials=True,
            max_age=86400,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path in website_routes.CREDENTIALED_PATHS:
            await self.cors_credentials(scope, receive, send)
        elif path.startswith("/v1/") or path in website_routes.CROSS_ORIGIN_PATHS:
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(settings: Settings, *, extra_admin_token: str | None = None) -> FastAPI:
    plan = load_plan(settings.plan_path)
    store = Store(settings.data_dir)
    writer = Writer(store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settle_garbage_collector()
        return_arrow_memory()
        yield
        writer.close()
        store.close()

    app = FastAPI(
        title="Kilde",
        version=__version__,
        lifespan=lifespan,
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.writer = writer
    app.state.pipeline = Pipeline(plan, writer)
    app.state.keys = WriteKeys.of(plan)
    app.state.tokens = TokenCheck(settings.data_dir, extra_admin_token)

    def use_plan(new_plan: Plan) -> None:
        app.state.pipeline.use_plan(new_plan)
        app.state.keys = WriteKeys.of(new_plan)

    app.state.use_plan = use_plan

    app.include_router(website_routes.router)  # before segment_api, see its docstring
    app.include_router(import_routes.router)  # before segment_api: /v1/social-login
    app.include_router(segment_api.router)
    app.include_router(form_routes.router)
    app.include_router(form_admin.router)
    app.include_router(email_api.router)
    app.include_router(admin_api.public)
    app.include_router(admin_api.router)
    app.include_router(profiles_api.router)
    app.include_router(insights_api.router)  # after profiles_api: its engine uses identity
    app.include_router(activate_api.router)
    app.include_router(privacy_api.router)
    app.include_router(dashboard.router)  # last: the dashboard's pages at /
    _install_error_handlers(app)
    app.add_middleware(AccessLog)
    app.add_middleware(CorsForCollection)
    return app


def create_collector_app(settings: Settings, lake_dir: Path) -> FastAPI:
    """`kilde serve --collector-only`: the collection routes only, appending to a lake.

    Stateless: events and dead letters go to new files in the lake (kilde.store.lake); the
    process keeps only a private scratch store for its privacy screen, seeded from the lake's
    state and removed on exit. No admin API, no dashboard; /api/health answers the balancer.
    """
    from kilde.store.lake import Lake, LakeWriter, collector_store

    plan = load_plan(settings.plan_path)
    lake = Lake(lake_dir)
    store = collector_store(lake)
    writer = LakeWriter(lake, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settle_garbage_collector()
        return_arrow_memory()
        yield
        writer.close()
        store.close()
        shutil.rmtree(store.path.parent, ignore_errors=True)

    app = FastAPI(title="Kilde collector", version=__version__, lifespan=lifespan, docs_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.writer = writer
    app.state.pipeline = Pipeline(plan, writer)
    app.state.keys = WriteKeys.of(plan)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "mode": "collector", "files_written": writer.files_written}

    app.include_router(website_routes.router)  # before segment_api, see its docstring
    app.include_router(segment_api.router)
    _install_error_handlers(app)
    app.add_middleware(AccessLog)
    app.add_middleware(CorsForCollection)
    return app


# Every event makes a few dozen short-lived dicts and lists. With Python's default threshold
# (700) the collector ran every couple of hundred events and, now and then, walked the whole
# heap that start-up built (about 140,000 objects, a few hundred ms each time): measured in
# bench/, garbage collection took about as much time as parsing, checking and enriching put
# together. Frozen start-up objects are never walked again, and young collections at 10,000
# cut the collector's share about eightfold.
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Collect once, freeze what start-up built, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def return_arrow_memory() -> None:
    """Let Arrow allocate through the C library's malloc instead of its own mimalloc pool.

    mimalloc keeps what an import's chunks used (tens of MB of columns per request) for reuse;
    malloc hands big buffers back to the system when they are freed. A 2,000,000-row import
    peaked about 40 MB lower this way, at the same speed (bench/import.py), and batched
    collection ran within the noise of the shared test machine (bench/ingest.py).
    """
    pa.set_memory_pool(pa.system_memory_pool())


class AccessLog:
    """One log line per request: method, path, status, time.

    The route's template (`/v1/{kind}`), never the path itself, the query string or the body:
    any of them may carry personal data or a token.
    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`app.middleware("http")`) costs
    a task group and memory streams per request, a quarter of the time of a small request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            log.info(
                "%s %s %d %.1fms",
                scope["method"],
                getattr(route, "path", None) or "(no route)",
                status,
                (time.perf_counter() - started) * 1000,
            )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HttpProblem)
    async def _problem(_: Request, exc: HttpProblem) -> Response:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        # Describe the field and the rule, never the value that was sent.
        details = [
            {"path": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        first = details[0] if details else {"path": "", "message": "invalid request"}
        return problem_response(
            HttpProblem(
                400,
                "invalid_request",
                f"{first['path']}: {first['message']}",
                "correct the named parameter; see /api/docs for the expected shape",
                path=first["path"],
                extra={"details": details},
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: "there is nothing at this address", 405: "this method is not allowed here"}
        return JsonResponse(
            {
                "success": False,
                "error": f"http_{exc.status_code}",
                "message": messages.get(exc.status_code, str(exc.detail)),
                "fix": "see /api/docs for the available endpoints",
            },
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        # The exception text may quote input, so only its type reaches the log.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return JsonResponse(
            {
                "success": False,
                "error": "internal_error",
                "message": "Kilde failed to handle this request",
                "fix": "retry; if it persists, report it with the time of the request",
            },
            status_code=500,
        )
