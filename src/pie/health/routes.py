from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import Select, literal_column, select, text

from pie import db
from pie.http.routing import PieRoute
from pie.reads import fetch_one
from pie.schemagate import gate

router = APIRouter(route_class=PieRoute, tags=["health"])
log = logging.getLogger("pie.health")

HEALTH_DB_TIMEOUT = 3.0


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unavailable"]
    # why the server cannot serve API requests (503 only): e.g. the schema is not migrated
    reason: str | None = None


class LiveOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    database: Literal["ok", "unavailable"]
    schema_revision: str | None = None
    expected_revision: str | None = None
    reason: str | None = None


@router.get(
    "/v2/health",
    operation_id="health",
    response_model=HealthOut,
    responses={
        503: {"model": HealthOut, "description": "the database cannot be reached, or its schema is not migrated"}
    },
)
async def health() -> Response:
    """Public liveness and database check: 200, or 503 when the database cannot be reached or
    its schema is not migrated (``reason`` says which)."""
    if gate.problem is not None:
        return JSONResponse({"status": "degraded", "database": "ok", "reason": gate.problem}, status_code=503)
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT):
            await fetch_one(_SELECT_1)  # through the pool, in autocommit: one round trip
    except Exception as exc:  # any failure to reach the database is "unavailable"
        log.warning("health check: database unavailable (%s: %s)", exc.__class__.__name__, exc)
        return JSONResponse({"status": "degraded", "database": "unavailable"}, status_code=503)
    return Response(_HEALTHY, media_type="application/json")


_SELECT_1: Select[Any] = select(literal_column("1").label("ok"))
_HEALTHY = b'{"status":"ok","database":"ok"}'


@router.get("/v2/health/live", operation_id="healthlive", response_model=LiveOut)
async def live() -> JSONResponse:
    """Liveness probe: the process is up and its event loop answers. Never touches the database."""
    return JSONResponse({"status": "ok"})


@functools.lru_cache(maxsize=1)
def _head_revision() -> str:
    from pie.migrate import head_revision

    return head_revision()


_REVISION = text("SELECT version_num FROM alembic_version")


@router.get(
    "/v2/health/ready",
    operation_id="healthready",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "not ready: the database is unreachable or not migrated"}},
)
async def ready() -> JSONResponse:
    """Readiness probe: the database is reachable **and** its schema is at the migration head
    (503 with the reason otherwise)."""
    expected = await asyncio.to_thread(_head_revision)
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT):
            async with db.get_engine().connect() as conn:
                exists = (await conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL"))).scalar()
                revisions = [r[0] for r in (await conn.execute(_REVISION)).all()] if exists else []
    except Exception as exc:
        log.warning("readiness: database unavailable (%s: %s)", exc.__class__.__name__, exc)
        return JSONResponse(
            ReadyOut(
                status="not_ready",
                database="unavailable",
                expected_revision=expected,
                reason=f"database unreachable ({exc.__class__.__name__})",
            ).model_dump(),
            status_code=503,
        )
    current = revisions[0] if len(revisions) == 1 else None
    if current != expected:
        reason = (
            "database schema not migrated (no alembic_version)"
            if not revisions
            else f"database schema at revision {', '.join(revisions)}, expected {expected}"
        )
        return JSONResponse(
            ReadyOut(
                status="not_ready", database="ok", schema_revision=current, expected_revision=expected, reason=reason
            ).model_dump(),
            status_code=503,
        )
    return JSONResponse(
        ReadyOut(status="ready", database="ok", schema_revision=current, expected_revision=expected).model_dump(
            exclude_none=True
        )
    )


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus exposition (``PIE_METRICS_ENABLED``; 404 when off)."""
    from pie import metrics
    from pie.errors import NotFound
    from pie.jobs.summary import queue_query

    if not request.app.state.settings.metrics_enabled:
        raise NotFound("metrics are disabled (PIE_METRICS_ENABLED=false)")
    # the query of the console's queue summary (one source for both), waiting and running jobs
    body, content_type = await metrics.render(db.get_engine(), queue_query(statuses=("pending", "started")))
    return Response(body, media_type=content_type)
