"""The handler loop end to end (issue 12), against moto's HTTP server and a real `pie serve`
on a loopback port: PIE dispatches a job, the example handler runs in a subprocess where no PIE
server package is importable (a bare interpreter: ``-I -S``, only the kit and the example on
sys.path), and the job ends through the real callback with nothing but the callback token.
Also: per-handler time-outs, payload limits at creation, the loopback PIE_PUBLIC_URL warning."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import clean_subprocess_env, start_pie_server
from test_dispatch_aws import (  # noqa: F401  (fixtures)
    aws,
    aws_settings,
    ecs_cluster,
    moto_endpoint,
    recorded_invocations,
    seed,
    start_recording,
    stored,
)

from pie.dispatch import backends
from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle
from pie.jobs.logic import create_job

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "kit"
LAMBDA_EXAMPLE = ROOT / "examples" / "lambda_handler"
ECS_EXAMPLE = ROOT / "examples" / "ecs_task"
# a bare interpreter: no site-packages at all (so neither PIE nor its dependencies), no
# PYTHONPATH, no user site; only the standard library plus the two directories given
BARE_PYTHON = [getattr(sys, "_base_executable", None) or sys.executable, "-I", "-S"]
RUNNER = r"""
import json, runpy, sys
kit, example, mode = sys.argv[1:4]
for name in ("pie", "sqlalchemy", "fastapi", "boto3", "jsonschema"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} must not be importable here")
sys.path[:0] = [kit, example]
if mode == "lambda":
    import handler
    print(json.dumps(handler.handler(json.loads(sys.stdin.read()), None)))
else:
    runpy.run_path(example + "/entrypoint.py", run_name="__main__")
"""


def run_bare(
    example: Path, mode: str, *, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BARE_PYTHON, "-c", RUNNER, str(KIT), str(example), mode],
        input=stdin,
        env=env or {},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def lambda_function(moto_endpoint) -> dict[str, str]:
    """A function of this module's own (moto's state is per process, shared with
    test_dispatch_aws's server)."""
    import io
    import zipfile

    role = aws("iam", moto_endpoint).create_role(RoleName="pie-handler-e2e", AssumeRolePolicyDocument="{}")["Role"][
        "Arn"
    ]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.write(LAMBDA_EXAMPLE / "handler.py", "handler.py")
        z.write(KIT / "pie_handler_kit.py", "pie_handler_kit.py")
    lam = aws("lambda", moto_endpoint)
    fn = lam.create_function(
        FunctionName="pie-e2e",
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
    )
    return {"arn": fn["FunctionArn"], "version": lam.publish_version(FunctionName="pie-e2e")["Version"]}


def test_the_bare_interpreter_cannot_import_pie():
    r = subprocess.run([*BARE_PYTHON, "-c", "import pie"], capture_output=True, text=True, env={}, timeout=60)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


@pytest.fixture(scope="module")
def pie_server(database_url, tmp_path_factory):
    env = clean_subprocess_env(PIE_DATABASE_URL=database_url, PIE_RUN_DISPATCHER="false", PIE_JWT_SECRET="e2e-secret")
    server = start_pie_server(tmp_path_factory.mktemp("serve"), env=env)
    try:
        yield server
    finally:
        server.stop()


def job_from_api(server, job_id: str) -> dict:
    r = httpx.get(f"{server.url}/v2/jobs/{job_id}", headers=server.admin_headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


async def test_lambda_job_completes_through_the_example_handler(
    session, pie_server, aws_settings, moto_endpoint, lambda_function, caplog
):
    await seed(
        session, "lam-e2e", {"type": "lambda", "arn": lambda_function["arn"], "version": lambda_function["version"]}
    )
    r = httpx.post(
        f"{pie_server.url}/v2/models/lam-e2e/versions/1/inference",
        json={"input": {"route": "Adelaide to Sydney", "competitor_count": 5, "on_demand": True}},
        headers=pie_server.headers(scopes=["run_inference"]),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["inference_job_id"]

    start_recording(moto_endpoint)
    caplog.set_level(logging.WARNING, logger="pie.dispatch")
    assert await dispatch_until_idle(aws_settings.model_copy(update={"public_url": pie_server.url})) == 1
    (call,) = [c for c in recorded_invocations(moto_endpoint) if c["payload"]["job_id"] == job_id]
    payload = call["payload"]
    assert payload["callback_url"] == f"{pie_server.url}/v2/models/lam-e2e/versions/1/jobs/{job_id}/complete"
    assert job_from_api(pie_server, job_id)["status"] == "started"

    # the example handler, in a bare interpreter, on exactly what Lambda received
    done = run_bare(LAMBDA_EXAMPLE, "lambda", stdin=json.dumps(payload))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "success" and summary["callback"]["status"] == "success"

    job = job_from_api(pie_server, job_id)
    assert job["status"] == "success"
    assert job["output"] == {
        "recommended_price": 121.0,  # 100 x (1 + 0.02 x 5) x 1.1
        "currency": "AUD",
        "model": "lam-e2e@1",
        "route": "Adelaide to Sydney",
    }
    # PIE_PUBLIC_URL was loopback: a warning on the job, logged once by the dispatcher
    assert any("loopback" in w and "callback cannot arrive" in w for w in job["warnings"])
    assert sum("PIE_PUBLIC_URL" in rec.getMessage() for rec in caplog.records) == 1

    # the token did its job and nothing more: it reads nothing
    r = httpx.get(
        f"{pie_server.url}/v2/jobs/{job_id}",
        headers={"Authorization": f"Bearer {payload['callback_token']}"},
        timeout=30,
    )
    assert r.status_code == 401


async def test_lambda_handler_failure_is_reported_as_a_structured_error(
    session, pie_server, aws_settings, moto_endpoint, lambda_function
):
    await seed(session, "lam-fail", {"type": "lambda", "arn": lambda_function["arn"]})
    job = await create_job(session, job_type="inference", model_id="lam-fail", model_version="1", input={"no_route": 1})
    await session.commit()
    start_recording(moto_endpoint)
    await dispatch_until_idle(aws_settings.model_copy(update={"public_url": pie_server.url}))
    (call,) = [c for c in recorded_invocations(moto_endpoint) if c["payload"]["job_id"] == job.job_id]
    done = run_bare(LAMBDA_EXAMPLE, "lambda", stdin=json.dumps(call["payload"]))
    assert done.returncode == 0, done.stderr
    row = job_from_api(pie_server, job.job_id)
    assert row["status"] == "failure"
    assert row["error"] == {
        "code": "missing_feature",
        "message": "a 'route' feature or input is required",
        "details": {"job_id": job.job_id},
    }


async def test_ecs_job_completes_through_the_example_entrypoint(
    session, pie_server, aws_settings, moto_endpoint, ecs_cluster
):
    await seed(session, "ecs-e2e", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-train"})
    job = await create_job(
        session,
        job_type="training",
        model_id="ecs-e2e",
        model_version="1",
        input={"weekly_demand": [10, 20, 30, 40], "epochs": 3},
    )
    await session.commit()
    assert await dispatch_until_idle(aws_settings.model_copy(update={"public_url": pie_server.url})) == 1

    ecs = aws("ecs", moto_endpoint)
    arns = ecs.list_tasks(cluster=ecs_cluster, startedBy=backends.ecs_started_by(job.job_id))["taskArns"]
    task = ecs.describe_tasks(cluster=ecs_cluster, tasks=arns)["tasks"][0]
    (override,) = task["overrides"]["containerOverrides"]
    assert override["name"] == "main"
    environment = {e["name"]: e["value"] for e in override["environment"]}
    assert set(environment) == {"PIE_JOB_PAYLOAD"}

    # the entrypoint with the environment RunTask gave the container (and nothing else)
    done = run_bare(ECS_EXAMPLE, "ecs", env=environment)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "job_id": job.job_id,
        "status": "success",
        "error": None,
    }
    row = job_from_api(pie_server, job.job_id)
    assert row["status"] == "success"
    assert row["output"] == {
        "model": "ecs-e2e@1",
        "parameters": {"mean": 25.0, "stdev": pytest.approx(12.909944, rel=1e-6)},
        "epochs": 3,
        "trained_on": 4,
    }

    # a second run of the same task (ECS restarted it) reports the same outcome: a no-op
    again = run_bare(ECS_EXAMPLE, "ecs", env=environment)
    assert again.returncode == 0, again.stderr
    # no payload: exit status 2, nothing reported
    assert run_bare(ECS_EXAMPLE, "ecs", env={}).returncode == 2


async def test_handler_timeout_overrides_the_global_one(session, aws_settings, moto_endpoint, lambda_function):
    """A handler with timeout_seconds 2 fails its job as timed out after 2 s (not before) while
    the global default is an hour; a job of a handler without one keeps running."""
    await seed(session, "short", {"type": "lambda", "arn": lambda_function["arn"], "timeout_seconds": 2})
    await seed(session, "long", {"type": "lambda", "arn": lambda_function["arn"]})
    short = await create_job(session, job_type="inference", model_id="short", model_version="1")
    long = await create_job(session, job_type="inference", model_id="long", model_version="1")
    await session.commit()
    hour = aws_settings.model_copy(update={"job_timeout_seconds": 3600.0})
    assert await dispatch_until_idle(hour) == 2
    started = (await stored(session, short.job_id)).started_at
    assert (await stored(session, short.job_id)).timeout_seconds == 2 and (
        await stored(session, long.job_id)
    ).timeout_seconds is None

    sweeper = Dispatcher(hour, name="sweeper")
    deadline = time.monotonic() + 120  # generous: the hour's time-out would not fire either
    while (row := await stored(session, short.job_id)).status == "started":
        assert time.monotonic() < deadline, "the 2 s time-out never fired"
        await sweeper.sweep()
        await asyncio.sleep(0.1)
    elapsed = (row.completed_at - started).total_seconds()
    assert elapsed >= 2, elapsed  # never before its time-out (after it: as soon as a sweep runs)
    assert row.status == "failure" and row.error["code"] == "timed_out" and row.error["timeout_seconds"] == 2
    assert "within 2 seconds" in row.error["message"]
    assert (await stored(session, long.job_id)).status == "started"


async def test_oversized_payloads_are_422_at_creation(client, admin, session, lambda_function, settings):
    await seed(session, "ecs-big", {"type": "ecs_task", "value": "cluster/task"})
    await seed(session, "lam-big", {"type": "lambda", "arn": lambda_function["arn"]})
    before = await session.scalar(__import__("sqlalchemy").text("SELECT count(*) FROM jobs"))

    r = await client.post(
        "/v2/models/ecs-big/versions/1/inference", json={"input": {"blob": "x" * 8000}}, headers=admin
    )
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False and "8192" in r.json()["message"] and "ECS" in r.json()["message"]
    # quotes are escaped inside the override: a smaller input can exceed it too
    r = await client.post("/v2/models/ecs-big/versions/1/inference", json={"input": {"q": ['"'] * 1300}}, headers=admin)
    assert r.status_code == 422 and "8192" in r.json()["message"]
    # just under the limit is fine
    r = await client.post(
        "/v2/models/ecs-big/versions/1/inference", json={"input": {"blob": "x" * 5000}}, headers=admin
    )
    assert r.status_code == 202, r.text

    limit = settings.lambda_max_payload_bytes
    r = await client.post(
        "/v2/models/lam-big/versions/1/inference", json={"input": {"blob": "x" * limit}}, headers=admin
    )
    assert r.status_code == 422 and "PIE_LAMBDA_MAX_PAYLOAD_BYTES" in r.json()["message"]
    r = await client.post(
        "/v2/models/lam-big/versions/1/inference", json={"input": {"blob": "x" * (limit - 2000)}}, headers=admin
    )
    assert r.status_code == 202, r.text
    # nothing half-written: only the two accepted jobs exist
    assert await session.scalar(__import__("sqlalchemy").text("SELECT count(*) FROM jobs")) == before + 2


def test_loopback_public_url_is_detected(settings):
    for url in (
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
        "http://0.0.0.0",
        "http://127.1.2.3",
    ):
        assert backends.is_loopback_url(url), url
    for url in ("https://pie.example.com", "http://10.0.0.5:8000", "http://testserver"):
        assert not backends.is_loopback_url(url), url
    public = settings.model_copy(update={"public_url": "https://pie.example.com"})
    assert backends.public_url_warning(public, "lambda") is None
    loop = settings.model_copy(update={"public_url": "http://localhost:8123"})
    assert backends.public_url_warning(loop, "in_process") is None  # in-process jobs need no callback
    assert "cannot arrive" in backends.public_url_warning(loop, "ecs_task")
