"""One service (issue 19 point 4, spec 15.4): `POST .../service/{id}/init` re-initialises it
(202 `{service_id, job_id}`; 404 unknown; 422 departed, domain inactive or no model);
`DELETE .../service/{id}` removes it (204) from lists, freeze checks and re-inits, keeps its
jobs and history and frees the id for a new init. Audited. (ECS: test_lifecycle_aws.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from factories import assign, domain_url, init_service, make_version, stored_service, tenant_setup
from lifecycle_support import job
from sqlalchemy import text

from pie.app import create_app
from pie.dispatch.dispatcher import dispatch_until_idle

D = domain_url("client-1", "south_australia")
ADL, SYD = {"route": "Adelaide to Sydney"}, {"route": "Sydney to Adelaide"}


@pytest.fixture
async def plain(engine, settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"fast_reads": False}))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def depart(client, admin, service_id: str) -> None:
    past = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    r = await client.put(f"{D}/service/{service_id}", json={"departure_datetime": past}, headers=admin)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# re-initialise one service


async def test_reinit_one_service(client, session, admin, auth, settings):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", ADL)
    await init_service(client, admin, "svc-2", SYD)
    assert await dispatch_until_idle(settings) == 2
    assert (await stored_service(session, "svc-1")).status == "available"
    r = await client.put(f"{D}/service/svc-1", json={"static_features": {"competitor_count": 4}}, headers=admin)
    assert r.status_code == 200
    resolved = r.json()["resolved_features"]

    tenant = auth(scopes=["init_services", "read_models"], client_id="client-1")
    r = await client.post(f"{D}/service/svc-1/init", headers=tenant)
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"service_id", "job_id"} and r.json()["service_id"] == "svc-1"
    job_id = r.json()["job_id"]
    service = await stored_service(session, "svc-1")
    assert service.status == "initializing" and service.resolved_features == resolved
    assert (await stored_service(session, "svc-2")).status == "available"  # only that one
    row = await job(client, admin, job_id)
    assert row["input"] == resolved and row["service_id"] == "svc-1" and row["model_version"] == "1"
    default = (await client.get(f"{D}/assignments/default", headers=admin)).json()
    assert row["assignment_id"] == default["assignment_id"]
    stored = (await session.execute(text("SELECT purpose, features FROM jobs WHERE job_id = :j"), {"j": job_id})).one()
    assert stored.purpose == "service_init" and stored.features == resolved
    assert await dispatch_until_idle(settings) == 1
    assert (await stored_service(session, "svc-1")).status == "available"

    audit = (await client.get("/v2/audit?action=reinitdomainservice", headers=admin)).json()
    assert [(a["target_type"], a["target_id"], a["summary"]["job_id"]) for a in audit] == [
        ("service", "south_australia/svc-1", job_id)
    ]
    # Idempotency-Key: the same request replays the first answer, one job
    key = {"Idempotency-Key": "reinit-1"}
    first = await client.post(f"{D}/service/svc-2/init", headers={**admin, **key})
    again = await client.post(f"{D}/service/svc-2/init", headers={**admin, **key})
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    count = await session.scalar(text("SELECT count(*) FROM jobs WHERE service_id = 'svc-2'"))
    assert count == 2


async def test_reinit_refusals(client, session, admin, auth):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", ADL)
    await init_service(client, admin, "gone", SYD)
    await depart(client, admin, "gone")
    jobs = await session.scalar(text("SELECT count(*) FROM jobs"))

    r = await client.post(f"{D}/service/nope/init", headers=admin)
    assert r.status_code == 404 and r.json()["message"] == "service nope not found in domain south_australia"
    r = await client.post("/v2/clients/client-1/domains/nowhere/service/svc-1/init", headers=admin)
    assert r.status_code == 404
    r = await client.post(f"{D}/service/gone/init", headers=admin)
    assert r.status_code == 422
    assert r.json()["message"] == "service gone has departed; departed services are not re-initialised"
    r = await client.post(f"{D}/service/svc-1/init", headers=auth(scopes=["read_domains"], client_id="client-1"))
    assert r.status_code == 403
    await client.patch(D, json={"status": "inactive"}, headers=admin)
    r = await client.post(f"{D}/service/svc-1/init", headers=admin)
    assert r.status_code == 422 and r.json()["message"] == "domain south_australia is not active"
    await client.patch(D, json={"status": "active"}, headers=admin)
    await assign(client, admin, status="archived")  # the default key retired: no model
    r = await client.post(f"{D}/service/svc-1/init", headers=admin)
    assert r.status_code == 422 and r.json()["message"].startswith("no model assigned")
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == jobs
    assert (await stored_service(session, "svc-1")).status == "initializing"  # untouched


# ---------------------------------------------------------------------------------------------
# delete a service


async def test_delete_a_service(client, plain, session, admin, auth, settings):
    await tenant_setup(client, session, admin)
    init = (await init_service(client, admin, "svc-1", ADL)).json()["job_id"]
    await init_service(client, admin, "svc-2", SYD)
    assert await dispatch_until_idle(settings) == 2
    await assign(client, admin, key="forecast", service_id="svc-1")
    r = await client.post(
        f"{D}/service/svc-1/assignments/forecast/jobs", json={"input": {"n": 1}, "subscribe": True}, headers=admin
    )
    pending = r.json()["job_id"]
    replay = (await client.get("/v2/models/pricing-model/event-subscriptions", headers=admin)).json()
    [replay] = [s for s in replay if s["service_id"] == "svc-1"]

    tenant = auth(scopes=["init_services", "read_domains", "read_models"], client_id="client-1")
    r = await client.delete(f"{D}/service/svc-1", headers=tenant)
    assert r.status_code == 204 and r.content == b""

    # gone from reads (the fast path and the route alike), lists and re-inits
    for http in (client, plain):
        r = await http.get(f"{D}/service/svc-1", headers=tenant)
        assert r.status_code == 404 and r.json()["message"] == "service svc-1 not found in domain south_australia"
    assert [s["service_id"] for s in (await client.get(f"{D}/services", headers=tenant)).json()] == ["svc-2"]
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.json()["dispatched_services"] == ["svc-2"]
    assert (await client.post(f"{D}/service/svc-1/init", headers=admin)).status_code == 404

    # its jobs stay; the unfinished one was cancelled
    listed = (await client.get("/v2/jobs?service_id=svc-1", headers=tenant)).json()
    assert sorted(j["job_id"] for j in listed) == sorted([init, pending])
    cancelled = await job(client, admin, pending)
    assert cancelled["status"] == "failure" and cancelled["error"]["code"] == "cancelled"
    assert cancelled["error"]["message"] == "service svc-1 was deleted before it was dispatched"
    assert (await job(client, admin, init))["status"] == "success"
    # its service-scope revisions stay (archived); its replay subscription is stale
    revisions = await session.execute(text("SELECT assignment_key, status FROM assignments WHERE service_id = 'svc-1'"))
    assert revisions.all() == [("forecast", "archived")]
    r = await client.get(f"/v2/models/pricing-model/event-subscriptions/{replay['id']}", headers=admin)
    assert r.json()["status"] == "stale"
    audit = (await client.get("/v2/audit?action=deletedomainservice", headers=admin)).json()
    assert len(audit) == 1 and audit[0]["target_id"] == "south_australia/svc-1"
    assert audit[0]["summary"]["cancelled_jobs"] == [pending]
    assert audit[0]["summary"]["archived_assignments"] == ["forecast"]

    # the id is free: a new service under it, with no active assignment of the old one
    r = await init_service(client, admin, "svc-1", SYD)
    assert (await client.get(f"{D}/service/svc-1", headers=admin)).json()["provided_features"] == SYD
    assert (await client.get(f"{D}/service/svc-1/assignments/forecast", headers=admin)).status_code == 404
    history = (await client.get(f"{D}/service/svc-1/assignments/forecast/revisions", headers=admin)).json()
    assert [h["status"] for h in history] == ["archived"]  # the id's history
    assert await dispatch_until_idle(settings) >= 1
    assert (await stored_service(session, "svc-1")).status == "available"


async def test_a_deleted_service_leaves_the_freeze_check(client, session, admin):
    """Version 2 freezes a schema that svc-1's route does not fit: the default upsert is
    blocked by svc-1 until svc-1 is deleted."""
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", ADL)
    await init_service(client, admin, "svc-2", SYD)
    schema = [{"name": "route", "json_schema": {"type": "string", "enum": ["Sydney to Adelaide"]}, "mandatory": True}]
    await make_version(session, version="2", features=schema)
    r = await assign(client, admin, model_version="2", expect=422)
    assert [b["service_id"] for b in r.json()["blocking_services"]] == ["svc-1"]
    assert (await client.delete(f"{D}/service/svc-1", headers=admin)).status_code == 204
    r = await assign(client, admin, model_version="2")
    assert r.json()["model_version"] == "2"


async def test_delete_refusals(client, session, admin, auth):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", ADL)
    await init_service(client, admin, "gone", SYD)
    await depart(client, admin, "gone")

    r = await client.delete(f"{D}/service/nope", headers=admin)
    assert r.status_code == 404 and r.json()["message"] == "service nope not found in domain south_australia"
    r = await client.delete(f"{D}/service/gone", headers=admin)
    assert r.status_code == 422
    assert r.json()["message"] == "service gone has departed; departed services are kept as history"
    r = await client.delete(f"{D}/service/svc-1", headers=auth(scopes=["read_domains"], client_id="client-1"))
    assert r.status_code == 403
    r = await client.delete(f"{D}/service/svc-1", headers=auth(scopes=["init_services"], client_id="client-2"))
    assert r.status_code == 403
    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    r = await client.delete(f"{D}/service/svc-1", headers=admin)
    assert r.status_code == 422 and r.json()["message"] == "client client-1 is suspended"
    await client.patch("/v2/clients/client-1", json={"status": "active"}, headers=admin)
    assert (await client.delete(f"{D}/service/svc-1", headers=admin)).status_code == 204
    assert (await client.delete(f"{D}/service/svc-1", headers=admin)).status_code == 404  # twice
    assert (await stored_service(session, "gone")) is not None
    assert await session.scalar(text("SELECT count(*) FROM audit_log WHERE action = 'deletedomainservice'")) == 1


async def test_delete_cancels_every_unfinished_init_job_of_the_service(client, session, admin):
    """The init job and a re-init job both pending: both end (as cancelled) in one
    finish_jobs batch, which sets the service status once per init job."""
    await tenant_setup(client, session, admin)
    init = (await init_service(client, admin, "svc-1", ADL)).json()["job_id"]
    reinit = (await client.post(f"{D}/service/svc-1/init", headers=admin)).json()["job_id"]
    r = await client.delete(f"{D}/service/svc-1", headers=admin)
    assert r.status_code == 204, r.text
    for job_id in (init, reinit):
        row = await job(client, admin, job_id)
        assert row["status"] == "failure" and row["error"]["code"] == "cancelled"


async def test_the_time_out_sweep_ends_several_init_jobs_at_once(client, session, admin, settings):
    """Two started init jobs past their time-out end in one sweep (one finish_jobs batch with
    two service-status updates): both services fail."""
    from pie.dispatch.dispatcher import Dispatcher

    await tenant_setup(client, session, admin)
    jobs = [(await init_service(client, admin, s, ADL)).json()["job_id"] for s in ("svc-1", "svc-2")]
    await session.execute(
        text(
            "UPDATE jobs SET status = 'started', attempts = 1, started_at = now() - interval '2 hours' "
            "WHERE job_id = ANY(:ids)"
        ),
        {"ids": jobs},
    )
    await session.commit()
    counts = await Dispatcher(settings.model_copy(update={"job_timeout_seconds": 60.0}), name="sweeper").sweep()
    assert counts["timed_out"] == 2
    for service_id in ("svc-1", "svc-2"):
        assert (await stored_service(session, service_id)).status == "failed"
