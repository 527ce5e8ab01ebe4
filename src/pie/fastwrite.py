"""Fast direct inference (README: Performance): the success case of
``POST /v2/models/{model_id}/versions/{model_version}/inference`` answered by one pure ASGI layer,
without FastAPI's routing, dependency solving and ORM unit of work.

The layer takes a request when it is a plain ``POST`` (no query string, no ``Idempotency-Key``)
with a JSON body and a bearer token holding ``run_inference``. It verifies the token with the
app's verifier (the verified-token cache, as ``pie.deps``), reads the body once through the
bounded parser, validates it with the route's own request model (strict, unknown fields
refused) and applies the route's rules with the logic's own functions
(``registry.logic.requested_tenant``, ``inference_problem``, ``jobs.logic.payload_problem``,
``audit.routing.new_entry``). On a pooled connection, in one transaction:

1. the version row (and the tenant's client row, which must be active) ``FOR SHARE`` -- the same
   locks as the route, so no status change or suspension commits between check and insert;
2. one statement: the job row, its audit row (same columns as ``pie.audit.logic.record``) and
   the dispatchers' ``pg_notify``;
3. ``COMMIT``.

Anything but that success case -- no or a bad token, a callback token, a missing permission or
tenant, ``subscribe: true``, an unknown version or client, a malformed or oversized body, a
database error while reading the version -- rolls back (nothing was written) and hands the
request, with its body replayed, to the regular FastAPI route, which answers it exactly as
before. Once the version is read, the layer answers every outcome itself (and releases the raw
body): a failed version, an input that does not match the contract or a payload over its
handler's limit get the route's 422 (the same functions make the same message); a database
error in the INSERT or the COMMIT gets the envelope the route's error handler would give (503
for an unavailable database or a timeout) and is never retried by the route -- after a failed
COMMIT the job may exist, so a second attempt could launch a second job.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import exc as sa_exc
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pie import callbacks, db, idempotency, metrics
from pie.audit.context import AuditEntry
from pie.audit.logic import row_values
from pie.audit.routing import new_entry
from pie.deps import bearer_principal
from pie.errors import PieError, Unprocessable, database_error_response, internal_error_response
from pie.fastpath import RouteLabel, bearer_token, compile_template
from pie.http.body import parse_bounded
from pie.jobs.channels import NOTIFY_CHANNEL
from pie.jobs.logic import payload_problem
from pie.jsonbody import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS
from pie.reads import announce
from pie.registry.logic import inference_problem, requested_tenant
from pie.registry.schemas import InferenceRequest
from pie.schemas import ID_PATTERN

log = logging.getLogger("pie")

ROUTE = RouteLabel("/v2/models/{model_id}/versions/{model_version}/inference", "infermodelversion")
_REGEX = compile_template(ROUTE.path, {"model_id": ID_PATTERN, "model_version": ID_PATTERN})
_IDEMPOTENCY_HEADER = idempotency.HEADER.lower().encode()

# the route's locks: the version FOR SHARE (registry.logic.get_model_version), and the tenant's
# client row FOR SHARE (registry.logic.inference_tenant)
_VERSION = (
    "SELECT status, handlers, handler_contracts FROM model_versions"
    " WHERE model_id = %(model_id)s AND version = %(version)s FOR SHARE"
)
_VERSION_AND_CLIENT = (
    "SELECT v.status, v.handlers, v.handler_contracts FROM model_versions v"
    " JOIN clients c ON c.client_id = %(client_id)s AND c.status = 'active'"
    " WHERE v.model_id = %(model_id)s AND v.version = %(version)s FOR SHARE"
)
# the job row (jobs.logic.create_job), its audit row (audit.logic.record) and the NOTIFY
# (jobs.logic.notify_new_jobs), in one round trip
_LAUNCH = (
    "WITH job AS ("
    " INSERT INTO jobs (job_type, model_id, model_version, input, client_id, warnings, timeout_seconds, created_by)"
    " VALUES ('inference', %(model_id)s, %(version)s, %(input)s, %(client_id)s, '[]'::jsonb,"
    " %(timeout_seconds)s, %(created_by)s)"
    " RETURNING job_id"
    "), audit AS ("
    " INSERT INTO audit_log (action, method, path, target_type, target_id, client_id, request_id,"
    " actor_sub, actor_username, actor_client_id, summary)"
    " SELECT %(action)s, %(method)s, %(path)s, %(target_type)s, job_id, %(audit_client_id)s, %(request_id)s,"
    " %(actor_sub)s, %(actor_username)s, %(actor_client_id)s, %(summary)s FROM job"
    ")"
    " SELECT job_id, pg_notify(%(channel)s, '') FROM job"
)


@dataclass
class _Launch:
    model_id: str
    version: str
    tenant: str | None
    input: dict[str, Any]
    entry: AuditEntry


@dataclass
class _Body:
    """The request body, held once: replayed to the route when this layer hands the request
    over, released once the layer answers every outcome itself (before the INSERT)."""

    messages: list[Message]
    data: bytes
    released: bool = False

    def release(self) -> None:
        self.messages, self.data, self.released = [], b"", True


Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, further headers


def _answer(response: Response) -> Answer:
    """A rendered JSON response as the layer sends it (it writes the length and type itself)."""
    headers = [(k, v) for k, v in response.raw_headers if k not in (b"content-length", b"content-type")]
    return response.status_code, bytes(response.body), headers


def _rendered(error: PieError) -> Answer:
    """``error`` as the app's handler renders it (``pie.errors``)."""
    return _answer(JSONResponse(error.body(), status_code=error.status_code, headers=error.headers))


def _as_is(data: bytes) -> bytes:
    return data


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json"


def _replaying(messages: list[Message], error: BaseException | None, receive: Receive) -> Receive:
    """A ``receive`` giving the route the messages this layer already read (then the error
    reading raised, e.g. the body limit's 413), then the server's own."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        if error is not None:
            raise error
        return await receive()

    return replay


class FastInferenceMiddleware:
    """Pure ASGI; see the module docstring."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        match = _REGEX.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        content_type = None
        for name, value in scope.get("headers") or ():
            if name == b"content-type":
                content_type = value
            elif name == _IDEMPOTENCY_HEADER:  # pie.idempotency's rules: the route
                await self.app(scope, receive, send)
                return
        token = bearer_token(scope)
        if token is None or not _is_json(content_type) or callbacks.is_callback_token(token):
            await self.app(scope, receive, send)
            return
        try:
            principal = await bearer_principal(scope["app"].state, token)
        except (PieError, sa_exc.SQLAlchemyError):
            principal = None
        if principal is None or not principal.has("run_inference"):
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
        held = _Body(messages, body)
        del body, chunks, messages  # ``held`` alone keeps the body (see _Body.release)

        scope.setdefault("state", {})["principal"] = principal  # the access line names the caller
        answer = await self._launch(scope, principal, match.groupdict(), held)
        if answer is None:
            assert not held.released
            await self.app(scope, _replaying(held.messages, None, receive), send)
            return
        scope["route"] = ROUTE
        status, content, headers = answer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(content)).encode()),
                    (b"content-type", b"application/json"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _launch(self, scope: Scope, principal: Any, path: dict[str, str], held: _Body) -> Answer | None:
        """The job launched and committed (202 and its body), an envelope when the INSERT or
        the commit failed, or None when the route must answer."""
        settings = scope["app"].state.settings
        try:
            parsed = parse_bounded(
                held.data,
                max_depth=getattr(settings, "json_max_depth", DEFAULT_MAX_DEPTH),
                max_items=getattr(settings, "json_max_items", DEFAULT_MAX_ITEMS),
            )
            request = InferenceRequest.model_validate(parsed)
            if request.subscribe:  # stores a subscription as well: the route's logic
                return None
            tenant = requested_tenant(principal, request.client_id)
        except (ValueError, PieError):  # malformed JSON, a limit, validation (ValueError), 403
            return None
        entry = new_entry(Request(scope), principal, ROUTE.operation_id, path, parsed)
        if tenant is not None:
            entry.client_id = tenant
        launch = _Launch(path["model_id"], path["model_version"], tenant, request.input, entry)
        del parsed, request  # the input's objects live in ``launch`` alone (released before the INSERT)

        try:
            conn = await db.get_engine().connect()
        except (sa_exc.SQLAlchemyError, OSError):  # no connection: the route answers (its 503)
            return None
        try:
            raw = await conn.get_raw_connection()
            pg: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
            job_id = await self._insert(conn, pg, settings, launch, held, scope)
            if not isinstance(job_id, str):
                return job_id  # the route's (None) or the INSERT's error envelope
            try:
                await pg.commit()
            except psycopg.Error as exc:
                return await self._failed(conn, pg, exc, scope, "COMMIT")
        finally:
            await conn.close()
        metrics.jobs_created(["inference"])()
        content = json.dumps({"inference_job_id": job_id}, separators=(",", ":")).encode()
        return 202, content, []

    async def _insert(
        self, conn: Any, pg: psycopg.AsyncConnection[Any], settings: Any, launch: _Launch, held: _Body, scope: Scope
    ) -> str | Answer | None:
        """Statements 1 and 2 (see the module docstring): the job id; None after a rollback when
        the route must answer (anything found by statement 1 and the checks); the error
        envelope when statement 2 fails (the body is released by then: answered here, as the
        route's error handler would)."""
        model_id, version, tenant = launch.model_id, launch.version, launch.tenant
        try:
            cur = pg.cursor()
            params: dict[str, Any] = {"model_id": model_id, "version": version, "client_id": tenant}
            sql = _VERSION if tenant is None else _VERSION_AND_CLIENT
            announce(conn, cur, sql, params)
            await cur.execute(sql, params)
            found = await cur.fetchone()
        except psycopg.Error as exc:
            found = None
            if pg.closed or pg.broken:
                await conn.invalidate(exc)
        if found is None:  # no such version, the tenant missing or suspended, a database error
            if not (pg.closed or pg.broken):
                with contextlib.suppress(psycopg.Error):
                    await pg.rollback()  # nothing was written: undo the locks
            return None

        # From here this layer answers every outcome itself (the route would answer the same,
        # through the same functions), so the raw body is released: a large body, its Python
        # objects, its JSON text and libpq's copy of it are never all held at once.
        held.release()
        status, handlers, contracts = found
        problem = inference_problem(model_id, version, status, contracts, launch.input)
        handler = handlers.get("inference") if isinstance(handlers, dict) else None
        handler = handler if isinstance(handler, dict) else None
        if problem is None:
            problem = payload_problem(
                settings,
                handler,
                job_type="inference",
                model_id=model_id,
                model_version=version,
                input=launch.input,
                client_id=tenant,
            )
        if problem is not None:
            with contextlib.suppress(psycopg.Error):
                await pg.rollback()
            return _rendered(Unprocessable(problem))
        input_json = json.dumps(launch.input).encode()
        launch.input = {}
        audit = row_values(launch.entry, method="POST", path=URL(scope=scope).path)
        params = {
            "model_id": model_id,
            "version": version,
            "input": Jsonb(input_json, dumps=_as_is),
            "client_id": tenant,
            "timeout_seconds": handler.get("timeout_seconds") if handler else None,
            "created_by": Jsonb(launch.entry.actor),
            "action": audit["action"],
            "method": audit["method"],
            "path": audit["path"],
            "target_type": audit["target_type"],
            "audit_client_id": audit["client_id"],
            "request_id": audit["request_id"],
            "actor_sub": audit["actor_sub"],
            "actor_username": audit["actor_username"],
            "actor_client_id": audit["actor_client_id"],
            "summary": Jsonb(audit["summary"]),
            "channel": NOTIFY_CHANNEL,
        }
        del input_json
        try:
            announce(conn, cur, _LAUNCH, params)
            await cur.execute(_LAUNCH, params)
            row = await cur.fetchone()
        except psycopg.Error as exc:
            return await self._failed(conn, pg, exc, scope, "INSERT")
        assert row is not None
        return str(row[0])

    async def _failed(
        self, conn: Any, pg: psycopg.AsyncConnection[Any], exc: psycopg.Error, scope: Scope, statement: str
    ) -> Answer:
        """The INSERT failed, or the COMMIT's outcome is unknown or negative: roll back and
        answer as the route's error handler would (never retried by the route: after a failed
        COMMIT the job may exist)."""
        broken = pg.closed or pg.broken
        if broken:
            await conn.invalidate(exc)
        else:
            with contextlib.suppress(psycopg.Error):
                await pg.rollback()
        wrapped = sa_exc.DBAPIError.instance(statement, {}, exc, psycopg.Error, connection_invalidated=broken)
        request_id = (scope.get("state") or {}).get("request_id", "-")
        response = database_error_response(wrapped)
        if response is None:
            log.error("database error in request %s POST %s", request_id, scope.get("path"), exc_info=exc)
            response = internal_error_response(request_id)
        else:
            log.warning("request %s POST %s: %s", request_id, scope.get("path"), wrapped.__class__.__name__)
        return _answer(response)
