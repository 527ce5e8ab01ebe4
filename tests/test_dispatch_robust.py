"""Robustness of dispatch and of the database connection: SKIP LOCKED claims, results that
survive a database outage, database timeouts that answer 503 at once. The outage and freeze tests
run on a PostgreSQL cluster of their own (never the shared server)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from pgcluster import OwnCluster
from sqlalchemy import select, text
from test_dispatch_inprocess import new_job, seed_version, stored

from pie import db
from pie.dispatch.dispatcher import Dispatcher
from pie.dispatch.inprocess import register
from pie.tables.jobs import Job


async def test_claim_skips_a_locked_pending_job_and_takes_the_others_without_waiting(session, settings, database_url):
    """Another transaction holds the oldest due job's row: the claim skips it and takes the
    other due jobs while the row is still held (with a plain FOR UPDATE it would wait for the
    lock, and fail at the lock timeout)."""
    await seed_version(session)
    locked = await new_job(session, input={"n": 0})
    others = [await new_job(session, input={"n": i}) for i in (1, 2)]
    holder = await psycopg.AsyncConnection.connect(db.libpq_url(database_url))
    try:
        await holder.execute("SELECT 1 FROM jobs WHERE job_id = %s FOR UPDATE", (locked,))
        dispatcher = Dispatcher(settings, name="skipper")
        dispatcher._start_workers()
        try:
            claimed = await asyncio.wait_for(dispatcher.claim_and_dispatch(), timeout=60)
            assert claimed == 2
            assert dispatcher._inflight == set(others)
        finally:
            await dispatcher.stop(grace=5.0)
        assert (await stored(session, locked)).status == "pending"
        for job_id in others:
            assert (await stored(session, job_id)).status == "success"
    finally:
        await holder.rollback()
        await holder.close()


async def test_dispatcher_claims_no_more_in_process_jobs_than_free_workers(session, settings):
    await seed_version(session, inference="test_gated")
    from test_dispatch_inprocess import GATE, SLOW_CALLS

    SLOW_CALLS.clear()
    GATE.clear()
    for i in range(10):
        await new_job(session, input={"n": i})
    dispatcher = Dispatcher(
        settings.model_copy(update={"in_process_workers": 3, "dispatch_batch_size": 50}), name="small"
    )
    dispatcher._start_workers()
    try:
        assert await dispatcher.claim_and_dispatch() == 3
        assert await dispatcher.claim_and_dispatch() == 0  # every worker busy
        started = (await session.execute(select(Job.job_id).where(Job.status == "started"))).scalars().all()
        assert len(started) == 3
    finally:
        GATE.set()
        await dispatcher.stop(grace=5.0)


# ---------------------------------------------------------------------------------------------
# a cluster of our own, and the process-wide engine pointed at it for one test


@pytest.fixture
async def own_db(engine, settings) -> AsyncIterator[OwnCluster]:
    """An own PostgreSQL cluster, migrated; the process-wide engine points at it during the test."""
    from pie.migrate import upgrade

    cluster = await asyncio.to_thread(OwnCluster)
    saved = db.save_engine()
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(upgrade, cluster.url)
        yield cluster
    finally:
        if db._engine is not saved.engine:
            await db.dispose_engine()
        db.restore_engine(saved)
        await asyncio.to_thread(cluster.destroy)


OUTAGE: dict[str, Any] = {}


@register("test_outage")
def _outage(payload: dict[str, Any]) -> dict[str, Any]:
    """Counts its runs; the first one stops the database for a few seconds just before
    returning, so the result is recorded while PostgreSQL is down."""
    OUTAGE["calls"].append(payload["job_id"])
    if len(OUTAGE["calls"]) == 1:
        cluster: OwnCluster = OUTAGE["cluster"]
        cluster.stop()
        OUTAGE["stopped_at"] = time.monotonic()
        threading.Timer(OUTAGE["down_for"], cluster.start).start()
    return {"ran": len(OUTAGE["calls"])}


async def test_a_result_finished_during_a_database_outage_is_recorded_once_it_is_back(own_db, settings):
    """PostgreSQL is stopped for 4 s while an in-process result is being recorded: the
    dispatcher retries with backoff (the lease is 300 s), the job ends in success and ran once."""
    db.init_engine(own_db.url, settings)
    OUTAGE.update(calls=[], cluster=own_db, down_for=4.0)
    async with db.sessionmaker()() as session:
        await seed_version(session, inference="test_outage")
        job_id = await new_job(session, input={"n": 1})
    dispatcher = Dispatcher(settings.model_copy(update={"dispatch_poll_interval": 0.2}), name="outage")
    await dispatcher.start()
    try:
        deadline = time.monotonic() + 40
        job = None
        while time.monotonic() < deadline:
            try:
                async with db.sessionmaker()() as session:
                    job = await stored(session, job_id)
                if job.status in ("success", "failure"):
                    break
            except Exception:
                pass  # the database is down
            await asyncio.sleep(0.2)
    finally:
        await dispatcher.stop(grace=5.0)
    assert job is not None and (job.status, job.attempts, job.output) == ("success", 1, {"ran": 1})
    assert OUTAGE["calls"] == [job_id]


async def test_requests_get_503_at_once_when_the_database_is_frozen_or_a_lock_times_out(own_db, settings, admin):
    """No database timeouts used to mean a request waited as long as PostgreSQL was frozen
    (SIGSTOP). Now: the client-side guard (statement timeout + connect timeout), the connect
    timeout and the lock timeout all answer the 503 envelope within seconds."""
    from pie.app import create_app

    fast = settings.model_copy(
        update={"db_connect_timeout": 1.0, "db_statement_timeout_ms": 1000, "db_lock_timeout_ms": 300}
    )
    db.init_engine(own_db.url, fast)
    app = create_app(fast)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        r = await client.post("/v2/clients", json={"client_id": "sealink", "name": "SeaLink"}, headers=admin)
        assert r.status_code in (200, 201), r.text
        assert (await client.get("/v2/clients", headers=admin)).status_code == 200

        # statement timeout (server side)
        async with db.get_engine().connect() as conn:
            with pytest.raises(Exception) as caught:
                await conn.execute(text("SELECT pg_sleep(3)"))
        from pie.errors import database_error_response

        response = database_error_response(caught.value)
        assert response is not None and response.status_code == 503

        # lock timeout: another transaction holds the client row that PATCH locks
        holder = await psycopg.AsyncConnection.connect(own_db.url)
        try:
            await holder.execute("SELECT 1 FROM clients WHERE client_id = 'sealink' FOR UPDATE")
            # answered while the lock is still held (no lock timeout: it would wait for ever)
            r = await asyncio.wait_for(
                client.patch("/v2/clients/sealink", json={"name": "Renamed"}, headers=admin), timeout=30
            )
            assert r.status_code == 503 and r.json() == {
                "success": False,
                "message": "database timeout: a lock was not granted within the configured limit; try again later",
            }
        finally:
            await holder.rollback()
            await holder.close()

        # frozen server: pooled connections and new ones both give up
        own_db.freeze()
        try:
            for _ in range(2):  # answered while the server is still frozen (without the guards: never)
                r = await asyncio.wait_for(client.get("/v2/clients", headers=admin), timeout=30)
                assert r.status_code == 503 and r.json()["success"] is False, r.text
        finally:
            own_db.thaw()
        deadline = time.monotonic() + 60  # the thawed server answers again (generous: a loaded machine)
        while (r := await client.get("/v2/clients", headers=admin)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.1)


LATE: dict[str, Any] = {"calls": []}


@register("test_late_claim")
def _late_claim(payload: dict[str, Any]) -> dict[str, Any]:
    LATE["calls"].append(payload["job_id"])
    return {"ran": len(LATE["calls"])}


async def test_a_claim_committed_after_the_dispatcher_gave_up_on_it_is_run_soon(own_db, settings):
    """Issue 18, item 15: PostgreSQL frozen (SIGSTOP) while a claim is on the wire. The dispatcher
    gives up on it (its response guard: statement + connect timeout) and goes on; when the server
    thaws, it runs the claim and commits it: the job is `started` and leased to a dispatcher that
    never heard of it, and used to stay so until the lease ran out (PIE_IN_PROCESS_LEASE_SECONDS,
    300 s). Now the next claim puts it back in the queue and it runs, once."""
    quick = settings.model_copy(
        update={"db_connect_timeout": 1.0, "db_statement_timeout_ms": 1000, "in_process_lease_seconds": 300.0}
    )
    db.init_engine(own_db.url, quick)
    LATE["calls"] = []
    async with db.sessionmaker()() as session:
        await seed_version(session, inference="test_late_claim")
    dispatcher = Dispatcher(quick, name="late")
    dispatcher._start_workers()
    try:
        assert await dispatcher.claim_and_dispatch() == 0  # registered, claim connection open
        async with db.sessionmaker()() as session:
            job_id = await new_job(session, input={"n": 1})

        # the claim runs in a transaction (it signs the callback tokens with the key it locks): the
        # server freezes once the claim's statements are done, so its COMMIT is on the wire
        sign = dispatcher._sign

        async def sign_then_freeze(conn: Any, rows: Any) -> Any:
            tokens = await sign(conn, rows)
            own_db.freeze()
            return tokens

        dispatcher._sign = sign_then_freeze  # type: ignore[method-assign]
        try:
            # the claim times out (and the one retry on a new connection cannot connect)
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(dispatcher.claim_and_dispatch(), timeout=30)
        finally:
            dispatcher._sign = sign  # type: ignore[method-assign]
            own_db.thaw()

        # the server ran the claim after all: the job is leased to the dispatcher, which does not
        # know it (this is the path that left jobs `started` for minutes)
        async def claimed_late() -> bool:
            async with db.sessionmaker()() as session:
                job = await stored(session, job_id)
                return job.status == "started" and job.locked_by == dispatcher.worker_id

        deadline = time.monotonic() + 30
        while not await claimed_late():
            assert time.monotonic() < deadline, "the frozen claim never committed"
            await asyncio.sleep(0.1)
        assert job_id not in dispatcher._inflight

        # the dispatcher's next cycles: the job runs well before its lease would end
        deadline = time.monotonic() + 60
        while True:
            await dispatcher.claim_and_dispatch()
            async with db.sessionmaker()() as session:
                job = await stored(session, job_id)
            if job.status == "success":
                break
            assert time.monotonic() < deadline, f"still {job.status} (lease until {job.lease_expires_at})"
            await asyncio.sleep(0.2)
    finally:
        await dispatcher.stop(grace=5.0)
    assert LATE["calls"] == [job_id]  # once
    assert (job.attempts, job.output) == (1, {"ran": 1})  # the claim it never acted on is no attempt
    assert dispatcher._doubtful_claims == {}
