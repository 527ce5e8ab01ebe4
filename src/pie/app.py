"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie import db, idempotency, metrics, schemagate
from pie.auth import make_verifier
from pie.config import Settings, get_settings
from pie.docs import install_docs
from pie.errors import (
    ERROR_ENVELOPE_SCHEMA,
    envelope,
    error_response_doc,
    install_error_handlers,
    internal_error_response,
)
from pie.httpserver import HeaderCountGuard
from pie.logconfig import request_id_var
from pie.openapi_names import name_inline_schemas
from pie.query_params import reject_unknown_query_params

log = logging.getLogger("pie")
access_log = logging.getLogger("pie.access")


class RequestIdMiddleware:
    """Per request: an id (``X-Request-ID``, kept if the caller sent a sane one, else generated)
    set on the logging context and echoed on the response; one access line (logger
    ``pie.access``: method, route template, status, duration, the caller's sub/tenant) and the
    request metrics; an unhandled exception becomes the 500 envelope — logged once, with the
    traceback in the log and never in the body. Pure ASGI, one layer for all of it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics_enabled: bool = True,
        access_log: bool = True,
        on_request_id: Callable[[str], None] | None = None,
    ):
        self.app = app
        self.metrics_enabled = metrics_enabled
        self.access_log = access_log
        self.on_request_id = on_request_id  # the tracing hook, when on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = b""
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                incoming = value
                break
        request_id = incoming.decode("latin-1") if incoming else ""
        if not (request_id and len(request_id) <= 128 and request_id.isprintable()):
            request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        if self.on_request_id is not None:
            self.on_request_id(request_id)
        header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started, status
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message.setdefault("headers", []).append(header)
            await send(message)

        try:
            if schemagate.gate.problem is not None and schemagate.gate.refuses(scope["path"]):
                # `pie serve --no-migrate` on a database that is not migrated (checked at start)
                await envelope(503, schemagate.gate.problem, {"Retry-After": "5"})(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s %s %s", request_id, scope.get("method"), scope.get("path"))
            if response_started:  # too late for an error body; let the server drop the connection
                raise
            await internal_error_response(request_id)(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - started)
            request_id_var.reset(token)

    _static: frozenset[str] | None = None

    def _static_paths(self, scope: Scope) -> frozenset[str]:
        if self._static is None:
            routes = getattr(scope.get("app"), "routes", ())
            self._static = frozenset(r.path for r in routes if "{" not in getattr(r, "path", "{"))
        return self._static

    def _record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        route_path = getattr(scope.get("route"), "path", None)
        if route_path is None and status != 404:
            # plain Starlette routes (docs, OpenAPI) do not name themselves in the scope; their
            # paths have no parameters, so the path is the template
            route_path = scope.get("path") if scope.get("path") in self._static_paths(scope) else None
        route_path = metrics.route_label(route_path)
        method = metrics.method_label(scope.get("method", ""))
        if self.metrics_enabled:
            metrics.observe_request(route_path, method, status, seconds)
        if self.access_log and access_log.isEnabledFor(logging.INFO):
            principal = state.get("principal")
            sub = getattr(principal, "subject", None)
            tenants = sorted(getattr(principal, "tenants", ()) or ())
            tenant = "*" if getattr(principal, "is_admin", False) else (",".join(tenants) or None)
            duration_ms = round(seconds * 1000, 2)
            access_log.info(
                "%s %s %s %.2fms sub=%s tenant=%s",
                method,
                route_path,
                status,
                duration_ms,
                sub or "-",
                tenant or "-",
                extra={
                    "method": method,
                    "route": route_path,
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": duration_ms,
                    "sub": sub,
                    "tenant": tenant,
                },
            )


class HeadAsGetMiddleware:
    """``HEAD`` on any ``GET`` route: the ``GET`` answer's status and headers without its body
    (RFC 9110; the ``Allow`` header of a 405 lists HEAD wherever GET is allowed)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with the 413 envelope: at once when the
    declared ``Content-Length`` is larger, else as soon as the bytes read exceed it (chunked
    uploads), so an oversized body is never held in memory or parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return f"request body too large (the limit is {self.max_bytes} bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and value.strip().isdigit() and int(value) > self.max_bytes:
                await envelope(413, self.message())(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading; the handler renders it
                    raise StarletteHTTPException(413, self.message())
            return message

        await self.app(scope, limited_receive, send)


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


class WorkerPidMiddleware:
    """``X-PIE-Worker-PID``: the process that answered (PIE_EXPOSE_WORKER_PID, for debugging
    ``pie serve --workers N``)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-pie-worker-pid", self.pid))
            await send(message)

        await self.app(scope, receive, send_with_pid)


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
    from pie.routing import routes_without_pie_route

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
