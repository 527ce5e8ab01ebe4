"""Domain exceptions carry their HTTP status; one set of handlers renders the envelope."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pie.schemagate import NOT_MIGRATED, gate, is_schema_error

log = logging.getLogger("pie.errors")


class PieError(Exception):
    status_code = 500
    default_message = "internal server error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        self.message = message or self.default_message
        self.headers = headers
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"success": False, "message": self.message}


class BadRequest(PieError):
    status_code = 400
    default_message = "bad request"


class Unauthorized(PieError):
    status_code = 401
    default_message = "not authenticated"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(PieError):
    status_code = 403
    default_message = "forbidden"


class NotFound(PieError):
    status_code = 404
    default_message = "not found"


class Conflict(PieError):
    status_code = 409
    default_message = "conflict"


class Unprocessable(PieError):
    status_code = 422
    default_message = "unprocessable request"


class ServiceUnavailable(PieError):
    status_code = 503
    default_message = "service unavailable"


class AssignmentBlocked(Unprocessable):
    """422 with the documented ``{error, blocking_services}`` body instead of the envelope."""

    def __init__(self, message: str, blocking_services: list[dict[str, Any]]):
        super().__init__(message)
        self.blocking_services = blocking_services

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "blocking_services": self.blocking_services}


ERROR_ENVELOPE_SCHEMA = {
    "title": "ErrorEnvelope",
    "type": "object",
    "required": ["success", "message"],
    "properties": {
        "success": {"type": "boolean", "const": False},
        "message": {"type": "string", "description": "human-readable, never parsed by callers"},
    },
}


def error_response_doc(description: str) -> dict[str, Any]:
    """OpenAPI response object of an error answered with the envelope (the app's OpenAPI
    document defines ``#/components/schemas/ErrorEnvelope``)."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
    }


def error_responses(**descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route's documented errors, by status: ``error_responses(e404="...")``.
    400 (request validation), 401/403 (authenticated routes) and 413 (bodies) are added app-wide."""
    return {int(key.lstrip("e")): error_response_doc(text) for key, text in descriptions.items()}


def envelope(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status_code, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> str:
    parts: list[str] = []
    # unknown fields first: a misspelt field also makes the field it meant "missing"
    errors = sorted(exc.errors(), key=lambda err: err.get("type") != "extra_forbidden")
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) if loc else "body"
        if err.get("type") == "json_invalid":
            from pie.jsonbody import REFUSAL_PREFIXES

            detail = str((err.get("ctx") or {}).get("error", ""))
            parts.append(detail if detail.startswith(REFUSAL_PREFIXES) else "malformed JSON body")
            continue
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
            continue
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


# SQLSTATEs of integrity violations the logic should have caught first (the safety net)
_INTEGRITY_STATUS = {
    "23505": (409, "conflict: the record already exists"),  # unique_violation
    "23P01": (409, "conflict: the change overlaps an existing record"),  # exclusion_violation
    "23503": (409, "conflict: a referenced record does not exist or is still referenced"),  # foreign_key
    "23514": (422, "the change violates a data rule"),  # check_violation
    "23502": (422, "a required value is missing"),  # not_null_violation
}
# transaction conflicts: safe for the caller to retry
_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization, deadlock
# a database timeout (PIE_DB_STATEMENT_TIMEOUT_MS / PIE_DB_LOCK_TIMEOUT_MS): the 503 envelope
_TIMEOUT_SQLSTATES = {
    "57014": "database timeout: the statement took longer than the configured limit; try again later",  # query_canceled
    "55P03": "database timeout: a lock was not granted within the configured limit; try again later",  # lock_not_available
}


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def _constraint(exc: BaseException) -> str | None:
    diag = getattr(getattr(exc, "orig", None), "diag", None)
    return getattr(diag, "constraint_name", None)


def database_error_response(exc: BaseException) -> JSONResponse | None:
    """The envelope for a database error that is not a server bug, or None."""
    from sqlalchemy import exc as sa_exc

    state = _sqlstate(exc)
    if isinstance(exc, sa_exc.IntegrityError):
        status, message = _INTEGRITY_STATUS.get(state or "", (409, "conflict with the stored data"))
        constraint = _constraint(exc)
        return envelope(status, f"{message} ({constraint})" if constraint else message)
    if isinstance(exc, sa_exc.DBAPIError) and state in _RETRYABLE_SQLSTATES:
        return envelope(409, "conflict with a concurrent change; retry the request")
    if isinstance(exc, sa_exc.DBAPIError) and state in _TIMEOUT_SQLSTATES:
        return envelope(503, _TIMEOUT_SQLSTATES[state], {"Retry-After": "1"})
    if isinstance(exc, sa_exc.DBAPIError) and is_schema_error(exc):  # a table or column is missing
        return envelope(503, gate.problem or f"{NOT_MIGRATED}: run `pie migrate`", {"Retry-After": "5"})
    if isinstance(exc, (sa_exc.TimeoutError, sa_exc.InterfaceError)) or (
        isinstance(exc, sa_exc.OperationalError)
        and (state is None or state.startswith("08") or state.startswith("57P"))
    ):
        return envelope(503, "database unavailable; try again later", {"Retry-After": "1"})
    return None


def internal_error_response(request_id: str) -> JSONResponse:
    return envelope(500, f"internal server error (request id {request_id})")


_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}


def _allowed_methods(request: Request) -> str | None:
    """Every method the documented routes accept on this path (Starlette reports only the first
    matching route's), from the OpenAPI paths; None when the path is not documented."""
    from starlette.routing import compile_path

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
    from sqlalchemy.exc import SQLAlchemyError

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
            from pie.deps import authenticate

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
