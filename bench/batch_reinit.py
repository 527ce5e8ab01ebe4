"""Benchmark of batch re-initialization (``POST .../services/init``).

For each size N (default 10,000 and 50,000 services, 1% of them departed, provided features
drawn from the spec's seven-feature example set), in one run on one database:

* re-init: ``pie.tenancy.logic.reinit_all_services`` (the real route logic: domain lock, active
  default assignment, one statement: ``INSERT INTO jobs ... SELECT ... FROM services`` with the
  stored ``resolved_features`` as input and features, and the ``UPDATE`` of those services to
  ``initializing``; NOTIFY), committed;
* baseline: one bulk ``INSERT`` of the same number of job rows (``generate_series``, the same
  columns, a typical resolved feature set as input and features), committed: the bare cost of
  recording that many jobs.

Each figure is the median of ``--repeat`` runs; the jobs table is emptied (``TRUNCATE``) and
vacuumed before each run so both start from the same state. No dispatcher runs.
Targets: re-init <= 4x baseline; cost growing linearly from 10k to 50k.

Database: PIE_BENCH_DATABASE_URL (migrated to head, the bench's rows removed afterwards), else a
scratch database on postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/batch_reinit.py [--services 10000 50000] [--repeat 5]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_check import MODEL_ID, Tenant, run_sizes, timed

TYPICAL = {
    "route": "Adelaide to Sydney",
    "competitor_count": 7,
    "advertising_spend": 42.5,
    "on_demand": True,
    "weekly_demand": [10, 20, 30, 40, 50, 60, 70],
    "origin_destination_pair": ["Adelaide", "Sydney"],
    "market_ref": 17,
}


async def bench_size(url: str, n: int, repeat: int) -> tuple[float, float, int]:
    from sqlalchemy import text

    from pie import db
    from pie.tenancy.logic import reinit_all_services

    tenant = Tenant(url, n)
    tenant.seed()
    live = tenant.non_departed()
    with psycopg.connect(url) as conn:
        assignment_id = conn.execute(
            "SELECT assignment_id FROM assignments WHERE client_id = %s AND assignment_key = 'default' AND status = 'active'",
            (tenant.client_id,),
        ).fetchone()[0]
    reinits: list[float] = []
    baselines: list[float] = []

    def empty_jobs() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM jobs WHERE client_id = %s", (tenant.client_id,))
        tenant.vacuum()

    async def baseline() -> None:
        async with db.sessionmaker()() as session, session.begin():
            await session.execute(
                text(
                    """INSERT INTO jobs (job_type, model_id, model_version, assignment_id, client_id, domain_id,
                                         service_id, purpose, input, features)
                       SELECT 'inference', :model_id, '1', :assignment_id, :client_id, :domain_id,
                              'svc-' || lpad(g::text, 6, '0'), 'service_init', CAST(:features AS jsonb), CAST(:features AS jsonb)
                       FROM generate_series(1, :n) AS g"""
                ),
                {
                    "model_id": MODEL_ID,
                    "assignment_id": assignment_id,
                    "client_id": tenant.client_id,
                    "domain_id": tenant.domain_id,
                    "features": json.dumps(TYPICAL),
                    "n": live,
                },
            )

    dispatched: list[tuple[str, str]] = []

    async def reinit() -> None:
        async with db.sessionmaker()() as session, session.begin():
            scope = await tenant.scope(session)
            dispatched[:] = await reinit_all_services(session, scope, tenant.domain_id)

    try:
        for _ in range(repeat):
            empty_jobs()
            baselines.append(await timed(baseline))
            empty_jobs()
            reinits.append(await timed(reinit))
            assert len(dispatched) == live, (len(dispatched), live)
        with psycopg.connect(url) as conn:
            jobs = conn.execute(
                """SELECT count(*), count(*) FILTER (WHERE j.input = s.resolved_features)
                   FROM jobs j JOIN services s USING (client_id, domain_id, service_id)
                   WHERE j.client_id = %s""",
                (tenant.client_id,),
            ).fetchone()
        assert jobs == (live, live), jobs
    finally:
        tenant.cleanup()
    return statistics.median(reinits), statistics.median(baselines), live


async def main() -> int:
    return await run_sizes(
        __doc__,
        bench_size,
        what="batch re-init",
        short="re-init",
        baseline_label=lambda live: f"baseline bulk INSERT of {live} jobs",
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
