"""Services: init, get, list, update, departed semantics, batch re-init (spec 5.3-5.5)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from factories import (
    assign,
    feature,
    fresh,
    init_service,
    jobs_of,
    make_client,
    make_version,
    stored_job,
    stored_service,
    tenant_setup,
)
from sqlalchemy import func, select

from pie.tables.assignments import Assignment
from pie.tables.registry import ModelVersion
from pie.tables.tenancy import Service

D = "/v2/clients/client-1/domains/south_australia"
SA = {"route": "Adelaide to Sydney"}


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


async def default_revision(session) -> Assignment:
    return await session.scalar(
        select(Assignment)
        .where(Assignment.assignment_key == "default", Assignment.status == "active")
        .execution_options(populate_existing=True)
    )


async def test_init_stores_service_and_creates_the_init_job(client, session, admin):
    await tenant_setup(client, session, admin)
    provided = {"route": "Adelaide to Sydney", "competitor_count": 4, "market_ref": "spot"}
    r = await init_service(client, admin, "service-1", provided)
    body = r.json()
    assert body["service_id"] == "service-1" and body["job_id"]

    service = await stored_service(session, "service-1")
    assert service.status == "initializing"
    assert service.provided_features == provided
    assert service.resolved_features == provided  # no defaults in the example set

    job = await stored_job(session, body["job_id"])
    revision = await default_revision(session)
    assert job.job_type == "inference" and job.status == "pending"
    assert job.assignment_id == revision.assignment_id
    assert (job.model_id, job.model_version) == ("pricing-model", "1")
    assert (job.client_id, job.domain_id, job.service_id) == ("client-1", "south_australia", "service-1")
    assert job.input == provided and job.features == provided
    assert job.purpose == "service_init"

    r = await client.get(f"{D}/service/service-1", headers=admin)
    assert r.status_code == 200
    out = r.json()
    assert out["status"] == "initializing" and out["departed"] is False and out["departure_datetime"] is None
    assert out["provided_features"] == provided and out["resolved_features"] == provided
    assert out["domain_id"] == "south_australia" and out["created_at"].endswith("Z")


async def test_init_applies_schema_defaults(client, session, admin):
    features = [
        feature("route", {"type": "string"}, True),
        feature("cabin", {"type": "string", "default": "deck"}),
        feature("berths", {"type": "integer"}),
    ]
    await tenant_setup(client, session, admin, features=features)
    await init_service(client, admin, "s", {"route": "r"})
    service = await stored_service(session, "s")
    assert service.provided_features == {"route": "r"}
    assert service.resolved_features == {"route": "r", "cabin": "deck"}


async def test_init_refuses_bad_features_and_writes_nothing(client, session, admin):
    await tenant_setup(client, session, admin)
    cases = [
        ({}, "route", "missing mandatory feature"),
        ({"route": "Melbourne to Hobart"}, "route", "Melbourne"),
        ({"route": "Adelaide to Sydney", "competitor_count": 21}, "competitor_count", "21"),
        ({"route": "Adelaide to Sydney", "origin_destination_pair": ["a", "b", "c"]}, "origin_destination_pair", ""),
        ({"route": "Adelaide to Sydney", "market_ref": "barter"}, "market_ref", "barter"),
        ({"route": "Adelaide to Sydney", "colour": "blue"}, "colour", "unknown feature"),
    ]
    for provided, name, detail in cases:
        r = await init_service(client, admin, "s", provided, expect=422)
        message = r.json()["message"]
        assert r.json()["success"] is False and name in message and detail in message, message
    assert await session.scalar(select(func.count()).select_from(Service)) == 0
    assert await jobs_of(session) == []


async def test_init_needs_an_active_default_assignment(client, session, admin):
    await make_client(session)
    await make_version(session)
    r = await client.post("/v2/clients/client-1/domains", json={"domain_id": "south_australia"}, headers=admin)
    assert r.status_code == 201
    r = await init_service(client, admin, "s", {}, expect=422)
    assert "no model assigned" in r.json()["message"]
    # a non-default key does not count
    await assign(client, admin, key="forecast")
    r = await init_service(client, admin, "s", {}, expect=422)
    assert "no model assigned" in r.json()["message"]
    # an archived default does not count either
    await assign(client, admin, status="archived")
    r = await init_service(client, admin, "s", {}, expect=422)
    assert "no model assigned" in r.json()["message"]
    await assign(client, admin)
    await init_service(client, admin, "s", {})
    # a default pointing at a version that has since failed cannot initialize services
    await make_version(session, version="2")
    await assign(client, admin, model_version="2")
    v2 = (await fresh(session, select(ModelVersion).where(ModelVersion.version == "2")))[0]
    v2.status = "failed"
    await session.commit()
    r = await init_service(client, admin, "t", {}, expect=422)
    assert "failed" in r.json()["message"]
    assert (await client.post(f"{D}/services/init", headers=admin)).status_code == 422


async def test_init_conflict_inactive_domain_and_suspended_client(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", SA)
    r = await init_service(client, admin, "s", SA, expect=409)
    assert r.json()["success"] is False
    assert len(await jobs_of(session)) == 1

    await client.patch(D, json={"status": "inactive"}, headers=admin)
    r = await init_service(client, admin, "t", SA, expect=422)
    assert "not active" in r.json()["message"]
    await client.patch(D, json={"status": "active"}, headers=admin)

    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    r = await init_service(client, admin, "t", SA, expect=422)
    assert "suspended" in r.json()["message"]
    assert (await client.get(f"{D}/service/s", headers=admin)).status_code == 200


async def test_init_bad_input_is_400_and_unknown_domain_404(client, session, admin):
    await tenant_setup(client, session, admin)
    for body in (
        {},
        {"service_id": "bad id"},
        {"service_id": "s", "static_features": ["route"]},
        {"service_id": "s", "departure_datetime": "tomorrow"},
        {"service_id": "s", "departure_datetime": 1700000000},
    ):
        r = await client.post(f"{D}/service/init", json=body, headers=admin)
        assert r.status_code == 400, (body, r.text)
    r = await client.post("/v2/clients/client-1/domains/nope/service/init", json={"service_id": "s"}, headers=admin)
    assert r.status_code == 404


async def test_governing_schema_is_the_frozen_schema_of_the_default_version(client, session, admin):
    """Live features say `route` is any string; version 2's frozen schema restricts it."""
    live = [feature("route", {"type": "string"}, True)]
    frozen = [
        feature("route", {"type": "string", "enum": ["A-B"]}, True),
        feature("fare", {"type": "number", "default": 10}),
    ]
    await tenant_setup(client, session, admin, features=live)
    # version 1 has no frozen schema: the live features govern
    await init_service(client, admin, "s1", {"route": "anything"})
    assert (await stored_service(session, "s1")).resolved_features == {"route": "anything"}

    await make_version(session, version="2", features=frozen)
    r = await assign(client, admin, model_version="2", expect=422)  # s1 blocks the swap
    assert r.json()["blocking_services"][0]["service_id"] == "s1"
    await client.put(
        f"{D}/service/s1",
        json={"departure_datetime": iso(datetime.now(timezone.utc) - timedelta(hours=1))},
        headers=admin,
    )
    await assign(client, admin, model_version="2")

    r = await init_service(client, admin, "s2", {"route": "anything"}, expect=422)
    assert "route" in r.json()["message"]
    await init_service(client, admin, "s2", {"route": "A-B"})
    assert (await stored_service(session, "s2")).resolved_features == {"route": "A-B", "fare": 10}


async def test_departure_datetime_and_departed(client, session, admin):
    await tenant_setup(client, session, admin)
    past = datetime.now(timezone.utc) - timedelta(days=1)
    future = datetime.now(timezone.utc) + timedelta(days=1)
    await init_service(client, admin, "past", SA, departure_datetime=iso(past))
    await init_service(client, admin, "future", SA, departure_datetime=iso(future))
    await init_service(client, admin, "none", SA)
    # an offset-less date-time is taken as UTC
    await init_service(client, admin, "naive", SA, departure_datetime="2001-02-03T04:05:06")

    r = await client.get(f"{D}/service/past", headers=admin)
    assert r.json()["departed"] is True and r.json()["departure_datetime"] == iso(past)
    r = await client.get(f"{D}/service/naive", headers=admin)
    assert r.json()["departure_datetime"] == "2001-02-03T04:05:06Z" and r.json()["departed"] is True
    r = await client.get(f"{D}/service/future", headers=admin)
    assert r.json()["departed"] is False

    r = await client.get(f"{D}/services", headers=admin)
    assert [s["service_id"] for s in r.json()] == ["future", "naive", "none", "past"]
    r = await client.get(f"{D}/services?departed=true", headers=admin)
    assert [s["service_id"] for s in r.json()] == ["naive", "past"]
    r = await client.get(f"{D}/services?departed=false", headers=admin)
    assert [s["service_id"] for s in r.json()] == ["future", "none"]
    r = await client.get(f"{D}/services?limit=3", headers=admin)
    assert len(r.json()) == 3 and r.headers.get("X-Next-Cursor")
    r = await client.get(f"{D}/services?departed=maybe", headers=admin)
    assert r.status_code == 400


async def test_get_unknown_service_is_404(client, session, admin):
    await tenant_setup(client, session, admin)
    r = await client.get(f"{D}/service/ghost", headers=admin)
    assert r.status_code == 404 and r.json()["success"] is False
    r = await client.put(f"{D}/service/ghost", json={}, headers=admin)
    assert r.status_code == 404


async def test_update_merges_removes_and_re_resolves_without_a_job(client, session, admin):
    features = [
        feature("route", {"type": "string"}, True),
        feature("cabin", {"type": "string", "default": "deck"}),
        feature("berths", {"type": "integer", "minimum": 0}),
    ]
    await tenant_setup(client, session, admin, features=features)
    await init_service(client, admin, "s", {"route": "r", "cabin": "suite", "berths": 2})
    jobs_before = len(await jobs_of(session))

    r = await client.put(f"{D}/service/s", json={"static_features": {"route": "r2", "cabin": None}}, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["provided_features"] == {"route": "r2", "berths": 2}
    assert body["resolved_features"] == {"route": "r2", "berths": 2, "cabin": "deck"}
    stored = await stored_service(session, "s")
    assert stored.provided_features == {"route": "r2", "berths": 2}
    assert stored.status == "initializing"
    assert len(await jobs_of(session)) == jobs_before

    # departure replaced when given, kept when not, cleared by an explicit null
    when = datetime(2030, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    r = await client.put(f"{D}/service/s", json={"departure_datetime": iso(when)}, headers=admin)
    assert r.json()["departure_datetime"] == iso(when) and r.json()["provided_features"] == {"route": "r2", "berths": 2}
    r = await client.put(f"{D}/service/s", json={"static_features": {"berths": 3}}, headers=admin)
    assert r.json()["departure_datetime"] == iso(when)
    r = await client.put(f"{D}/service/s", json={"departure_datetime": None}, headers=admin)
    assert r.json()["departure_datetime"] is None


async def test_update_failure_writes_nothing(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", {"route": "Adelaide to Sydney", "competitor_count": 2})
    before = await stored_service(session, "s")
    for patch in ({"competitor_count": 99}, {"route": None}, {"novel": 1}, {"weekly_demand": [1, 2, 3]}):
        r = await client.put(
            f"{D}/service/s",
            json={"static_features": patch, "departure_datetime": "2001-01-01T00:00:00Z"},
            headers=admin,
        )
        assert r.status_code == 422, (patch, r.text)
        assert r.json()["success"] is False
    after = await stored_service(session, "s")
    assert after.provided_features == before.provided_features
    assert after.resolved_features == before.resolved_features
    assert after.departure_datetime is None


async def test_update_refused_on_inactive_domain_and_needs_init_services(client, session, admin, auth):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", SA)
    manager = auth(scopes=["manage_domains", "read_domains"], client_id="client-1")
    operator = auth(scopes=["init_services"], client_id="client-1")
    assert (await client.put(f"{D}/service/s", json={}, headers=manager)).status_code == 403
    assert (
        await client.post(f"{D}/service/init", json={"service_id": "x", "static_features": SA}, headers=manager)
    ).status_code == 403
    assert (await client.post(f"{D}/services/init", headers=manager)).status_code == 403
    assert (await client.put(f"{D}/service/s", json={}, headers=operator)).status_code == 200
    assert (await client.get(f"{D}/service/s", headers=operator)).status_code == 403
    await client.patch(D, json={"status": "inactive"}, headers=admin)
    r = await client.put(f"{D}/service/s", json={"static_features": {"competitor_count": 1}}, headers=admin)
    assert r.status_code == 422


async def test_unknown_service_is_404_before_any_422(client, session, admin):
    """Like the other service-addressed routes (assignments, jobs): a service that does not
    exist is 404 even when the domain is inactive or the client suspended."""
    await tenant_setup(client, session, admin)
    await client.patch(D, json={"status": "inactive"}, headers=admin)
    for url, body in (
        (f"{D}/service/ghost", {}),
        (f"{D}/service/ghost/assignments/forecast", {"model_id": "pricing-model", "model_version": "1"}),
    ):
        assert (await client.put(url, json=body, headers=admin)).status_code == 404
    await client.patch(D, json={"status": "active"}, headers=admin)
    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    for url, body in (
        (f"{D}/service/ghost", {}),
        (f"{D}/service/ghost/assignments/forecast", {"model_id": "pricing-model", "model_version": "1"}),
    ):
        r = await client.put(url, json=body, headers=admin)
        assert r.status_code == 404 and "ghost" in r.json()["message"], r.text
    r = await client.post(f"{D}/service/ghost/assignments/forecast/jobs", json={}, headers=admin)
    assert r.status_code == 404


async def test_update_re_resolves_against_the_governing_schema_not_live_features(client, session, admin):
    frozen = [feature("route", {"type": "string"}, True), feature("fare", {"type": "number", "default": 5})]
    await tenant_setup(
        client, session, admin, features=[feature("route", {"type": "string"}, True)], version_features=frozen
    )
    await init_service(client, admin, "s", {"route": "x"})
    assert (await stored_service(session, "s")).resolved_features == {"route": "x", "fare": 5}
    # live features change: they do not govern while version 1 has a frozen schema
    await client.put(f"{D}/features", json={"features": [feature("route", {"type": "integer"}, True)]}, headers=admin)
    r = await client.put(f"{D}/service/s", json={"static_features": {"fare": 7.5}}, headers=admin)
    assert r.status_code == 200 and r.json()["resolved_features"] == {"route": "x", "fare": 7.5}


async def test_batch_reinit_dispatches_non_departed_services(client, session, admin):
    await tenant_setup(client, session, admin)
    past = iso(datetime.now(timezone.utc) - timedelta(minutes=5))
    future = iso(datetime.now(timezone.utc) + timedelta(days=3))
    await init_service(client, admin, "b", {"route": "Adelaide to Sydney", "competitor_count": 1})
    await init_service(client, admin, "a", {"route": "Sydney to Adelaide"}, departure_datetime=future)
    await init_service(client, admin, "gone", {"route": "Sydney to Adelaide"}, departure_datetime=past)
    before = {sid: await stored_service(session, sid) for sid in ("a", "b", "gone")}
    snapshot = {sid: (s.provided_features, s.resolved_features, s.updated_at) for sid, s in before.items()}
    init_jobs = {j.job_id for j in await jobs_of(session)}

    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 202, r.text
    assert r.json()["dispatched_services"] == ["a", "b"]

    fresh = [j for j in await jobs_of(session) if j.job_id not in init_jobs]
    assert r.json()["jobs"] == [
        {"service_id": j.service_id, "job_id": j.job_id} for j in sorted(fresh, key=lambda j: j.service_id)
    ]
    revision = await default_revision(session)
    assert sorted(j.service_id for j in fresh) == ["a", "b"]
    for job in fresh:
        stored = before[job.service_id]
        assert job.job_type == "inference" and job.status == "pending"
        assert job.assignment_id == revision.assignment_id
        assert (job.model_id, job.model_version, job.client_id, job.domain_id) == (
            "pricing-model",
            "1",
            "client-1",
            "south_australia",
        )
        assert job.input == stored.resolved_features and job.features == stored.resolved_features
    # stored features untouched; the services that got a job are initializing until it ends
    for sid in ("a", "b", "gone"):
        after = await stored_service(session, sid)
        assert (after.provided_features, after.resolved_features) == snapshot[sid][:2]
        assert after.status == ("initializing" if sid != "gone" else before[sid].status)
        assert (after.updated_at == snapshot[sid][2]) == (sid == "gone")


async def test_batch_reinit_uses_stored_resolved_features_even_after_live_edits(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", {"route": "Adelaide to Sydney"})
    await client.put(f"{D}/features", json={"features": [feature("other", {"type": "string"}, True)]}, headers=admin)
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.json()["dispatched_services"] == ["s"]
    job = (await jobs_of(session))[-1]
    assert job.input == {"route": "Adelaide to Sydney"}


async def test_batch_reinit_refusals(client, session, admin):
    await make_client(session)
    await make_version(session)
    await client.post("/v2/clients/client-1/domains", json={"domain_id": "south_australia"}, headers=admin)
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 422 and "no model assigned" in r.json()["message"]
    await assign(client, admin)
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 202 and r.json() == {"dispatched_services": [], "jobs": []}
    await client.patch(D, json={"status": "inactive"}, headers=admin)
    assert (await client.post(f"{D}/services/init", headers=admin)).status_code == 422
    await client.patch(D, json={"status": "active"}, headers=admin)
    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    assert (await client.post(f"{D}/services/init", headers=admin)).status_code == 422
    assert (await client.post("/v2/clients/client-1/domains/nope/services/init", headers=admin)).status_code == 404
    assert await jobs_of(session) == []


async def test_tenant_isolation_of_services(client, session, admin, auth):
    await tenant_setup(client, session, admin)
    await make_client(session, "client-2")
    await init_service(client, admin, "s", SA)
    intruder = auth(groups=["client:client-2"], username="mallory")
    assert (await client.get(f"{D}/service/s", headers=intruder)).status_code == 403
    assert (await client.post(f"{D}/services/init", headers=intruder)).status_code == 403
    # the same domain id under another client is a different (absent) domain
    r = await client.get("/v2/clients/client-2/domains/south_australia/service/s", headers=admin)
    assert r.status_code == 404


async def test_service_status_follows_its_init_job(client, session, admin):
    """The end of the init job (reported through the completion route) sets the service status;
    a batch re-init job is an init job too."""
    await tenant_setup(client, session, admin)
    ok = (await init_service(client, admin, "ok", SA)).json()["job_id"]
    bad = (await init_service(client, admin, "bad", SA)).json()["job_id"]
    complete = "/v2/models/pricing-model/versions/1/jobs/{}/complete"
    r = await client.post(complete.format(ok), json={"status": "success", "output": {"price": 1}}, headers=admin)
    assert r.status_code == 200, r.text
    r = await client.post(complete.format(bad), json={"status": "failure", "error": {"code": "x"}}, headers=admin)
    assert r.status_code == 200, r.text
    assert (await client.get(f"{D}/service/ok", headers=admin)).json()["status"] == "available"
    assert (await client.get(f"{D}/service/bad", headers=admin)).json()["status"] == "failed"

    # re-init: the fresh jobs are init jobs; their outcome becomes the services' status
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.json()["dispatched_services"] == ["bad", "ok"]
    fresh_jobs = {j.service_id: j.job_id for j in await jobs_of(session) if j.status == "pending"}
    await client.post(complete.format(fresh_jobs["bad"]), json={"status": "success", "output": {}}, headers=admin)
    assert (await client.get(f"{D}/service/bad", headers=admin)).json()["status"] == "available"


async def test_a_late_older_init_job_does_not_override_a_newer_outcome(client, session, admin):
    """Init job J1 is still out when a batch re-init's J2 succeeds; J1 then reports failure late:
    the service keeps the newer outcome (available)."""
    await tenant_setup(client, session, admin)
    first = (await init_service(client, admin, "svc", SA)).json()["job_id"]
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.json()["dispatched_services"] == ["svc"]
    second = next(j.job_id for j in await jobs_of(session) if j.job_id != first)
    complete = "/v2/models/pricing-model/versions/1/jobs/{}/complete"
    r = await client.post(complete.format(second), json={"status": "success", "output": {}}, headers=admin)
    assert r.status_code == 200, r.text
    assert (await client.get(f"{D}/service/svc", headers=admin)).json()["status"] == "available"
    r = await client.post(complete.format(first), json={"status": "failure", "error": {"code": "late"}}, headers=admin)
    assert r.status_code == 200, r.text
    assert (await client.get(f"{D}/service/svc", headers=admin)).json()["status"] == "available"

    # while the newer job has not ended, the service stays initializing (spec 15.3): an older
    # job's outcome does not count; the newest job's does
    r = await client.post(f"{D}/services/init", headers=admin)
    third = r.json()["jobs"][0]["job_id"]
    fourth = (await client.post(f"{D}/services/init", headers=admin)).json()["jobs"][0]["job_id"]
    r = await client.post(complete.format(third), json={"status": "failure", "error": {"code": "x"}}, headers=admin)
    assert r.status_code == 200, r.text
    assert (await client.get(f"{D}/service/svc", headers=admin)).json()["status"] == "initializing"
    r = await client.post(complete.format(fourth), json={"status": "failure", "error": {"code": "x"}}, headers=admin)
    assert (await client.get(f"{D}/service/svc", headers=admin)).json()["status"] == "failed"
