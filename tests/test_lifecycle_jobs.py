"""Cancel and retry a job (issue 19 points 2 and 3, spec 15.4), through HTTP on PostgreSQL with
in-process handlers and a real dispatcher (the AWS backends: test_lifecycle_aws.py).

Cancel: a pending or started job ends at once as `failure` with `error.code = "cancelled"`
through the one path that ends jobs (long-polls, service status, metrics), fires nothing, and
every later completion of it is 409; an in-process handler sees its cancel flag and whatever it
returns is discarded; cancel and completion racing on two real connections: exactly one wins.
Retry: a new job (`retry_of`) with the same type, input, tenant, domain and service, through the
key resolved again now; only ended jobs; Idempotency-Key; audited."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import assign, domain_url, init_service, make_version, stored_service, tenant_setup, until
from lifecycle_support import job, until_waiting, wait_for
from sqlalchemy import text

from pie.app import create_app
from pie.dispatch import inprocess
from pie.dispatch.dispatcher import Dispatcher, dispatch_until_idle
from pie.dispatch.inprocess import register
from pie.jobs.waiting import listener
from pie.metrics import JOBS_ENDED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kit"))
import pie_handler_kit as kit

D = domain_url("client-1", "south_australia")
MODEL = "/v2/models/pricing-model"
ROUTE = {"route": "Adelaide to Sydney"}
TENANT = {"scopes": ["run_inference", "read_models", "init_services"], "client_id": "client-1"}

# in-process handlers of this module (registered in this process only)
RUNNING = threading.Event()  # a long handler has started
SAW_CANCEL = threading.Event()  # ... and saw its cancel flag
RELEASE = threading.Event()  # lets the stubborn handler finish


@register("test_until_cancelled")
def _until_cancelled(payload: dict[str, Any]) -> dict[str, Any]:
    """A long handler that checks the flag between steps (up to 30 s)."""
    RUNNING.set()
    for _ in range(3000):
        if inprocess.cancelled():
            SAW_CANCEL.set()
            return {"stopped_early": True}
        RELEASE.wait(0.01)
    return {"stopped_early": False}


@register("test_stubborn")
def _stubborn(payload: dict[str, Any]) -> dict[str, Any]:
    """Ignores the flag: finishes when released."""
    RUNNING.set()
    RELEASE.wait(30)
    return {"price": 99}


def _kit_handler(input: Any, features: Any, job: kit.Job) -> dict[str, Any]:
    RUNNING.set()
    for step in range(3000):
        if job.cancelled():
            SAW_CANCEL.set()
            raise kit.JobCancelled()
        RELEASE.wait(0.01)
    return {"steps": step}


def handlers(inference: str) -> dict[str, Any]:
    return {
        "training": {"type": "in_process", "value": "echo"},
        "inference": {"type": "in_process", "value": inference},
    }


@pytest.fixture(autouse=True)
def _reset_events() -> None:
    for event in (RUNNING, SAW_CANCEL, RELEASE):
        event.clear()


@pytest.fixture
async def plain(engine, settings) -> AsyncIterator[httpx.AsyncClient]:
    """The application without the fast read layer (the route's own answers)."""
    app = create_app(settings.model_copy(update={"fast_reads": False}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
async def dispatcher(settings) -> AsyncIterator[Dispatcher]:
    """A started dispatcher (LISTEN included). The sweep, whose cancellation look-up is the
    fallback of the NOTIFY, is ten minutes away: only the NOTIFY can raise a flag in time."""
    running = Dispatcher(settings.model_copy(update={"dispatch_sweep_interval": 600.0}), name="lifecycle")
    await running.start()
    try:
        yield running
    finally:
        RELEASE.set()
        await running.stop(grace=5.0)


async def infer(client, headers, model=MODEL, version="1", **body) -> str:
    r = await client.post(f"{model}/versions/{version}/inference", json={"input": ROUTE, **body}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["inference_job_id"]


async def cancel(client, headers, job_id: str, expect: int = 200) -> dict[str, Any]:
    r = await client.post(f"/v2/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == expect, r.text
    return r.json()


async def retry(client, headers, job_id: str, expect: int = 202, **extra: Any) -> dict[str, Any]:
    r = await client.post(f"/v2/jobs/{job_id}/retry", headers={**headers, **extra})
    assert r.status_code == expect, r.text
    return r.json()


async def complete(client, headers, job_id: str, status="success", version="1", **body) -> httpx.Response:
    return await client.post(
        f"{MODEL}/versions/{version}/jobs/{job_id}/complete", json={"status": status, **body}, headers=headers
    )


# ---------------------------------------------------------------------------------------------
# cancel


async def test_cancel_a_pending_job(client, plain, session, admin, auth, settings):
    await tenant_setup(client, session, admin)
    tenant = auth(**TENANT)
    job_id = await infer(client, tenant)
    body = await cancel(client, tenant, job_id)
    assert body["job_id"] == job_id and body["status"] == "failure" and body["completed_at"] is not None
    assert body["output"] is None and body["client_id"] == "client-1"
    error = body["error"]
    assert error["code"] == "cancelled" and error["previous_status"] == "pending"
    assert error["message"] == "cancelled by client-1 before it was dispatched"
    assert error["cancelled_by"] == {"sub": body["created_by"]["sub"], "username": None, "client_id": "client-1"}
    # the job is read the same way by the fast path and the route
    assert (await client.get(f"/v2/jobs/{job_id}", headers=tenant)).json() == body
    assert (await plain.get(f"/v2/jobs/{job_id}", headers=tenant)).json() == body
    # never dispatched
    assert await dispatch_until_idle(settings) == 0
    assert (await job(client, tenant, job_id)) == body

    # ended: a second cancel is 409; any later completion is 409 and changes nothing
    r = await client.post(f"/v2/jobs/{job_id}/cancel", headers=tenant)
    assert r.status_code == 409
    assert r.json() == {"success": False, "message": f"job {job_id} has already ended with status failure (cancelled)"}
    for status in ("success", "failure"):
        r = await complete(client, admin, job_id, status, output={"price": 1}, error={"code": "late"})
        assert r.status_code == 409
        assert r.json() == {
            "success": False,
            "message": f"job {job_id} was cancelled; this {status} report is ignored",
            "cancelled": True,
        }
    assert (await job(client, tenant, job_id)) == body
    audit = (await client.get("/v2/audit?action=canceljob", headers=admin)).json()
    assert [(a["target_type"], a["target_id"], a["client_id"]) for a in audit] == [("job", job_id, "client-1")]


async def test_a_cancelled_init_job_fails_the_service_wakes_long_polls_and_fires_nothing(client, session, admin):
    await tenant_setup(client, session, admin)
    r = await client.post(
        "/v2/models/pricing-model/event-subscriptions",
        json={
            "trigger_event": "inference_complete",
            "target_model_id": "pricing-model",
            "target_action": "training",
            "input_source": "stored",
            "input": {},
        },
        headers=admin,
    )
    assert r.status_code == 201
    job_id = (await init_service(client, admin, "svc-1", ROUTE)).json()["job_id"]
    assert (await stored_service(session, "svc-1")).status == "initializing"
    ended = JOBS_ENDED.labels("inference", "in_process", "failure")._value.get()
    poll = asyncio.ensure_future(client.get(f"/v2/jobs/{job_id}?wait=30", headers=admin))
    await until(lambda: listener.waiters.get(job_id), what="the long-poll waiting")  # for the job to end
    body = await cancel(client, admin, job_id)
    assert body["error"]["code"] == "cancelled" and body["error"]["previous_status"] == "pending"
    polled = await poll
    assert polled.status_code == 200 and polled.json()["status"] == "failure"
    assert (await stored_service(session, "svc-1")).status == "failed"
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == 1  # nothing fired
    # counted as an ended job, like any other end
    assert JOBS_ENDED.labels("inference", "in_process", "failure")._value.get() == ended + 1


async def test_who_may_cancel(client, session, admin, auth):
    await tenant_setup(client, session, admin)
    direct = await infer(client, auth(**TENANT))
    init = (await init_service(client, admin, "svc-1", ROUTE)).json()["job_id"]
    platform = await infer(client, admin)  # an admin's job without client_id: a platform job

    assert (await cancel(client, admin, "no-such-job", expect=404))["message"] == "job no-such-job not found"
    r = await client.post(f"/v2/jobs/{direct}/cancel", headers=auth(scopes=["read_models"], client_id="client-1"))
    assert r.status_code == 403 and r.json()["message"] == "missing permission run_inference or init_services"
    other = auth(scopes=["run_inference", "init_services"], client_id="client-2")
    assert (await cancel(client, other, direct, expect=403))["message"] == "no access to client client-1"
    assert await cancel(client, auth(groups=["client:client-1"], username="alice"), platform, expect=403)
    # init_services launches init jobs, not inference jobs
    only_init = auth(scopes=["init_services"], client_id="client-1")
    assert (await cancel(client, only_init, direct, expect=403))["message"] == "missing permission run_inference"
    assert (await cancel(client, only_init, init))["status"] == "failure"
    # a human of the tenant and a platform machine caller
    assert (await cancel(client, auth(groups=["client:client-1"], username="alice"), direct))["error"]["message"] == (
        "cancelled by alice before it was dispatched"
    )
    assert (await cancel(client, auth(scopes=["run_inference"], client_id=None), platform))["status"] == "failure"


async def test_an_in_process_handler_is_asked_to_stop(client, session, admin, dispatcher):
    await make_version(session, "long", "1", handlers=handlers("test_until_cancelled"))
    job_id = await infer(client, admin, model="/v2/models/long")
    await wait_for(lambda: asyncio.to_thread(RUNNING.wait, 0), what="the handler start")
    body = await cancel(client, admin, job_id)
    assert body["error"]["previous_status"] == "started"
    assert "in-process handler was asked to stop" in body["error"]["message"]
    await wait_for(lambda: asyncio.to_thread(SAW_CANCEL.wait, 0), what="the handler seeing its flag")
    await wait_for(lambda: _idle(dispatcher), what="the dispatcher recording the result")
    after = await job(client, admin, job_id)
    assert after == body  # the handler's {"stopped_early": true} was discarded


async def test_a_missed_cancel_notification_is_caught_by_the_sweep(client, session, admin, settings, monkeypatch):
    """The dispatcher listens on a channel nobody notifies (as if the notification was lost
    while LISTEN reconnected): its sweep finds the cancelled running job and raises the flag."""
    from pie.dispatch import dispatcher as dispatch_module

    monkeypatch.setattr(dispatch_module, "CANCEL_CHANNEL", "pie_job_cancel_not_notified")
    await make_version(session, "long", "1", handlers=handlers("test_until_cancelled"))
    running = Dispatcher(settings.model_copy(update={"dispatch_sweep_interval": 0.2}), name="sweeper")
    await running.start()
    try:
        job_id = await infer(client, admin, model="/v2/models/long")
        await wait_for(lambda: asyncio.to_thread(RUNNING.wait, 0), what="the handler start")
        await cancel(client, admin, job_id)
        await wait_for(lambda: asyncio.to_thread(SAW_CANCEL.wait, 0), what="the sweep raising the flag")
    finally:
        RELEASE.set()
        await running.stop(grace=5.0)
    assert (await job(client, admin, job_id))["error"]["code"] == "cancelled"


async def test_the_kit_exposes_the_flag_to_in_process_handlers(client, session, admin, dispatcher):
    register("test_kit_until_cancelled")(kit.in_process(_kit_handler))  # the same handler as for ECS/Lambda
    await make_version(session, "kit", "1", handlers=handlers("test_kit_until_cancelled"))
    job_id = await infer(client, admin, model="/v2/models/kit")
    await wait_for(lambda: asyncio.to_thread(RUNNING.wait, 0), what="the handler start")
    await cancel(client, admin, job_id)
    await wait_for(lambda: asyncio.to_thread(SAW_CANCEL.wait, 0), what="the kit handler seeing job.cancelled()")
    await wait_for(lambda: _idle(dispatcher), what="the dispatcher recording the result")
    assert (await job(client, admin, job_id))["error"]["code"] == "cancelled"


async def test_a_handler_that_finishes_anyway_is_discarded(client, session, admin, dispatcher):
    await make_version(session, "stubborn", "1", handlers=handlers("test_stubborn"))
    job_id = await infer(client, admin, model="/v2/models/stubborn")
    await wait_for(lambda: asyncio.to_thread(RUNNING.wait, 0), what="the handler start")
    body = await cancel(client, admin, job_id)
    RELEASE.set()
    await wait_for(lambda: _idle(dispatcher), what="the dispatcher recording the result")
    after = await job(client, admin, job_id)
    assert after["status"] == "failure" and after["output"] is None and after == body


async def _idle(dispatcher: Dispatcher) -> bool:
    return not dispatcher._inflight


@pytest.mark.parametrize("first", ["cancel", "complete"])
async def test_cancel_racing_a_completion_exactly_one_wins(client, session, admin, auth, engine, first):
    """Two real connections: another transaction holds the job row; the cancel and the
    completion both queue on it; when it commits, the first in the queue ends the job and the
    other is refused with 409 — never two outcomes, never a half-written one."""
    await tenant_setup(client, session, admin)
    job_id = await infer(client, admin)
    requests = {
        "cancel": lambda: client.post(f"/v2/jobs/{job_id}/cancel", headers=admin),
        "complete": lambda: complete(client, auth(scopes=["complete_jobs"]), job_id, output={"price": 120}),
    }
    second = "complete" if first == "cancel" else "cancel"
    async with engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(text("SELECT 1 FROM jobs WHERE job_id = :j FOR UPDATE"), {"j": job_id})
        a = asyncio.ensure_future(requests[first]())
        await until_waiting(blocker, 1, a)
        b = asyncio.ensure_future(requests[second]())
        await until_waiting(blocker, 2, a, b)
        await blocker.commit()
    answers = {first: await a, second: await b}
    assert sorted(r.status_code for r in answers.values()) == [200, 409]
    assert answers[first].status_code == 200 and answers[second].status_code == 409
    final = await job(client, admin, job_id)
    if first == "cancel":
        assert final["status"] == "failure" and final["error"]["code"] == "cancelled" and final["output"] is None
        assert answers["complete"].json()["cancelled"] is True
    else:
        assert final["status"] == "success" and final["output"] == {"price": 120} and final["error"] is None
        assert answers["cancel"].json()["message"] == f"job {job_id} has already ended with status success"
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == 1


# ---------------------------------------------------------------------------------------------
# retry


async def test_retry_an_ended_job(client, plain, session, admin, auth):
    await tenant_setup(client, session, admin)
    tenant = auth(**TENANT)
    original = await infer(client, tenant, client_id="client-1")
    assert (await retry(client, tenant, original, expect=409))["message"] == (
        f"job {original} is pending; only an ended job (success or failure) can be retried"
    )
    r = await complete(client, admin, original, "failure", error={"code": "flaky", "message": "try again"})
    assert r.status_code == 200
    new_id = (await retry(client, tenant, original))["job_id"]
    assert new_id != original
    new = await job(client, tenant, new_id)
    old = await job(client, tenant, original)
    assert new["retry_of"] == original and old["retry_of"] is None
    assert new["status"] == "pending" and new["error"] is None and new["attempts"] == 0
    for field in ("job_type", "input", "client_id", "model_id", "model_version", "domain_id", "service_id"):
        assert new[field] == old[field], field
    assert new["created_by"]["client_id"] == "client-1"
    # the fast path and the route show the new field alike
    assert (await plain.get(f"/v2/jobs/{new_id}", headers=tenant)).json() == new
    listed = (await client.get("/v2/jobs", headers=tenant)).json()
    assert [j["job_id"] for j in listed][:2] == [new_id, original]
    audit = (await client.get("/v2/audit?action=retryjob", headers=admin)).json()
    assert [(a["target_id"], a["summary"]["retry_of"]) for a in audit] == [(new_id, original)]
    # a cancelled job can be retried too, and a retry of a retry points at its own original
    await cancel(client, tenant, new_id)
    again = (await retry(client, tenant, new_id))["job_id"]
    assert (await job(client, tenant, again))["retry_of"] == new_id
    assert (await retry(client, admin, "no-such-job", expect=404))["message"] == "job no-such-job not found"
    other = auth(scopes=["run_inference"], client_id="client-2")
    assert (await retry(client, other, original, expect=403))["message"] == "no access to client client-1"


async def test_retry_runs_through_the_key_resolved_again(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", ROUTE)
    await assign(client, admin, key="forecast", service_id="svc-1")
    r = await client.post(f"{D}/service/svc-1/assignments/forecast/jobs", json={"input": {"n": 1}}, headers=admin)
    original = await job(client, admin, r.json()["job_id"])
    assert original["model_version"] == "1"
    await complete(client, admin, original["job_id"], output={})
    await make_version(session, version="2")
    revision = (await assign(client, admin, key="forecast", service_id="svc-1", model_version="2")).json()
    # the service's features changed since: the retry gets them as they are now
    r = await client.put(f"{D}/service/svc-1", json={"static_features": {"competitor_count": 4}}, headers=admin)
    assert r.status_code == 200
    new = await job(client, admin, (await retry(client, admin, original["job_id"]))["job_id"])
    assert (new["model_version"], new["assignment_id"]) == ("2", revision["assignment_id"])
    assert new["input"] == {"n": 1} and new["service_id"] == "svc-1" and new["domain_id"] == "south_australia"
    features = await session.scalar(text("SELECT features FROM jobs WHERE job_id = :j"), {"j": new["job_id"]})
    assert features["competitor_count"] == 4

    # the key retired: nothing to run through
    await assign(client, admin, key="forecast", service_id="svc-1", model_version="2", status="archived")
    r = await client.post(f"/v2/jobs/{original['job_id']}/retry", headers=admin)
    assert r.status_code == 422
    assert r.json()["message"] == (
        "assignment forecast is archived in service svc-1 of domain south_australia: no active revision to retry "
        "the job through"
    )


async def test_a_direct_job_is_retried_on_the_same_version_unless_it_is_archived(client, session, admin):
    await tenant_setup(client, session, admin)
    await make_version(session, version="2")
    original = await infer(client, admin, version="2")
    await complete(client, admin, original, output={}, version="2")
    first = await job(client, admin, (await retry(client, admin, original))["job_id"])
    assert first["model_version"] == "2" and first["assignment_id"] is None
    r = await client.post(f"{MODEL}/versions/2/new_status", json={"status": "archived"}, headers=admin)
    assert r.status_code == 200
    r = await client.post(f"/v2/jobs/{original}/retry", headers=admin)
    assert r.status_code == 422
    assert r.json()["message"] == "model pricing-model version 2 is archived; it takes no new job"


async def test_retry_honours_idempotency_keys(client, session, admin):
    await tenant_setup(client, session, admin)
    first, second = await infer(client, admin), await infer(client, admin)
    for job_id in (first, second):
        await complete(client, admin, job_id, output={})
    key = {"Idempotency-Key": "retry-once"}
    a = await client.post(f"/v2/jobs/{first}/retry", headers={**admin, **key})
    b = await client.post(f"/v2/jobs/{first}/retry", headers={**admin, **key})
    assert a.status_code == b.status_code == 202 and a.json() == b.json()
    assert b.headers["idempotent-replayed"] == "true"
    count = await session.scalar(text("SELECT count(*) FROM jobs WHERE retry_of = :j"), {"j": first})
    assert count == 1
    r = await client.post(f"/v2/jobs/{second}/retry", headers={**admin, **key})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["message"]


async def test_retry_of_an_init_job_reinitialises_the_service(client, session, admin, settings):
    await tenant_setup(client, session, admin)
    init = (await init_service(client, admin, "svc-1", ROUTE)).json()["job_id"]
    await cancel(client, admin, init)
    assert (await stored_service(session, "svc-1")).status == "failed"
    new_id = (await retry(client, admin, init))["job_id"]
    assert (await stored_service(session, "svc-1")).status == "initializing"
    assert await dispatch_until_idle(settings) == 1
    assert (await job(client, admin, new_id))["status"] == "success"
    assert (await stored_service(session, "svc-1")).status == "available"
    purpose = await session.scalar(text("SELECT purpose FROM jobs WHERE job_id = :j"), {"j": new_id})
    assert purpose == "service_init"


async def test_retry_is_refused_when_a_launch_now_would_be(client, session, admin):
    await tenant_setup(client, session, admin)
    job_id = (await init_service(client, admin, "svc-1", ROUTE)).json()["job_id"]
    await complete(client, admin, job_id, output={})
    r = await client.patch(f"{D}", json={"status": "inactive"}, headers=admin)
    assert r.status_code == 200
    r = await client.post(f"/v2/jobs/{job_id}/retry", headers=admin)
    assert r.status_code == 422 and r.json()["message"] == "domain south_australia is not active"
    await client.patch(f"{D}", json={"status": "active"}, headers=admin)
    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    r = await client.post(f"/v2/jobs/{job_id}/retry", headers=admin)
    assert r.status_code == 422 and r.json()["message"] == "client client-1 is suspended"
    await client.patch("/v2/clients/client-1", json={"status": "active"}, headers=admin)
    assert (await client.delete(f"{D}/service/svc-1", headers=admin)).status_code == 204
    r = await client.post(f"/v2/jobs/{job_id}/retry", headers=admin)
    assert r.status_code == 422
    assert r.json()["message"] == "service svc-1 of domain south_australia no longer exists; its jobs cannot be retried"
    assert await session.scalar(text("SELECT count(*) FROM jobs WHERE retry_of IS NOT NULL")) == 0
