"""The pipelined dispatcher (issue #21): async in-process handlers on the event loop, a batch of
mixed results recorded right, callback tokens from the batch signer, ``finish_jobs`` on a raw
connection (one statement for plain jobs), and Lambda calls of a batch made in parallel."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from jose import jwt
from sqlalchemy import select
from test_dispatch_aws import aws, aws_settings, moto_endpoint, seed  # noqa: F401  (fixtures)
from test_dispatch_inprocess import new_job, seed_version, stored

from pie import callbacks, db
from pie.auth import signing_keys
from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle
from pie.dispatch.inprocess import HandlerFailure, register
from pie.jobs.logic import Completion, finish_jobs
from pie.tables.jobs import Job

ASYNC_RUNS: list[dict[str, Any]] = []


@register("test_async_echo")
async def _async_echo(payload: dict[str, Any]) -> dict[str, Any]:
    """An ``async def`` handler: it awaits, and notes the thread and task it ran in."""
    await asyncio.sleep(0.01)
    ASYNC_RUNS.append(
        {
            "job_id": payload["job_id"],
            "thread": threading.current_thread() is threading.main_thread(),
            "task": asyncio.current_task() is not None,
        }
    )
    if payload["input"].get("fail"):
        raise HandlerFailure("async_failure", "the async handler failed", {"n": payload["input"]["n"]})
    return {"n": payload["input"]["n"], "token": bool(payload.get("callback_token"))}


@register("test_thread_shapes")
def _thread_shapes(payload: dict[str, Any]) -> Any:
    """A plain (thread pool) handler returning values JSON normalises: a tuple, an int key, None."""
    n = payload["input"]["n"]
    if n % 3 == 0:
        return None
    if n % 3 == 1:
        return (n, "x")
    return {n: "int key"}


async def test_async_handlers_run_as_tasks_on_the_event_loop(session, settings):
    """An ``async def`` implementation is awaited on the dispatcher's loop (it used to be called
    in a pool thread, where it returned an un-awaited coroutine and the job failed): its output
    or its HandlerFailure end the job."""
    ASYNC_RUNS.clear()
    await seed_version(session, inference="test_async_echo")
    ok = [await new_job(session, input={"n": i}) for i in range(5)]
    failed = await new_job(session, input={"n": 9, "fail": True})
    assert await dispatch_until_idle(settings.model_copy(update={"in_process_workers": 3})) == 6
    for i, job_id in enumerate(ok):
        job = await stored(session, job_id)
        assert (job.status, job.output, job.attempts) == ("success", {"n": i, "token": True}, 1)
    job = await stored(session, failed)
    assert (job.status, job.error) == (
        "failure",
        {"code": "async_failure", "message": "the async handler failed", "details": {"n": 9}},
    )
    assert len(ASYNC_RUNS) == 6 and all(r["thread"] and r["task"] for r in ASYNC_RUNS)


async def test_a_large_mixed_batch_ends_every_job_with_its_own_result(session, settings):
    """Built-in (on the loop), async (tasks) and plain (thread pool) handlers in one run with
    16 workers: every job ends once, with exactly its own output or error, recorded in batches."""
    ASYNC_RUNS.clear()
    await seed_version(session, "echo")
    await seed_version(session, "async", inference="test_async_echo")
    await seed_version(session, "shapes", inference="test_thread_shapes")
    await seed_version(session, "fails", inference="fail")
    ids: dict[str, list[str]] = {"echo": [], "async": [], "shapes": [], "fails": []}
    for i in range(60):
        for model in ids:
            ids[model].append(await new_job(session, model_id=model, input={"n": i}))
    assert await dispatch_until_idle(settings.model_copy(update={"in_process_workers": 16}), timeout=60) == 240
    for i in range(60):
        echo, async_, shapes, fails = [await stored(session, ids[m][i]) for m in ids]
        assert (echo.status, echo.output) == ("success", {"input": {"n": i}, "features": None})
        assert (async_.status, async_.output) == ("success", {"n": i, "token": True})
        expected = [None, [i, "x"], {str(i): "int key"}][i % 3]
        assert (shapes.status, shapes.output) == ("success", expected)
        assert fails.status == "failure" and fails.error["code"] == "deliberate_failure"
        assert fails.error["details"] == {"job_id": ids["fails"][i]}
    counts = (await session.execute(select(Job.attempts, Job.locked_by, Job.lease_expires_at))).all()
    assert {tuple(r) for r in counts} == {(1, None, None)}


def test_the_batch_signer_makes_the_tokens_python_jose_makes():
    """The dispatcher signs a callback token per job with ``callbacks.Signer``: byte for byte
    what python-jose's ``jwt.encode`` (``callbacks.mint``) gives, and it verifies with the key."""
    key = signing_keys.new_key()
    signer = callbacks.Signer(key)
    for client_id in (None, "sealink", 'qu"ote\\ and \u00e9'):
        for job_id in ("0190b0b0-0000-7000-8000-000000000000", "weird \u2028 id"):
            job = SimpleNamespace(job_id=job_id, model_id="m\u00f6del", model_version="7", client_id=client_id)
            for ttl in (0.5, 4500, 4500.9):
                token = signer.sign(job, ttl, now=1_800_000_000)
                assert token == callbacks.mint(key, job, ttl, now=1_800_000_000)
    token = signer.sign(job, 60)
    claims = jwt.decode(token, key.secret, algorithms=["HS256"], audience=callbacks.AUDIENCE, issuer=callbacks.ISSUER)
    assert claims["job_id"] == job.job_id and claims["exp"] - claims["iat"] == 60
    assert jwt.get_unverified_header(token)["kid"] == key.kid


async def test_finish_jobs_on_a_raw_connection_ends_plain_jobs_and_announces_them(session, settings, database_url):
    """``finish_jobs`` given the dispatcher's kind of connection (psycopg, autocommit): the plain
    job ends and its end is announced on ``pie_job_done`` (what ``?wait=`` long-polls hear); a
    repeat and a conflicting report change nothing and announce nothing; an unknown id is absent."""
    await seed_version(session)
    plain, repeat, conflict = [await new_job(session, input={"n": i}) for i in range(3)]
    async with db.sessionmaker()() as s, s.begin():
        await finish_jobs(
            s, [Completion(repeat, "success", output={"first": True}), Completion(conflict, "failure", error=None)]
        )
    url = db.libpq_url(database_url)
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(url, autocommit=True) as conn,
    ):
        await listener.execute("LISTEN pie_job_done")
        outcomes = await finish_jobs(
            conn,
            [
                Completion(plain, "success", output={"ok": 1}, output_json='{"ok":1}'),
                Completion(repeat, "success", output={"second": True}),
                Completion(conflict, "success", output={"late": True}),
                Completion("no-such-job", "success", output={}),
            ],
        )
        heard = []
        async for note in listener.notifies(timeout=2.0):
            heard.append(note.payload)
    assert {k: (o.status, o.result) for k, o in outcomes.items()} == {
        plain: ("success", "completed"),
        repeat: ("success", "repeat"),
        conflict: ("failure", "conflict"),
    }
    assert heard == [plain]
    job = await stored(session, plain)
    assert (job.status, job.output, job.locked_by, job.completed_at is not None) == ("success", {"ok": 1}, None, True)
    assert (await stored(session, repeat)).output == {"first": True}
    job = await stored(session, conflict)
    assert (job.status, job.output, job.error["code"]) == ("failure", None, "handler_failure")


def far_function(endpoint: str) -> str:
    """A Lambda function of this module's own (moto's state is shared by every server in the
    process, so the names differ from test_dispatch_aws's)."""
    import io
    import zipfile

    role = aws("iam", endpoint).create_role(RoleName="pie-far", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.writestr("handler.py", "def handler(event, context):\n    return event\n")
    return aws("lambda", endpoint).create_function(
        FunctionName="pie-far",
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": code.getvalue()},
    )["FunctionArn"]


async def test_lambda_calls_of_a_batch_run_in_parallel(session, aws_settings, moto_endpoint):
    """Every Invoke takes 0.3 s more here (a far AWS region): a dispatcher still makes the calls
    of a batch at once (up to PIE_DISPATCH_AWS_CONCURRENCY), where one at a time, or a few
    threads, would cap dispatch at a handful of jobs per second. Each job is invoked once."""
    await seed(session, "far", {"type": "lambda", "arn": far_function(moto_endpoint)})
    ids = [await new_job(session, model_id="far", input={"n": i}) for i in range(16)]
    dispatcher = Dispatcher(aws_settings.model_copy(update={"dispatch_aws_concurrency": 32}), name="far")
    state = {"now": 0, "max": 0, "calls": 0}
    lock = threading.Lock()

    def slow_network(**_: Any) -> None:
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.3)
        with lock:
            state["now"] -= 1

    dispatcher._aws.lambda_client.meta.events.register("before-send.lambda.Invoke", slow_network)
    dispatcher._start_workers()
    try:
        assert await dispatcher.drain(timeout=30) == 16
    finally:
        await dispatcher.stop(grace=5.0)
    assert state["calls"] == 16 and state["max"] == 16
    for job_id in ids:
        job = await stored(session, job_id)
        assert (job.status, job.attempts, job.lease_expires_at, job.error) == ("started", 1, None, None)


@pytest.fixture(autouse=True)
def _clear():
    ASYNC_RUNS.clear()
    yield


async def test_a_job_that_needs_a_worker_is_not_held_up_behind_a_backlog_of_other_jobs(session, settings):
    """600 built-in jobs (more than a claim's look-ahead window of 500) queued before one job
    for a plain handler: the second claim already finds that job (the window held none, so the
    worker half looked through the whole queue), long before the backlog ahead of it drains."""
    from test_dispatch_inprocess import CAPTURED

    CAPTURED.clear()
    await seed_version(session, "bulk")
    await seed_version(session, "worker", inference="test_capture")
    async with db.sessionmaker()() as s, s.begin():
        await s.execute(
            Job.__table__.insert(),
            [
                {"job_type": "inference", "model_id": "bulk", "model_version": "1", "input": {"n": i}}
                for i in range(600)
            ],
        )
    behind = await new_job(session, model_id="worker", input={"n": "behind"})
    dispatcher = Dispatcher(
        settings.model_copy(update={"in_process_workers": 2, "dispatch_batch_size": 50}), name="deep"
    )
    dispatcher._start_workers()
    try:
        claimed = [await dispatcher.claim_and_dispatch() for _ in range(2)]
        job = await stored(session, behind)
        assert job.status in ("started", "success") and job.attempts == 1 and sum(claimed) <= 101
    finally:
        await dispatcher.stop(grace=5.0)
    assert (await stored(session, behind)).status == "success"
    assert [p["job_id"] for p in CAPTURED] == [behind]
