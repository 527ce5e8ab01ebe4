"""Domain exceptions carry their HTTP status; one set of handlers renders the envelope."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def envelope(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=status_code, headers=headers)


def _describe_validation_error(exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) if loc else "body"
        if err.get("type") == "json_invalid":
            parts.append("malformed JSON body")
            continue
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PieError)
    async def _pie_error(request: Request, exc: PieError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request %s failed: %s", getattr(request.state, "request_id", "-"), exc.message)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(400, _describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "not found", 405: "method not allowed"}
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else messages.get(exc.status_code, "error")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return envelope(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        log.exception("unhandled error in request %s %s %s", request_id, request.method, request.url.path)
        return envelope(500, f"internal server error (request id {request_id})")
