"""The app's exception handlers: each renders the one ``{success: false, message}`` envelope
(``pie.errors`` holds the exceptions and the envelope; this module is the HTTP side of them)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from pie.deps import authenticate
from pie.errors import PieError, database_error_response, envelope, internal_error_response
from pie.http.body import REFUSAL_PREFIXES

log = logging.getLogger("pie.errors")


def _describe_validation_error(exc: RequestValidationError) -> str:
    parts: list[str] = []
    # unknown fields first: a misspelt field also makes the field it meant "missing"
    errors = sorted(exc.errors(), key=lambda err: err.get("type") != "extra_forbidden")
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) if loc else "body"
        if err.get("type") == "json_invalid":
            detail = str((err.get("ctx") or {}).get("error", ""))
            parts.append(detail if detail.startswith(REFUSAL_PREFIXES) else "malformed JSON body")
            continue
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
            continue
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}


def _allowed_methods(request: Request) -> str | None:
    """Every method the documented routes accept on this path (Starlette reports only the first
    matching route's), from the OpenAPI paths; None when the path is not documented."""
    app = request.app
    table = getattr(app.state, "pie_allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            methods = {m.upper() for m in operations if m.upper() in _HTTP_METHODS}
            if "GET" in methods:
                methods.add("HEAD")
            table.append((compile_path(template)[0], methods))
        app.state.pie_allow_table = table
    allowed: set[str] = set()
    for regex, methods in table:
        if regex.match(request.url.path):
            allowed |= methods
    return ", ".join(sorted(allowed)) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PieError)
    async def _pie_error(request: Request, exc: PieError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request %s failed: %s", getattr(request.state, "request_id", "-"), exc.message)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            # FastAPI parses a JSON body before it runs any dependency: authenticate first, so a
            # missing or rejected token is a 401 whatever the body (every route with a body needs one)
            try:
                await authenticate(request)
            except PieError as auth_error:
                return JSONResponse(auth_error.body(), status_code=auth_error.status_code, headers=auth_error.headers)
        return envelope(400, _describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "not found", 405: "method not allowed"}
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else messages.get(exc.status_code, "error")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
            headers = {**(headers or {}), "Allow": _allowed_methods(request) or (headers or {}).get("Allow", "")}
        return envelope(exc.status_code, message, headers)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        response = database_error_response(exc)
        if response is None:
            log.exception("database error in request %s %s %s", request_id, request.method, request.url.path)
            return internal_error_response(request_id)
        log.warning("request %s %s %s: %s", request_id, request.method, request.url.path, exc.__class__.__name__)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # normally RequestIdMiddleware answers first; this covers errors outside it
        request_id = getattr(request.state, "request_id", "-")
        log.error("unhandled error in request %s %s %s", request_id, request.method, request.url.path, exc_info=exc)
        return internal_error_response(request_id)
