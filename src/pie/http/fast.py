"""The fast layer (docs/architecture.md: Fast paths): the success case of the hottest requests
answered by two pure ASGI layers, without FastAPI's routing and dependency solving.

The table is built from the app: each capability declares its hot handlers beside its routes
(``pie.jobs.hot``, ``pie.assignments.hot``, ``pie.tenancy.hot``, ``pie.health.hot``,
``pie.registry.hot``), keyed by operation id; :func:`route_table` takes each operation's path
template and the patterns of its path parameters from the app's own route and refuses to start
(``RuntimeError``) when an operation id names no route of the app, or a route of another
method.

Reads (:class:`FastReadMiddleware`): a plain ``GET`` with no query string and a bearer token
(no token for a ``public`` read); the token is verified by the app's verifier (as
``pie.deps``), the reader applies the route's rules (``pie.policies``) and reads the row with
the route's own Core read; its answer is serialized once by the route's response model.

Writes (:class:`FastWriteMiddleware`): a plain ``POST`` (no query string, no
``Idempotency-Key``) with a JSON body and a bearer token; the body is read once, and the hot
writer either answers or hands the request, with its body replayed, to the route.

Anything but the success case -- no or a bad token, a callback token, a missing permission or
tenant, a row that does not exist, a query string, a database error while reading -- is
handed untouched to the regular FastAPI route, which renders it exactly as before. The request
id, metrics and the access line come from ``RequestIdMiddleware`` around these layers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie import callbacks
from pie.auth import Principal
from pie.deps import bearer_principal
from pie.errors import PieError, database_error_response, internal_error_response
from pie.http.headers import IDEMPOTENCY_KEY
from pie.http.routing import flat_routes
from pie.reads import json_bytes


@dataclass(frozen=True)
class RouteLabel:
    """What ``scope["route"]`` names for metrics and the access log: the route template."""

    path: str
    operation_id: str


# -- the table --------------------------------------------------------------------------------

ReadAnswer = tuple[type[BaseModel], Any] | Response | None
Reader = Callable[[Principal | None, Mapping[str, str]], Awaitable[ReadAnswer]]


@dataclass(frozen=True)
class HotRead:
    """A hot GET: ``read`` answers the success case (a response model and its row, or a whole
    response) or None (the route answers). ``public``: the route has no authentication."""

    read: Reader
    public: bool = False


H = TypeVar("H")


@dataclass(frozen=True)
class FastRoute(Generic[H]):
    label: RouteLabel
    regex: re.Pattern[str]
    hot: H


def _segment(pattern: str) -> str:
    return "(?:" + pattern.removeprefix("^").removesuffix("$") + ")"


def compile_template(template: str, patterns: Mapping[str, str]) -> re.Pattern[str]:
    """The path regex of ``template``: each ``{name}`` matches ``patterns[name]`` (the route's
    own validation pattern), or one path segment when the route declares none."""
    regex = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        regex += re.escape(literal)
        if name:
            regex += f"(?P<{name}>{_segment(patterns[name]) if name in patterns else '[^/]+'})"
    return re.compile(regex)


def path_patterns(route: APIRoute) -> dict[str, str]:
    """The ``pattern`` of each path parameter the route (or one of its dependencies) declares."""
    patterns: dict[str, str] = {}

    def walk(dependant: Dependant) -> None:
        for param in dependant.path_params:
            for meta in param.field_info.metadata:
                pattern = getattr(meta, "pattern", None)
                if isinstance(pattern, str):
                    patterns[param.name] = pattern
        for sub in dependant.dependencies:
            walk(sub)

    walk(route.dependant)
    return patterns


def route_table(app: FastAPI, hot: Mapping[str, H], method: str) -> tuple[FastRoute[H], ...]:
    """The fast routes of ``hot`` (operation id -> handler), from the app's own routes: their
    templates and parameter patterns. ``RuntimeError`` when an operation id is not a ``method``
    route of the app (the layer must not answer for a route that changed or went away)."""
    routes = {
        route.operation_id: route
        for route in flat_routes(app.routes)
        if isinstance(route, APIRoute) and route.operation_id
    }
    missing = sorted(op for op in hot if op not in routes or method not in (routes[op].methods or ()))
    if missing:
        raise RuntimeError(
            f"the fast layer has hot {method} handlers for operation ids the app has no {method} route for: "
            + ", ".join(missing)
        )
    table = []
    for operation_id, handler in hot.items():
        route = routes[operation_id]
        regex = compile_template(route.path, path_patterns(route))
        table.append(FastRoute(RouteLabel(route.path, operation_id), regex, handler))
    return tuple(table)


def match(table: tuple[FastRoute[H], ...], path: str) -> tuple[FastRoute[H], dict[str, str]] | None:
    for fast in table:
        found = fast.regex.fullmatch(path)
        if found is not None:
            return fast, found.groupdict()
    return None


# -- shared pieces ----------------------------------------------------------------------------


def bearer_token(scope: Scope) -> str | None:
    """The bearer token of the request (None: none, or another scheme -- the route's 401)."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            return token
    return None


async def caller(scope: Scope) -> Principal | None:
    """The verified caller of a bearer token, as ``pie.deps.current_principal`` finds it; None
    whenever the route must decide: no token, a callback token (the route refuses it, or
    verifies it), an invalid token or a database error while resolving a machine tenant."""
    token = bearer_token(scope)
    if token is None or callbacks.is_callback_token(token):
        return None
    try:
        return await bearer_principal(scope["app"].state, token)
    except (PieError, sa_exc.SQLAlchemyError):
        return None


Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, further headers


def answer_of(response: Response) -> Answer:
    """A rendered JSON response as the layers send it (they write the length and type)."""
    headers = [(k, v) for k, v in response.raw_headers if k not in (b"content-length", b"content-type")]
    return response.status_code, bytes(response.body), headers


def rendered(error: PieError) -> Answer:
    """``error`` as the app's handler renders it (``pie.errors``)."""
    return answer_of(JSONResponse(error.body(), status_code=error.status_code, headers=error.headers))


def database_error_answer(exc: sa_exc.StatementError, scope: Scope, log: Any) -> Answer:
    """A database error as the route's error handler answers it: its envelope (503 for an
    unavailable database or a timeout, 409 for a conflict), else the logged 500."""
    request_id = (scope.get("state") or {}).get("request_id", "-")
    response = database_error_response(exc)
    if response is None:
        log.error(
            "database error in request %s %s %s", request_id, scope.get("method"), scope.get("path"), exc_info=exc
        )
        response = internal_error_response(request_id)
    else:
        log.warning("request %s %s %s: %s", request_id, scope.get("method"), scope.get("path"), exc.__class__.__name__)
    return answer_of(response)


async def send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | tuple[()] = ()) -> None:
    """The one response shape of the fast layer: the JSON body with its length and type."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- reads ------------------------------------------------------------------------------------


class _FastLayer(Generic[H]):
    """What both layers share: the app behind them, their table and the gate (an HTTP request of
    the layer's ``method``, no query string, a path of the table)."""

    method: str

    def __init__(self, app: ASGIApp, table: tuple[FastRoute[H], ...]):
        self.app = app
        self.table = table

    def _match(self, scope: Scope) -> tuple[FastRoute[H], dict[str, str]] | None:
        if scope["type"] != "http" or scope["method"] != self.method or scope.get("query_string"):
            return None
        return match(self.table, scope["path"])


class FastReadMiddleware(_FastLayer[HotRead]):
    """Pure ASGI; see the module docstring. ``table``: ``route_table(app, hot_reads, "GET")``."""

    method = "GET"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        fast, params = found
        answer: ReadAnswer = None
        principal = None
        if fast.hot.public:
            answer = await fast.hot.read(None, params)
        else:
            principal = await caller(scope)
            if principal is not None:
                try:
                    answer = await fast.hot.read(principal, params)
                except (PieError, sa_exc.SQLAlchemyError):
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
        await send_json(send, 200, json_bytes(model, row))


# -- writes -----------------------------------------------------------------------------------


@dataclass
class Body:
    """The request body, held once: replayed to the route when the layer hands the request
    over, released once the writer answers every outcome itself."""

    messages: list[Message]
    data: bytes
    released: bool = False

    def release(self) -> None:
        self.messages, self.data, self.released = [], b"", True


# (scope, caller, path parameters, body) -> the answer, or None: the route answers (the body
# must not be released then)
Writer = Callable[[Scope, Principal, dict[str, str], Body], Awaitable[Answer | None]]


@dataclass(frozen=True)
class HotWrite:
    """A hot POST: ``write`` answers the success case (and any outcome once it has taken the
    request); ``permission``: what the caller must hold for the layer to try."""

    write: Writer
    permission: str


_IDEMPOTENCY_HEADER = IDEMPOTENCY_KEY.lower().encode()


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def _replaying(messages: list[Message], error: BaseException | None, receive: Receive) -> Receive:
    """A ``receive`` giving the route the messages the layer already read (then the error
    reading raised, e.g. the body limit's 413), then the server's own."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        if error is not None:
            raise error
        return await receive()

    return replay


class FastWriteMiddleware(_FastLayer[HotWrite]):
    """Pure ASGI; see the module docstring. ``table``: ``route_table(app, hot_writes, "POST")``."""

    method = "POST"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        fast, params = found
        content_type = None
        for name, value in scope.get("headers") or ():
            if name == b"content-type":
                content_type = value
            elif name == _IDEMPOTENCY_HEADER:  # pie.idempotency's rules: the route
                await self.app(scope, receive, send)
                return
        principal = await caller(scope) if _is_json(content_type) else None
        if principal is None or not principal.has(fast.hot.permission):
            await self.app(scope, receive, send)
            return

        messages: list[Message] = []
        chunks: list[bytes] = []
        complete = False
        try:
            while not complete:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break  # the client went away: the route sees the disconnect
                chunks.append(message.get("body", b""))
                complete = not message.get("more_body", False)
        except Exception as exc:  # the body limit's 413 and the like: raised again for the route
            await self.app(scope, _replaying(messages, exc, receive), send)
            return
        if not complete:
            await self.app(scope, _replaying(messages, None, receive), send)
            return
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(messages) > 1:  # one copy of the body from here on: the chunks are released
            messages = [{"type": "http.request", "body": body, "more_body": False}]
        held = Body(messages, body)
        del body, chunks, messages  # ``held`` alone keeps the body (see Body.release)

        scope.setdefault("state", {})["principal"] = principal  # the access line names the caller
        answer = await fast.hot.write(scope, principal, params, held)
        if answer is None:
            assert not held.released
            await self.app(scope, _replaying(held.messages, None, receive), send)
            return
        scope["route"] = fast.label
        await send_json(send, *answer)
