"""Benchmark of the live-features dry run (``PUT .../features?dry_run=true``, spec 15.1) against
the freeze check on the same domain.

For each size N (default 10,000 and 50,000 services, 1% of them departed, provided features
drawn from the spec's seven-feature example set, nearly all distinct: the domain of
``bench/freeze_check.py``), in one run on one database, alternating:

* dry run: ``pie.tenancy.logic.dry_run_features`` (the real route logic:
  domain lock, client check, validation of the submitted definitions, the set-based check of
  every non-departed service through ``pie.tenancy.freeze.check_draft``), with a
  draft that adds a defaulted ``fare`` to the seven features (every service passes);
* baseline: the freeze check itself, ``pie.tenancy.freeze.check_domain`` against the same
  definitions on the same domain (what a ``default`` upsert to a version frozen with them runs).

Each figure is the median of ``--repeat`` runs. Nothing is written by either. Target: dry run
<= 1.5x the freeze check.

Database: PIE_BENCH_DATABASE_URL (migrated to head, the bench's rows removed afterwards), else a
scratch database on postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/features_dry_run.py [--services 10000 50000] [--repeat 5]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_check import MODEL_ID, WITH_FARE, Tenant, run_sizes, timed


async def bench_size(url: str, n: int, repeat: int) -> tuple[float, float, int]:
    from pie import db
    from pie.tenancy import freeze
    from pie.tenancy.logic import FeaturesDryRun, dry_run_features

    tenant = Tenant(url, n)
    tenant.seed()
    live = tenant.non_departed()
    dry_runs: list[float] = []
    checks: list[float] = []
    answers: list[FeaturesDryRun] = []

    async def dry_run() -> None:
        async with db.sessionmaker()() as session, session.begin():
            scope = await tenant.scope(session)
            answers.append(await dry_run_features(session, scope, tenant.domain_id, WITH_FARE))

    async def freeze_check() -> None:
        async with db.sessionmaker()() as session, session.begin():
            await freeze.check_domain(
                session,
                client_id=tenant.client_id,
                domain_id=tenant.domain_id,
                definitions=WITH_FARE,
                service_updates=[],
                model_id=MODEL_ID,
                model_version="2",
            )

    try:
        tenant.vacuum()
        await dry_run()  # warm both paths once (caches, plans)
        await freeze_check()
        for index in range(repeat):
            # alternate which goes first, so neither always meets a warmer cache
            if index % 2 == 0:
                dry_runs.append(await timed(dry_run))
                checks.append(await timed(freeze_check))
            else:
                checks.append(await timed(freeze_check))
                dry_runs.append(await timed(dry_run))
        assert all(a.blocking_services == [] for a in answers)
    finally:
        tenant.cleanup()
    return statistics.median(dry_runs), statistics.median(checks), live


async def main() -> int:
    return await run_sizes(
        __doc__,
        bench_size,
        what="features dry run",
        short="dry run",
        baseline_label=lambda live: "freeze check",
        target=1.5,
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
