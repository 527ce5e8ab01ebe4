from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from pie import db

router = APIRouter(tags=["health"])


@router.get("/v2/health", operation_id="health")
async def health() -> JSONResponse:
    """Public liveness and database check: 200, or 503 when the database cannot be reached."""
    try:
        async with asyncio.timeout(3):
            async with db.get_engine().connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception:  # any failure to reach the database is "unavailable"
        return JSONResponse({"status": "degraded", "database": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})
