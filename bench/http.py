"""HTTP request-path benchmark: PIE against the bare stack, in one run, on one database.

Starts the bare baseline (``bench/bare_app.py``: FastAPI + uvicorn + a psycopg 3 pool, no auth,
no ORM, no middleware) and ``pie serve`` (dispatcher off, so only the request path is measured)
on the same scratch database, loads each route with the same generator — ``wrk`` when installed
(2 threads x 32 connections), else a bundled asyncio HTTP/1.1 keep-alive generator — and prints
req/s, p50, p99 and each ratio PIE / bare.

Scenarios (``--scenario``, default ``routes``):

* ``routes``   GET job, domain assignment, service (tenant machine token), GET /v2/health, and
               POST direct inference, each against its bare twin;
* ``workers``  one PIE read route with ``--workers 1`` against ``--workers 2`` (multi-core);
* ``longpoll`` N concurrent ``?wait`` long-polls (default 1,000): database connections the
               server holds while they wait, other requests' p99 with and without the waiters,
               how late each long-poll answers after its wait, and how fast it answers when
               its job ends;
* ``memory``   peak RSS growth of the server to accept one JSON body of 1 MB and 8 MB;
* ``all``      every scenario above.

Database: PIE_BENCH_DATABASE_URL (used as is), else a scratch database on the local PostgreSQL
at postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards).

    .venv/bin/python bench/http.py [--scenario all] [--duration 10] [--connections 32] [--waiters 1000]

Only loopback traffic; every server it starts binds 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import sys

if __name__ == "http":
    # A script run from this folder (``python bench/x.py``) has the folder first on sys.path, so
    # its ``import http`` (httpx, urllib, starlette ...) finds this file: put the standard
    # library's package in its place (the import statement then binds that one).
    import importlib.machinery
    import importlib.util
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _search = [p for p in sys.path if _os.path.abspath(p or ".") != _here]
    _spec = importlib.machinery.PathFinder.find_spec("http", _search)
    assert _spec is not None and _spec.loader is not None
    _stdlib_http = importlib.util.module_from_spec(_spec)
    sys.modules["http"] = _stdlib_http
    _spec.loader.exec_module(_stdlib_http)
else:
    # run as the benchmark: drop this folder from the import path before anything imports
    # ``http.client``
    import os as _os

    if sys.path and _os.path.abspath(sys.path[0] or ".") == _os.path.dirname(_os.path.abspath(__file__)):
        sys.path.pop(0)

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
SECRET = "bench-http-secret"
CLIENT, DOMAIN, SERVICE, MODEL = "bench-client", "pricing", "service-1", "bench-model"
PIE_BIN = Path(sys.executable).with_name("pie")


# ---------------------------------------------------------------------------------------------
# infrastructure


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    url = os.environ.get("PIE_BENCH_DATABASE_URL")
    if url:
        yield url
        return
    name = f"pie_bench_http_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(LOCAL_SERVER, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield LOCAL_SERVER.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(LOCAL_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def pids(self) -> list[int]:
        """The server process and its children (uvicorn workers)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [self.process.pid, *(int(p) for p in out.split())]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_healthy(server: Server, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited: {server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{server.name} did not become healthy; log: {server.log.read_text()[-3000:]}")


def start_bare(db_url: str, tmp: Path) -> Server:
    port = free_port()
    log = tmp / "bare.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env={**os.environ, "BARE_DATABASE_URL": db_url},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    server = Server("bare", f"http://127.0.0.1:{port}", proc, log)
    wait_healthy(server, "/bare/health")
    return server


def pie_env(db_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIE_")}
    env.update(
        PIE_DATABASE_URL=db_url,
        PIE_JWT_SECRET=SECRET,
        PIE_JWT_ISSUER="pie-dev",
        PIE_RUN_DISPATCHER="false",
        PIE_DATA_DIR=str(data_dir),
        **extra,
    )
    return env


def start_pie(db_url: str, tmp: Path, *, workers: int | None = None, name: str = "pie", **extra: str) -> Server:
    port = free_port()
    data_dir = tmp / f"data-{name}"
    data_dir.mkdir(exist_ok=True)
    log = tmp / f"{name}.log"
    cmd = [str(PIE_BIN), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(
        cmd, cwd=data_dir, env=pie_env(db_url, data_dir, **extra), stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    server = Server(name, f"http://127.0.0.1:{port}", proc, log)
    wait_healthy(server, "/v2/health")
    return server


def token(**kwargs) -> str:
    from pie.auth import mint_dev_token
    from pie.config import Settings

    return mint_dev_token(Settings(_env_file=None, jwt_secret=SECRET, jwt_issuer="pie-dev"), ttl=6 * 3600, **kwargs)


# ---------------------------------------------------------------------------------------------
# seeding (through PIE's own API)


@dataclass
class Seed:
    job_id: str
    admin: dict[str, str]
    tenant: dict[str, str]


def seed(pie: Server) -> Seed:
    admin = {"Authorization": f"Bearer {token(admin=True)}"}
    tenant_token = token(scopes=["read_models", "read_domains", "run_inference", "init_services"], client_id=CLIENT)
    tenant = {"Authorization": f"Bearer {tenant_token}"}
    handlers = {
        "training": {"type": "in_process", "value": "echo"},
        "inference": {"type": "in_process", "value": "echo"},
    }
    with httpx.Client(base_url=pie.url, headers=admin, timeout=30) as c:

        def ok(resp: httpx.Response) -> dict:
            if resp.status_code >= 300:
                raise SystemExit(
                    f"seeding failed: {resp.request.method} {resp.request.url} -> {resp.status_code} {resp.text}"
                )
            return resp.json()

        ok(c.post("/v2/clients", json={"client_id": CLIENT, "name": "Bench"}))
        ok(c.post("/v2/models", json={"id": MODEL, "name": "bench", "description": "bench", "handlers": handlers}))
        ok(c.post(f"/v2/models/{MODEL}/new_version", json={"version": "1"}))
        ok(c.post(f"/v2/models/{MODEL}/versions/1/new_status", json={"status": "active"}))
        ok(
            c.post(
                f"/v2/clients/{CLIENT}/domains",
                json={
                    "domain_id": DOMAIN,
                    "name": "bench",
                    "features": [
                        {"name": "route", "mandatory": True, "json_schema": {"type": "string"}},
                        {
                            "name": "competitor_count",
                            "mandatory": False,
                            "json_schema": {"type": "integer", "default": 2},
                        },
                    ],
                },
            )
        )
        ok(
            c.put(
                f"/v2/clients/{CLIENT}/domains/{DOMAIN}/assignments/default",
                json={"model_id": MODEL, "model_version": "1"},
            )
        )
        ok(
            c.post(
                f"/v2/clients/{CLIENT}/domains/{DOMAIN}/service/init",
                json={"service_id": SERVICE, "static_features": {"route": "Adelaide to Sydney"}},
            )
        )
        job = ok(
            c.post(
                f"/v2/clients/{CLIENT}/domains/{DOMAIN}/assignments/default/jobs",
                json={"input": {"route": "Adelaide to Sydney"}},
            )
        )
    return Seed(job_id=job["job_id"], admin=admin, tenant=tenant)


# ---------------------------------------------------------------------------------------------
# load generation


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int

    def row(self) -> str:
        err = f"  ({self.errors} non-2xx!)" if self.errors else ""
        return f"{self.rps:9.0f} req/s  p50 {self.p50_ms:7.2f} ms  p99 {self.p99_ms:7.2f} ms{err}"


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(
    url: str, *, method: str, body: bytes | None, headers: dict[str, str], duration: float, connections: int, tmp: Path
) -> Result:
    lua = ["wrk.method = " + json.dumps(method)]
    if body is not None:
        lua.append("wrk.body = " + json.dumps(body.decode()))
        lua.append('wrk.headers["Content-Type"] = "application/json"')
    for k, v in headers.items():
        lua.append(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
    script = tmp / f"wrk-{uuid.uuid4().hex[:6]}.lua"
    script.write_text("\n".join(lua) + "\n")
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{max(1, int(duration))}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return Result(rps, p50, p99, errors)


async def _asyncio_load(
    url: str, method: str, body: bytes | None, headers: dict[str, str], duration: float, connections: int
) -> Result:
    u = httpx.URL(url)
    head = [f"{method} {u.raw_path.decode()} HTTP/1.1", f"Host: {u.host}:{u.port}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def conn() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(u.host, u.port)
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - t0) * 1000)
                if not status_line.split()[1].startswith(b"2"):
                    errors += 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(conn() for _ in range(connections)))
    elapsed = time.monotonic() - start
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return Result(len(latencies) / elapsed, q[49], q[98], errors)


def _median_result(results: list[Result]) -> Result:
    return Result(
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.errors for r in results),
    )


def load(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    duration: float,
    connections: int,
    tmp: Path,
) -> Result:
    headers = headers or {}
    if shutil.which("wrk"):
        return run_wrk(
            url, method=method, body=body, headers=headers, duration=duration, connections=connections, tmp=tmp
        )
    return asyncio.run(_asyncio_load(url, method, body, headers, duration, connections))


def generator_name() -> str:
    return "wrk (2 threads)" if shutil.which("wrk") else "bundled asyncio generator"


# ---------------------------------------------------------------------------------------------
# scenarios


def scenario_routes(db_url: str, tmp: Path, args: argparse.Namespace) -> None:
    pie = start_pie(db_url, tmp, **dict(kv.split("=", 1) for kv in args.pie_env))
    bare = start_bare(db_url, tmp)
    try:
        s = seed(pie)
        body = json.dumps({"input": {"route": "Adelaide to Sydney", "competitor_count": 3}}).encode()
        pairs = [
            ("GET job", f"/v2/jobs/{s.job_id}", f"/bare/jobs/{s.job_id}", "GET", None, s.tenant, 0.7),
            (
                "GET domain assignment",
                f"/v2/clients/{CLIENT}/domains/{DOMAIN}/assignments/default",
                f"/bare/clients/{CLIENT}/domains/{DOMAIN}/assignments/default",
                "GET",
                None,
                s.tenant,
                0.7,
            ),
            (
                "GET service",
                f"/v2/clients/{CLIENT}/domains/{DOMAIN}/service/{SERVICE}",
                f"/bare/clients/{CLIENT}/domains/{DOMAIN}/service/{SERVICE}",
                "GET",
                None,
                s.tenant,
                0.7,
            ),
            ("GET health", "/v2/health", "/bare/health", "GET", None, {}, 0.9),
            (
                "POST inference",
                f"/v2/models/{MODEL}/versions/1/inference",
                f"/bare/models/{MODEL}/versions/1/inference",
                "POST",
                body,
                s.tenant,
                0.5,
            ),
        ]
        print(
            f"\n## routes: one process each, {generator_name()} x {args.connections} connections, "
            f"{args.rounds} alternating rounds of {args.duration:.0f} s per side (after a 2 s warm-up); "
            "medians of the rounds, ratio = median of the per-round ratios"
        )
        print(f"{'route':24} {'':5} {'result (median round)':56} ratio  target")
        for label, pie_path, bare_path, method, payload, headers, target in pairs:
            if args.only and not any(word.lower() in label.lower() for word in args.only):
                continue
            runs: dict[str, list[Result]] = {"bare": [], "pie": []}
            ratios = []
            sides = (("bare", bare, bare_path, {}), ("pie", pie, pie_path, headers))
            for _name, server, path, hdrs in sides:  # warm-up
                load(
                    server.url + path,
                    method=method,
                    body=payload,
                    headers=hdrs,
                    duration=2,
                    connections=args.connections,
                    tmp=tmp,
                )
            cpu: dict[str, list[float]] = {"bare": [], "pie": []}
            for i in range(args.rounds):
                # alternate which side goes first: a load swing on the shared machine hits both
                for name, server, path, hdrs in sides if i % 2 == 0 else sides[::-1]:
                    before = cpu_seconds(server.pids)
                    result = load(
                        server.url + path,
                        method=method,
                        body=payload,
                        headers=hdrs,
                        duration=args.duration,
                        connections=args.connections,
                        tmp=tmp,
                    )
                    runs[name].append(result)
                    served = max(result.rps * max(1, int(args.duration)), 1.0)
                    cpu[name].append((cpu_seconds(server.pids) - before) / served * 1e6)
                ratios.append(runs["pie"][-1].rps / runs["bare"][-1].rps)
            ratio = statistics.median(ratios)
            med = {name: _median_result(results) for name, results in runs.items()}
            spread = f"  rounds {' '.join(f'{r:.2f}' for r in ratios)}" if args.rounds > 1 else ""
            print(f"{label:24} bare  {med['bare'].row()}")
            print(
                f"{'':24} pie   {med['pie'].row()}  {ratio:4.2f}x  >= {target}x "
                f"{'met' if ratio >= target else 'MISSED'}{spread}"
            )
            # server CPU time per request: steadier than req/s on a machine whose speed drifts
            cpu_bare, cpu_pie = statistics.median(cpu["bare"]), statistics.median(cpu["pie"])
            print(
                f"{'':24} CPU per request (server process): bare {cpu_bare:6.0f} us, pie {cpu_pie:6.0f} us"
                f"  -> bare/pie {cpu_bare / cpu_pie:4.2f}x"
            )
    finally:
        pie.stop()
        bare.stop()


def scenario_workers(db_url: str, tmp: Path, args: argparse.Namespace) -> None:
    print(f"\n## workers: GET domain assignment (tenant token), {generator_name()} x {args.connections} connections")
    results = {}
    for workers in (1, 2):
        pie = start_pie(db_url, tmp, workers=workers, name=f"pie-w{workers}")
        try:
            if workers == 1:
                s = seed(pie)
            path = f"/v2/clients/{CLIENT}/domains/{DOMAIN}/assignments/default"
            load(pie.url + path, headers=s.tenant, duration=2, connections=args.connections, tmp=tmp)
            results[workers] = load(
                pie.url + path, headers=s.tenant, duration=args.duration, connections=args.connections, tmp=tmp
            )
            print(f"--workers {workers}  {results[workers].row()}")
        finally:
            pie.stop()
    print(
        f"ratio --workers 2 / --workers 1: {results[2].rps / results[1].rps:.2f}x  (expected >= 1.6x on 2 cores;"
        " the load generator shares the same 2 cores)"
    )


def _pg_connections(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]


def _pg_connection_states(db_url: str) -> tuple[int, int, int]:
    """(connections of the server, LISTEN connections, connections in use) on this database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE query LIKE 'LISTEN%%'),"
            " count(*) FILTER (WHERE state NOT IN ('idle') AND query NOT LIKE 'LISTEN%%')"
            " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        ).fetchone()


def scenario_longpoll(db_url: str, tmp: Path, args: argparse.Namespace) -> None:
    pie = start_pie(db_url, tmp, name="pie-longpoll")
    try:
        s = seed(pie)
        n = args.waiters
        wait = 20.0
        admin = s.admin
        # one pending job per waiter (dispatcher off: they stay pending until completed below)
        with httpx.Client(base_url=pie.url, headers=admin, timeout=60) as c:
            jobs = [
                c.post(f"/v2/models/{MODEL}/versions/1/inference", json={"input": {"i": i}}).json()["inference_job_id"]
                for i in range(n)
            ]
        probe = f"{pie.url}/v2/jobs/{s.job_id}"
        quiet = load(probe, headers=s.tenant, duration=args.duration, connections=8, tmp=tmp)
        idle_conns = _pg_connections(db_url)

        async def waiters() -> tuple[list[float], list[float], Result, tuple[int, int, int]]:
            # raw keep-alive sockets, all opened before any request is sent, so each long-poll is
            # timed from the moment its request is written (no client-side queueing in the figure)
            u = httpx.URL(pie.url)
            conns = [await asyncio.open_connection(u.host, u.port) for _ in jobs]

            async def one(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], job_id: str) -> tuple[float, float]:
                """(seconds waited, the moment it answered)"""
                reader, writer = conn
                writer.write(
                    f"GET /v2/jobs/{job_id}?wait={wait:g} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\n"
                    f"Authorization: {admin['Authorization']}\r\n\r\n".encode()
                )
                t0 = time.monotonic()
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                answered = time.monotonic()
                writer.close()
                if b" 200 " not in status:
                    raise SystemExit(f"long-poll answered {status!r}")
                return answered - t0, answered

            tasks = [asyncio.create_task(one(c, j)) for c, j in zip(conns, jobs)]
            await asyncio.sleep(3)  # all waiting
            busy_conns = _pg_connection_states(db_url)
            loaded = await asyncio.to_thread(
                load, probe, headers=s.tenant, duration=min(args.duration, wait - 8), connections=8, tmp=tmp
            )
            # end the first 50 jobs: their long-polls must answer at once
            ended_at = time.monotonic()
            async with httpx.AsyncClient(base_url=pie.url, headers=admin, timeout=30) as c2:
                await asyncio.gather(
                    *(
                        c2.post(
                            f"/v2/models/{MODEL}/versions/1/jobs/{j}/complete", json={"status": "success", "output": {}}
                        )
                        for j in jobs[:50]
                    )
                )
            early = [answered - ended_at for _, answered in await asyncio.gather(*tasks[:50])]
            rest = [waited for waited, _ in await asyncio.gather(*tasks[50:])]
            return early, rest, loaded, busy_conns

        early, rest, loaded, busy_conns = asyncio.run(waiters())
        print(f"\n## long-poll: {n} concurrent GET /v2/jobs/{{id}}?wait={wait:.0f}, one process")
        total, listening, busy = busy_conns
        print(
            f"database connections of the server: {idle_conns} before; with {n} waiters {total}, of which "
            f"{listening} LISTEN and {busy} in use (the others idle in the pool) (target: 1 for waiting)"
        )
        print(f"other requests (GET job, 8 connections) without waiters: {quiet.row()}")
        print(f"other requests (GET job, 8 connections) with {n} waiters:  {loaded.row()}")
        print(f"p99 ratio with/without waiters: {loaded.p99_ms / quiet.p99_ms:.2f}x (target <= 2x)")
        over = [d - wait for d in rest]
        print(
            f"long-polls whose job did not end: {len(rest)} answered after wait + "
            f"max {max(over):.2f} s, median {statistics.median(over):.2f} s (target: within wait + 1 s)"
        )
        print(
            f"long-polls whose job ended (50): answered at most {max(early) * 1000:.0f} ms after the"
            " completions were sent (all 50 sent at once)"
        )
    finally:
        pie.stop()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (clock ticks of /proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def _rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def scenario_memory(db_url: str, tmp: Path, args: argparse.Namespace) -> None:
    print("\n## memory: peak RSS growth of the server process to accept one JSON body (POST inference)")
    for size_mb in (1, 8):
        pie = start_pie(db_url, tmp, name=f"pie-mem{size_mb}")
        try:
            s = seed(pie) if size_mb == 1 else None
            headers = {"Authorization": f"Bearer {token(admin=True)}"}
            small = json.dumps({"input": {"x": 1}}).encode()
            with httpx.Client(base_url=pie.url, headers=headers, timeout=120) as c:
                for _ in range(20):  # warm up every code path with small bodies
                    c.post(
                        f"/v2/models/{MODEL}/versions/1/inference",
                        content=small,
                        headers={"Content-Type": "application/json"},
                    )
                pid = pie.pids[-1]
                before = _rss_peak_kb(pid)
                # a wide, shallow body: many short strings and numbers (the expensive shape to parse)
                item = {"sku": "x" * 20, "price": 12.5, "qty": 3}
                count = size_mb * 1024 * 1024 // len(json.dumps(item))
                body = json.dumps({"input": {"items": [item] * count}}).encode()
                t0 = time.monotonic()
                r = c.post(
                    f"/v2/models/{MODEL}/versions/1/inference",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                elapsed = time.monotonic() - t0
                after = _rss_peak_kb(pid)
            growth_mb = (after - before) / 1024
            print(
                f"{len(body) / 1e6:5.1f} MB body -> {r.status_code}, {elapsed * 1000:6.0f} ms, peak RSS +{growth_mb:6.1f} MB"
                f" ({growth_mb / (len(body) / 1048576):4.1f}x the body; target ~10x for 1 MB)"
            )
            _ = s
        finally:
            pie.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["routes", "workers", "longpoll", "memory", "all"], default="routes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating bare/pie rounds per route (routes)")
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument(
        "--pie-env", action="append", default=[], metavar="PIE_X=VALUE", help="routes: a setting of the PIE server"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="routes scenario: only routes whose label contains this word"
    )
    args = parser.parse_args()
    print(f"bench/http.py  python {sys.version.split()[0]}  cores {os.cpu_count()}  generator {generator_name()}")
    chosen = ["routes", "workers", "longpoll", "memory"] if args.scenario == "all" else [args.scenario]
    tmp = Path(tempfile.mkdtemp(prefix="pie-bench-http-"))
    try:
        for name in chosen:
            with scratch_database() as db_url:
                subprocess.run(
                    [str(PIE_BIN), "migrate"], env=pie_env(db_url, tmp), cwd=tmp, check=True, capture_output=True
                )
                globals()[f"scenario_{name}"](db_url, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
