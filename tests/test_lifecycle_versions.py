"""Archived model versions (issue 19 point 1, spec 15.4): `active -> archived` only while no
active assignment revision of any tenant or scope points at the version (else 409 naming them),
`archived -> active` restores it; an archived version takes no job and no assignment and no
subscription fires on it; version lists filter by status. The archive-vs-upsert race runs on two
real connections: the rule lives in the database's row locks."""

from __future__ import annotations

import asyncio

from factories import assign, domain_url, init_service, make_client, make_version, tenant_setup
from lifecycle_support import until_waiting
from sqlalchemy import text

D = domain_url("client-1", "south_australia")
MODEL = "/v2/models/pricing-model"
ROUTE = {"route": "Adelaide to Sydney"}


async def set_status(client, headers, status, version="2", model=MODEL):
    return await client.post(f"{model}/versions/{version}/new_status", json={"status": status}, headers=headers)


async def versions(client, headers, query=""):
    r = await client.get(f"{MODEL}/versions{query}", headers=headers)
    assert r.status_code == 200, r.text
    return [(v["version"], v["status"]) for v in r.json()]


async def test_archive_an_unassigned_version_then_restore_it(client, session, admin):
    await tenant_setup(client, session, admin)  # default -> version 1
    await make_version(session, version="2")
    r = await set_status(client, admin, "archived")
    assert r.status_code == 200, r.text
    assert r.json()["version"]["status"] == "archived" and r.json()["triggered_events"] == []
    assert (await client.get(f"{MODEL}/versions/2", headers=admin)).json()["status"] == "archived"
    assert await versions(client, admin, "?status=archived") == [("2", "archived")]
    assert await versions(client, admin, "?status=active") == [("1", "active")]
    assert await versions(client, admin) == [("1", "active"), ("2", "archived")]
    assert (await client.get(f"{MODEL}/versions?status=retired", headers=admin)).status_code == 400

    r = await set_status(client, admin, "active")
    assert r.status_code == 200 and r.json()["version"]["status"] == "active"
    assert await versions(client, admin, "?status=archived") == []
    history = (await client.get(f"{MODEL}/versions/2/status-history", headers=admin)).json()
    assert [(h["from_status"], h["to_status"]) for h in history][-2:] == [
        ("active", "archived"),
        ("archived", "active"),
    ]
    audit = (await client.get("/v2/audit?action=setmodelversionstatus", headers=admin)).json()
    assert [a["summary"]["to"] for a in audit][:2] == ["active", "archived"]


async def test_archiving_an_assigned_version_is_409_naming_every_assignment(client, session, admin):
    await tenant_setup(client, session, admin)  # client-1: default -> 1
    await init_service(client, admin, "svc-1", ROUTE)
    await assign(client, admin, key="forecast", service_id="svc-1")  # service scope -> 1
    await make_client(session, "client-2")
    r = await client.post("/v2/clients/client-2/domains", json={"domain_id": "north", "features": []}, headers=admin)
    assert r.status_code == 201, r.text
    await assign(client, admin, "client-2", "north")  # another tenant -> 1
    await make_version(session, version="2")
    await assign(client, admin, key="shadow", model_version="2")
    await assign(client, admin, key="old")
    await assign(client, admin, key="old", status="archived")  # an archived revision does not count

    r = await set_status(client, admin, "archived", version="1")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["success"] is False
    assert "cannot be archived" in body["message"] and "3 active assignment(s)" in body["message"]
    assert body["assignments"] == [
        {"client_id": "client-1", "domain_id": "south_australia", "service_id": None, "assignment_key": "default"},
        {"client_id": "client-1", "domain_id": "south_australia", "service_id": "svc-1", "assignment_key": "forecast"},
        {"client_id": "client-2", "domain_id": "north", "service_id": None, "assignment_key": "default"},
    ]
    assert (await client.get(f"{MODEL}/versions/1", headers=admin)).json()["status"] == "active"
    history = (await client.get(f"{MODEL}/versions/1/status-history", headers=admin)).json()
    assert "archived" not in [h["to_status"] for h in history]

    # once every key points elsewhere (or is retired), the version can be archived
    await assign(client, admin, model_version="2")
    await assign(client, admin, key="forecast", service_id="svc-1", model_version="2")
    await assign(client, admin, "client-2", "north", status="archived")
    r = await set_status(client, admin, "archived", version="1")
    assert r.status_code == 200, r.text


async def test_an_archived_version_takes_no_job_and_no_assignment(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", ROUTE)
    await make_version(session, version="2")
    assert (await set_status(client, admin, "archived")).status_code == 200
    jobs_before = await session.scalar(text("SELECT count(*) FROM jobs"))

    # direct inference: the fast write path and the route (an Idempotency-Key takes the route)
    for extra in ({}, {"Idempotency-Key": "archived-1"}):
        r = await client.post(f"{MODEL}/versions/2/inference", json={"input": ROUTE}, headers={**admin, **extra})
        assert r.status_code == 422, r.text
        assert r.json() == {
            "success": False,
            "message": "model pricing-model version 2 is archived; it cannot run inference",
        }
    # no assignment to it, in either scope
    for service_id in (None, "svc-1"):
        r = await assign(client, admin, key="forecast", model_version="2", service_id=service_id, expect=422)
        assert r.json()["message"] == "invalid model reference: model pricing-model version 2 is archived"
    r = await client.post(
        f"{D}/assignments",
        json={"assignment_key": "x", "model_id": "pricing-model", "model_version": "2"},
        headers=admin,
    )
    assert r.status_code == 422
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == jobs_before
    assert await session.scalar(text("SELECT count(*) FROM assignments WHERE model_version = '2'")) == 0

    # restored, it works again
    assert (await set_status(client, admin, "active")).status_code == 200
    r = await client.post(f"{MODEL}/versions/2/inference", json={"input": ROUTE}, headers=admin)
    assert r.status_code == 202, r.text
    await assign(client, admin, key="forecast", model_version="2")


async def test_archived_is_reached_only_from_active_and_left_only_to_active(client, session, admin):
    await make_version(session, version="1", status="pending")
    r = await set_status(client, admin, "archived", version="1")
    assert r.status_code == 422 and "pending -> archived" in r.json()["message"]
    assert (await set_status(client, admin, "active", version="1")).status_code == 200
    assert (await set_status(client, admin, "archived", version="1")).status_code == 200
    assert (await set_status(client, admin, "archived", version="1")).status_code == 200  # the same again: no-op
    for target in ("training", "failed", "pending"):
        r = await set_status(client, admin, target, version="1")
        assert r.status_code == 422, target
        assert r.json()["message"].endswith("(allowed from archived: active)")


async def test_subscriptions_never_fire_on_an_archived_version(client, session, admin):
    """training_complete fires on the target's newest ACTIVE version (an archived one is
    skipped); a job of an archived version that completes fires no inference_complete."""
    await make_version(session, "source", "1", status="training")
    await make_version(session, "target", "1")
    await make_version(session, "target", "2")
    r = await client.post(
        "/v2/models/source/event-subscriptions",
        json={
            "trigger_event": "training_complete",
            "target_model_id": "target",
            "target_action": "inference",
            "input_source": "stored",
            "input": ROUTE,
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert (await set_status(client, admin, "archived", version="2", model="/v2/models/target")).status_code == 200
    r = await set_status(client, admin, "active", version="1", model="/v2/models/source")
    [event] = r.json()["triggered_events"]
    fired = (await client.get(f"/v2/jobs/{event['job_id']}", headers=admin)).json()
    assert (fired["model_id"], fired["model_version"]) == ("target", "1")

    # a job started on a version that is archived before the job ends fires nothing
    r = await client.post(
        "/v2/models/target/event-subscriptions",
        json={
            "trigger_event": "inference_complete",
            "target_model_id": "source",
            "target_action": "inference",
            "input_source": "trigger_output",
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert (await set_status(client, admin, "archived", version="1", model="/v2/models/target")).status_code == 200
    r = await client.post(
        f"/v2/models/target/versions/1/jobs/{fired['job_id']}/complete",
        json={"status": "success", "output": {"price": 1}},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["triggered_events"] == []
    assert await session.scalar(text("SELECT count(*) FROM jobs WHERE model_id = 'source'")) == 0
    # the same completion on an active version fires (the subscription itself is fine)
    await make_version(session, "target", "3")
    r = await client.post("/v2/models/target/versions/3/inference", json={"input": {}}, headers=admin)
    job_id = r.json()["inference_job_id"]
    r = await client.post(
        f"/v2/models/target/versions/3/jobs/{job_id}/complete", json={"status": "success", "output": {}}, headers=admin
    )
    assert len(r.json()["triggered_events"]) == 1


async def test_the_openapi_document_knows_archived(client):
    doc = (await client.get("/v2/openapi.json")).json()
    assert "archived" in doc["components"]["schemas"]["VersionStatus"]["enum"]
    listing = doc["paths"]["/v2/models/{model_id}/versions"]["get"]
    assert [p for p in listing["parameters"] if p["name"] == "status"]
    conflict = doc["paths"]["/v2/models/{model_id}/versions/{model_version}/new_status"]["post"]["responses"]["409"]
    schema = conflict["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]["required"] == ["message", "assignments"]


async def test_archive_racing_an_upsert_waits_for_it_and_refuses(client, session, admin, engine):
    """Two real connections. An upsert pointing `forecast` at version 2 holds version 2 FOR
    SHARE and is paused (another connection holds the revision it must archive); the archive of
    version 2 then queues on the version row; when the upsert commits, the archive sees the new
    revision and answers 409. Checking before locking would have archived a version that an
    active revision points at."""
    await tenant_setup(client, session, admin)
    await make_version(session, version="2")
    await assign(client, admin, key="forecast")  # -> 1
    async with engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(
            text("SELECT 1 FROM assignments WHERE assignment_key = 'forecast' AND status = 'active' FOR UPDATE")
        )
        upsert = asyncio.ensure_future(
            client.put(
                f"{D}/assignments/forecast", json={"model_id": "pricing-model", "model_version": "2"}, headers=admin
            )
        )
        await until_waiting(blocker, 1, upsert)
        archive = asyncio.ensure_future(set_status(client, admin, "archived"))
        await until_waiting(blocker, 2, upsert, archive)
        await blocker.commit()
    upserted, archived = await upsert, await archive
    assert upserted.status_code == 200, upserted.text
    assert archived.status_code == 409, archived.text
    assert archived.json()["assignments"] == [
        {"client_id": "client-1", "domain_id": "south_australia", "service_id": None, "assignment_key": "forecast"}
    ]
    assert (await client.get(f"{MODEL}/versions/2", headers=admin)).json()["status"] == "active"
    r = await client.get(f"{D}/assignments/forecast", headers=admin)
    assert r.json()["model_version"] == "2"


async def test_upsert_racing_an_archive_waits_for_it_and_refuses(client, session, admin, engine):
    """The other order, on two real connections: the archive of version 2 queues first on the
    version row (another connection holds it), an upsert to version 2 queues behind it; once the
    archive has committed, the upsert reads `archived`: 422, and no revision points at it."""
    await tenant_setup(client, session, admin)
    await make_version(session, version="2")
    async with engine.connect() as blocker:
        await blocker.begin()
        # the archive locks the version row, then updates it: hold the row so it queues there;
        # the upsert (FOR SHARE) queues behind the archive's lock request
        await blocker.execute(
            text("SELECT 1 FROM model_versions WHERE model_id = 'pricing-model' AND version = '2' FOR UPDATE")
        )
        archive = asyncio.ensure_future(set_status(client, admin, "archived"))
        await until_waiting(blocker, 1, archive)
        upsert = asyncio.ensure_future(
            client.put(
                f"{D}/assignments/forecast", json={"model_id": "pricing-model", "model_version": "2"}, headers=admin
            )
        )
        await until_waiting(blocker, 2, archive, upsert)
        await blocker.commit()
    archived, upserted = await archive, await upsert
    assert archived.status_code == 200, archived.text
    assert upserted.status_code == 422, upserted.text
    assert upserted.json()["message"] == "invalid model reference: model pricing-model version 2 is archived"
    assert await session.scalar(text("SELECT count(*) FROM assignments WHERE model_version = '2'")) == 0
