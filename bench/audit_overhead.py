"""Benchmark of the audit trail's cost on the write path.

In one run on one database, through the real ASGI app (in process, httpx ASGITransport):

* audited: ``--writes`` sequential ``PUT .../service/{id}`` updates (a typical write: domain and
  service row locks, re-resolve, one UPDATE) — each also inserts its audit row;
* baseline: the same writes with the audit insert replaced by a no-op (everything else — the
  actor, ``created_by``, the dependency — unchanged).

Writes alternate one by one (baseline, audited, ...) so both see the same machine load; each
figure is the median of ``--repeat`` rounds. Target: audited <= 1.25x baseline — the audit adds
one statement (an INSERT without RETURNING) to a write that already makes about seven round trips
(domain, service and client row locks, the governing schema, the UPDATE, its re-read, COMMIT).

Database: PIE_BENCH_DATABASE_URL (migrated to head), else a scratch database on
postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/audit_overhead.py [--writes 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PIE_JWT_SECRET", "bench-secret")
os.environ.setdefault("PIE_RUN_DISPATCHER", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from freeze_check import bench_database, ensure_schema, log

D = "/v2/clients/bench-client/domains/bench-domain"
SERVICES = 20


async def run(url: str, writes: int, repeat: int) -> tuple[float, float]:
    from pie import db
    from pie.app import create_app
    from pie.audit import routing
    from pie.auth import mint_dev_token
    from pie.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    db.init_engine(url, pool_size=2, max_overflow=0)
    app = create_app(settings)
    admin = {"Authorization": f"Bearer {mint_dev_token(settings, admin=True)}"}
    real_record = routing.record

    async def no_record(*args: object, **kwargs: object) -> None:
        return None

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        handlers = {
            "inference": {"type": "in_process", "value": "echo"},
            "training": {"type": "in_process", "value": "echo"},
        }
        for method, path, body in (
            ("POST", "/v2/clients", {"client_id": "bench-client", "name": "Bench"}),
            ("POST", "/v2/models", {"id": "bench-model", "name": "m", "description": "d", "handlers": handlers}),
            ("POST", "/v2/models/bench-model/new_version", {"version": "1"}),
            ("POST", "/v2/models/bench-model/versions/1/new_status", {"status": "active"}),
            ("POST", "/v2/clients/bench-client/domains", {"domain_id": "bench-domain", "features": []}),
            ("PUT", f"{D}/assignments/default", {"model_id": "bench-model", "model_version": "1"}),
        ):
            r = await http.request(method, path, json=body, headers=admin)
            assert r.status_code < 300, r.text
        for i in range(SERVICES):
            r = await http.post(f"{D}/service/init", json={"service_id": f"s{i}"}, headers=admin)
            assert r.status_code == 202, r.text

        async def write(i: int) -> float:
            start = time.perf_counter()
            r = await http.put(f"{D}/service/s{i % SERVICES}", json={"static_features": {}}, headers=admin)
            assert r.status_code == 200, r.text
            return time.perf_counter() - start

        for i in range(SERVICES):  # warm-up
            await write(i)
        audited, baseline = [], []
        for _ in range(repeat):
            # writes alternate (no audit insert, audited): both see the same load over time
            spent = {False: 0.0, True: 0.0}
            for i in range(2 * writes):
                routing.record = real_record if i % 2 else no_record
                spent[bool(i % 2)] += await write(i)
            routing.record = real_record
            baseline.append(spent[False])
            audited.append(spent[True])
    await db.dispose_engine()
    return statistics.median(baseline), statistics.median(audited)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    async with bench_database() as (url, where, _scratch):
        ensure_schema(url)
        log(f"database: {where}; {args.writes} writes per round, median of {args.repeat} rounds")
        baseline, audited = await run(url, args.writes, args.repeat)
    ratio = audited / baseline
    log(f"baseline (no audit insert): {baseline * 1000 / args.writes:.2f} ms/write")
    log(f"audited:                    {audited * 1000 / args.writes:.2f} ms/write")
    log(f"ratio audited/baseline: {ratio:.2f}x (target <= 1.25x)")
    return 0 if ratio <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
