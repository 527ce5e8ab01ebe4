"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from pie import db, idempotency, metrics, schemagate
from pie.auth import make_verifier
from pie.config import Settings, get_settings
from pie.docs import install_docs
from pie.errors import (
    ERROR_ENVELOPE_SCHEMA,
    error_response_doc,
)
from pie.http.errors import install_error_handlers
from pie.http.limits import HeaderCountGuard
from pie.http.middleware import BodyLimitMiddleware, HeadAsGetMiddleware, RequestIdMiddleware, WorkerPidMiddleware
from pie.http.query_params import reject_unknown_query_params
from pie.openapi_names import name_inline_schemas


def _chain_shutdown_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` on the event loop as soon as SIGTERM/SIGINT arrives, then the handler
    the server installed (uvicorn: stop accepting, drain connections, lifespan shutdown).
    Returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if not callable(handler):
            continue

        def chained(signum: int, frame: Any, handler: Any = handler) -> None:
            loop.call_soon_threadsafe(callback)
            handler(signum, frame)

        previous[sig] = handler
        signal.signal(sig, chained)

    def restore() -> None:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)

    return restore


def _include_routers(app: FastAPI) -> None:
    from pie.assignments.routes import router as assignments_router
    from pie.audit.routes import router as audit_router
    from pie.audit.routing import check_routes
    from pie.clients.routes import router as clients_router
    from pie.console.routes import STATIC_DIR
    from pie.console.routes import router as console_router
    from pie.dispatch.routes import router as dispatch_router
    from pie.health.routes import router as health_router
    from pie.jobs.routes import router as jobs_router
    from pie.lifecycle.routes import router as lifecycle_router
    from pie.registry.routes import router as registry_router
    from pie.tenancy.routes import router as tenancy_router
    from pie.webhooks.routes import platform_router as platform_webhooks_router
    from pie.webhooks.routes import tenant_router as tenant_webhooks_router

    # the console's stylesheet and vendored script (served locally: no CDN, no build step);
    # mounted before the console's routes, whose catch-all answers unknown pages
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    # the console router (its own prefix, out of the OpenAPI document) comes last: API requests
    # do not walk its routes first
    for router in (
        health_router,
        clients_router,
        tenancy_router,
        assignments_router,
        registry_router,
        jobs_router,
        lifecycle_router,
        dispatch_router,
        audit_router,
        tenant_webhooks_router,
        platform_webhooks_router,
        console_router,
    ):
        app.include_router(router)
    check_routes(app)


def hot_reads() -> dict[str, Any]:
    """Operation id -> hot reader, as each capability declares them (``*/hot.py``)."""
    from pie.assignments.hot import HOT_READS as assignment_reads
    from pie.health.hot import HOT_READS as health_reads
    from pie.jobs.hot import HOT_READS as job_reads
    from pie.tenancy.hot import HOT_READS as tenancy_reads

    return {**health_reads, **job_reads, **assignment_reads, **tenancy_reads}


def hot_writes() -> dict[str, Any]:
    """Operation id -> hot writer (``*/hot.py``)."""
    from pie.registry.hot import HOT_WRITES

    return dict(HOT_WRITES)


def _install_fast_layer(app: FastAPI, settings: Settings) -> None:
    """The fast layer (``pie.http.fast``), innermost: its tables built from the app's routes and
    the hot handlers each capability declares (an operation id the app has no route for
    refuses to start)."""
    if settings.otel_enabled:  # traces name FastAPI's routes
        return
    from pie.http.fast import FastReadMiddleware, FastWriteMiddleware, route_table

    if settings.fast_writes:
        app.add_middleware(FastWriteMiddleware, table=route_table(app, hot_writes(), "POST"))
    if settings.fast_reads:
        app.add_middleware(FastReadMiddleware, table=route_table(app, hot_reads(), "GET"))


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document tells the truth about errors: request validation is a 400 envelope
    (not FastAPI's 422 body), and authenticated operations can answer 401 and 403."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorEnvelope"] = ERROR_ENVELOPE_SCHEMA
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                    del responses["422"]
                    responses.setdefault("400", error_response_doc("Invalid request (JSON, types, fields, path ids)"))
                if operation.get("security"):
                    responses.setdefault("401", error_response_doc("Missing or invalid bearer token"))
                    responses.setdefault("403", error_response_doc("Missing permission or tenant access"))
                if "requestBody" in operation:
                    responses.setdefault("413", error_response_doc("Request body larger than PIE_MAX_REQUEST_BYTES"))
                if any(p.get("name") == idempotency.HEADER for p in operation.get("parameters", [])):
                    responses.setdefault("422", error_response_doc("Invalid request"))
                    responses["422"]["description"] += "; or the Idempotency-Key was used with a different request"
        # named enums and unions: generated clients get one type per concept (README: Typed clients)
        name_inline_schemas(schema)
        if "HTTPValidationError" not in json.dumps(schema.get("paths", {})):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, *, database_url: str | None = None) -> FastAPI:
    """Build the app. ``database_url`` (or PIE_DATABASE_URL, or the embedded database) is
    connected at start-up unless an engine was already initialised (tests)."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from pie.jobs.waiting import listener
        from pie.webhooks.delivery import start_delivery

        owns_engine = False
        try:
            db.get_engine()
        except RuntimeError:
            from pie.embedded import resolve_database_url

            db.init_engine(database_url or resolve_database_url(settings), settings)
            owns_engine = True
            metrics.instrument_pool(db.get_engine())
        listener.reset()
        metrics.WORKER_UP.set(1)
        dispatcher = None
        webhooks = None
        stopping: asyncio.Task[None] | None = None
        # before the first request: is the schema migrated (else 503s until it is)?
        schema_watch = await schemagate.gate.start(db.get_engine())

        def on_shutdown_signal() -> None:
            """SIGTERM/SIGINT, before the server drains its connections: long-polls answer at
            once, the dispatcher stops claiming and gives its in-process jobs the grace period."""
            nonlocal stopping
            listener.shutdown()
            if dispatcher is not None and stopping is None:
                stopping = asyncio.ensure_future(dispatcher.stop(grace=settings.shutdown_grace_seconds))

        restore = _chain_shutdown_signals(on_shutdown_signal)
        try:
            if settings.run_dispatcher:
                from pie.dispatch.dispatcher import Dispatcher

                dispatcher = Dispatcher(settings=settings, name="api")
                await dispatcher.start()
                webhooks = await start_delivery(settings, "api")  # the webhook delivery loop beside it
            _freeze_startup_objects()
            yield
        finally:
            restore()
            if schema_watch is not None:
                schema_watch.cancel()
            schemagate.gate.reset()
            await listener.close()
            if webhooks is not None:
                await webhooks.stop(grace=min(settings.shutdown_grace_seconds, 5.0))
            if dispatcher is not None:
                if stopping is None:
                    stopping = asyncio.ensure_future(dispatcher.stop(grace=settings.shutdown_grace_seconds))
                await stopping
            if owns_engine:
                await db.dispose_engine()
            metrics.process_exited()

    app = FastAPI(
        title="PIE v2",
        version="2.0.0",
        description="Model-serving control plane: tenants, domains, services, assignments, "
        "the model registry and durable jobs.",
        openapi_url="/v2/openapi.json",
        # served by pie.docs from local assets (no CDN): /v2/docs, /v2/redoc and the landing page /
        docs_url=None,
        redoc_url=None,
        # `/v2/clients/` is an unknown route (404 envelope), not a redirect to another host/path
        redirect_slashes=False,
        lifespan=lifespan,
        # unknown query parameters are a 400 on every route (spec 14.3)
        dependencies=[Depends(reject_unknown_query_params)],
    )
    app.state.settings = settings
    app.state.verifier = make_verifier(settings)  # verified-token cache (README: Performance)
    install_error_handlers(app)
    idempotency.install(app)
    _include_routers(app)
    # the last added middleware is the outermost: CORS wraps everything, 500s included
    _install_fast_layer(app, settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(HeaderCountGuard, max_headers=settings.http_max_headers)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(
        RequestIdMiddleware,
        metrics_enabled=settings.metrics_enabled,
        access_log=settings.access_log,
        on_request_id=_tracing_hook(settings),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Next-Cursor", "X-Request-ID"],
        )
    if settings.expose_worker_pid:
        app.add_middleware(WorkerPidMiddleware)
    from pie.http.routing import routes_without_pie_route

    if stray := routes_without_pie_route(app.routes):  # the bounded JSON parser and the response hooks
        raise RuntimeError(f"routes without route_class=PieRoute: {stray}")
    install_docs(app)  # static pages (docs, landing page): no bodies, no transactions
    _install_openapi(app)
    if settings.otel_enabled:
        from pie import tracing

        tracing.instrument(app)
    return app


def _freeze_startup_objects() -> None:
    """Move everything allocated while starting (modules, the app and its routes, pydantic
    schemas: hundreds of thousands of objects that live as long as the process) out of the
    garbage collector's reach, so its full collections stop re-scanning them every few hundred
    requests (pauses that showed as the p99 of every route)."""
    gc.collect()
    gc.freeze()


def _tracing_hook(settings: Settings) -> Callable[[str], None] | None:
    if not settings.otel_enabled:
        return None
    from pie import tracing

    return tracing.annotate
