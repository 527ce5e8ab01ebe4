"""The bare-stack baseline for ``bench/http.py``: FastAPI on uvicorn, a psycopg 3 async pool, no
auth, no ORM, no middleware. Each route does the same database work as the PIE route it stands
beside, so the ratio PIE / bare is the cost of everything PIE adds (auth, tenant checks,
validation, the unit of work, serialization rules).

    BARE_DATABASE_URL=postgresql://... uvicorn bench.bare_app:app --port 8100   (from the repository root)
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

POOL_SIZE = int(os.environ.get("BARE_POOL_SIZE", "32"))  # as PIE's pools (PIE_DB_POOL_SIZE, PIE_DB_READ_POOL_SIZE)
# opened on demand, as PIE's pools. psycopg_pool's default wraps each checkout in a transaction
# (BEGIN ... COMMIT around a read); BARE_AUTOCOMMIT=1 reads in autocommit as PIE's reads do
AUTOCOMMIT = os.environ.get("BARE_AUTOCOMMIT", "") == "1"
pool = AsyncConnectionPool(
    os.environ.get("BARE_DATABASE_URL", ""),
    min_size=0,
    max_size=POOL_SIZE,
    kwargs={"autocommit": AUTOCOMMIT},
    open=False,
)


@asynccontextmanager
async def lifespan(app: FastAPI):
    await pool.open(wait=True)
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


async def one(sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        row = await cur.fetchone()
    if row is None:
        raise HTTPException(404)
    return row


@app.get("/bare/health")
async def health() -> dict[str, str]:
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")
    return {"status": "ok", "database": "ok"}


@app.get("/bare/jobs/{job_id}")
async def get_job(job_id: str) -> dict[str, Any]:
    return await one("SELECT * FROM jobs WHERE job_id = %s", (job_id,))


@app.get("/bare/clients/{client_id}/domains/{domain_id}/assignments/{key}")
async def get_assignment(client_id: str, domain_id: str, key: str) -> dict[str, Any]:
    return await one(
        "SELECT * FROM assignments WHERE client_id = %s AND domain_id = %s AND service_id IS NULL"
        " AND assignment_key = %s AND status = 'active'",
        (client_id, domain_id, key),
    )


@app.get("/bare/clients/{client_id}/domains/{domain_id}/service/{service_id}")
async def get_service(client_id: str, domain_id: str, service_id: str) -> dict[str, Any]:
    return await one(
        "SELECT * FROM services WHERE client_id = %s AND domain_id = %s AND service_id = %s",
        (client_id, domain_id, service_id),
    )


@app.post("/bare/models/{model_id}/versions/{version}/inference", status_code=202)
async def inference(model_id: str, version: str, request: Request) -> dict[str, str]:
    body = json.loads(await request.body())
    async with pool.connection() as conn, conn.transaction():  # one transaction: insert, notify, commit
        cur = await conn.execute(
            "INSERT INTO jobs (job_type, model_id, model_version, input) VALUES ('inference', %s, %s, %s)"
            " RETURNING job_id",
            (model_id, version, Jsonb(body["input"])),
        )
        row = await cur.fetchone()
        await conn.execute("SELECT pg_notify('pie_jobs', '')")
    assert row is not None
    return {"inference_job_id": row[0]}
