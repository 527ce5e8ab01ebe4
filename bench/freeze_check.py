"""Benchmark of the freeze check: a domain ``default`` assignment upsert that passes the check
of every non-departed service and re-resolves everyone's ``resolved_features``.

For each size N (default 10,000 and 50,000 non-departed services with provided features drawn
from the spec's seven-feature example set, nearly all distinct), in one run on one database:

* upsert: ``pie.assignments.logic.upsert_domain_assignment`` (the real route logic: domain lock,
  model reference, freeze check, archive + insert, bulk re-resolve), committed. The default key
  alternates between version 2 (frozen schema = the seven features plus a defaulted ``fare``)
  and version 1 (the seven features), so every service's ``resolved_features`` really changes
  on every run;
* baseline: one bulk ``UPDATE services SET resolved_features = ...`` of the same rows (the new
  value computed in SQL), committed: the bare cost of rewriting those rows.

Each figure is the median of ``--repeat`` runs (``VACUUM ANALYZE services`` before each).
Targets: upsert <= 4x baseline; cost growing linearly from 10k to 50k.

Database: PIE_BENCH_DATABASE_URL (migrated to head, the bench's rows removed afterwards), else a
scratch database on postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/freeze_check.py [--services 10000 50000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"

SEVEN_FEATURES = [
    {
        "name": "route",
        "json_schema": {"type": "string", "enum": ["Adelaide to Sydney", "Sydney to Adelaide"]},
        "mandatory": True,
    },
    {"name": "competitor_count", "json_schema": {"type": "integer", "minimum": 0, "maximum": 20}, "mandatory": False},
    {"name": "advertising_spend", "json_schema": {"type": "number", "minimum": 0, "maximum": 100}, "mandatory": False},
    {"name": "on_demand", "json_schema": {"type": "boolean"}, "mandatory": False},
    {
        "name": "weekly_demand",
        "json_schema": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 7, "maxItems": 7},
        "mandatory": False,
    },
    {
        "name": "origin_destination_pair",
        "json_schema": {
            "type": "array",
            "prefixItems": [{"type": "string"}, {"type": "string"}],
            "items": False,
            "minItems": 2,
            "maxItems": 2,
        },
        "mandatory": False,
    },
    {
        "name": "market_ref",
        "json_schema": {"oneOf": [{"type": "string", "enum": ["spot", "auction"]}, {"type": "integer", "minimum": 0}]},
        "mandatory": False,
    },
]
WITH_FARE = SEVEN_FEATURES + [
    {"name": "fare", "json_schema": {"type": "number", "minimum": 0, "default": 99.5}, "mandatory": False}
]
HANDLERS = {
    "training": {"type": "in_process", "value": "echo"},
    "inference": {"type": "in_process", "value": "reference_pricing"},
}
MODEL_ID = "bench-pricing"

# N services with seven-feature provided sets: most values vary per service (weekly demand,
# spend), a few departed services that must be skipped
SERVICES_SQL = """
INSERT INTO services (client_id, domain_id, service_id, status, departure_datetime, provided_features, resolved_features)
SELECT %(client)s, %(domain)s, 'svc-' || lpad(g::text, 6, '0'), 'available',
       CASE WHEN g %% 100 = 0 THEN now() - interval '1 day' ELSE now() + interval '30 days' END,
       p.f, p.f
FROM generate_series(1, %(n)s) AS g,
LATERAL (SELECT jsonb_build_object(
    'route', CASE WHEN g %% 2 = 0 THEN 'Adelaide to Sydney' ELSE 'Sydney to Adelaide' END,
    'competitor_count', g %% 21,
    'advertising_spend', round((g %% 1000) / 10.0, 1),
    'on_demand', g %% 3 = 0,
    'weekly_demand', jsonb_build_array(g %% 97, g %% 89, g %% 83, g %% 79, g %% 73, g %% 71, g %% 67),
    'origin_destination_pair', jsonb_build_array('Adelaide', 'Sydney'),
    'market_ref', CASE WHEN g %% 4 = 0 THEN to_jsonb('spot'::text) ELSE to_jsonb(g %% 50) END
) || CASE WHEN g %% 5 = 0 THEN '{"legacy_code": "x"}'::jsonb ELSE '{}'::jsonb END AS f) AS p
"""


def log(message: str) -> None:
    print(message, flush=True)


@asynccontextmanager
async def bench_database() -> AsyncIterator[tuple[str, str, bool]]:
    """(url, description, scratch)."""
    url = os.environ.get("PIE_BENCH_DATABASE_URL")
    if url:
        yield url, "PIE_BENCH_DATABASE_URL", False
        return
    name = f"pie_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(LOCAL_SERVER, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield LOCAL_SERVER.rsplit("/", 1)[0] + "/" + name, f"local PostgreSQL, scratch database {name}", True
    finally:
        with psycopg.connect(LOCAL_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Tenant:
    """One client + domain with N services, its default assigned to version 1."""

    def __init__(self, url: str, n: int):
        self.url = url
        self.n = n
        self.client_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.domain_id = "south_australia"

    def seed(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO models (id, name, handlers, status) VALUES (%s, %s, %s::jsonb, 'active') ON CONFLICT DO NOTHING",
                (MODEL_ID, MODEL_ID, json.dumps(HANDLERS)),
            )
            for version, features in (("1", SEVEN_FEATURES), ("2", WITH_FARE)):
                conn.execute(
                    """INSERT INTO model_versions (model_id, version, status, handlers, features)
                       VALUES (%s, %s, 'active', %s::jsonb, %s::jsonb) ON CONFLICT DO NOTHING""",
                    (MODEL_ID, version, json.dumps(HANDLERS), json.dumps(features)),
                )
            conn.execute("INSERT INTO clients (client_id, name) VALUES (%s, %s)", (self.client_id, self.client_id))
            conn.execute(
                "INSERT INTO domains (client_id, domain_id, name, features) VALUES (%s, %s, %s, %s::jsonb)",
                (self.client_id, self.domain_id, "bench", json.dumps(SEVEN_FEATURES)),
            )
            conn.execute(
                """INSERT INTO assignments (client_id, domain_id, assignment_key, model_id, model_version)
                   VALUES (%s, %s, 'default', %s, '1')""",
                (self.client_id, self.domain_id, MODEL_ID),
            )
            conn.execute(SERVICES_SQL, {"client": self.client_id, "domain": self.domain_id, "n": self.n})
            conn.execute("VACUUM ANALYZE services")

    def cleanup(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            params = (self.client_id,)
            conn.execute("DELETE FROM jobs WHERE client_id = %s", params)
            conn.execute("DELETE FROM assignments WHERE client_id = %s", params)
            conn.execute("DELETE FROM services WHERE client_id = %s", params)
            conn.execute("DELETE FROM domains WHERE client_id = %s", params)
            conn.execute("DELETE FROM clients WHERE client_id = %s", params)

    def vacuum(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE services")
            conn.execute("VACUUM ANALYZE jobs")

    def non_departed(self) -> int:
        with psycopg.connect(self.url) as conn:
            return conn.execute(
                """SELECT count(*) FROM services WHERE client_id = %s AND domain_id = %s
                   AND (departure_datetime IS NULL OR departure_datetime > now())""",
                (self.client_id, self.domain_id),
            ).fetchone()[0]

    async def scope(self, session):
        from pie.auth import Principal
        from pie.deps import TenantScope
        from pie.tables.clients import Client

        client = await session.get(Client, self.client_id)
        return TenantScope(principal=Principal(subject="bench", is_admin=True), client=client)


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def ensure_schema(url: str) -> None:
    from pie.migrate import upgrade

    upgrade(url)


async def init(url: str) -> None:
    from pie import db

    db.init_engine(url, pool_size=2, max_overflow=0)


async def bench_size(url: str, n: int, repeat: int) -> tuple[float, float, int]:
    from sqlalchemy import text

    from pie import db
    from pie.assignments.logic import upsert_domain_assignment
    from pie.assignments.schemas import AssignmentUpsert

    tenant = Tenant(url, n)
    tenant.seed()
    live = tenant.non_departed()
    versions = ["2", "1"]
    upserts: list[float] = []
    baselines: list[float] = []
    try:
        for index in range(repeat):
            target = versions[index % 2]

            async def baseline() -> None:
                # the same rows rewritten with a new value computed in SQL, one statement
                extra = '{"fare": 99.5}' if index % 2 == 0 else "{}"
                async with db.sessionmaker()() as session, session.begin():
                    await session.execute(
                        text(
                            """UPDATE services SET resolved_features = (provided_features - 'legacy_code') || CAST(:extra AS jsonb),
                                      updated_at = clock_timestamp()
                               WHERE client_id = :c AND domain_id = :d
                                 AND (departure_datetime IS NULL OR departure_datetime > now())"""
                        ),
                        {"c": tenant.client_id, "d": tenant.domain_id, "extra": extra},
                    )

            async def upsert() -> None:
                async with db.sessionmaker()() as session, session.begin():
                    scope = await tenant.scope(session)
                    await upsert_domain_assignment(
                        session,
                        scope,
                        tenant.domain_id,
                        "default",
                        AssignmentUpsert(model_id=MODEL_ID, model_version=target),
                    )

            tenant.vacuum()
            baselines.append(await timed(baseline))
            # the baseline wrote the values the upsert is about to compute: put the previous
            # ones back so the upsert rewrites every row too
            async with db.sessionmaker()() as session, session.begin():
                await session.execute(
                    text(
                        """UPDATE services SET resolved_features = (provided_features - 'legacy_code') || CAST(:extra AS jsonb)
                           WHERE client_id = :c AND domain_id = :d"""
                    ),
                    {
                        "c": tenant.client_id,
                        "d": tenant.domain_id,
                        "extra": "{}" if target == "2" else '{"fare": 99.5}',
                    },
                )
            tenant.vacuum()
            upserts.append(await timed(upsert))
        # the last upsert really re-resolved everyone
        with psycopg.connect(url) as conn:
            has_fare = conn.execute(
                """SELECT count(*) FILTER (WHERE resolved_features ? 'fare'),
                          count(*) FILTER (WHERE resolved_features ? 'legacy_code')
                   FROM services WHERE client_id = %s AND (departure_datetime IS NULL OR departure_datetime > now())""",
                (tenant.client_id,),
            ).fetchone()
        expected = live if versions[(repeat - 1) % 2] == "2" else 0
        assert has_fare == (expected, 0), (has_fare, expected)
    finally:
        tenant.cleanup()
    return statistics.median(upserts), statistics.median(baselines), live


async def run_sizes(
    doc: str,
    bench_size: Callable[[str, int, int], Awaitable[tuple[float, float, int]]],
    *,
    what: str,
    short: str,
    baseline_label: Callable[[int], str],
    target: float = 4.0,
) -> int:
    """The driver the size benchmarks share: for each ``--services`` size, ``bench_size`` returns
    (median measured, median baseline, non-departed services); print each beside its baseline,
    then the growth from the first to the last size and the ``target`` ratio (default 4x)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--services", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from pie import db

    async with bench_database() as (url, where, _scratch):
        log(f"database: {where}")
        ensure_schema(url)
        await init(url)
        rows = []
        try:
            for n in args.services:
                measured, baseline, live = await bench_size(url, n, args.repeat)
                rows.append((n, live, measured, baseline))
                log(
                    f"{n:>7} services ({live} non-departed): {what} {measured * 1000:8.1f} ms | "
                    f"{baseline_label(live)} {baseline * 1000:8.1f} ms | ratio {measured / baseline:4.2f}x"
                )
        finally:
            await db.dispose_engine()
    if len(rows) >= 2:
        (n0, _, m0, b0), (n1, _, m1, b1) = rows[0], rows[-1]
        log(
            f"growth {n0} -> {n1} ({n1 / n0:.1f}x services): {short} {m1 / m0:.2f}x, baseline {b1 / b0:.2f}x "
            f"(per service: {m0 / n0 * 1e6:.1f} us -> {m1 / n1 * 1e6:.1f} us)"
        )
    worst = max(m / b for _, _, m, b in rows)
    log(f"target {short} <= {target:g}x baseline: {'met' if worst <= target else 'NOT met'} (worst {worst:.2f}x)")
    return 0


async def main() -> int:
    return await run_sizes(
        __doc__, bench_size, what="default upsert", short="upsert", baseline_label=lambda live: "baseline bulk UPDATE"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
