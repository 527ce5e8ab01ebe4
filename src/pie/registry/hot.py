"""The hot write of the registry (docs/architecture.md: Fast paths): direct inference
(``infermodelversion``) for the fast write layer (``pie.http.fast``).

The layer hands over a plain ``POST`` with a JSON body and a caller holding ``run_inference``.
Here the body is read through the bounded parser, validated with the route's own request model
(strict, unknown fields refused), and the route's rules are applied with the logic's own
functions (``logic.requested_tenant``, ``inference_problem``, ``pie.jobs.hot.payload_problem``,
``audit.routing.new_entry``). On a pooled connection, in one transaction:

1. the version row (and the tenant's client row, which must be active) ``FOR SHARE`` -- the same
   locks as the route, so no status change or suspension commits between check and insert;
2. ``pie.jobs.hot.LAUNCH``: the job row, its audit row and the dispatchers' ``pg_notify`` (the
   statement the route runs for the same request);
3. ``COMMIT``.

Anything but that success case -- ``subscribe: true``, an unknown version or client, a
malformed or oversized body, a database error while reading the version -- rolls back (nothing
was written) and returns None: the route answers, with the body replayed. Once the version is
read, every outcome is answered here (and the raw body released): a failed version, an input
that does not match the contract or a payload over its handler's limit get the route's 422
(the same functions make the same message); a database error in the INSERT or the COMMIT gets
the envelope of the route's error handler and is never retried by the route -- after a failed
COMMIT the job may exist, so a second attempt could launch a second job.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import bindparam, select
from sqlalchemy import exc as sa_exc
from starlette.datastructures import URL
from starlette.requests import Request
from starlette.types import Scope

from pie import db, metrics, policies
from pie.audit.context import AuditEntry
from pie.audit.routing import new_entry
from pie.auth import Principal
from pie.clients.models import Client
from pie.errors import PieError, Unprocessable
from pie.http.fast import Answer, Body, HotWrite, database_error_answer, rendered
from pie.jobs.hot import LAUNCH, launch_params, payload_problem
from pie.jsonbody import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS, parse_bounded
from pie.reads import announce, compiled_sql
from pie.registry.logic import inference_problem, requested_tenant
from pie.registry.models import ModelVersion
from pie.registry.schemas import InferenceRequest

log = logging.getLogger("pie")

OPERATION_ID = "infermodelversion"

# the route's locks: the version FOR SHARE (logic.get_model_version), and the tenant's client
# row FOR SHARE (logic.inference_tenant)
_V = ModelVersion.__table__.c
_C = Client.__table__.c
_VERSION_COLUMNS = (_V.status, _V.handlers, _V.handler_contracts)
_VERSION_WHERE = (_V.model_id == bindparam("model_id"), _V.version == bindparam("version"))
_VERSION = select(*_VERSION_COLUMNS).where(*_VERSION_WHERE).with_for_update(read=True)
_VERSION_AND_CLIENT = (
    select(*_VERSION_COLUMNS)
    .join(Client.__table__, (_C.client_id == bindparam("client_id")) & (_C.status == "active"))
    .where(*_VERSION_WHERE)
    .with_for_update(read=True)
)


@dataclass
class _Launch:
    model_id: str
    version: str
    tenant: str | None
    input: dict[str, Any]
    entry: AuditEntry


async def infer_model_version(scope: Scope, principal: Principal, path: dict[str, str], held: Body) -> Answer | None:
    """The job launched and committed (202 and its body), an envelope when the INSERT or the
    commit failed, or None when the route must answer."""
    settings = scope["app"].state.settings  # the JSON limits: the app's, as the route's parser
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
    entry = new_entry(Request(scope), principal, OPERATION_ID, path, parsed)
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
        job_id = await _insert(conn, pg, launch, held, scope)
        if not isinstance(job_id, str):
            return job_id  # the route's (None) or the INSERT's error envelope
        try:
            await pg.commit()
        except psycopg.Error as exc:
            return await _failed(conn, pg, exc, scope, "COMMIT")
    finally:
        await conn.close()
    metrics.jobs_created(["inference"])()
    content = json.dumps({"inference_job_id": job_id}, separators=(",", ":")).encode()
    return 202, content, []


async def _insert(
    conn: Any, pg: psycopg.AsyncConnection[Any], launch: _Launch, held: Body, scope: Scope
) -> str | Answer | None:
    """Statements 1 and 2 (see the module docstring): the job id; None after a rollback when
    the route must answer (anything found by statement 1 and the checks); the error envelope
    when statement 2 fails (the body is released by then: answered here, as the route's error
    handler would)."""
    model_id, version, tenant = launch.model_id, launch.version, launch.tenant
    try:
        cur = pg.cursor()
        sql, constants = compiled_sql(_VERSION if tenant is None else _VERSION_AND_CLIENT)
        params: dict[str, Any] = {**constants, "model_id": model_id, "version": version, "client_id": tenant}
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

    # From here every outcome is answered here (the route would answer the same, through the
    # same functions), so the raw body is released: a large body, its Python objects, its JSON
    # text and libpq's copy of it are never all held at once.
    held.release()
    status, handlers, contracts = found
    handler = handlers.get("inference") if isinstance(handlers, dict) else None
    handler = handler if isinstance(handler, dict) else None
    problem = inference_problem(model_id, version, status, contracts, launch.input) or payload_problem(
        handler, model_id=model_id, version=version, input=launch.input, client_id=tenant
    )
    if problem is not None:
        with contextlib.suppress(psycopg.Error):
            await pg.rollback()
        return rendered(Unprocessable(problem))
    input_json = json.dumps(launch.input).encode()
    launch.input = {}
    params = launch_params(
        model_id=model_id,
        version=version,
        input_json=input_json,
        client_id=tenant,
        timeout_seconds=handler.get("timeout_seconds") if handler else None,
        entry=launch.entry,
        method="POST",
        path=URL(scope=scope).path,
    )
    del input_json
    sql, constants = compiled_sql(LAUNCH)
    params = {**constants, **params}
    try:
        announce(conn, cur, sql, params)
        await cur.execute(sql, params)
        row = await cur.fetchone()
    except psycopg.Error as exc:
        return await _failed(conn, pg, exc, scope, "INSERT")
    assert row is not None
    return str(row[0])


async def _failed(
    conn: Any, pg: psycopg.AsyncConnection[Any], exc: psycopg.Error, scope: Scope, statement: str
) -> Answer:
    """The INSERT failed, or the COMMIT's outcome is unknown or negative: roll back and answer
    as the route's error handler would (never retried by the route: after a failed COMMIT the
    job may exist)."""
    broken = pg.closed or pg.broken
    if broken:
        await conn.invalidate(exc)
    else:
        with contextlib.suppress(psycopg.Error):
            await pg.rollback()
    wrapped = sa_exc.DBAPIError.instance(statement, {}, exc, psycopg.Error, connection_invalidated=broken)
    return database_error_answer(wrapped, scope, log)


HOT_WRITES = {OPERATION_ID: HotWrite(infer_model_version, permission=policies.INFERENCE_PERMISSION)}
