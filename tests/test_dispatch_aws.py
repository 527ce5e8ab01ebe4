"""Lambda and ECS dispatch against moto's HTTP server (real boto3 HTTP calls via AWS_ENDPOINT_URL).

What AWS received is read back from moto itself: Lambda ``Invoke`` requests from moto's request
recorder, ECS task overrides from ``DescribeTasks``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import tempfile
import time
import zipfile
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest

_RECORDING = os.path.join(tempfile.mkdtemp(prefix="pie-moto-"), "recording.jsonl")
os.environ["MOTO_RECORDER_FILEPATH"] = _RECORDING

import boto3  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import select  # noqa: E402

from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle  # noqa: E402
from pie.jobs.logic import create_job  # noqa: E402
from pie.tables.jobs import Job  # noqa: E402
from pie.tables.registry import Model, ModelVersion  # noqa: E402

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.moto_api import recorder
    from moto.server import ThreadedMotoServer

    recorder._location = _RECORDING  # in case moto was imported before this module set the path
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests.post(endpoint + "/moto-api/config", json={"lambda": {"use_docker": False}}, timeout=10)
    try:
        yield endpoint
    finally:
        requests.post(endpoint + "/moto-api/recorder/stop-recording", timeout=10)
        server.stop()


def aws(service: str, endpoint: str):
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION)


@pytest.fixture(scope="module")
def lambda_function(moto_endpoint) -> dict[str, str]:
    iam = aws("iam", moto_endpoint)
    role = iam.create_role(RoleName="pie-handler", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.writestr("handler.py", "def handler(event, context):\n    return event\n")
    lam = aws("lambda", moto_endpoint)
    fn = lam.create_function(
        FunctionName="pie-infer",
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
    )
    version = lam.publish_version(FunctionName="pie-infer")["Version"]
    return {"arn": fn["FunctionArn"], "version": version}


@pytest.fixture(scope="module")
def ecs_cluster(moto_endpoint) -> str:
    ec2, ecs = aws("ec2", moto_endpoint), aws("ecs", moto_endpoint)
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]
    document = json.dumps(
        {
            "instanceId": instance["InstanceId"],
            "region": REGION,
            "availabilityZone": "us-east-1a",
            "privateIp": "10.0.0.1",
            "imageId": "ami-12c6146b",
            "instanceType": "t2.micro",
            "accountId": "123456789012",
            "architecture": "x86_64",
            "pendingTime": "2026-01-01T00:00:00Z",
            "version": "2017-09-30",
        }
    )
    ecs.create_cluster(clusterName="pie-jobs")
    ecs.register_container_instance(cluster="pie-jobs", instanceIdentityDocument=document)
    ecs.register_task_definition(
        family="pie-train", containerDefinitions=[{"name": "main", "image": "pie/train", "memory": 128}]
    )
    return "pie-jobs"


@pytest.fixture
def aws_settings(settings, moto_endpoint):
    return settings.model_copy(
        update={
            "aws_endpoint_url": moto_endpoint,
            "ecs_launch_type": "EC2",
            "dispatch_max_attempts": 3,
            "dispatch_backoff_base": 0.05,
            "dispatch_backoff_max": 0.2,
            "dispatch_poll_interval": 0.2,
        }
    )


def recorded_invocations(endpoint: str) -> list[dict[str, Any]]:
    text = requests.get(endpoint + "/moto-api/recorder/download-recording", timeout=10).text
    calls = []
    for line in text.splitlines():
        entry = json.loads(line)
        url = urlparse(entry["url"])
        if not url.path.endswith("/invocations"):
            continue
        body = base64.b64decode(entry["body"]) if entry.get("body_encoded") else (entry.get("body") or "").encode()
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        calls.append(
            {
                "function": unquote(url.path.split("/functions/")[1].rsplit("/invocations", 1)[0]),
                "qualifier": parse_qs(url.query).get("Qualifier", [None])[0],
                "invocation_type": headers.get("x-amz-invocation-type"),
                "payload": json.loads(body),
            }
        )
    return calls


def start_recording(endpoint: str) -> None:
    requests.post(endpoint + "/moto-api/recorder/reset-recording", timeout=10)
    requests.post(endpoint + "/moto-api/recorder/start-recording", timeout=10)


async def seed(session, model_id: str, inference: dict[str, Any], training: dict[str, Any] | None = None) -> None:
    hs = {"inference": inference, "training": training or inference}
    session.add(Model(id=model_id, name=model_id, handlers=hs, status="active"))
    await session.flush()
    session.add(ModelVersion(model_id=model_id, version="1", status="active", handlers=hs))
    await session.commit()


async def stored(session, job_id: str) -> Job:
    return await session.scalar(select(Job).where(Job.job_id == job_id).execution_options(populate_existing=True))


async def test_lambda_invoke_event_with_qualifier_and_payload(
    session, client, auth, aws_settings, moto_endpoint, lambda_function
):
    await seed(
        session,
        "lam",
        {"type": "lambda", "arn": lambda_function["arn"], "version": lambda_function["version"]},
        {"type": "lambda", "arn": lambda_function["arn"]},
    )
    infer = await create_job(
        session, job_type="inference", model_id="lam", model_version="1", input={"route": "ADL-SYD"}
    )
    train = await create_job(session, job_type="training", model_id="lam", model_version="1")
    await session.commit()
    start_recording(moto_endpoint)
    assert await dispatch_until_idle(aws_settings) == 2

    calls = {c["payload"]["job_id"]: c for c in recorded_invocations(moto_endpoint)}
    assert set(calls) == {infer.job_id, train.job_id}
    call = calls[infer.job_id]
    token = call["payload"].pop("callback_token")  # spec 14.5 (tests/test_callback_tokens.py)
    assert isinstance(token, str) and token.count(".") == 2
    assert call["function"] == lambda_function["arn"] and call["qualifier"] == lambda_function["version"]
    assert call["invocation_type"] == "Event"
    assert call["payload"] == {
        "job_id": infer.job_id,
        "job_type": "inference",
        "model_id": "lam",
        "model_version": "1",
        "assignment_id": None,
        "client_id": None,
        "domain_id": None,
        "service_id": None,
        "input": {"route": "ADL-SYD"},
        "features": None,
        "callback_url": f"http://testserver/v2/models/lam/versions/1/jobs/{infer.job_id}/complete",
    }
    assert calls[train.job_id]["qualifier"] is None and calls[train.job_id]["payload"]["job_type"] == "training"

    # dispatched: started, waiting for the function to call back
    job = await stored(session, infer.job_id)
    assert job.status == "started" and job.attempts == 1 and job.lease_expires_at is None and job.completed_at is None
    r = await client.post(
        call["payload"]["callback_url"].replace("http://testserver", ""),
        json={"status": "success", "output": {"price": 120}},
        headers=auth(scopes=["complete_jobs"]),
    )
    assert r.status_code == 200
    job = await stored(session, infer.job_id)
    assert job.status == "success" and job.output == {"price": 120}


async def test_ecs_run_task_with_payload_override(session, aws_settings, moto_endpoint, ecs_cluster):
    await seed(session, "ecs", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-train"})
    job = await create_job(session, job_type="training", model_id="ecs", model_version="1", input={"epochs": 3})
    await session.commit()
    assert await dispatch_until_idle(aws_settings) == 1
    ecs = aws("ecs", moto_endpoint)
    # ECS allows startedBy up to 36 letters, numbers, '-', '/' and '_' (moto does not check it):
    # "pie-" and the job id's 32 hex digits
    started_by = "pie-" + job.job_id.replace("-", "")
    assert len(started_by) == 36
    arns = ecs.list_tasks(cluster=ecs_cluster, startedBy=started_by)["taskArns"]
    assert len(arns) == 1
    task = ecs.describe_tasks(cluster=ecs_cluster, tasks=arns)["tasks"][0]
    assert task["startedBy"] == started_by
    assert task["taskDefinitionArn"].endswith(":task-definition/pie-train:1")
    assert task["launchType"] == "EC2"
    [override] = task["overrides"]["containerOverrides"]
    assert override["name"] == "main"
    [env] = override["environment"]
    assert env["name"] == "PIE_JOB_PAYLOAD"
    payload = json.loads(env["value"])
    assert payload["job_id"] == job.job_id and payload["job_type"] == "training" and payload["input"] == {"epochs": 3}
    assert payload["callback_url"].endswith(f"/v2/models/ecs/versions/1/jobs/{job.job_id}/complete")
    stored_job = await stored(session, job.job_id)
    assert stored_job.status == "started" and stored_job.lease_expires_at is None


async def test_aws_error_is_retried_then_recorded_as_failure(session, aws_settings, moto_endpoint, ecs_cluster):
    await seed(session, "broken", {"type": "ecs_task", "value": "no-such-cluster/pie-train"})
    job = await create_job(session, job_type="inference", model_id="broken", model_version="1")
    await session.commit()
    dispatcher = Dispatcher(aws_settings, name="aws-retry")
    await dispatcher.start()
    seen_retry = False
    deadline = time.monotonic() + 60  # generous: a loaded machine is slow, not wrong
    try:
        while time.monotonic() < deadline:
            row = await stored(session, job.job_id)
            if row.status == "pending" and row.dispatch_error is not None:
                seen_retry = True
                # waiting for a retry: not started, no error (spec 15.3)
                assert row.error is None and row.started_at is None
                assert row.dispatch_error["code"] == "aws_error" and row.dispatch_error["retrying_in_seconds"] <= 0.2
            if row.status == "failure":
                break
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.stop()
    row = await stored(session, job.job_id)
    assert row.status == "failure" and row.attempts == 3 and row.completed_at is not None
    assert row.error["code"] == "aws_error" and row.error["aws_code"] == "ClusterNotFoundException"
    assert row.error["attempts"] == 3 and row.error["backend"] == "ecs_task" and row.error["operation"] == "RunTask"
    assert row.error["message"].startswith("gave up after 3 attempts")
    assert seen_retry


async def test_unreachable_aws_endpoint_is_retried_then_fails(session, settings, unused_tcp_port):
    closed = settings.model_copy(
        update={
            "aws_endpoint_url": f"http://127.0.0.1:{unused_tcp_port}",
            "dispatch_max_attempts": 2,
            "dispatch_backoff_base": 0.01,
        }
    )
    await seed(session, "lam", {"type": "lambda", "arn": "arn:aws:lambda:us-east-1:123456789012:function:x"})
    job = await create_job(session, job_type="inference", model_id="lam", model_version="1")
    await session.commit()
    for _ in range(50):
        await dispatch_until_idle(closed)
        row = await stored(session, job.job_id)
        if row.status == "failure":
            break
        await asyncio.sleep(0.02)
    assert row.status == "failure" and row.attempts == 2 and row.error["code"] == "aws_unreachable"


async def insert_job_row(session, **values) -> Job:
    """A job row written directly, as the bulk paths (batch re-init, subscriptions) write them,
    bypassing create_job's payload-limit check: the dispatch-time check still catches it."""
    job = Job(**values)
    session.add(job)
    await session.flush()
    await session.refresh(job)
    return job


async def test_ecs_payload_too_large_fails_at_once(session, aws_settings, ecs_cluster):
    await seed(session, "ecs-big", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-train"})
    job = await insert_job_row(
        session, job_type="training", model_id="ecs-big", model_version="1", input={"blob": "x" * 10000}
    )
    await session.commit()
    assert await dispatch_until_idle(aws_settings) == 1
    row = await stored(session, job.job_id)
    assert row.status == "failure" and row.attempts == 1
    assert row.error["code"] == "payload_too_large" and row.error["backend"] == "ecs_task"


async def test_ecs_payload_whose_override_is_too_large_once_escaped_fails_at_once(session, aws_settings, ecs_cluster):
    """ECS caps the overrides structure at 8192 characters of JSON, where the payload is a string
    and every quote in it is escaped: a payload under the limit that grows past it once escaped
    fails at once (AWS would refuse it), instead of being retried."""
    await seed(session, "ecs-quotes", {"type": "ecs_task", "value": f"{ecs_cluster}/pie-train"})
    job = await insert_job_row(
        session, job_type="training", model_id="ecs-quotes", model_version="1", input={"q": ['"'] * 1300}
    )
    await session.commit()
    assert await dispatch_until_idle(aws_settings) == 1
    row = await stored(session, job.job_id)
    assert row.status == "failure" and row.attempts == 1
    assert row.error["code"] == "payload_too_large" and "8192" in row.error["message"]


def test_ecs_fargate_request_carries_the_configured_network(settings):
    """moto cannot run FARGATE tasks (see notes), so the request is checked with botocore's
    Stubber: launch type, awsvpc subnets / security groups / public IP from PIE_ECS_*."""
    from botocore.stub import ANY, Stubber

    from pie.dispatch.backends import AwsBackends

    fargate = settings.model_copy(
        update={
            "ecs_launch_type": "FARGATE",
            "ecs_subnets": ["subnet-1", "subnet-2"],
            "ecs_security_groups": ["sg-1"],
            "ecs_assign_public_ip": True,
            "ecs_container_name": "model",
            "ecs_payload_env_var": "JOB",
        }
    )
    backends = AwsBackends(fargate)
    payload = {"job_id": "j1", "input": {"a": 1}}
    with Stubber(backends.ecs_client) as stub:
        stub.add_response(
            "run_task",
            {"tasks": [{"taskArn": "arn:aws:ecs:us-east-1:123456789012:task/c1/abc"}], "failures": []},
            {
                "cluster": "c1",
                "taskDefinition": "train:3",
                "count": 1,
                "startedBy": "pie-j1",
                "launchType": "FARGATE",
                "networkConfiguration": {
                    "awsvpcConfiguration": {
                        "subnets": ["subnet-1", "subnet-2"],
                        "securityGroups": ["sg-1"],
                        "assignPublicIp": "ENABLED",
                    }
                },
                "overrides": {
                    "containerOverrides": [{"name": "model", "environment": [{"name": "JOB", "value": ANY}]}]
                },
            },
        )
        info = backends.run_ecs_task({"type": "ecs_task", "value": "c1/train:3"}, payload)
        stub.assert_no_pending_responses()
    assert info["task_arn"].endswith("/abc") and info["task_definition"] == "train:3"


def test_ecs_failures_in_the_answer_are_a_dispatch_error(settings):
    from botocore.stub import Stubber

    from pie.dispatch.backends import AwsBackends, DispatchError

    backends = AwsBackends(settings.model_copy(update={"ecs_launch_type": "EC2"}))
    with Stubber(backends.ecs_client) as stub:
        stub.add_response(
            "run_task",
            {
                "tasks": [],
                "failures": [{"arn": "arn:aws:ecs:us-east-1:1:container-instance/x", "reason": "RESOURCE:MEMORY"}],
            },
        )
        try:
            backends.run_ecs_task({"type": "ecs_task", "value": "c1/train"}, {"job_id": "j1"})
        except DispatchError as exc:
            error = exc
        else:
            raise AssertionError("no DispatchError")
    assert error.retryable and error.code == "ecs_run_task_failed" and "RESOURCE:MEMORY" in error.message
    assert error.as_error()["failures"][0]["reason"] == "RESOURCE:MEMORY"


async def test_a_claim_skips_a_locked_lambda_job_and_hands_over_the_others(
    session, aws_settings, database_url, lambda_function
):
    """Another transaction holds the oldest queued Lambda job's row: the claim skips it and
    hands the other due Lambda jobs over while the row is still held (the half of the claim
    for Lambda/ECS hand-offs never waits for a locked row, as the in-process half does not:
    tests/test_dispatch_robust.py)."""
    import psycopg

    from pie import db

    await seed(session, "lam", {"type": "lambda", "arn": lambda_function["arn"]})
    ids = []
    for n in range(3):
        job = await create_job(session, job_type="inference", model_id="lam", model_version="1", input={"n": n})
        await session.commit()
        ids.append(job.job_id)
    locked, others = ids[0], ids[1:]
    holder = await psycopg.AsyncConnection.connect(db.libpq_url(database_url))
    try:
        await holder.execute("SELECT 1 FROM jobs WHERE job_id = %s FOR UPDATE", (locked,))
        dispatcher = Dispatcher(aws_settings, name="skipper")
        dispatcher._start_workers()
        try:
            claimed = await asyncio.wait_for(dispatcher.claim_and_dispatch(), timeout=60)
        finally:
            await dispatcher.stop(grace=10.0)
        assert claimed == 2
        assert not holder.closed and (await (await holder.execute("SELECT 1")).fetchone()) == (1,)  # still held
    finally:
        await holder.rollback()
        await holder.close()
    for job_id in others:
        row = await stored(session, job_id)
        assert (row.status, row.attempts, row.lease_expires_at) == ("started", 1, None)  # handed to Lambda
    row = await stored(session, locked)
    assert (row.status, row.attempts) == ("pending", 0)
