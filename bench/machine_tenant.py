"""Benchmark of the machine-token tenant lookup (spec 14.2).

A machine token's tenant is found from its ``client_id`` claim through the clients'
``app_client_ids`` on every request. This measures ``GET /v2/clients/{client_id}`` (the app
in-process over ASGI, a real database) for:

* baseline: a human token of the tenant's group (its tenant is in the token: no lookup);
* a machine token whose claim is a mapped app-client id, with the per-process cache on
  (``PIE_TENANT_CACHE_SECONDS=10``, the default);
* the same with the cache off (``0``): one lookup query per request.

Each figure is the median of ``--repeat`` rounds of ``--requests`` sequential requests per
variant; within a round the variants alternate in chunks of 20 requests, so a busy machine
slows all three alike.
Target: the cached lookup within 1.1x of the baseline, the uncached within 1.5x.

Database: PIE_BENCH_DATABASE_URL (migrated to head), else a scratch database on
postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/machine_tenant.py [--requests 500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("PIE_JWT_SECRET", "bench-secret")
os.environ["PIE_RUN_DISPATCHER"] = "false"

from freeze_check import bench_database, ensure_schema, log

TENANT = "bench-tenant"
APP_CLIENT = "4f1abcdefghij2klmnop3qrstu"


async def elapsed(http, headers: dict[str, str], requests: int) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        r = await http.get(f"/v2/clients/{TENANT}", headers=headers)
        assert r.status_code == 200, r.text
    return time.perf_counter() - start


CHUNK = 20


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import httpx

    from pie import db
    from pie.app import create_app
    from pie.auth import mint_dev_token
    from pie.auth.app_clients import cache
    from pie.config import Settings

    async with bench_database() as (url, where, _scratch):
        log(f"database: {where}")
        ensure_schema(url)
        db.init_engine(url, pool_size=2, max_overflow=0)
        settings = Settings(_env_file=None)
        app = create_app(settings)
        admin = {"Authorization": f"Bearer {mint_dev_token(settings, admin=True)}"}
        human = {
            "Authorization": "Bearer " + mint_dev_token(settings, groups=[f"client:{TENANT}"], username="bench-user")
        }
        machine = {"Authorization": "Bearer " + mint_dev_token(settings, scopes=["read_domains"], client_id=APP_CLIENT)}
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
                r = await http.post(
                    "/v2/clients",
                    json={"client_id": TENANT, "name": "bench", "app_client_ids": [APP_CLIENT]},
                    headers=admin,
                )
                if r.status_code not in (201, 409):
                    raise SystemExit(f"cannot create the tenant: {r.status_code} {r.text}")
                await elapsed(http, human, 50)  # warm-up
                figures: dict[str, list[float]] = {"baseline": [], "cached": [], "uncached": []}
                for _ in range(args.repeat):
                    spent = {"baseline": 0.0, "cached": 0.0, "uncached": 0.0}
                    for _ in range(max(1, args.requests // CHUNK)):
                        spent["baseline"] += await elapsed(http, human, CHUNK)
                        app.state.settings.tenant_cache_seconds = 10.0
                        spent["cached"] += await elapsed(http, machine, CHUNK)
                        app.state.settings.tenant_cache_seconds = 0.0
                        cache.clear()
                        spent["uncached"] += await elapsed(http, machine, CHUNK)
                    for label, seconds in spent.items():
                        figures[label].append(max(1, args.requests // CHUNK) * CHUNK / seconds)
                await http.patch(f"/v2/clients/{TENANT}", json={"app_client_ids": []}, headers=admin)
        finally:
            await db.dispose_engine()
    base = statistics.median(figures["baseline"])
    log(f"human token (no lookup, baseline): {base:,.0f} requests/s")
    for label in ("cached", "uncached"):
        value = statistics.median(figures[label])
        log(f"machine token, lookup {label}: {value:,.0f} requests/s = {base / value:.2f}x the baseline's time")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
