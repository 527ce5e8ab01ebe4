"""Job routes: getjob (with ?wait long-polling), listjobs, completemodeljob, and the in-process
handler listing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from factories import until
from sqlalchemy import select

from pie.jobs.logic import create_job
from pie.jobs.waiting import listener
from pie.tables.clients import Client
from pie.tables.jobs import Job
from pie.tables.registry import EventSubscription, Model, ModelVersion
from pie.tables.tenancy import Domain, Service

ECHO = {"training": {"type": "in_process", "value": "echo"}, "inference": {"type": "in_process", "value": "echo"}}


async def seed_version(session, model_id="m1", version="1", *, contracts=None, handlers=None) -> None:
    if await session.get(Model, model_id) is None:
        session.add(
            Model(id=model_id, name=model_id, handlers=handlers or ECHO, handler_contracts=contracts, status="active")
        )
        await session.flush()
    session.add(
        ModelVersion(
            model_id=model_id, version=version, status="active", handlers=handlers or ECHO, handler_contracts=contracts
        )
    )
    await session.commit()


async def seed_service(session, client_id="sealink", domain_id="pricing", service_id="svc-1") -> None:
    if await session.get(Client, client_id) is None:
        session.add(Client(client_id=client_id, name=client_id))
        await session.flush()
    if await session.get(Domain, (client_id, domain_id)) is None:
        session.add(Domain(client_id=client_id, domain_id=domain_id))
        await session.flush()
    session.add(Service(client_id=client_id, domain_id=domain_id, service_id=service_id, status="initializing"))
    await session.commit()


async def new_job(session, **kw: Any) -> Job:
    kw.setdefault("job_type", "inference")
    kw.setdefault("model_id", "m1")
    kw.setdefault("model_version", "1")
    job = await create_job(session, **kw)
    await session.commit()
    return job


def complete_url(job: Job | str, model_id="m1", version="1") -> str:
    job_id = job if isinstance(job, str) else job.job_id
    return f"/v2/models/{model_id}/versions/{version}/jobs/{job_id}/complete"


async def stored(session, job_id: str) -> Job:
    return await session.scalar(select(Job).where(Job.job_id == job_id).execution_options(populate_existing=True))


async def service_status(session, client_id: str, domain_id: str, service_id: str) -> str:
    return (await session.get(Service, (client_id, domain_id, service_id), populate_existing=True)).status


# ---------------------------------------------------------------------------------------------
# getjob


async def test_getjob_returns_the_job_record(client, session, admin):
    await seed_version(session)
    job = await new_job(session, input={"route": "ADL-SYD"})
    r = await client.get(f"/v2/jobs/{job.job_id}", headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {
        "job_id",
        "job_type",
        "status",
        "model_id",
        "model_version",
        "assignment_id",
        "client_id",
        "domain_id",
        "service_id",
        "subscription_id",
        "retry_of",
        "arm",
        "shadow_of",
        "input",
        "output",
        "error",
        "warnings",
        "attempts",
        "timeout_seconds",
        "created_by",
        "created_at",
        "started_at",
        "completed_at",
        "updated_at",
        "dispatch",
    }
    assert body["dispatch"] is None  # no dispatch attempt failed
    assert body["job_id"] == job.job_id and body["status"] == "pending" and body["job_type"] == "inference"
    assert body["input"] == {"route": "ADL-SYD"} and body["output"] is None and body["attempts"] == 0
    assert body["created_at"].endswith("Z") and body["started_at"] is None and body["warnings"] == []


async def test_getjob_errors(client, session, admin, auth):
    await seed_version(session)
    job = await new_job(session)
    assert (await client.get("/v2/jobs/0192f1c4-0000-7000-8000-000000000000", headers=admin)).status_code == 404
    r = await client.get("/v2/jobs/-not-an-id", headers=admin)
    assert r.status_code == 400 and r.json()["success"] is False
    r = await client.get(f"/v2/jobs/{job.job_id}")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await client.get(f"/v2/jobs/{job.job_id}", headers=auth(scopes=["manage_domains"]))
    assert r.status_code == 403 and r.json() == {
        "success": False,
        "message": "missing permission read_models or run_inference",
    }
    for bad in ("31", "-1", "soon"):
        assert (await client.get(f"/v2/jobs/{job.job_id}?wait={bad}", headers=admin)).status_code == 400


async def test_getjob_checks_tenant_of_the_job(client, session, auth):
    await seed_version(session)
    await seed_service(session, "sealink")
    await seed_service(session, "other")
    tenant_job = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-1")
    loose_job = await new_job(session)
    sealink = auth(scopes=["run_inference"], client_id="sealink")
    other = auth(scopes=["run_inference", "read_models"], client_id="other")
    assert (await client.get(f"/v2/jobs/{tenant_job.job_id}", headers=sealink)).status_code == 200
    r = await client.get(f"/v2/jobs/{tenant_job.job_id}", headers=other)
    assert r.status_code == 403 and "sealink" in r.json()["message"]
    human = auth(groups=["client:sealink"], username="alice")
    assert (await client.get(f"/v2/jobs/{tenant_job.job_id}", headers=human)).status_code == 200
    # a platform job (no tenant): not for tenant callers (spec 14.1), for machine callers
    # without a tenant and admins
    r = await client.get(f"/v2/jobs/{loose_job.job_id}", headers=sealink)
    assert r.status_code == 403 and "platform" in r.json()["message"]
    assert (await client.get(f"/v2/jobs/{loose_job.job_id}", headers=human)).status_code == 403
    assert (await client.get(f"/v2/jobs/{loose_job.job_id}", headers=auth(scopes=["run_inference"]))).status_code == 200
    assert (await client.get(f"/v2/jobs/{loose_job.job_id}", headers=auth(admin=True))).status_code == 200


async def test_getjob_wait_returns_when_the_job_ends(client, session, admin, auth):
    await seed_version(session)
    job = await new_job(session)
    worker = auth(scopes=["complete_jobs"])

    async def finish_later():
        await until(lambda: listener.waiters.get(job.job_id), what="the long-poll waiting")  # then end the job
        r = await client.post(complete_url(job), json={"status": "success", "output": {"price": 42}}, headers=worker)
        assert r.status_code == 200, r.text

    finisher = asyncio.create_task(finish_later())
    r = await client.get(f"/v2/jobs/{job.job_id}?wait=20", headers=admin)
    await finisher
    assert r.status_code == 200
    assert r.json()["status"] == "success" and r.json()["output"] == {"price": 42}


async def test_getjob_wait_gives_up_with_the_current_state(client, session, admin):
    await seed_version(session)
    job = await new_job(session)
    r = await client.get(f"/v2/jobs/{job.job_id}?wait=0.3", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "pending"
    # an ended job answers at once, whatever the wait
    done = await stored(session, job.job_id)
    done.status = "failure"
    await session.commit()
    r = await client.get(f"/v2/jobs/{job.job_id}?wait=30", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "failure"


async def test_getjob_wait_on_unknown_job_is_404(client, engine, admin):
    r = await client.get("/v2/jobs/no-such-job?wait=5", headers=admin)
    assert r.status_code == 404


# ---------------------------------------------------------------------------------------------
# listjobs


async def test_listjobs_newest_first_with_filters_and_cursor(client, session, admin):
    await seed_version(session)
    await seed_version(session, "m2", "7")
    await seed_service(session, "sealink", "pricing", "svc-1")
    await seed_service(session, "sealink", "pricing", "svc-2")
    a = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-1")
    b = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-2", job_type="training")
    c = await new_job(session, model_id="m2", model_version="7")
    d = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-1")
    stored_d = await stored(session, d.job_id)
    stored_d.status = "success"
    await session.commit()

    r = await client.get("/v2/jobs", headers=admin)
    assert r.status_code == 200
    assert [j["job_id"] for j in r.json()] == [d.job_id, c.job_id, b.job_id, a.job_id]
    assert "x-next-cursor" not in r.headers

    async def ids(query: str) -> list[str]:
        resp = await client.get(f"/v2/jobs?{query}", headers=admin)
        assert resp.status_code == 200, resp.text
        return [j["job_id"] for j in resp.json()]

    assert await ids("client_id=sealink&service_id=svc-1") == [d.job_id, a.job_id]
    assert await ids("client_id=sealink&domain_id=pricing") == [d.job_id, b.job_id, a.job_id]
    assert await ids("model_id=m2") == [c.job_id]
    assert await ids("status=success") == [d.job_id]
    assert await ids("status=pending&client_id=sealink") == [b.job_id, a.job_id]

    r = await client.get("/v2/jobs?limit=3", headers=admin)
    assert [j["job_id"] for j in r.json()] == [d.job_id, c.job_id, b.job_id]
    cursor = r.headers["x-next-cursor"]
    r = await client.get(f"/v2/jobs?limit=3&cursor={cursor}", headers=admin)
    assert [j["job_id"] for j in r.json()] == [a.job_id] and "x-next-cursor" not in r.headers


async def test_listjobs_is_tenant_filtered(client, session, auth):
    await seed_version(session)
    await seed_service(session, "sealink")
    await seed_service(session, "other")
    mine = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-1")
    theirs = await new_job(session, client_id="other", domain_id="pricing", service_id="svc-1")
    loose = await new_job(session)

    async def ids(headers, query="") -> list[str]:
        resp = await client.get(f"/v2/jobs{query}", headers=headers)
        assert resp.status_code == 200, resp.text
        return [j["job_id"] for j in resp.json()]

    # tenant callers: their tenant's jobs only, never platform jobs (spec 14.1)
    assert await ids(auth(scopes=["run_inference"], client_id="sealink")) == [mine.job_id]
    assert await ids(auth(scopes=["run_inference", "read_models"], client_id="sealink")) == [mine.job_id]
    assert await ids(auth(groups=["client:sealink"], username="alice")) == [mine.job_id]
    # a machine caller without a tenant sees only platform jobs
    assert await ids(auth(scopes=["read_models"])) == [loose.job_id]
    assert await ids(auth(scopes=["run_inference"], client_id="no-such-client")) == [loose.job_id]
    assert await ids(auth(admin=True)) == [loose.job_id, theirs.job_id, mine.job_id]
    # asking for another tenant explicitly is forbidden
    r = await client.get("/v2/jobs?client_id=other", headers=auth(scopes=["run_inference"], client_id="sealink"))
    assert r.status_code == 403


async def test_listjobs_errors(client, engine, admin, auth):
    assert (await client.get("/v2/jobs")).status_code == 401
    assert (await client.get("/v2/jobs", headers=auth(scopes=["manage_domains"]))).status_code == 403
    assert (await client.get("/v2/jobs?status=done", headers=admin)).status_code == 400
    assert (await client.get("/v2/jobs?client_id=bad%20id", headers=admin)).status_code == 400
    assert (await client.get("/v2/jobs?limit=0", headers=admin)).status_code == 400
    assert (await client.get("/v2/jobs?cursor=%%%", headers=admin)).status_code == 400


# ---------------------------------------------------------------------------------------------
# completemodeljob


async def test_complete_success_stores_output_and_repeat_is_a_noop(client, session, auth):
    await seed_version(session)
    job = await new_job(session)
    worker = auth(scopes=["complete_jobs"])
    r = await client.post(complete_url(job), json={"status": "success", "output": {"price": 99.5}}, headers=worker)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "job_id": job.job_id,
        "model_id": "m1",
        "model_version": "1",
        "status": "success",
        "triggered_events": [],
    }
    row = await stored(session, job.job_id)
    assert row.status == "success" and row.output == {"price": 99.5} and row.error is None
    first_completed_at = row.completed_at
    assert first_completed_at is not None

    r = await client.post(complete_url(job), json={"status": "success", "output": {"price": 1}}, headers=worker)
    assert r.status_code == 200 and r.json()["status"] == "success" and r.json()["triggered_events"] == []
    row = await stored(session, job.job_id)
    assert row.output == {"price": 99.5} and row.completed_at == first_completed_at

    r = await client.post(complete_url(job), json={"status": "failure", "error": {"message": "late"}}, headers=worker)
    assert r.status_code == 409 and r.json()["success"] is False
    assert (await stored(session, job.job_id)).status == "success"


async def test_complete_failure_keeps_the_error(client, session, auth):
    await seed_version(session)
    job = await new_job(session)
    worker = auth(scopes=["complete_jobs"])
    body = {"status": "failure", "error": {"code": "oom", "message": "ran out of memory"}, "output": {"ignored": True}}
    r = await client.post(complete_url(job), json=body, headers=worker)
    assert r.status_code == 200 and r.json()["status"] == "failure"
    row = await stored(session, job.job_id)
    assert (
        row.status == "failure" and row.error == {"code": "oom", "message": "ran out of memory"} and row.output is None
    )
    assert (await client.post(complete_url(job), json={"status": "success"}, headers=worker)).status_code == 409

    other = await new_job(session)
    r = await client.post(complete_url(other), json={"status": "failure"}, headers=worker)
    assert r.status_code == 200
    assert (await stored(session, other.job_id)).error["code"] == "handler_failure"


async def test_absent_job_values_are_sql_null(client, session, auth):
    """features (no service), output (failed job) and error (successful job) are SQL NULL, not a
    JSON null, so `IS NULL` queries and reports on the jobs table mean "not set"."""
    from sqlalchemy import text

    await seed_version(session)
    worker = auth(scopes=["complete_jobs"])
    ok, failed = await new_job(session), await new_job(session)
    assert (
        await client.post(complete_url(ok), json={"status": "success", "output": {"a": 1}}, headers=worker)
    ).status_code == 200
    assert (await client.post(complete_url(failed), json={"status": "failure"}, headers=worker)).status_code == 200
    rows = {
        r.job_id: r
        for r in await session.execute(
            text("SELECT job_id, features IS NULL AS f, output IS NULL AS o, error IS NULL AS e FROM jobs")
        )
    }
    assert (rows[ok.job_id].f, rows[ok.job_id].o, rows[ok.job_id].e) == (True, False, True)
    assert (rows[failed.job_id].f, rows[failed.job_id].o, rows[failed.job_id].e) == (True, True, False)


async def test_complete_errors(client, session, auth, admin):
    await seed_version(session)
    await seed_version(session, "m1", "2")
    await seed_service(session, "sealink")
    job = await new_job(session)
    worker = auth(scopes=["complete_jobs"])
    ok = {"status": "success", "output": {}}
    # the job must belong to that model version
    assert (await client.post(complete_url(job, "m1", "2"), json=ok, headers=worker)).status_code == 404
    assert (await client.post(complete_url(job, "m9", "1"), json=ok, headers=worker)).status_code == 404
    assert (
        await client.post(complete_url("0192f1c4-0000-7000-8000-000000000000"), json=ok, headers=worker)
    ).status_code == 404
    # syntax
    for bad in ({"status": "done"}, {}, {"status": 1}, [1]):
        r = await client.post(complete_url(job), json=bad, headers=worker)
        assert r.status_code == 400, bad
    r = await client.post(complete_url(job), content=b"{nope", headers={**worker, "content-type": "application/json"})
    assert r.status_code == 400
    assert (await client.post(complete_url(job, "m 1"), json=ok, headers=worker)).status_code == 400
    assert (await client.post("/v2/models/-m/versions/1/jobs/x/complete", json=ok, headers=worker)).status_code == 400
    # auth
    assert (await client.post(complete_url(job), json=ok)).status_code == 401
    r = await client.post(complete_url(job), json=ok, headers=auth(scopes=["run_inference", "read_models"]))
    assert r.status_code == 403
    tenant_job = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-1")
    r = await client.post(complete_url(tenant_job), json=ok, headers=auth(scopes=["complete_jobs"], client_id="other"))
    assert r.status_code == 403
    r = await client.post(
        complete_url(tenant_job), json=ok, headers=auth(scopes=["complete_jobs"], client_id="sealink")
    )
    assert r.status_code == 200
    # nothing was half-written by the rejected calls
    assert (await stored(session, job.job_id)).status == "pending"
    assert (await client.post(complete_url(job), json=ok, headers=admin)).status_code == 200


async def test_complete_output_contract_mismatch_is_a_warning(client, session, auth):
    contracts = {
        "inference": {
            "output_schema": {"type": "object", "required": ["price"], "properties": {"price": {"type": "number"}}}
        }
    }
    await seed_version(session, contracts=contracts)
    worker = auth(scopes=["complete_jobs"])
    good = await new_job(session)
    bad = await new_job(session)
    assert (
        await client.post(complete_url(good), json={"status": "success", "output": {"price": 3}}, headers=worker)
    ).status_code == 200
    r = await client.post(complete_url(bad), json={"status": "success", "output": {"cost": "x"}}, headers=worker)
    assert r.status_code == 200 and r.json()["status"] == "success"
    assert (await stored(session, good.job_id)).warnings == []
    row = await stored(session, bad.job_id)
    assert row.status == "success" and row.output == {"cost": "x"}
    assert len(row.warnings) == 1 and "output_schema" in row.warnings[0] and "price" in row.warnings[0]
    r = await client.get(f"/v2/jobs/{bad.job_id}", headers=auth(admin=True))
    assert r.json()["warnings"] == row.warnings


async def test_complete_service_init_job_sets_service_status(client, session, auth):
    await seed_version(session)
    await seed_service(session, "sealink", "pricing", "svc-ok")
    await seed_service(session, "sealink", "pricing", "svc-bad")
    worker = auth(scopes=["complete_jobs"], client_id="sealink")
    ok = await new_job(
        session,
        job_type="training",
        client_id="sealink",
        domain_id="pricing",
        service_id="svc-ok",
        purpose="service_init",
    )
    bad = await new_job(
        session,
        job_type="training",
        client_id="sealink",
        domain_id="pricing",
        service_id="svc-bad",
        purpose="service_init",
    )
    plain = await new_job(session, client_id="sealink", domain_id="pricing", service_id="svc-bad")
    assert (
        await client.post(complete_url(ok), json={"status": "success", "output": {}}, headers=worker)
    ).status_code == 200
    assert (await client.post(complete_url(bad), json={"status": "failure"}, headers=worker)).status_code == 200
    assert await service_status(session, "sealink", "pricing", "svc-ok") == "available"
    assert await service_status(session, "sealink", "pricing", "svc-bad") == "failed"
    # an ordinary job of the service does not touch its status
    assert (
        await client.post(complete_url(plain), json={"status": "success", "output": {}}, headers=worker)
    ).status_code == 200
    assert await service_status(session, "sealink", "pricing", "svc-bad") == "failed"


async def add_subscription(session, source, target, *, input_source="trigger_output", input=None, status="active"):
    sub = EventSubscription(
        source_model_id=source,
        trigger_event="inference_complete",
        target_model_id=target,
        target_action="inference",
        input_source=input_source,
        input=input,
        status=status,
    )
    session.add(sub)
    await session.commit()
    return str(sub.id)


async def jobs_of(session, model_id: str) -> list[Job]:
    return list(
        (
            await session.scalars(select(Job).where(Job.model_id == model_id).execution_options(populate_existing=True))
        ).all()
    )


async def test_complete_inference_fires_inference_complete_subscriptions(client, session, auth):
    await seed_version(session, "m1", "1")
    await seed_version(session, "m2", "7")
    chained = await add_subscription(session, "m1", "m2")
    await add_subscription(session, "m1", "m2", input_source="stored", input={"x": 1}, status="paused")
    job = await new_job(session)
    worker = auth(scopes=["complete_jobs"])
    r = await client.post(complete_url(job), json={"status": "success", "output": {"price": 7}}, headers=worker)
    assert r.status_code == 200, r.text
    events = r.json()["triggered_events"]
    fired = await jobs_of(session, "m2")
    assert len(fired) == 1 and events == [{"subscription_id": chained, "job_id": fired[0].job_id}]
    assert fired[0].input == {"price": 7} and str(fired[0].subscription_id) == chained and fired[0].status == "pending"
    # the repeat fires nothing again
    r = await client.post(complete_url(job), json={"status": "success", "output": {"price": 7}}, headers=worker)
    assert r.status_code == 200 and r.json()["triggered_events"] == []
    assert len(await jobs_of(session, "m2")) == 1


async def test_complete_answers_207_when_a_triggered_subscription_fails(client, session, auth):
    await seed_version(session, "m1", "1")
    await seed_version(session, "m2", "7")
    session.add(Model(id="m3", name="m3", handlers=ECHO, status="pending"))  # no active version
    await session.commit()
    ok = await add_subscription(session, "m1", "m2")
    broken = await add_subscription(session, "m1", "m3", input_source="stored", input={"a": 1})
    job = await new_job(session)
    r = await client.post(
        complete_url(job), json={"status": "success", "output": {"p": 1}}, headers=auth(scopes=["complete_jobs"])
    )
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["job_id"] == job.job_id and body["status"] == "success"
    by_sub = {e["subscription_id"]: e for e in body["triggered_events"]}
    assert set(by_sub) == {ok, broken} and "job_id" in by_sub[ok] and "m3" in by_sub[broken]["error"]
    # the job is completed all the same
    assert (await stored(session, job.job_id)).status == "success"


async def test_failed_or_training_jobs_fire_nothing(client, session, auth):
    await seed_version(session, "m1", "1")
    await seed_version(session, "m2", "7")
    await add_subscription(session, "m1", "m2")
    worker = auth(scopes=["complete_jobs"])
    failed = await new_job(session)
    training = await new_job(session, job_type="training")
    r = await client.post(complete_url(failed), json={"status": "failure", "error": {"m": 1}}, headers=worker)
    assert r.status_code == 200 and r.json()["triggered_events"] == []
    r = await client.post(complete_url(training), json={"status": "success", "output": {"w": 1}}, headers=worker)
    assert r.status_code == 200 and r.json()["triggered_events"] == []
    assert await jobs_of(session, "m2") == []


# ---------------------------------------------------------------------------------------------
# GET /v2/handlers/in-process


async def test_list_in_process_handlers(client, engine, auth):
    r = await client.get("/v2/handlers/in-process", headers=auth(scopes=["read_models"]))
    assert r.status_code == 200
    names = r.json()
    assert isinstance(names, list) and {"echo", "fail", "reference_pricing"} <= set(names) and names == sorted(names)
    assert (await client.get("/v2/handlers/in-process")).status_code == 401
    assert (await client.get("/v2/handlers/in-process", headers=auth(scopes=["run_inference"]))).status_code == 403


async def test_openapi_documents_the_registry_and_job_operations(client):
    """Operation ids as in spec section 12 (and our added routes), and the statuses each route
    can answer documented with the error envelope."""
    paths = (await client.get("/v2/openapi.json")).json()["paths"]
    m, v = "/v2/models", "/v2/models/{model_id}/versions/{model_version}"
    subs = "/v2/models/{model_id}/event-subscriptions"
    expected = {
        ("get", m): ("listmodels", {"200", "400", "401", "403"}),
        ("post", m): ("createmodel", {"201", "400", "401", "403", "409", "422"}),
        ("get", m + "/{model_id}"): ("getmodel", {"200", "400", "401", "403", "404"}),
        ("put", m + "/{model_id}"): ("updatemodel", {"200", "400", "401", "403", "404", "422"}),
        ("post", m + "/{model_id}/new_version"): (
            "createmodelversion",
            {"201", "400", "401", "403", "404", "409", "422"},
        ),
        ("get", m + "/{model_id}/versions"): ("listmodelversions", {"200", "404"}),
        ("get", v): ("getmodelversion", {"200", "404"}),
        ("post", v + "/new_status"): ("setmodelversionstatus", {"200", "400", "404", "422"}),
        ("post", v + "/inference"): ("infermodelversion", {"202", "400", "401", "403", "404", "422"}),
        ("get", subs): ("listmodeleventsubscriptions", {"200", "404"}),
        ("post", subs): ("createmodeleventsubscription", {"201", "400", "404", "422"}),
        ("get", subs + "/{subscription_id}"): ("getmodeleventsubscription", {"200", "404"}),
        ("put", subs + "/{subscription_id}"): ("updatemodeleventsubscription", {"200", "400", "404", "422"}),
        ("delete", subs + "/{subscription_id}"): ("deletemodeleventsubscription", {"204", "404"}),
        ("get", "/v2/jobs/{job_id}"): ("getjob", {"200", "400", "401", "403", "404"}),
        ("get", "/v2/jobs"): ("listjobs", {"200", "400", "401", "403"}),
        ("post", v + "/jobs/{job_id}/complete"): (
            "completemodeljob",
            {"200", "207", "400", "401", "403", "404", "409"},
        ),
        ("get", "/v2/handlers/in-process"): ("listinprocesshandlers", {"200", "401", "403"}),
    }
    for (method, path), (operation_id, statuses) in expected.items():
        operation = paths[path][method]
        assert operation["operationId"] == operation_id
        assert statuses <= set(operation["responses"]), (operation_id, statuses - set(operation["responses"]))


@pytest.mark.parametrize("wait", ["nan", "inf", "-1", "31", "abc"])
async def test_wait_must_be_a_finite_number_of_seconds_up_to_30(client, admin, wait):
    r = await client.get(f"/v2/jobs/0190c2a8-0000-7000-8000-000000000000?wait={wait}", headers=admin)
    assert r.status_code == 400, r.text
    assert r.json()["success"] is False and "wait" in r.json()["message"]
    if wait in ("nan", "inf"):
        assert "finite" in r.json()["message"]
