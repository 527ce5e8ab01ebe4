"""What the instrumentation costs: request throughput of `pie serve` with Prometheus metrics,
the access log and JSON logging ON, beside the same server with them OFF, in one run.

Both servers run at once on the same scratch database (one process each, no dispatcher); the
load generator (asyncio + httpx, C concurrent keep-alive connections) alternates between them
in rounds of S seconds, so drifting machine load hits both alike. Two routes: a job read
(`GET /v2/jobs/{id}`, a real token and tenant check) and the liveness probe (no database).
OFF = PIE_METRICS_ENABLED=false, PIE_ACCESS_LOG=false, PIE_LOG_FORMAT=text; ON = metrics on,
access log on, PIE_LOG_FORMAT=json (log lines written to a file, as a shipper would read them).

Database: as bench/dispatch.py (PIE_BENCH_DATABASE_URL, else a scratch database on the local
PostgreSQL, else an embedded PostgreSQL).

    .venv/bin/python bench/instrumentation.py [--rounds 3] [--seconds 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dispatch import bench_database

SECRET = "bench-instrumentation-secret"


def start(url: str, workdir: Path, port: int, on: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIE_")}
    env.update(
        PIE_DATABASE_URL=url,
        PIE_DATA_DIR=str(workdir),
        PIE_JWT_SECRET=SECRET,
        PIE_RUN_DISPATCHER="false",
        PIE_METRICS_ENABLED="true" if on else "false",
        PIE_ACCESS_LOG="true" if on else "false",
        PIE_LOG_FORMAT="json" if on else "text",
    )
    log = open(workdir / f"serve-{'on' if on else 'off'}.log", "w")
    script = Path(sys.executable).with_name("pie")
    return subprocess.Popen(
        [str(script), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_up(base: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/v2/health/live", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base} did not start")


async def load(base: str, path: str, headers: dict[str, str], seconds: float, concurrency: int) -> int:
    done = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as http:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                r = await http.get(path)
                assert r.status_code == 200, r.text
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def in_process(rounds: int, requests: int) -> None:
    """The same comparison without sockets or a load generator competing for the CPU: both apps
    in this process, driven through ASGI (httpx.ASGITransport), alternating rounds."""
    import logging
    import logging.config

    from pie.app import create_app
    from pie.config import Settings
    from pie.logconfig import logging_config

    config = logging_config("json", "info")
    config["handlers"]["default"] = {
        "class": "logging.FileHandler",
        "filename": os.devnull,
        "formatter": "pie",
        "filters": ["context"],
    }
    logging.config.dictConfig(config)
    apps = {
        "off": create_app(Settings(_env_file=None, metrics_enabled=False, access_log=False)),
        "on": create_app(Settings(_env_file=None, metrics_enabled=True, access_log=True, log_format="json")),
    }
    totals = {"off": 0.0, "on": 0.0}
    for _ in range(rounds + 1):
        for name, app in apps.items():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
                started = time.perf_counter()
                for _ in range(requests):
                    r = await http.get("/v2/health/live")
                    assert r.status_code == 200
                elapsed = time.perf_counter() - started
            if _ > 0:  # the first round warms up
                totals[name] += elapsed
    # the instrumentation's own work per request, timed directly (metrics + one JSON access line)
    from pie.http.middleware import RequestIdMiddleware

    on = RequestIdMiddleware(None, metrics_enabled=True, access_log=True)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": "/v2/jobs/x", "route": apps["on"].routes[-1]}
    state: dict = {}
    started = time.perf_counter()
    for _ in range(requests * rounds):
        on._record(scope, state, 200, 0.001)
    record_us = (time.perf_counter() - started) / (requests * rounds) * 1e6
    print(f"instrumentation work per request, timed alone: {record_us:.1f} us (metrics + one JSON access line)")
    per_off = totals["off"] / (rounds * requests) * 1e6
    per_on = totals["on"] / (rounds * requests) * 1e6
    print(
        f"in process (ASGI) GET /v2/health/live: off {per_off:7.1f} us/request   on {per_on:7.1f} us/request   "
        f"instrumentation {per_on - per_off:6.1f} us/request   throughput ratio on/off {per_off / per_on:.3f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--in-process-requests", type=int, default=2000)
    args = parser.parse_args()

    from conftest import free_port

    from pie.auth import mint_dev_token
    from pie.config import Settings
    from pie.migrate import upgrade

    async with bench_database() as (url, description):
        upgrade(url)
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO models (id, name, handlers, status) VALUES ('bench', 'bench', '{}', 'active')"
                " ON CONFLICT DO NOTHING"
            )
            conn.execute(
                "INSERT INTO model_versions (model_id, version, status, handlers) VALUES ('bench', '1', 'active', '{}')"
                " ON CONFLICT DO NOTHING"
            )
            job_id = conn.execute(
                "INSERT INTO jobs (job_id, job_type, model_id, model_version, input) "
                "VALUES ('0192f1c4-7d1e-7c3a-9f3e-5b1f0e6a2d41', 'inference', 'bench', '1', '{}') RETURNING job_id"
            ).fetchone()[0]
        token = mint_dev_token(Settings(_env_file=None, jwt_secret=SECRET), admin=True)
        headers = {"Authorization": f"Bearer {token}"}
        workdir = Path(tempfile.mkdtemp(prefix="pie-bench-instr-"))
        ports = {"off": free_port(), "on": free_port()}
        procs = {name: start(url, workdir, port, name == "on") for name, port in ports.items()}
        try:
            for port in ports.values():
                wait_up(f"http://127.0.0.1:{port}")
            print(f"database: {description}; {os.cpu_count()} CPUs (shared, loaded machine: compare ratios only)")
            for path in (f"/v2/jobs/{job_id}", "/v2/health/live"):
                totals = {"off": 0, "on": 0}
                for name in ("off", "on"):  # warm-up
                    await load(f"http://127.0.0.1:{ports[name]}", path, headers, 1.0, args.concurrency)
                for _ in range(args.rounds):
                    for name in ("off", "on"):
                        totals[name] += await load(
                            f"http://127.0.0.1:{ports[name]}", path, headers, args.seconds, args.concurrency
                        )
                span = args.rounds * args.seconds
                off, on = totals["off"] / span, totals["on"] / span
                print(
                    f"GET {path:<55} instrumentation off {off:8.1f} req/s   on {on:8.1f} req/s   ratio on/off {on / off:.3f}"
                )
            await in_process(args.rounds, args.in_process_requests)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
