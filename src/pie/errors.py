"""Domain exceptions carry their HTTP status; the one envelope they render as (the handlers that
render it: ``pie.http.errors``)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from pie.schemagate import NOT_MIGRATED, gate, is_schema_error


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
