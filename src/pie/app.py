"""The FastAPI application factory."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie import db, idempotency
from pie.auth import TokenVerifier
from pie.config import Settings, get_settings
from pie.httpserver import HeaderCountGuard
from pie.errors import (
    ERROR_ENVELOPE_SCHEMA,
    envelope,
    error_response_doc,
    install_error_handlers,
    internal_error_response,
)

log = logging.getLogger("pie")


class RequestIdMiddleware:
    """Gives every request an id (``X-Request-ID``, kept if the caller sent a sane one) and turns
    an unhandled exception into the 500 envelope — logged once, with the request id, the
    traceback in the log and never in the body."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if incoming and len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error in request %s %s %s", request_id, scope.get("method"), scope.get("path")
            )
            if response_started:  # too late for an error body; let the server drop the connection
                raise
            await internal_error_response(request_id)(scope, receive, send_with_id)


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


def _include_routers(app: FastAPI) -> None:
    from pie.assignments.routes import router as assignments_router
    from pie.clients.routes import router as clients_router
    from pie.dispatch.routes import router as dispatch_router
    from pie.health.routes import router as health_router
    from pie.jobs.routes import router as jobs_router
    from pie.registry.routes import router as registry_router
    from pie.tenancy.routes import router as tenancy_router

    for router in (
        health_router,
        clients_router,
        tenancy_router,
        assignments_router,
        registry_router,
        jobs_router,
        dispatch_router,
    ):
        app.include_router(router)


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document tells the truth about errors: request validation is a 400 envelope
    (not FastAPI's 422 body), and authenticated operations can answer 401 and 403."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
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
        owns_engine = False
        try:
            db.get_engine()
        except RuntimeError:
            from pie.embedded import resolve_database_url

            db.init_engine(database_url or resolve_database_url(settings))
            owns_engine = True
        dispatcher = None
        try:
            if settings.run_dispatcher:
                from pie.dispatch.dispatcher import Dispatcher

                dispatcher = Dispatcher(settings=settings, name="api")
                await dispatcher.start()
            yield
        finally:
            if dispatcher is not None:
                await dispatcher.stop()
            if owns_engine:
                await db.dispose_engine()

    app = FastAPI(
        title="PIE v2",
        version="2.0.0",
        description="Model-serving control plane: tenants, domains, services, assignments, "
        "the model registry and durable jobs.",
        openapi_url="/v2/openapi.json",
        docs_url="/v2/docs",
        swagger_ui_oauth2_redirect_url="/v2/docs/oauth2-redirect",
        redoc_url=None,
        # `/v2/clients/` is an unknown route (404 envelope), not a redirect to another host/path
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.verifier = TokenVerifier(settings)
    install_error_handlers(app)
    idempotency.install(app)
    # the last added middleware is the outermost: CORS wraps everything, 500s included
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(HeaderCountGuard, max_headers=settings.http_max_headers)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Next-Cursor", "X-Request-ID"],
        )
    _include_routers(app)
    from pie.routing import routes_without_pie_route

    if stray := routes_without_pie_route(app.routes):  # the bounded JSON parser and the response hooks
        raise RuntimeError(f"routes without route_class=PieRoute: {stray}")
    _install_openapi(app)
    return app
