"""Several dispatchers on one database: each job is dispatched exactly once, and a dispatcher
killed mid-run loses no job (its expired leases are recovered by another dispatcher).

The dispatchers are real ``pie worker`` processes (plus one in this test process); the handler
appends a line per invocation to a shared file, so invocations are counted across processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from conftest import SUBPROCESS_POOLS
from sqlalchemy import func, select, text

from pie.dispatch.dispatcher import Dispatcher
from pie.dispatch.inprocess import register
from pie.tables.jobs import Job
from pie.tables.registry import Model, ModelVersion

WORKER_CODE = """
import os, sys, time
from pie.dispatch.inprocess import register

LOG = os.environ["PIE_TEST_RECORD_FILE"]
SLEEP = float(os.environ.get("PIE_TEST_SLEEP", "0"))

@register("test_record")
def record(payload):
    with open(LOG, "a") as f:
        f.write(f"{os.getpid()} {payload['job_id']}\\n")
    time.sleep(SLEEP)
    return {"pid": os.getpid()}

from pie.cli import main
sys.exit(main(["worker", "--name", sys.argv[1]]))
"""

_RECORD_FILE: dict[str, str] = {}


@register("test_record")
def _record_here(payload: dict[str, Any]) -> dict[str, Any]:
    """The same implementation in this process (no sleep)."""
    with open(_RECORD_FILE["path"], "a") as f:
        f.write(f"{os.getpid()} {payload['job_id']}\n")
    return {"pid": os.getpid()}


async def start_worker(name: str, database_url: str, record: Path, **env: str) -> asyncio.subprocess.Process:
    environment = {
        **os.environ,
        **SUBPROCESS_POOLS,  # the shared PostgreSQL is busy: a small connection budget
        "PIE_DATABASE_URL": database_url,
        "PIE_TEST_RECORD_FILE": str(record),
        "PIE_LOG_LEVEL": "WARNING",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER_CODE,
        name,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert b"dispatching" in line, line
    except BaseException:
        if proc.returncode is None:  # never left running when it did not start as expected
            proc.kill()
            await proc.wait()
        raise
    return proc


async def stop_worker(proc: asyncio.subprocess.Process) -> int:
    """SIGTERM: the worker stops gracefully and exits 0."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode


async def seed(session) -> None:
    hs = {
        "inference": {"type": "in_process", "value": "test_record"},
        "training": {"type": "in_process", "value": "test_record"},
    }
    session.add(Model(id="m1", name="m1", handlers=hs, status="active"))
    await session.flush()
    session.add(ModelVersion(model_id="m1", version="1", status="active", handlers=hs))
    await session.commit()


async def insert_jobs(session, n: int) -> None:
    await session.execute(
        text(
            "INSERT INTO jobs (job_type, model_id, model_version, input) "
            "SELECT 'inference', 'm1', '1', jsonb_build_object('n', g) FROM generate_series(1, :n) AS g"
        ),
        {"n": n},
    )
    await session.execute(text("SELECT pg_notify('pie_jobs', '')"))
    await session.commit()


async def count(session, *conditions) -> int:
    return await session.scalar(
        select(func.count()).select_from(Job).where(*conditions).execution_options(populate_existing=True)
    )


async def wait_until(session, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


def invocations(record: Path) -> list[tuple[int, str]]:
    lines = record.read_text().splitlines() if record.exists() else []
    return [(int(pid), job_id) for pid, job_id in (line.split() for line in lines)]


async def test_three_dispatchers_never_dispatch_a_job_twice(session, settings, database_url, tmp_path):
    record = tmp_path / "invocations.log"
    _RECORD_FILE["path"] = str(record)
    await seed(session)
    workers: list[asyncio.subprocess.Process] = []
    local = Dispatcher(settings.model_copy(update={"dispatch_batch_size": 20}), name="local")
    try:
        # (started inside the try: a worker left running would dispatch the next tests' jobs)
        for i in range(2):
            workers.append(
                await start_worker(f"w{i}", database_url, record, PIE_TEST_SLEEP="0.002", PIE_DISPATCH_BATCH_SIZE="20")
            )
        await local.start()
        await insert_jobs(session, 400)
        await wait_until(session, lambda: _all_ended(session, 400), timeout=120)
    finally:
        await local.stop()
        exit_codes = [await stop_worker(proc) for proc in workers]
    assert exit_codes == [0, 0]

    calls = invocations(record)
    per_job = Counter(job_id for _, job_id in calls)
    assert len(per_job) == 400 and set(per_job.values()) == {1}, per_job.most_common(3)
    assert await count(session, Job.status == "success", Job.attempts == 1) == 400
    # the work really was shared between processes
    assert len({pid for pid, _ in calls}) >= 2


async def _all_ended(session, n: int) -> bool:
    return await count(session, Job.status.in_(["success", "failure"])) == n


async def _kill_victim_mid_run(session, database_url, record: Path, **env: str) -> asyncio.subprocess.Process:
    """A ``pie worker`` (4 in-process workers, default 300 s lease) whose handler takes a minute
    claims jobs from 10 due ones and is killed -9 while running them."""
    victim = await start_worker("victim", database_url, record, PIE_TEST_SLEEP="60", PIE_IN_PROCESS_WORKERS="4", **env)
    try:
        await insert_jobs(session, 10)
        deadline = time.monotonic() + 30
        while len(invocations(record)) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # would it claim more than its free workers?
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
    finally:
        if victim.returncode is None:
            victim.kill()
            await victim.wait()
    return victim


async def test_killed_dispatcher_loses_no_job_and_its_jobs_run_again_within_seconds(
    session, settings, database_url, tmp_path
):
    """kill -9 of a dispatcher: it had claimed only as many in-process jobs as it has workers
    (4 of 10), and a live dispatcher on the same host sees its process gone and requeues them at
    once — not after the 300 s lease."""
    record = tmp_path / "invocations.log"
    _RECORD_FILE["path"] = str(record)
    await seed(session)
    victim = await _kill_victim_mid_run(session, database_url, record)
    victim_calls = invocations(record)
    assert {pid for pid, _ in victim_calls} == {victim.pid} and len(victim_calls) == 4
    assert await count(session, Job.status == "started") == 4
    assert await count(session, Job.status == "pending") == 6

    rescuer = Dispatcher(settings.model_copy(update={"dispatch_poll_interval": 0.2}), name="rescuer")
    await rescuer.start()
    try:
        # within seconds on an idle machine; the generous limit is still well inside the lease
        await wait_until(session, lambda: _all_ended(session, 10), timeout=120)
    finally:
        await rescuer.stop()
    assert await count(session, Job.status == "success", Job.attempts == 2) == 4
    assert await count(session, Job.status == "success", Job.attempts == 1) == 6
    rescued = [job_id for pid, job_id in invocations(record) if pid == os.getpid()]
    assert len(rescued) == 10 and len(set(rescued)) == 10


async def test_jobs_of_a_silent_dispatcher_on_another_host_are_requeued_after_its_heartbeat_expires(
    session, settings, database_url, tmp_path
):
    """A dispatcher elsewhere cannot check the process: it requeues the dead one's jobs once its
    heartbeat is older than PIE_DISPATCH_DEAD_AFTER (here 2 s), long before the lease ends."""
    record = tmp_path / "invocations.log"
    _RECORD_FILE["path"] = str(record)
    await seed(session)
    fast = {
        "dispatch_dead_after": 2.0,
        "dispatch_heartbeat_interval": 0.5,
        "dispatch_sweep_interval": 0.2,
        "dispatch_poll_interval": 0.2,
    }
    victim = await _kill_victim_mid_run(
        session, database_url, record, PIE_DISPATCH_HEARTBEAT_INTERVAL="0.5", PIE_DISPATCH_DEAD_AFTER="2"
    )
    assert len(invocations(record)) == 4
    rescuer = Dispatcher(settings.model_copy(update=fast), name="rescuer")
    rescuer.host = "another-host"  # as if on another machine: the victim's pid means nothing here
    await rescuer.start()
    try:
        # dead after 2 s of silence, judged only once the rescuer itself is 2 s healthy: seconds
        # on an idle machine; the generous limit is still well inside the 300 s lease
        await wait_until(session, lambda: _all_ended(session, 10), timeout=120)
    finally:
        await rescuer.stop()
    assert await count(session, Job.status == "success", Job.attempts == 2) == 4
    requeued = (await session.execute(select(Job.error).where(Job.attempts == 2))).scalars().all()
    assert requeued == [None] * 4  # the requeue note is cleared by the successful end
    assert victim.pid not in {pid for pid, _ in invocations(record)[4:]}


async def _started(session, n: int) -> bool:
    return await count(session, Job.status == "started") == n


async def test_a_dispatcher_just_back_from_an_outage_does_not_judge_its_peers_dead(
    session, settings, database_url, caplog
):
    """A dispatcher whose own heartbeats failed (the database refused them: here a lock timeout
    on the dispatchers table) judges no peer dead until its heartbeats have succeeded again for
    PIE_DISPATCH_DEAD_AFTER: after an outage every heartbeat is stale, the peers' too, and a
    peer that is alive must keep its jobs. Once it is healthy that long, a peer still silent is
    dead and its jobs go back to the queue."""
    import logging

    from pie import db

    dead_after = 1.5
    fast = settings.model_copy(
        update={"dispatch_heartbeat_interval": 0.05, "dispatch_dead_after": dead_after, "db_lock_timeout_ms": 200}
    )
    await seed(session)
    await session.execute(
        text(
            "INSERT INTO dispatchers (id, name, host, pid, workers) VALUES ('peer', 'peer', 'elsewhere', 1, 1);"
            "INSERT INTO jobs (job_type, model_id, model_version, input, status, attempts, started_at,"
            " locked_by, lease_expires_at)"
            " VALUES ('inference', 'm1', '1', '{}', 'started', 1, now(), 'peer', now() + interval '1 hour')"
        )
    )
    await session.commit()

    async def peer_job() -> tuple[str, str | None]:
        row = (await session.execute(text("SELECT status, locked_by FROM jobs"))).one()
        await session.commit()
        return row.status, row.locked_by

    async def heartbeat_after(moment: Any, judge: Dispatcher) -> bool:
        beat = await session.scalar(
            text("SELECT heartbeat_at > :t FROM dispatchers WHERE id = :me"), {"t": moment, "me": judge.worker_id}
        )
        await session.commit()
        return bool(beat)

    async def dispatchers() -> list[str]:
        ids = list((await session.execute(text("SELECT id FROM dispatchers ORDER BY id"))).scalars())
        await session.commit()
        return ids

    saved = db.save_engine()
    db.init_engine(database_url, fast)  # the dispatcher's statements give up on a lock after 200 ms
    judge = Dispatcher(fast, name="judge")
    judge.host = "judge-host"
    caplog.set_level(logging.WARNING, logger="pie")
    try:
        judge._start_workers()  # registers and heartbeats
        await wait_until(session, lambda: heartbeat_after(datetime.min, judge), timeout=30)
        await asyncio.sleep(dead_after)  # healthy for PIE_DISPATCH_DEAD_AFTER: a judge of its peers

        # the outage: nobody can heartbeat; when it ends, the peer's last heartbeat is an hour old
        async with db_connection(database_url) as outage:
            await outage.execute("LOCK TABLE dispatchers IN ACCESS EXCLUSIVE MODE")
            await wait_for_log(caplog, "heartbeat failed", timeout=30)
            await outage.execute("UPDATE dispatchers SET heartbeat_at = now() - interval '1 hour' WHERE id = 'peer'")
            ended = (await (await outage.execute("SELECT now()")).fetchone())[0]
        await wait_until(session, lambda: heartbeat_after(ended, judge), timeout=30)  # back

        await judge.sweep()
        # too early to tell a dead peer from a slow one (no other dispatcher may be alive in this
        # database: one left over by an earlier test would judge the peer itself)
        assert await peer_job() == ("started", "peer"), await dispatchers()

        await asyncio.sleep(dead_after)  # healthy again for PIE_DISPATCH_DEAD_AFTER
        await judge.sweep()
        assert await peer_job() == ("pending", None), await dispatchers()
    finally:
        await judge.stop(grace=5.0)
        await db.dispose_engine()
        db.restore_engine(saved)


@contextlib.asynccontextmanager
async def db_connection(database_url: str):
    """A connection of its own whose transaction commits when the block ends."""
    import psycopg

    from pie import db

    conn = await psycopg.AsyncConnection.connect(db.libpq_url(database_url))
    try:
        yield conn
        await conn.commit()
    finally:
        await conn.close()


async def wait_for_log(caplog, words: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(words in r.getMessage() for r in caplog.records):
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {words!r} in time")
        await asyncio.sleep(0.02)
