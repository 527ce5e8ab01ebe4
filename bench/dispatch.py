"""Benchmark of the dispatcher against the best Python PostgreSQL queues (issue #21).

PIE (``pie worker``, the built-in ``echo`` handler) beside pgqueuer and procrastinate, on the
same database server, one consumer process each, ``--concurrency`` (16) concurrent no-op jobs,
in alternating rounds (the order rotates every round), so a busy machine hits every system alike:

* **drain**: ``--jobs`` (20,000) jobs queued in one transaction while the consumer idles; jobs/s
  until the last one is done, and the consumer process's CPU per job (user + system time of the
  process and all its threads, from /proc/<pid>/stat, over the drain);
* **latency**: jobs enqueued one by one (one transaction each) at a fixed ``--rate`` (200 jobs/s)
  for ``--latency-seconds``; enqueue -> done p50/p99 from the database's own clock (each queue's
  enqueue and completion timestamps: PIE ``created_at``/``completed_at``, pgqueuer's log rows
  ``queued``/``successful``, procrastinate's events ``deferred``/``succeeded``);
* **lambda**: ``--lambda-jobs`` Lambda jobs dispatched by one ``pie worker`` to moto's HTTP
  server (a separate process), every request held ``--aws-delay`` (30 ms, as the round trip to
  a far AWS region would) by a test hook in the worker's boto3 clients; invocations/s, beside
  the ceiling of one call at a time.

Printed: per round and system the figures, then medians, and the medians of the per-round
ratios PIE / peer (a ratio is taken within one round, so both sides saw the same machine).
Absolute numbers on a shared 2-core machine are noisy: read the ratios, and re-run when
``uptime`` shows a quiet machine.

The peers are installed only for the bench, never by the project::

    .venv/bin/pip install pgqueuer procrastinate      # a peer that is missing is skipped

Database: PIE_BENCH_DATABASE_URL (used as is; it must be empty), else a scratch database on the
local PostgreSQL at postgresql://postgres@127.0.0.1:5432/postgres (dropped afterwards), else
(``--own-cluster``, or when that server is unreachable) a throw-away cluster of its own
(tests/pgcluster.py, made durable again: fsync and synchronous_commit on; 200 connections): the
same PostgreSQL, without the connections and locks of other users of a shared server.

    .venv/bin/python bench/dispatch.py [--rounds 3] [--jobs 20000] [--concurrency 16] [--rate 200]
        [--latency-seconds 10] [--lambda-jobs 3000] [--aws-delay 0.03] [--only drain,latency,lambda]
        [--own-cluster] [--peers pgqueuer,pgqueuer-batches,procrastinate] [--before-src DIR]

``--before-src DIR`` adds ``pie worker`` run from another source tree (``git archive <commit> src
| tar -x -C DIR/..``) to the same rounds: a before/after ratio of a change.
"""

from __future__ import annotations

import os
import sys

# bench/http.py would shadow the standard library's http package (needed by httpx/starlette)
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import asyncio
import contextlib
import importlib.util
import json
import signal
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIE_HANDLERS = (
    '{"inference": {"type": "in_process", "value": "echo"}, "training": {"type": "in_process", "value": "echo"}}'
)


# ---------------------------------------------------------------------------------------------
# the database


@asynccontextmanager
async def bench_database(own_cluster: bool) -> AsyncIterator[tuple[str, str]]:
    """(url, description)."""
    url = os.environ.get("PIE_BENCH_DATABASE_URL")
    if url and not own_cluster:
        yield url, "PIE_BENCH_DATABASE_URL"
        return
    name = None
    if not own_cluster:
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
    sys.path.insert(0, str(ROOT / "tests"))
    from pgcluster import OwnCluster

    cluster = await asyncio.to_thread(OwnCluster)
    with open(cluster.data / "postgresql.conf", "a") as conf:  # durable, as a server is (later lines win)
        conf.write("\nfsync = on\nsynchronous_commit = on\nfull_page_writes = on\n")
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster.url, f"a cluster of its own ({cluster.dir}; fsync and synchronous_commit on)"
    finally:
        await asyncio.to_thread(cluster.destroy)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# ---------------------------------------------------------------------------------------------
# consumer processes


class Consumer:
    """A consumer process, started and stopped around each measurement."""

    def __init__(self, argv: list[str], env: dict[str, str], ready: str):
        self.argv, self.env, self.ready = argv, env, ready
        self.proc: subprocess.Popen[str] | None = None

    async def __aenter__(self) -> Consumer:
        import tempfile

        self.log = tempfile.NamedTemporaryFile("w+", prefix="pie-bench-consumer-", suffix=".log")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        deadline = time.monotonic() + 60
        while self.ready not in Path(self.log.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"consumer {self.argv} did not start:\n" + Path(self.log.name).read_text()[-3000:])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # LISTEN in place, first idle poll done
        return self

    def output(self) -> str:
        return Path(self.log.name).read_text()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aexit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.log.close()


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIE_", "AWS_"))}


# ---------------------------------------------------------------------------------------------
# the systems


class System:
    name = ""
    ready = "ready"

    def __init__(self, url: str, concurrency: int):
        self.url, self.concurrency = url, concurrency

    def consumer(self, **extra_env: str) -> Consumer:
        env = {**base_env(), **extra_env}
        argv = [
            sys.executable,
            __file__,
            "--consumer",
            self.name,
            "--url",
            self.url,
            "--concurrency",
            str(self.concurrency),
        ]
        return Consumer(argv, env, self.ready)

    async def install(self) -> None: ...
    async def enqueue_many(self, conn: psycopg.AsyncConnection[Any], n: int) -> None: ...
    async def enqueue_one(self, conn: psycopg.AsyncConnection[Any]) -> None: ...
    async def remaining(self, conn: psycopg.AsyncConnection[Any]) -> int: ...  # type: ignore[empty-body]
    async def latencies(self, conn: psycopg.AsyncConnection[Any]) -> list[float]: ...  # type: ignore[empty-body]
    async def reset(self, conn: psycopg.AsyncConnection[Any]) -> None: ...


class Pie(System):
    name = "PIE"
    ready = "dispatching"

    def consumer(self, **extra_env: str) -> Consumer:
        env = {
            **base_env(),
            "PIE_DATABASE_URL": self.url,
            "PIE_JWT_SECRET": "bench-secret",
            "PIE_LOG_LEVEL": "warning",
            "PIE_IN_PROCESS_WORKERS": str(self.concurrency),
            "PIE_PUBLIC_URL": "https://pie.example.com",
            **extra_env,
        }
        return Consumer([str(Path(sys.executable).with_name("pie")), "worker", "--name", "bench"], env, self.ready)

    async def install(self) -> None:
        sys.path.insert(0, str(ROOT / "src"))
        from pie.migrate import upgrade

        await asyncio.to_thread(upgrade, self.url)
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO models (id, name, handlers, status) VALUES ('bench', 'bench', %s::jsonb, 'active')",
                (PIE_HANDLERS,),
            )
            await conn.execute(
                "INSERT INTO model_versions (model_id, version, status, handlers) "
                "VALUES ('bench', '1', 'active', %s::jsonb)",
                (PIE_HANDLERS,),
            )

    async def enqueue_many(self, conn, n, model_id: str = "bench") -> None:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO jobs (job_type, model_id, model_version, input) "
                "SELECT 'inference', %s, '1', jsonb_build_object('n', g) FROM generate_series(1, %s) AS g",
                (model_id, n),
            )
            await conn.execute("SELECT pg_notify('pie_jobs', '')")

    async def enqueue_one(self, conn) -> None:
        # what create_job writes and notifies, in one round trip
        await conn.execute(
            "WITH j AS (INSERT INTO jobs (job_type, model_id, model_version, input) "
            "VALUES ('inference', 'bench', '1', '{\"n\": 1}') RETURNING job_id) "
            "SELECT pg_notify('pie_jobs', '') FROM j"
        )

    async def remaining(self, conn) -> int:
        row = await (await conn.execute("SELECT count(*) FROM jobs WHERE status IN ('pending', 'started')")).fetchone()
        return row[0]

    async def check(self, conn, n: int) -> None:
        row = await (
            await conn.execute("SELECT count(*) FILTER (WHERE status = 'success' AND attempts = 1), count(*) FROM jobs")
        ).fetchone()
        if row[0] != n or row[1] != n:
            raise SystemExit(f"PIE: {row[0]} of {n} jobs succeeded at the first attempt ({row[1]} jobs)")

    async def latencies(self, conn) -> list[float]:
        cur = await conn.execute(
            "SELECT EXTRACT(EPOCH FROM completed_at - created_at)::float8 FROM jobs WHERE status = 'success'"
        )
        return [r[0] for r in await cur.fetchall()]

    async def reset(self, conn) -> None:
        await conn.execute("DELETE FROM jobs")


class PieBefore(Pie):
    """``pie worker`` of another source tree (``--before-src``, e.g. the tree before a change:
    ``git archive <commit> src | tar -x -C /tmp/before``), on the same database and jobs."""

    name = "PIE-before"
    src = ""

    def consumer(self, **extra_env: str) -> Consumer:
        made = super().consumer(**extra_env)
        made.env["PYTHONPATH"] = self.src
        return made

    async def install(self) -> None:
        """The same tables and model as PIE's (installed once)."""


class PgQueuer(System):
    """pgqueuer "bounded": at most N jobs at once (``max_concurrent_tasks``, which needs batches
    of at most N/2)."""

    name = "pgqueuer"

    async def install(self) -> None:
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await Queries(PsycopgDriver(conn)).install()

    async def enqueue_many(self, conn, n) -> None:
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        await Queries(PsycopgDriver(conn)).enqueue(["noop"] * n, [None] * n, [0] * n)

    async def enqueue_one(self, conn) -> None:
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        if not hasattr(self, "_queries"):
            self._queries = Queries(PsycopgDriver(conn))
        await self._queries.enqueue("noop", None)

    async def remaining(self, conn) -> int:
        return (await (await conn.execute("SELECT count(*) FROM pgqueuer")).fetchone())[0]

    async def check(self, conn, n: int) -> None:
        done = (await (await conn.execute("SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")).fetchone())[
            0
        ]
        if done != n:
            raise SystemExit(f"pgqueuer: {done} of {n} jobs successful")

    async def latencies(self, conn) -> list[float]:
        cur = await conn.execute(
            "SELECT EXTRACT(EPOCH FROM s.created - q.created)::float8 FROM pgqueuer_log AS q "
            "JOIN pgqueuer_log AS s ON s.job_id = q.job_id AND s.status = 'successful' WHERE q.status = 'queued'"
        )
        return [r[0] for r in await cur.fetchall()]

    async def reset(self, conn) -> None:
        await conn.execute("DELETE FROM pgqueuer")
        await conn.execute("DELETE FROM pgqueuer_log")
        await conn.execute("DELETE FROM pgqueuer_statistics")
        if hasattr(self, "_queries"):
            del self._queries


class Procrastinate(System):
    name = "procrastinate"

    def _app(self, conn_url: str) -> Any:
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conn_url))

        @app.task(name="noop")
        async def noop() -> None:
            return None

        return app

    async def install(self) -> None:
        app = self._app(self.url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def enqueue_many(self, conn, n) -> None:
        app = self._app(self.url)
        async with app.open_async():
            for start in range(0, n, 5000):
                await app.configure_task("noop").batch_defer_async(*[{}] * min(5000, n - start))

    async def enqueue_one(self, conn) -> None:
        if not hasattr(self, "_open"):
            self._open_app = self._app(self.url)
            self._open = await self._open_app.open_async().__aenter__()
        await self._open_app.configure_task("noop").defer_async()

    async def close(self) -> None:
        if hasattr(self, "_open"):
            await self._open_app.close_async()
            del self._open

    async def remaining(self, conn) -> int:
        return (
            await (
                await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
            ).fetchone()
        )[0]

    async def check(self, conn, n: int) -> None:
        done = (
            await (await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")).fetchone()
        )[0]
        if done != n:
            raise SystemExit(f"procrastinate: {done} of {n} jobs succeeded")

    async def latencies(self, conn) -> list[float]:
        cur = await conn.execute(
            "SELECT EXTRACT(EPOCH FROM s.at - d.at)::float8 FROM procrastinate_events AS d "
            "JOIN procrastinate_events AS s ON s.job_id = d.job_id AND s.type = 'succeeded' WHERE d.type = 'deferred'"
        )
        return [r[0] for r in await cur.fetchall()]

    async def reset(self, conn) -> None:
        await self.close()
        await conn.execute("DELETE FROM procrastinate_events")
        await conn.execute("DELETE FROM procrastinate_jobs")


class PgQueuerBatches(PgQueuer):
    """pgqueuer with batches of N and no bound on the jobs at once (no-op jobs end at once, so
    few more than N run): its fastest set-up near N concurrent jobs."""

    name = "pgqueuer-batches"

    async def install(self) -> None:
        """The same tables as ``pgqueuer`` (installed once)."""


PEERS = {"pgqueuer": PgQueuer, "pgqueuer-batches": PgQueuerBatches, "procrastinate": Procrastinate}


# ---------------------------------------------------------------------------------------------
# measurements


async def wait_until_done(system: System, conn, timeout: float) -> float:
    """Poll every 10 ms until nothing is left; the monotonic time it was first seen empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await system.remaining(conn) == 0:
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{system.name}: jobs still queued after {timeout:.0f} s")


async def drain(system: System, n: int) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(system.url, autocommit=True) as conn:
        await system.reset(conn)
        async with system.consumer() as consumer:
            cpu0 = cpu_seconds(consumer.pid)
            start = time.monotonic()
            await system.enqueue_many(conn, n)
            try:
                end = await wait_until_done(system, conn, timeout=max(120.0, n / 50))
            except TimeoutError as exc:
                raise SystemExit(f"{exc}; consumer output:\n{consumer.output()[-3000:]}") from None
            cpu = cpu_seconds(consumer.pid) - cpu0
        await system.check(conn, n)
        await system.reset(conn)
    return {"rate": n / (end - start), "seconds": end - start, "cpu_us": cpu / n * 1e6}


async def latency(system: System, rate: float, seconds: float) -> dict[str, float]:
    n = int(rate * seconds)
    async with await psycopg.AsyncConnection.connect(system.url, autocommit=True) as conn:
        await system.reset(conn)
        async with (
            system.consumer() as consumer,
            await psycopg.AsyncConnection.connect(system.url, autocommit=True) as producer,
        ):
            cpu0 = cpu_seconds(consumer.pid)
            start = time.monotonic()
            late = 0
            for i in range(n):
                due = start + i / rate
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif wait < -0.005:
                    late += 1
                await system.enqueue_one(producer)
            await wait_until_done(system, conn, timeout=120.0)
            cpu = cpu_seconds(consumer.pid) - cpu0
        values = await system.latencies(conn)
        if len(values) != n:
            raise SystemExit(f"{system.name}: {len(values)} of {n} jobs done")
        await system.reset(conn)
    return {
        "p50_ms": statistics.median(values) * 1000,
        "p99_ms": pct(values, 0.99) * 1000,
        "cpu_us": cpu / n * 1e6,
        "late": late,
    }


# ---------------------------------------------------------------------------------------------
# Lambda dispatch through moto's HTTP server, every request delayed in the client


def delay_aws_requests(delay: float) -> None:
    """The test hook: every AWS request of this process's boto3 clients (pie's AwsBackends and
    the ones made here) waits ``delay`` seconds in its thread before it is sent, as the round trip
    to a far AWS region would hold it."""
    from pie.dispatch import backends

    def slow(**_: Any) -> None:
        time.sleep(delay)

    real = backends.AwsBackends._client

    def client(self: Any, service: str) -> Any:
        made = real(self, service)
        made.meta.events.register(f"before-send.{made.meta.service_model.service_name}", slow)
        return made

    backends.AwsBackends._client = client  # type: ignore[method-assign]


async def lambda_dispatch(url: str, n: int, delay: float) -> dict[str, float]:
    import boto3
    import requests

    moto_port = free_port()
    aws_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    moto = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(moto_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**base_env(), **aws_env},
    )
    endpoint = f"http://127.0.0.1:{moto_port}"
    try:
        for _ in range(100):
            with contextlib.suppress(Exception):
                requests.get(endpoint + "/moto-api/", timeout=1)
                break
            await asyncio.sleep(0.1)
        requests.post(endpoint + "/moto-api/config", json={"lambda": {"use_docker": False}}, timeout=10)
        kwargs = {"endpoint_url": endpoint, "region_name": "us-east-1", **_creds(aws_env)}
        role = boto3.client("iam", **kwargs).create_role(RoleName="bench", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        import io
        import zipfile

        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as z:
            z.writestr("handler.py", "def handler(event, context):\n    return event\n")
        arn = boto3.client("lambda", **kwargs).create_function(
            FunctionName="bench",
            Runtime="python3.12",
            Role=role,
            Handler="handler.handler",
            Code={"ZipFile": code.getvalue()},
        )["FunctionArn"]
        hooked = boto3.client("lambda", **kwargs)
        hooked.meta.events.register("before-send.lambda", lambda **_: time.sleep(delay))
        rtts = []
        for _ in range(5):
            started = time.monotonic()
            await asyncio.to_thread(hooked.invoke, FunctionName=arn, InvocationType="Event", Payload=b"{}")
            rtts.append(time.monotonic() - started)
        # baseline in the same run: the same invocations straight from a pool of as many threads
        # (a plain boto3 client as PIE configures it, the same delay), no queue at all
        from concurrent.futures import ThreadPoolExecutor

        from botocore.config import Config

        plain = boto3.client(
            "lambda",
            config=Config(max_pool_connections=32, parameter_validation=False, retries={"total_max_attempts": 2}),
            **kwargs,
        )
        plain.meta.events.register("before-send.lambda", lambda **_: time.sleep(delay))
        body = json.dumps({"job_id": "0" * 36, "input": {"n": 1}, "callback_token": "x" * 420}).encode()

        def call(_: int) -> None:
            plain.invoke(FunctionName=arn, InvocationType="Event", Payload=body)

        started = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            await asyncio.to_thread(lambda: list(pool.map(call, range(n))))
        baseline = n / (time.monotonic() - started)
        handlers = json.dumps({"inference": {"type": "lambda", "arn": arn}, "training": {"type": "lambda", "arn": arn}})
        pie = Pie(url, 16)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("DELETE FROM jobs")
            await conn.execute(
                "INSERT INTO models (id, name, handlers, status) VALUES ('bench-lambda', 'l', %s::jsonb, 'active') "
                "ON CONFLICT DO NOTHING",
                (handlers,),
            )
            await conn.execute(
                "INSERT INTO model_versions (model_id, version, status, handlers) "
                "VALUES ('bench-lambda', '1', 'active', %s::jsonb) ON CONFLICT DO NOTHING",
                (handlers,),
            )
            consumer_process = Consumer(
                [sys.executable, __file__, "--consumer", "pie-aws-delay", "--url", url],
                {**pie.consumer().env, "AWS_ENDPOINT_URL": endpoint, "PIE_BENCH_AWS_DELAY": str(delay), **aws_env},
                pie.ready,
            )
            async with consumer_process as consumer:
                cpu0 = cpu_seconds(consumer.pid)
                start = time.monotonic()
                await pie.enqueue_many(conn, n, model_id="bench-lambda")
                while True:
                    left = (
                        await (
                            await conn.execute(
                                "SELECT count(*) FROM jobs WHERE status = 'pending' "
                                "OR (status = 'started' AND lease_expires_at IS NOT NULL)"
                            )
                        ).fetchone()
                    )[0]
                    if left == 0:
                        break
                    if time.monotonic() - start > 300:
                        raise SystemExit(f"lambda: {left} jobs not dispatched after 300 s")
                    await asyncio.sleep(0.01)
                end = time.monotonic()
                cpu = cpu_seconds(consumer.pid) - cpu0
            row = await (
                await conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'started' AND attempts = 1 AND error IS NULL), count(*) "
                    "FROM jobs"
                )
            ).fetchone()
            if row[0] != n:
                raise SystemExit(f"lambda: {row[0]} of {n} jobs dispatched once without error")
            await conn.execute("DELETE FROM jobs")
        return {
            "rate": n / (end - start),
            "seconds": end - start,
            "cpu_us": cpu / n * 1e6,
            "rtt_ms": statistics.median(rtts) * 1000,
            "baseline": baseline,
        }
    finally:
        moto.terminate()
        moto.wait(10)


def _creds(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}


# ---------------------------------------------------------------------------------------------
# the peers' consumers (run as child processes of this script)


def run_consumer(kind: str, url: str, concurrency: int) -> int:
    if kind == "pie-aws-delay":  # `pie worker`, with the AWS delay hook
        sys.path.insert(0, str(ROOT / "src"))
        delay_aws_requests(float(os.environ["PIE_BENCH_AWS_DELAY"]))
        from pie.cli import main as pie_main

        return pie_main(["worker", "--name", "bench-aws"])
    if kind in ("pgqueuer", "pgqueuer-batches"):
        from datetime import timedelta

        from pgqueuer import QueueManager
        from pgqueuer.db import PsycopgDriver
        from pgqueuer.queries import Queries

        async def main() -> None:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            qm = QueueManager(Queries(PsycopgDriver(conn)))

            @qm.entrypoint("noop")
            async def noop(job: Any) -> None:
                return None

            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
            print("ready", flush=True)
            # max_concurrent_tasks must be at least twice the batch size
            # "bounded": at most N jobs at once (max_concurrent_tasks, which needs batches of at
            # most N/2); "batches": batches of N and no bound (more than N may run at once)
            bounded = kind == "pgqueuer"
            await qm.run(
                batch_size=max(concurrency // 2, 1) if bounded else concurrency,
                max_concurrent_tasks=concurrency if bounded else None,
                dequeue_timeout=timedelta(seconds=5),
                log_aggregation_interval=timedelta(0),
            )

        with asyncio.Runner(loop_factory=_uvloop()) as runner:
            runner.run(main())
        return 0
    if kind == "procrastinate":
        app = Procrastinate(url, concurrency)._app(url)

        async def main() -> None:
            async with app.open_async():
                print("ready", flush=True)
                await app.run_worker_async(concurrency=concurrency, install_signal_handlers=True, delete_jobs="never")

        with asyncio.Runner(loop_factory=_uvloop()) as runner:
            runner.run(main())
        return 0
    raise SystemExit(f"unknown consumer {kind}")


def _uvloop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Every consumer gets uvloop when it is installed (``pie worker`` uses it too)."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


# ---------------------------------------------------------------------------------------------


def fmt_ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (rounds: {', '.join(f'{v:.2f}' for v in values)})"


async def main(args: argparse.Namespace) -> int:
    peers = []
    for name, cls in PEERS.items():
        if name not in args.peers.split(","):
            continue
        if importlib.util.find_spec(name.split("-")[0]) is None:
            print(f"{name} is not installed: skipped (.venv/bin/pip install {name})")
            continue
        peers.append(cls)
    only = set(args.only.split(","))
    async with bench_database(args.own_cluster) as (url, where):
        print(f"database: {where}; load at start: {os.getloadavg()[0]:.2f}")
        systems: list[System] = [Pie(url, args.concurrency)]
        if args.before_src:
            PieBefore.src = os.path.abspath(args.before_src)
            systems.append(PieBefore(url, args.concurrency))
            peers.insert(0, PieBefore)
        systems += [cls(url, args.concurrency) for cls in peers if cls is not PieBefore]
        for system in systems:
            await system.install()
        drains: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
        lats: dict[str, list[dict[str, float]]] = {s.name: [] for s in systems}
        for r in range(args.rounds):
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for system in order:
                if "drain" in only:
                    n = args.jobs if system.name != "procrastinate" else min(args.jobs, args.slow_peer_jobs)
                    d = await drain(system, n)
                    drains[system.name].append(d)
                    print(
                        f"round {r + 1} drain   {system.name:14} {n:6} jobs {d['rate']:8.0f} jobs/s  "
                        f"CPU {d['cpu_us']:6.0f} us/job   (load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                if "latency" in only:
                    lat = await latency(system, args.rate, args.latency_seconds)
                    lats[system.name].append(lat)
                    print(
                        f"round {r + 1} latency {system.name:14} p50 {lat['p50_ms']:6.1f} ms  p99 {lat['p99_ms']:6.1f} ms  "
                        f"CPU {lat['cpu_us']:6.0f} us/job  late sends {lat['late']}",
                        flush=True,
                    )
        lam = None
        if "lambda" in only:
            lam = [await lambda_dispatch(url, args.lambda_jobs, args.aws_delay) for _ in range(args.lambda_rounds)]
            for x in lam:
                print(
                    f"lambda  {args.lambda_jobs} jobs, Invoke round trip with the delay {x['rtt_ms']:.1f} ms: "
                    f"{x['rate']:.0f} invocations/s  CPU {x['cpu_us']:.0f} us/job; baseline (32 threads calling "
                    f"moto, no queue) {x['baseline']:.0f}/s; ratio {x['rate'] / x['baseline']:.2f}  (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )

    print()
    print(f"== summary ({args.rounds} alternating rounds, concurrency {args.concurrency}) ==")
    if "drain" in only:
        print("drain: jobs/s (median) | CPU us/job (median)")
        for name, ds in drains.items():
            print(
                f"  {name:14} {statistics.median(d['rate'] for d in ds):8.0f} | "
                f"{statistics.median(d['cpu_us'] for d in ds):6.0f}"
            )
        pie = drains["PIE"]
        for cls in peers:
            ratios = [p["rate"] / q["rate"] for p, q in zip(pie, drains[cls.name])]
            cpu = [q["cpu_us"] / p["cpu_us"] for p, q in zip(pie, drains[cls.name])]
            print(f"  PIE / {cls.name:14} drain {fmt_ratio(ratios)}; peer CPU / PIE CPU {statistics.median(cpu):.2f}x")
        cpu_pie = statistics.median(d["cpu_us"] for d in pie)
        print(f"  target: PIE CPU per job <= 150 us: {cpu_pie:.0f} us {'OK' if cpu_pie <= 150 else 'MISSED'}")
    if "latency" in only:
        print(f"latency at {args.rate:.0f} jobs/s: p50 / p99 ms (medians)")
        for name, ls in lats.items():
            print(
                f"  {name:14} {statistics.median(x['p50_ms'] for x in ls):6.1f} / "
                f"{statistics.median(x['p99_ms'] for x in ls):6.1f}"
            )
        for cls in peers:
            ratios = [p["p50_ms"] / q["p50_ms"] for p, q in zip(lats["PIE"], lats[cls.name])]
            print(f"  p50 PIE / {cls.name:14} {fmt_ratio(ratios)}")
    if lam:
        rate = statistics.median(x["rate"] for x in lam)
        serial = 1000 / statistics.median(x["rtt_ms"] for x in lam)
        print(
            f"lambda: {rate:.0f} invocations/s per dispatcher ({rate / serial:.1f}x the {serial:.0f}/s of one call "
            f"at a time); target >= 300/s: {'OK' if rate >= 300 else 'MISSED'}"
        )
        ratio = statistics.median(x["rate"] / x["baseline"] for x in lam)
        print(f"  PIE / baseline (the same calls from 32 plain threads, no queue): {ratio:.2f}x")
    return 0


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=20000, help="jobs per drain")
    parser.add_argument("--slow-peer-jobs", type=int, default=5000, help="jobs per drain for procrastinate")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0, help="jobs/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--lambda-jobs", type=int, default=3000)
    parser.add_argument("--lambda-rounds", type=int, default=1)
    parser.add_argument("--aws-delay", type=float, default=0.03, help="seconds added to every AWS request")
    parser.add_argument("--peers", default="pgqueuer,pgqueuer-batches,procrastinate")
    parser.add_argument("--only", default="drain,latency,lambda")
    parser.add_argument("--before-src", help="also run `pie worker` from this src directory (a before/after ratio)")
    parser.add_argument("--own-cluster", action="store_true", help="a throw-away PostgreSQL cluster of its own")
    parser.add_argument("--consumer", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.consumer:
        sys.exit(run_consumer(arguments.consumer, arguments.url, arguments.concurrency))
    sys.exit(asyncio.run(main(arguments)))
