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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie import db
from pie.auth import TokenVerifier
from pie.config import Settings, get_settings
from pie.errors import install_error_handlers, internal_error_response

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


ERROR_ENVELOPE_SCHEMA = {
    "title": "ErrorEnvelope",
    "type": "object",
    "required": ["success", "message"],
    "properties": {
        "success": {"type": "boolean", "const": False},
        "message": {"type": "string", "description": "human-readable, never parsed by callers"},
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
    }


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
                    responses.setdefault("400", _error_response("Invalid request (JSON, types, fields, path ids)"))
                if operation.get("security"):
                    responses.setdefault("401", _error_response("Missing or invalid bearer token"))
                    responses.setdefault("403", _error_response("Missing permission or tenant access"))
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
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.verifier = TokenVerifier(settings)
    install_error_handlers(app)
    # the last added middleware is the outermost: CORS wraps everything, 500s included
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
    _install_openapi(app)
    return app
