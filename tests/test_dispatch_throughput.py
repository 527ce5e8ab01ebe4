"""The mechanisms behind the in-process dispatch throughput (bench/dispatch.py measures it):
claims on the dispatcher's own connection, results recorded in batches, and ``finish_jobs``
skipping the contract and subscription queries a batch does not need. Each test checks what a
user sees stays right."""

from __future__ import annotations

import asyncio
import time

import psycopg
from sqlalchemy import select
from test_dispatch_inprocess import GATE, new_job, seed_version, stored

from pie import db
from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle
from pie.tables.jobs import Job
from pie.tables.registry import EventSubscription


async def _wait_for(session, job_id: str, statuses: tuple[str, ...], timeout: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await stored(session, job_id)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


async def test_jobs_still_run_after_the_dispatchers_claim_connection_was_cut(session, settings, database_url, caplog):
    """The dispatcher claims on a connection of its own: when the server ended that connection
    while it sat idle (a restart, a network cut, an administrator), the claim is tried again at
    once on a new one — no failed cycle, no back-off — and jobs keep running without restarting
    the dispatcher."""
    await seed_version(session)
    dispatcher = Dispatcher(settings.model_copy(update={"dispatch_poll_interval": 0.2}), name="cut")
    await dispatcher.start()
    try:
        first = await new_job(session, input={"n": 1})
        assert (await _wait_for(session, first, ("success",))).status == "success"
        backend = dispatcher._claim_conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(db.libpq_url(database_url), autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        second = await new_job(session, input={"n": 2})
        job = await _wait_for(session, second, ("success", "failure"))
        assert (job.status, job.output["input"], job.attempts) == ("success", {"n": 2}, 1)
        assert dispatcher._claim_conn.info.backend_pid != backend
        assert not [r for r in caplog.records if "dispatch cycle failed" in r.getMessage()]
    finally:
        await dispatcher.stop(grace=5.0)


async def test_a_result_is_recorded_at_once_while_another_job_keeps_running(session, settings):
    """Results are recorded in batches while other jobs run, but a result never waits for a
    running job to end: an instant job beside a long one ends at once."""
    GATE.clear()
    await seed_version(session, "slow", inference="test_gated")
    await seed_version(session, "fast")
    dispatcher = Dispatcher(settings.model_copy(update={"dispatch_poll_interval": 0.2}), name="mixed")
    await dispatcher.start()
    try:
        slow = await new_job(session, model_id="slow", input={"n": 0})
        await _wait_for(session, slow, ("started",))
        fast = await new_job(session, model_id="fast", input={"n": 1})
        # the slow job is held (GATE) until the test ends: the fast one ending at all is the point
        job = await _wait_for(session, fast, ("success",))
        assert job.status == "success"
        assert (await stored(session, slow)).status == "started"
    finally:
        GATE.set()
        await dispatcher.stop(grace=5.0)
    assert (await stored(session, slow)).status == "success"


async def test_one_batch_checks_contracts_and_fires_subscriptions_only_where_they_exist(session, settings):
    """A batch of in-process results mixes versions with and without an output schema and models
    with and without an inference_complete subscription: each job gets exactly its own warnings
    and triggered jobs."""
    schema = {"inference": {"output_schema": {"type": "object", "required": ["price"]}}}
    await seed_version(session, "checked", contracts=schema)
    await seed_version(session, "null-schema", contracts={"inference": {"output_schema": None}})
    await seed_version(session, "plain")
    await seed_version(session, "source")
    await seed_version(session, "target")
    session.add(
        EventSubscription(
            source_model_id="source",
            trigger_event="inference_complete",
            target_model_id="target",
            target_action="inference",
            input_source="trigger_output",
        )
    )
    await session.commit()
    ids = {m: await new_job(session, model_id=m, input={"n": 1}) for m in ("checked", "null-schema", "plain", "source")}
    await dispatch_until_idle(settings.model_copy(update={"in_process_workers": 4}))

    jobs = {m: await stored(session, job_id) for m, job_id in ids.items()}
    assert {m: j.status for m, j in jobs.items()} == dict.fromkeys(ids, "success")
    assert len(jobs["checked"].warnings) == 1 and "output_schema" in jobs["checked"].warnings[0]
    assert jobs["null-schema"].warnings == [] and jobs["plain"].warnings == [] and jobs["source"].warnings == []
    fired = (await session.execute(select(Job).where(Job.model_id == "target"))).scalars().all()
    assert [(j.input, j.status) for j in fired] == [(jobs["source"].output, "success")]
