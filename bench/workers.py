"""Read-route throughput of ``pie serve --workers 2`` against ``--workers 1`` (same run, same
database, same load generator), printing the ratio.

Each configuration starts a real ``pie serve`` on a free port against a scratch database
(created on PIE_BENCH_SERVER_URL, default the local PostgreSQL at
postgresql://postgres@127.0.0.1:5432/postgres, dropped afterwards) seeded with 50 clients, then
drives ``GET /v2/clients`` (authenticated, one query, 50 rows) for ``--duration`` seconds with
``--connections`` keep-alive connections. The load generator is ``wrk`` when it is installed
(C, cheap), else a Python thread pool (it then competes harder with the server for the CPU).
The load generator and PostgreSQL share the machine with the server: on 2 cores the ceiling
is below 2x.

    .venv/bin/python bench/workers.py [--duration 10] [--connections 32] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pie.auth import mint_dev_token  # noqa: E402
from pie.config import Settings  # noqa: E402

SECRET = "bench-workers-secret"
SERVER_URL = os.environ.get("PIE_BENCH_SERVER_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_dbname(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def pie_command() -> list[str]:
    script = Path(sys.executable).with_name("pie")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pie.cli"]


def start(workers: int, database_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIE_")}
    env.update(
        PIE_DATABASE_URL=database_url,
        PIE_JWT_SECRET=SECRET,
        PIE_RUN_DISPATCHER="false",
        PIE_DATA_DIR=str(workdir / ".pie"),
        PIE_LOG_LEVEL="warning",
    )
    log = open(workdir / f"serve-{workers}.log", "wb")
    proc = subprocess.Popen(
        [*pie_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pie serve --workers {workers} exited: {(workdir / f'serve-{workers}.log').read_text()}")
        try:
            if httpx.get(f"{url}/v2/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("pie serve did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_wrk(url: str, token: str, duration: float, connections: int) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{int(duration)}s",
            "-H",
            f"Authorization: Bearer {token}",
            f"{url}/v2/clients",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  {errors.group(1)} failed requests (not counted)", flush=True)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    return (total - int(errors.group(1) if errors else 0)) / seconds


def load_python(url: str, token: str, duration: float, connections: int) -> float:
    count = 0
    lock = threading.Lock()
    end = time.monotonic() + duration

    def run() -> None:
        nonlocal count
        done = 0
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as c:
            while time.monotonic() < end:
                r = c.get(f"{url}/v2/clients")
                if r.status_code != 200:
                    raise SystemExit(f"{r.status_code}: {r.text}")
                done += 1
        with lock:
            count += done

    threads = [threading.Thread(target=run) for _ in range(connections)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--python-client", action="store_true", help="use the Python load generator even if wrk exists")
    args = parser.parse_args()
    load = load_wrk if shutil.which("wrk") and not args.python_client else load_python
    name = f"pie_bench_workers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = with_dbname(SERVER_URL, name)
    workdir = Path(tempfile.mkdtemp(prefix="pie-bench-workers-"))
    token = mint_dev_token(Settings(_env_file=None, jwt_secret=SECRET), admin=True)
    results: dict[int, float] = {}
    try:
        for workers in args.workers:
            proc, url = start(workers, database_url, workdir)
            try:
                if not results:  # seed once (the first server migrated the database)
                    for i in range(50):
                        httpx.post(
                            f"{url}/v2/clients",
                            json={"client_id": f"bench-{i:02d}", "name": f"Bench {i}"},
                            headers={"Authorization": f"Bearer {token}"},
                        ).raise_for_status()
                load(url, token, 2.0, args.connections)  # warm-up
                results[workers] = load(url, token, args.duration, args.connections)
            finally:
                stop(proc)
                failures = [
                    line
                    for line in (workdir / f"serve-{workers}.log").read_text(errors="replace").splitlines()
                    if "Error" in line or "error" in line
                ]
                if failures:
                    print(f"  server errors: {len(failures)}, last: {failures[-1][:300]}", flush=True)
            print(f"--workers {workers}: {results[workers]:8.1f} req/s  (GET /v2/clients, {load.__name__})", flush=True)
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)
    base = results[args.workers[0]]
    for workers, rate in results.items():
        print(f"ratio --workers {workers} / --workers {args.workers[0]}: {rate / base:.2f}x")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
