from __future__ import annotations

import asyncio
import logging

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from pie import db
from pie.routing import PieRoute

router = APIRouter(route_class=PieRoute, tags=["health"])
log = logging.getLogger("pie.health")

HEALTH_DB_TIMEOUT = 3.0


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unavailable"]


@router.get(
    "/v2/health",
    operation_id="health",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "the database cannot be reached"}},
)
async def health() -> JSONResponse:
    """Public liveness and database check: 200, or 503 when the database cannot be reached."""
    try:
        async with asyncio.timeout(HEALTH_DB_TIMEOUT):
            async with db.get_engine().connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to reach the database is "unavailable"
        log.warning("health check: database unavailable (%s: %s)", exc.__class__.__name__, exc)
        return JSONResponse({"status": "degraded", "database": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})
