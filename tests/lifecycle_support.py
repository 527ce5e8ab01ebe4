"""Helpers of the lifecycle tests (issue 19): waiting for requests to queue on row locks held
by another real connection, and reading jobs and versions back through the API."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

LOCK_WAIT_TIMEOUT = 30.0


async def until_waiting(conn: AsyncConnection, count: int, *pending: asyncio.Future[Any]) -> None:
    """Return once ``count`` other backends of this database wait for a lock (the requests
    ``pending`` are queued behind ``conn``'s locks). Fails if one of ``pending`` finished first
    (it did not wait: the lock it should have taken was not taken) or after a generous timeout."""
    deadline = time.monotonic() + LOCK_WAIT_TIMEOUT
    while True:
        for future in pending:
            if future.done():
                response = future.result()
                raise AssertionError(f"a request finished instead of waiting for the lock: {response}")
        # pg_stat_activity is a snapshot cached per transaction: clear it each time
        await conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        )
        if waiting >= count:
            return
        assert time.monotonic() < deadline, (
            f"{waiting} of {count} requests wait for the lock after {LOCK_WAIT_TIMEOUT}s"
        )
        await asyncio.sleep(0.01)


async def job(http: httpx.AsyncClient, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    r = await http.get(f"/v2/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for(predicate: Any, timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll an async ``predicate`` until it is true (generous timeout; no timing assertion)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        await asyncio.sleep(0.05)
