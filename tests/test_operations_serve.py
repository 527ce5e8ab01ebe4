"""Operations with real processes: JSON logs of `pie serve`, readiness on an unmigrated
database and liveness without one, metrics under two worker processes, and SIGTERM with
long-polls and an in-process job in flight."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import SERVE_JWT_SECRET, _with_dbname, clean_subprocess_env, free_port, pie_command
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from test_jobs_routes import complete_url, new_job, seed_version

# an in-process handler that outlives any grace period, registered in the server subprocess
SLOW_HANDLER = textwrap.dedent(
    """
    import time
    from pie.dispatch.inprocess import register

    @register("test_slow")
    def _slow(payload):
        time.sleep(60)
        return {"slept": True}
    """
)


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, ready_path: str = "/v2/health/live"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "PIE_PUBLIC_URL": self.url}
        self.log_path = cwd / f"proc-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in args],
            env=self.env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"exited early:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"did not start:\n{self.log()[-3000:]}"
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="pie-ops-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve_env(database_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    return clean_subprocess_env(
        PIE_DATABASE_URL=database_url,
        PIE_DATA_DIR=str(workdir),
        PIE_JWT_SECRET=SERVE_JWT_SECRET,
        PIE_JWT_ISSUER="pie-dev",
        PIE_LOG_LEVEL="info",
        **extra,
    )


def headers(**kwargs) -> dict[str, str]:
    from pie.auth import mint_dev_token
    from pie.config import Settings

    settings = Settings(_env_file=None, jwt_secret=SERVE_JWT_SECRET, jwt_issuer="pie-dev")
    return {"Authorization": "Bearer " + mint_dev_token(settings, **kwargs)}


def json_lines(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def scrape(url: str) -> list:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    return [s for family in text_string_to_metric_families(r.text) for s in family.samples]


async def job_row(job_id: str):
    from pie import db

    async with db.get_engine().connect() as conn:
        return (
            await conn.execute(
                text("SELECT status, locked_by, lease_expires_at FROM jobs WHERE job_id = :j"), {"j": job_id}
            )
        ).one()


async def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_serve_json_logs_and_sigterm_with_long_polls_and_a_running_job(database_url, session, workdir):
    contract = {"inference": {"output_schema": {"type": "object", "required": ["price"]}}}
    await seed_version(session, "m1", "1", contracts=contract)
    slow = {"inference": {"type": "in_process", "value": "test_slow"}}
    await seed_version(session, "m2", "1", handlers=slow)
    # a job some other worker runs: the server below only completes it
    running = await new_job(session)
    await session.execute(
        text("UPDATE jobs SET status = 'started', started_at = now(), locked_by = 'elsewhere' WHERE job_id = :j"),
        {"j": running.job_id},
    )
    await session.commit()
    (workdir / "plugins").mkdir()
    (workdir / "plugins" / "sitecustomize.py").write_text(SLOW_HANDLER)
    env = serve_env(
        database_url,
        workdir,
        PIE_LOG_FORMAT="json",
        PIE_RUN_DISPATCHER="true",
        PIE_DISPATCH_POLL_INTERVAL="0.2",
        PIE_SHUTDOWN_GRACE_SECONDS="1",
        PYTHONPATH=str(workdir / "plugins"),
    )
    server = Proc([*pie_command(), "serve", "--host", "127.0.0.1", "--port", "{port}"], env, workdir)
    try:
        # -- one request: the client's request id on the app line and on the access line
        r = httpx.post(
            server.url + complete_url(running),
            json={"status": "success", "output": {"no_price": 1}},
            headers={**headers(scopes=["complete_jobs"]), "X-Request-ID": "ops-req-42"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "ops-req-42"
        r = httpx.get(server.url + "/v2/health/live")
        generated = r.headers["x-request-id"]
        assert generated and generated != "ops-req-42"

        # -- 20 long-polls on a job that runs (in process) longer than the grace period
        slow_job = await new_job(session, model_id="m2", model_version="1")

        async def started() -> bool:
            return (await job_row(slow_job.job_id)).status == "started"

        await _wait_for(started)
        async with httpx.AsyncClient(timeout=40) as http:
            polls = [
                asyncio.create_task(
                    http.get(f"{server.url}/v2/jobs/{slow_job.job_id}?wait=30", headers=headers(admin=True))
                )
                for _ in range(20)
            ]

            async def all_waiting() -> bool:
                samples = await asyncio.to_thread(scrape, server.url)
                return any(s.name == "pie_long_polls_waiting" and s.value == 20 for s in samples)

            await _wait_for(all_waiting)
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*polls)
            answered_after = time.monotonic() - sigterm_at
            returncode = await asyncio.to_thread(server.process.wait, 45)
            exited_after = time.monotonic() - sigterm_at
        assert [a.status_code for a in answers] == [200] * 20
        assert {a.json()["job_id"] for a in answers} == {slow_job.job_id}
        assert {a.json()["status"] for a in answers} <= {"started", "pending"}
        # at the SIGTERM, not at their 30 s wait; the exit after the 1 s grace, not after the
        # 60 s job (generous bounds: a loaded machine is slow, not wrong)
        assert answered_after < 20, answered_after
        assert exited_after < 40, exited_after
        assert returncode == 0
        # the unfinished in-process job is back in the queue at once, not after its lease
        row = await job_row(slow_job.job_id)
        assert (row.status, row.locked_by, row.lease_expires_at) == ("pending", None, None)
    finally:
        server.stop()

    lines = json_lines(server.log())
    mine = [line for line in lines if line.get("request_id") == "ops-req-42"]
    app_lines = [line for line in mine if line["logger"] == "pie.jobs"]
    access = [line for line in mine if line["logger"] == "pie.access"]
    assert app_lines and "does not match the contract" in app_lines[0]["message"]
    assert len(access) == 1
    assert access[0]["method"] == "POST"
    assert access[0]["route"] == "/v2/models/{model_id}/versions/{model_version}/jobs/{job_id}/complete"
    assert access[0]["status"] == 200 and access[0]["duration_ms"] >= 0
    assert access[0]["sub"] == "pie-dev-user"
    assert any(line.get("request_id") == generated and line["logger"] == "pie.access" for line in lines)
    # uvicorn's own access log is replaced, its other lines share the format
    assert not any(line["logger"] == "uvicorn.access" for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    # dispatcher lines carry the job id
    assert any(line.get("job_id") == slow_job.job_id for line in lines if line["logger"].startswith("pie.dispatch"))


async def test_readiness_on_an_unmigrated_database_then_migrated(workdir):
    server_url = os.environ.get("PIE_TEST_DATABASE_URL")
    if not server_url:
        pytest.skip("needs PIE_TEST_DATABASE_URL (a server to create an empty database on)")
    from pie.db import libpq_url

    server_url = libpq_url(server_url)
    name = f"pie_ops_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(server_url, name)
    env = serve_env(url, workdir, PIE_RUN_DISPATCHER="false")
    server = Proc([*pie_command(), "serve", "--no-migrate", "--host", "127.0.0.1", "--port", "{port}"], env, workdir)
    try:
        r = httpx.get(server.url + "/v2/health/ready")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "not_ready" and "not migrated" in r.json()["reason"]
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        migrated = subprocess.run([*pie_command(), "migrate"], env=env, cwd=workdir, capture_output=True, text=True)
        assert migrated.returncode == 0, migrated.stderr
        r = httpx.get(server.url + "/v2/health/ready")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready"
    finally:
        server.stop()
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_liveness_without_a_database(workdir):
    """The database goes away under a running server (a start-up needs it: `pie serve` retries
    an unreachable database, then exits): liveness still answers, readiness says why not."""
    from pgcluster import OwnCluster

    with OwnCluster() as pg:
        env = serve_env(pg.url, workdir, PIE_RUN_DISPATCHER="false", PIE_DB_CONNECT_TIMEOUT="2")
        server = Proc([*pie_command(), "serve", "--host", "127.0.0.1", "--port", "{port}"], env, workdir)
        try:
            assert httpx.get(server.url + "/v2/health/ready").status_code == 200
            pg.stop()
            r = httpx.get(server.url + "/v2/health/live")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            r = httpx.get(server.url + "/v2/health/ready", timeout=30)
            assert r.status_code == 503
            assert r.json()["database"] == "unavailable" and "unreachable" in r.json()["reason"]
        finally:
            server.stop()


MULTI = textwrap.dedent(
    """
    import sys, uvicorn
    from pie import metrics
    from pie.cli import _uvicorn_operations_options
    from pie.config import get_settings

    metrics.prepare_multiprocess(sys.argv[2])
    uvicorn.run("pie.app:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), workers=2,
                **_uvicorn_operations_options(get_settings()))
    """
)


def test_metrics_under_two_worker_processes(database_url, workdir):
    env = serve_env(database_url, workdir, PIE_RUN_DISPATCHER="false")
    server = Proc([sys.executable, "-c", MULTI, "{port}", str(workdir / "metrics")], env, workdir)
    try:
        # both workers up (each one's liveness gauge carries its pid)
        deadline = time.monotonic() + 60
        while True:
            pids = {s.labels.get("pid") for s in scrape(server.url) if s.name == "pie_worker_up" and s.value == 1}
            if len(pids) == 2:
                break
            assert time.monotonic() < deadline, pids
            time.sleep(0.2)
        for _ in range(40):  # a new connection each: the kernel spreads them over the workers
            assert httpx.get(server.url + "/v2/health/live").status_code == 200
        for _ in range(3):  # whichever worker answers the scrape, it reports both workers' counts
            samples = scrape(server.url)
            live = [
                s for s in samples if s.name == "pie_http_requests_total" and s.labels.get("route") == "/v2/health/live"
            ]
            assert sum(s.value for s in live) >= 40
    finally:
        server.stop()
