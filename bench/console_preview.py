"""Benchmark of the console's live-features preview against the API's features dry run on the same
domain: the console page answers from the API's logic (``pie.tenancy.logic.dry_run_features``),
so it should cost the dry run plus its page.

For each size N (default 10,000 and 50,000 services, 1% of them departed, provided features
drawn from the spec's seven-feature example set, nearly all distinct: the domain of
``bench/freeze_check.py``), in one run on one database, alternating, through the ASGI app in
this process (no network):

* console: ``POST /console/clients/{c}/domains/{d}/features`` (``op=preview``) with the editor's
  rows of a draft that adds a defaulted ``fare`` to the seven features (every service passes),
  signed in as an administrator: parsing the rows, the API's definition checks, the dry run,
  the page (changes table, impact);
* baseline: ``PUT /v2/clients/{c}/domains/{d}/features?dry_run=true`` with the same definitions
  (JSON) and an administrator's bearer token.

Each figure is the median of ``--repeat`` runs. Nothing is written by either. Target: console
<= 1.5x the API's dry run.

Database: PIE_BENCH_DATABASE_URL (migrated to head, the bench's rows removed afterwards), else a
scratch database on postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/console_preview.py [--services 10000 50000] [--repeat 5]
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_check import WITH_FARE, Tenant, run_sizes, timed

SECRET = "pie-bench-console-secret"


def editor_form(csrf: str) -> dict[str, str]:
    """The editor's fields for the draft (as the browser posts them)."""
    from pie.console import forms

    data = {"csrf_token": csrf, "op": "preview"}
    for i, row in enumerate(forms.rows_of(WITH_FARE), start=1):
        data.update(
            {
                f"f{i}_name": row.name,
                f"f{i}_type": row.type,
                f"f{i}_values": row.values,
                f"f{i}_minimum": row.minimum,
                f"f{i}_maximum": row.maximum,
                f"f{i}_default": row.default,
                f"f{i}_schema": row.schema,
            }
        )
        if row.mandatory:
            data[f"f{i}_mandatory"] = "1"
        if row.extra:
            data[f"f{i}_extra"] = row.extra
    return data


async def bench_size(url: str, n: int, repeat: int) -> tuple[float, float, int]:
    import httpx

    from pie.app import create_app
    from pie.auth import mint_dev_token
    from pie.config import Settings

    settings = Settings(_env_file=None, jwt_secret=SECRET, jwt_issuer="pie-dev", database_url=url)
    app = create_app(settings)
    token = mint_dev_token(settings, admin=True)
    tenant = Tenant(url, n)
    tenant.seed()
    live = tenant.non_departed()
    consoles: list[float] = []
    dry_runs: list[float] = []
    path = f"/clients/{tenant.client_id}/domains/{tenant.domain_id}/features"
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            signed = await http.post("/console/login", data={"token": token, "next": "/console"})
            assert signed.status_code == 303, signed.text
            editor = await http.get("/console" + path)
            found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', editor.text)
            assert found, editor.text[-500:]
            form = editor_form(found.group(1))

            async def console() -> None:
                r = await http.post("/console" + path, data=form)
                assert r.status_code == 200 and "Every service resolves" in r.text, r.text[-500:]

            async def dry_run() -> None:
                r = await http.put(
                    "/v2" + path,
                    params={"dry_run": "true"},
                    json={"features": WITH_FARE},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert r.status_code == 200 and r.json()["blocking_services"] == [], r.text[-500:]

            tenant.vacuum()
            await console()  # warm both paths once (caches, plans, templates)
            await dry_run()
            for index in range(repeat):
                # alternate which goes first, so neither always meets a warmer cache
                if index % 2 == 0:
                    consoles.append(await timed(console))
                    dry_runs.append(await timed(dry_run))
                else:
                    dry_runs.append(await timed(dry_run))
                    consoles.append(await timed(console))
    finally:
        tenant.cleanup()
    return statistics.median(consoles), statistics.median(dry_runs), live


async def main() -> int:
    return await run_sizes(
        __doc__,
        bench_size,
        what="console preview",
        short="console",
        baseline_label=lambda live: "API dry run",
        target=1.5,
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
