"""Lifecycle operations against moto's HTTP server (issue 19; real boto3 calls via
AWS_ENDPOINT_URL; see test_dispatch_aws.py): cancelling an ECS job stops its task (`StopTask`),
also when the cancel races the hand-over or the job belongs to a deleted service; a cancelled
Lambda job's later report is 409 and ignored; a retried Lambda job is invoked again; an ECS
handler's `container` receives the payload; a Lambda job of a version archived meanwhile
completes and fires nothing. The handler kit's cancellation runs end to end against a real
`pie serve`, in an interpreter where PIE is not importable."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import clean_subprocess_env, start_pie_server
from factories import domain_url, init_service, make_client, make_version, seven_features, stored_service
from lifecycle_support import job, wait_for
from sqlalchemy import text
from test_dispatch_aws import (  # noqa: F401  (fixtures)
    REGION,
    aws,
    aws_settings,
    moto_endpoint,
    recorded_invocations,
    seed,
    start_recording,
)
from test_handler_loop_e2e import BARE_PYTHON, KIT, LAMBDA_EXAMPLE, RUNNER, run_bare

from pie.dispatch import backends
from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle

ROUTE = {"route": "Adelaide to Sydney"}


@pytest.fixture(scope="module")
def lambda_fn(moto_endpoint) -> dict[str, str]:
    """A function of this module's own (moto's state is shared by the whole process)."""
    role = aws("iam", moto_endpoint).create_role(RoleName="pie-lifecycle", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.writestr("handler.py", "def handler(event, context):\n    return event\n")
    fn = aws("lambda", moto_endpoint).create_function(
        FunctionName="pie-lifecycle",
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
    )
    return {"arn": fn["FunctionArn"]}


@pytest.fixture(scope="module")
def ecs_cluster(moto_endpoint) -> str:
    """A cluster and task definitions of this module's own (moto's state is shared by the whole
    process: other modules' fixtures register theirs): `pie-life` (container `main`) and
    `pie-trainer` (container `trainer`)."""
    ec2, ecs = aws("ec2", moto_endpoint), aws("ecs", moto_endpoint)
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
    document = json.dumps(
        {
            "instanceId": instance["InstanceId"],
            "region": REGION,
            "availabilityZone": "us-east-1a",
            "privateIp": "10.0.0.2",
            "imageId": "ami-12c6146b",
            "instanceType": "t2.micro",
            "accountId": "123456789012",
            "architecture": "x86_64",
            "pendingTime": "2026-01-01T00:00:00Z",
            "version": "2017-09-30",
        }
    )
    ecs.create_cluster(clusterName="pie-lifecycle")
    ecs.register_container_instance(cluster="pie-lifecycle", instanceIdentityDocument=document)
    ecs.register_task_definition(
        family="pie-life", containerDefinitions=[{"name": "main", "image": "pie/train", "memory": 128}]
    )
    ecs.register_task_definition(
        family="pie-trainer", containerDefinitions=[{"name": "trainer", "image": "pie/trainer", "memory": 128}]
    )
    return "pie-lifecycle"


def task_of(endpoint: str, cluster: str, job_id: str) -> dict[str, Any]:
    ecs = aws("ecs", endpoint)
    [arn] = (
        ecs.list_tasks(cluster=cluster, startedBy=backends.ecs_started_by(job_id), desiredStatus="RUNNING")["taskArns"]
        or ecs.list_tasks(cluster=cluster, startedBy=backends.ecs_started_by(job_id), desiredStatus="STOPPED")[
            "taskArns"
        ]
    )
    return ecs.describe_tasks(cluster=cluster, tasks=[arn])["tasks"][0]


def payload_of(task: dict[str, Any]) -> dict[str, Any]:
    [override] = task["overrides"]["containerOverrides"]
    return json.loads({e["name"]: e["value"] for e in override["environment"]}["PIE_JOB_PAYLOAD"])


async def infer(client, headers, model_id: str) -> str:
    r = await client.post(f"/v2/models/{model_id}/versions/1/inference", json={"input": ROUTE}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["inference_job_id"]


def callback(client, payload: dict[str, Any], **body: Any):
    return client.post(
        payload["callback_url"].replace("http://testserver", ""),
        json=body,
        headers={"Authorization": f"Bearer {payload['callback_token']}"},
    )


# ---------------------------------------------------------------------------------------------
# ECS


async def test_cancelling_an_ecs_job_stops_its_task(client, session, admin, aws_settings, moto_endpoint, ecs_cluster):
    await seed(session, "ecs-cancel", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-life"})
    job_id = await infer(client, admin, "ecs-cancel")
    assert await dispatch_until_idle(aws_settings) == 1
    task = task_of(moto_endpoint, ecs_cluster, job_id)
    assert task["desiredStatus"] == "RUNNING"  # (moto advances lastStatus on every read)

    body = (await client.post(f"/v2/jobs/{job_id}/cancel", headers=admin)).json()
    assert body["status"] == "failure" and body["error"]["previous_status"] == "started"
    assert body["error"]["ecs_task_arn"] == task["taskArn"]
    assert body["error"]["message"] == f"cancelled by pie-dev-user; its ECS task {task['taskArn']} is being stopped"
    # the stop is an outbox row of the cancel's transaction, worked by a dispatcher
    assert await session.scalar(text("SELECT count(*) FROM task_stops")) == 1
    assert await dispatch_until_idle(aws_settings) == 0
    stopped = task_of(moto_endpoint, ecs_cluster, job_id)
    assert (stopped["desiredStatus"], stopped["stoppedReason"]) == ("STOPPED", "cancelled in PIE")
    assert await session.scalar(text("SELECT count(*) FROM task_stops")) == 0

    # the task's own report, had it got one out, is refused and changes nothing
    r = await callback(client, payload_of(task), status="success", output={"price": 1})
    assert r.status_code == 409 and r.json()["cancelled"] is True
    assert await job(client, admin, job_id) == body


async def test_a_running_dispatcher_stops_the_task_as_soon_as_the_job_is_cancelled(
    client, session, admin, aws_settings, moto_endpoint, ecs_cluster
):
    """`pie serve`'s (or `pie worker`'s) dispatcher: woken by the cancel's NOTIFY (its sweep is
    ten minutes away), it stops the task in the background of its loop."""
    await seed(session, "ecs-live", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-life"})
    running = Dispatcher(aws_settings.model_copy(update={"dispatch_sweep_interval": 600.0}), name="live")
    await running.start()
    try:
        job_id = await infer(client, admin, "ecs-live")

        async def handed_over() -> bool:
            return await session.scalar(text("SELECT ecs_task IS NOT NULL FROM jobs WHERE job_id = :j"), {"j": job_id})

        await wait_for(handed_over, what="the RunTask hand-over")
        await session.rollback()
        assert (await client.post(f"/v2/jobs/{job_id}/cancel", headers=admin)).status_code == 200

        async def stopped() -> bool:
            return task_of(moto_endpoint, ecs_cluster, job_id)["desiredStatus"] == "STOPPED"

        await wait_for(stopped, what="StopTask")

        async def stop_recorded() -> bool:  # the stop's row goes once StopTask has answered
            count = await session.scalar(text("SELECT count(*) FROM task_stops"))
            await session.rollback()
            return count == 0

        await wait_for(stop_recorded, what="the task_stops row deleted after StopTask")
    finally:
        await running.stop(grace=5.0)


async def test_a_cancel_racing_the_hand_over_still_stops_the_task(
    client, session, admin, aws_settings, moto_endpoint, ecs_cluster, monkeypatch
):
    """The cancel commits while RunTask is in flight (the job is started, its task unknown yet):
    the dispatcher then finds the job no longer its own and stops the task it started."""
    await seed(session, "ecs-race", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-life"})
    job_id = await infer(client, admin, "ecs-race")
    loop = asyncio.get_running_loop()
    real = backends.AwsBackends.run_ecs_task
    answers: list[httpx.Response] = []

    def run_then_cancel(self, handler, payload):
        info = real(self, handler, payload)
        answers.append(
            asyncio.run_coroutine_threadsafe(client.post(f"/v2/jobs/{job_id}/cancel", headers=admin), loop).result(30)
        )
        return info

    monkeypatch.setattr(backends.AwsBackends, "run_ecs_task", run_then_cancel)
    assert await dispatch_until_idle(aws_settings) == 1
    [cancelled] = answers
    assert cancelled.status_code == 200 and "ecs_task_arn" not in cancelled.json()["error"]
    stopped = task_of(moto_endpoint, ecs_cluster, job_id)
    assert stopped["desiredStatus"] == "STOPPED"
    assert stopped["stoppedReason"] == "the PIE job had ended when its task started"
    assert (await job(client, admin, job_id))["error"]["code"] == "cancelled"


async def test_deleting_a_service_stops_the_task_of_its_running_init_job(
    client, session, admin, aws_settings, moto_endpoint, ecs_cluster
):
    await make_client(session, "client-1")
    ecs = {"type": "ecs_task", "value": f"{ecs_cluster}/pie-life"}
    await make_version(session, "ecs-svc", "1", handlers={"training": ecs, "inference": ecs})
    D = domain_url("client-1", "south_australia")
    r = await client.post(
        "/v2/clients/client-1/domains",
        json={"domain_id": "south_australia", "features": seven_features()},
        headers=admin,
    )
    assert r.status_code == 201
    r = await client.put(f"{D}/assignments/default", json={"model_id": "ecs-svc", "model_version": "1"}, headers=admin)
    assert r.status_code == 200
    init = (await init_service(client, admin, "svc-1", ROUTE)).json()["job_id"]
    assert await dispatch_until_idle(aws_settings) == 1
    assert (await client.delete(f"{D}/service/svc-1", headers=admin)).status_code == 204
    assert await dispatch_until_idle(aws_settings) == 0
    assert task_of(moto_endpoint, ecs_cluster, init)["stoppedReason"] == "cancelled in PIE"
    after = await job(client, admin, init)
    assert after["error"]["code"] == "cancelled" and after["error"]["message"].startswith("service svc-1 was deleted")
    assert await stored_service(session, "svc-1") is None


async def test_an_ecs_handler_names_its_container(client, session, admin, aws_settings, moto_endpoint, ecs_cluster):
    """`container` (spec 15.4) receives the payload; without it, PIE_ECS_CONTAINER_NAME."""
    handler = {"type": "ecs_task", "value": f"{ecs_cluster}/pie-trainer", "container": "trainer"}
    r = await client.post(
        "/v2/models",
        json={"id": "named", "name": "n", "description": "", "handlers": {"training": handler, "inference": handler}},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert r.json()["handlers"]["inference"] == handler
    bad = {**handler, "container": "not a name!"}
    r = await client.post(
        "/v2/models",
        json={"name": "b", "description": "", "handlers": {"training": bad, "inference": bad}},
        headers=admin,
    )
    assert r.status_code == 422 and "container 'not a name!' is not an ECS container name" in r.json()["message"]
    r = await client.post("/v2/models/named/new_version", json={}, headers=admin)
    assert r.json()["version"]["handlers"]["inference"]["container"] == "trainer"
    assert (
        await client.post("/v2/models/named/versions/1/new_status", json={"status": "active"}, headers=admin)
    ).status_code == 200
    await seed(session, "default-container", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-life"})
    named, default = await infer(client, admin, "named"), await infer(client, admin, "default-container")

    settings = aws_settings.model_copy(update={"ecs_container_name": "model"})
    assert await dispatch_until_idle(settings) == 2
    overrides = {
        job_id: task_of(moto_endpoint, ecs_cluster, job_id)["overrides"]["containerOverrides"]
        for job_id in (named, default)
    }
    assert [o["name"] for o in overrides[named]] == ["trainer"]
    assert [o["name"] for o in overrides[default]] == ["model"]
    assert json.loads(overrides[named][0]["environment"][0]["value"])["job_id"] == named


# ---------------------------------------------------------------------------------------------
# Lambda


async def test_a_cancelled_lambda_jobs_later_report_is_409_and_ignored(
    client, session, admin, aws_settings, moto_endpoint, lambda_fn
):
    await seed(session, "lam-cancel", {"type": "lambda", "arn": lambda_fn["arn"]})
    job_id = await infer(client, admin, "lam-cancel")
    start_recording(moto_endpoint)
    assert await dispatch_until_idle(aws_settings) == 1
    [call] = [c for c in recorded_invocations(moto_endpoint) if c["payload"]["job_id"] == job_id]
    body = (await client.post(f"/v2/jobs/{job_id}/cancel", headers=admin)).json()
    assert body["error"]["previous_status"] == "started"
    assert body["error"]["message"].endswith("a Lambda invocation cannot be stopped (its report is ignored)")
    for report in ({"status": "success", "output": {"price": 120}}, {"status": "failure", "error": {"code": "x"}}):
        r = await callback(client, call["payload"], **report)
        assert r.status_code == 409, r.text
        assert r.json() == {
            "success": False,
            "message": f"job {job_id} was cancelled; this {report['status']} report is ignored",
            "cancelled": True,
        }
    assert await job(client, admin, job_id) == body


async def test_a_retried_lambda_job_is_invoked_again(client, session, admin, aws_settings, moto_endpoint, lambda_fn):
    await seed(session, "lam-retry", {"type": "lambda", "arn": lambda_fn["arn"]})
    job_id = await infer(client, admin, "lam-retry")
    start_recording(moto_endpoint)
    assert await dispatch_until_idle(aws_settings) == 1
    [first] = [c for c in recorded_invocations(moto_endpoint) if c["payload"]["job_id"] == job_id]
    r = await callback(client, first["payload"], status="failure", error={"code": "throttled"})
    assert r.status_code == 200
    retry_id = (await client.post(f"/v2/jobs/{job_id}/retry", headers=admin)).json()["job_id"]
    assert await dispatch_until_idle(aws_settings) == 1
    [second] = [c for c in recorded_invocations(moto_endpoint) if c["payload"]["job_id"] == retry_id]
    assert second["function"] == lambda_fn["arn"] and second["invocation_type"] == "Event"
    assert second["payload"]["input"] == first["payload"]["input"] == ROUTE
    r = await callback(client, second["payload"], status="success", output={"price": 99})
    assert r.status_code == 200
    retried = await job(client, admin, retry_id)
    assert retried["status"] == "success" and retried["retry_of"] == job_id


async def test_a_lambda_job_of_a_version_archived_meanwhile_fires_nothing(
    client, session, admin, aws_settings, moto_endpoint, lambda_fn
):
    await seed(session, "lam-arch", {"type": "lambda", "arn": lambda_fn["arn"]})
    await seed(session, "downstream", {"type": "in_process", "value": "echo"})
    r = await client.post(
        "/v2/models/lam-arch/event-subscriptions",
        json={
            "trigger_event": "inference_complete",
            "target_model_id": "downstream",
            "target_action": "inference",
            "input_source": "trigger_output",
        },
        headers=admin,
    )
    assert r.status_code == 201
    jobs = [await infer(client, admin, "lam-arch") for _ in range(2)]
    start_recording(moto_endpoint)
    assert await dispatch_until_idle(aws_settings) == 2
    calls = {c["payload"]["job_id"]: c["payload"] for c in recorded_invocations(moto_endpoint)}
    # while the version is active, a success fires the subscription
    r = await callback(client, calls[jobs[0]], status="success", output={"price": 1})
    assert len(r.json()["triggered_events"]) == 1
    r = await client.post("/v2/models/lam-arch/versions/1/new_status", json={"status": "archived"}, headers=admin)
    assert r.status_code == 200
    r = await callback(client, calls[jobs[1]], status="success", output={"price": 2})
    assert r.status_code == 200 and r.json()["triggered_events"] == []
    assert (await job(client, admin, jobs[1]))["output"] == {"price": 2}  # the job itself completes
    assert await session.scalar(text("SELECT count(*) FROM jobs WHERE model_id = 'downstream'")) == 1


# ---------------------------------------------------------------------------------------------
# the handler kit end to end (point 6)

LONG_ENTRYPOINT = textwrap.dedent(
    """
    import sys, time
    from pie_handler_kit import JobCancelled, main

    def train(input, features, job):
        print("ready", flush=True)
        for step in range(6000):  # a long training loop checking the flag between steps
            if job.cancelled():
                raise JobCancelled()
            time.sleep(0.01)
        return {"steps": step}

    if __name__ == "__main__":
        raise SystemExit(main(train))
    """
)


@pytest.fixture(scope="module")
def kit_server(database_url, tmp_path_factory):
    env = clean_subprocess_env(PIE_DATABASE_URL=database_url, PIE_RUN_DISPATCHER="false", PIE_JWT_SECRET="kit-secret")
    server = start_pie_server(tmp_path_factory.mktemp("serve"), env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def long_entrypoint(tmp_path) -> Path:
    (tmp_path / "entrypoint.py").write_text(LONG_ENTRYPOINT)
    return tmp_path


def start_task(entrypoint_dir: Path, environment: dict[str, str]) -> subprocess.Popen[str]:
    """The task's container: the entrypoint in a bare interpreter (no PIE importable) with the
    environment RunTask gave it; returns once it printed `ready` (the handler runs)."""
    process = subprocess.Popen(
        [*BARE_PYTHON, "-c", RUNNER, str(KIT), str(entrypoint_dir), "ecs"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "ready", (line, process.stderr.read() if process.poll() is not None else "")
    return process


async def ecs_job_for_the_kit(kit_server, session, aws_settings, ecs_cluster, model_id: str) -> str:
    await seed(session, model_id, {"type": "ecs_task", "value": f"{ecs_cluster}/pie-life"})
    r = httpx.post(
        f"{kit_server.url}/v2/models/{model_id}/versions/1/inference",
        json={"input": ROUTE},
        headers=kit_server.admin_headers,
        timeout=30,
    )
    assert r.status_code == 202, r.text
    assert await dispatch_until_idle(aws_settings.model_copy(update={"public_url": kit_server.url})) == 1
    return r.json()["inference_job_id"]


def environment_of(task: dict[str, Any]) -> dict[str, str]:
    [override] = task["overrides"]["containerOverrides"]
    return {e["name"]: e["value"] for e in override["environment"]}


async def test_the_kit_stops_an_ecs_handler_when_pie_cancels_its_job(
    kit_server, session, aws_settings, moto_endpoint, ecs_cluster, long_entrypoint
):
    job_id = await ecs_job_for_the_kit(kit_server, session, aws_settings, ecs_cluster, "kit-ecs")
    task = task_of(moto_endpoint, ecs_cluster, job_id)
    process = start_task(long_entrypoint, environment_of(task))
    try:
        r = httpx.post(f"{kit_server.url}/v2/jobs/{job_id}/cancel", headers=kit_server.admin_headers, timeout=30)
        assert r.status_code == 200, r.text
        assert await dispatch_until_idle(aws_settings) == 0  # works the stop: StopTask
        assert task_of(moto_endpoint, ecs_cluster, job_id)["desiredStatus"] == "STOPPED"
        process.send_signal(signal.SIGTERM)  # what ECS does to the container on StopTask
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"job_id": job_id, "status": "cancelled", "error": None}
    assert "SIGTERM received" in err
    row = httpx.get(f"{kit_server.url}/v2/jobs/{job_id}", headers=kit_server.admin_headers, timeout=30).json()
    assert row["status"] == "failure" and row["error"]["code"] == "cancelled"  # the kit's report was ignored


async def test_sigterm_without_a_cancel_is_reported_as_interrupted(
    kit_server, session, aws_settings, moto_endpoint, ecs_cluster, long_entrypoint
):
    """ECS may stop a task for other reasons (scale-in, Spot): the kit then reports the job
    `interrupted`, so it can be retried, instead of leaving it to time out."""
    job_id = await ecs_job_for_the_kit(kit_server, session, aws_settings, ecs_cluster, "kit-spot")
    process = start_task(long_entrypoint, environment_of(task_of(moto_endpoint, ecs_cluster, job_id)))
    try:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "failure" and summary["error"]["code"] == "interrupted"
    row = httpx.get(f"{kit_server.url}/v2/jobs/{job_id}", headers=kit_server.admin_headers, timeout=30).json()
    assert row["status"] == "failure" and row["error"]["code"] == "interrupted"


async def test_a_lambda_handler_of_a_cancelled_job_ends_without_an_error(
    kit_server, session, aws_settings, moto_endpoint, lambda_fn
):
    """A Lambda invocation cannot be stopped: it reports at its end, PIE answers 409
    `cancelled`, and the kit returns normally (an error would make Lambda retry the event)."""
    await seed(session, "kit-lambda", {"type": "lambda", "arn": lambda_fn["arn"]})
    r = httpx.post(
        f"{kit_server.url}/v2/models/kit-lambda/versions/1/inference",
        json={"input": ROUTE},
        headers=kit_server.admin_headers,
        timeout=30,
    )
    job_id = r.json()["inference_job_id"]
    start_recording(moto_endpoint)
    assert await dispatch_until_idle(aws_settings.model_copy(update={"public_url": kit_server.url})) == 1
    [call] = [c for c in recorded_invocations(moto_endpoint) if c["payload"]["job_id"] == job_id]
    r = httpx.post(f"{kit_server.url}/v2/jobs/{job_id}/cancel", headers=kit_server.admin_headers, timeout=30)
    assert r.status_code == 200
    done = run_bare(LAMBDA_EXAMPLE, "lambda", stdin=json.dumps(call["payload"]))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "cancelled" and summary["callback"]["cancelled"] is True
