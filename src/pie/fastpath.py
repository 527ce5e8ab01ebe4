"""Fast reads (README: Performance): the success case of the hottest GETs answered by one pure
ASGI layer, without FastAPI's routing and dependency solving.

``GET /v2/health`` (no token): the route's own function, without the routing around it.

``GET /v2/jobs/{job_id}``, ``GET /v2/clients/{c}/domains/{d}/assignments/{key}`` and
``GET /v2/clients/{c}/domains/{d}/service/{id}`` are matched here when the request is a plain
``GET`` with no query string and a bearer token: the token is verified by the app's verifier
(the verified-token cache, machine tenants resolved as in ``pie.deps``), the permission and
tenant rules of the route are applied from the principal, the row is read with one Core
statement outside any transaction and serialized once by the route's response model.

Anything but that success case — no or a bad token, a callback token, a missing permission or
tenant, a row that does not exist, a query string, a database error — is handed untouched to
the regular FastAPI route, which renders it exactly as before (so every error, every envelope
and the OpenAPI document stay those of the route). The request id, metrics and the access line
come from ``RequestIdMiddleware`` around this layer as for any request.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pie import callbacks
from pie.assignments.logic import read_active_domain_revision
from pie.assignments.schemas import AssignmentOut
from pie.auth import Principal
from pie.deps import bearer_principal
from pie.errors import PieError
from pie.health.routes import health
from pie.jobs.logic import read_job
from pie.jobs.schemas import JobOut
from pie.reads import json_bytes
from pie.schemas import ID_PATTERN, KEY_PATTERN
from pie.tenancy.logic import read_service
from pie.tenancy.schemas import ServiceOut


@dataclass(frozen=True)
class RouteLabel:
    """What ``scope["route"]`` names for metrics and the access log: the route template."""

    path: str
    operation_id: str


Reader = Callable[[Principal | None, dict[str, str]], Awaitable[tuple[type[BaseModel], Any] | Response | None]]


@dataclass(frozen=True)
class FastRead:
    label: RouteLabel
    regex: re.Pattern[str]
    read: Reader
    public: bool = False  # no bearer token (the route has no authentication)


def _segment(pattern: str) -> str:
    return "(?:" + pattern.removeprefix("^").removesuffix("$") + ")"


def compile_template(template: str, patterns: dict[str, str]) -> re.Pattern[str]:
    regex = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        regex += re.escape(literal)
        if name:
            regex += f"(?P<{name}>{_segment(patterns[name])})"
    return re.compile(regex)


async def _job(principal: Principal | None, params: dict[str, str]) -> tuple[type[BaseModel], Any] | None:
    assert principal is not None  # an authenticated read: the layer verified the token
    if not (principal.has("read_models") or principal.has("run_inference")):
        return None
    return JobOut, await read_job(principal, params["job_id"])  # 404 / 403 raise: the route answers


async def _domain_assignment(principal: Principal | None, params: dict[str, str]) -> tuple[type[BaseModel], Any] | None:
    assert principal is not None  # an authenticated read: the layer verified the token
    if not (principal.has("read_domains") and principal.can_access(params["client_id"])):
        return None
    row = await read_active_domain_revision(params["client_id"], params["domain_id"], params["assignment_key"])
    return None if row is None else (AssignmentOut, row)


async def _service(principal: Principal | None, params: dict[str, str]) -> tuple[type[BaseModel], Any] | None:
    assert principal is not None  # an authenticated read: the layer verified the token
    if not (principal.has("read_domains") and principal.can_access(params["client_id"])):
        return None
    row = await read_service(params["client_id"], params["domain_id"], params["service_id"])
    return None if row is None else (ServiceOut, row)


async def _health(_principal: Principal | None, _params: dict[str, str]) -> Response:
    """The route's own function (``SELECT 1`` through the pool; 200, or the 503 it logs)."""
    return await health()


_PATTERNS = {
    "job_id": ID_PATTERN,
    "client_id": ID_PATTERN,
    "domain_id": ID_PATTERN,
    "service_id": ID_PATTERN,
    "assignment_key": KEY_PATTERN,
}
_ROUTES = [
    ("/v2/jobs/{job_id}", "getjob", _job),
    (
        "/v2/clients/{client_id}/domains/{domain_id}/assignments/{assignment_key}",
        "getdomainmodelassignment",
        _domain_assignment,
    ),
    ("/v2/clients/{client_id}/domains/{domain_id}/service/{service_id}", "getdomainservice", _service),
]
FAST_READS = (
    FastRead(RouteLabel("/v2/health", "health"), re.compile(re.escape("/v2/health")), _health, public=True),
    *(
        FastRead(RouteLabel(template, operation_id), compile_template(template, _PATTERNS), read)
        for template, operation_id, read in _ROUTES
    ),
)


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            return token
    return None


class FastReadMiddleware:
    """Pure ASGI; see the module docstring. ``reads`` defaults to health and the three hot GETs."""

    def __init__(self, app: ASGIApp, reads: tuple[FastRead, ...] = FAST_READS):
        self.app = app
        self.reads = reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        for fast in self.reads:
            match = fast.regex.fullmatch(path)
            if match is not None:
                break
        else:
            await self.app(scope, receive, send)
            return
        token = None if fast.public else bearer_token(scope)
        answer = principal = None
        if fast.public:
            answer = await fast.read(None, {})
        elif token is not None:
            try:
                principal = await bearer_principal(scope["app"].state, token)
                # a callback token (its claims name the callback issuer) is for the route to refuse
                if principal.claims.get("iss") != callbacks.ISSUER:
                    answer = await fast.read(principal, match.groupdict())
            except (PieError, SQLAlchemyError):
                answer = None  # the route itself answers (and renders the error)
        if answer is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = fast.label
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
        if isinstance(answer, Response):
            await answer(scope, receive, send)
            return
        model, row = answer
        body = json_bytes(model, row)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
