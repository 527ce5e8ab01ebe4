"""The app's pure-ASGI middleware (``create_app`` adds them, outermost first: request id, access
line and metrics; HEAD as GET; the body limit; the worker-pid header). The header-count guard is
in ``pie.http.limits``; the fast layer in ``pie.http.fast``."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie import metrics, schemagate
from pie.errors import envelope, internal_error_response
from pie.logconfig import request_id_var

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
