"""Assignment revisions in domain and service scope (spec 6, 6.1)."""

from __future__ import annotations

import asyncio
import json

from factories import (
    assign,
    create_domain,
    feature,
    fresh,
    init_service,
    make_client,
    make_version,
    racing_uncommitted,
    tenant_setup,
)
from sqlalchemy import select

from pie.tables.assignments import Assignment

D = "/v2/clients/client-1/domains/south_australia"
SA = {"route": "Adelaide to Sydney"}


async def revisions(session, key: str, service_id: str | None = None) -> list[Assignment]:
    stmt = select(Assignment).where(Assignment.assignment_key == key).order_by(Assignment.created_at)
    stmt = stmt.where(Assignment.service_id.is_(None) if service_id is None else Assignment.service_id == service_id)
    return await fresh(session, stmt)


async def test_domain_upsert_via_collection_post_and_keyed_put(client, session, admin):
    await make_client(session)
    await make_version(session)
    await make_version(session, version="2")
    await create_domain(client, admin)
    r = await client.post(
        f"{D}/assignments",
        json={
            "assignment_key": "forecast",
            "model_id": "pricing-model",
            "model_version": "1",
            "role": "primary",
            "settings": {"horizon_days": 7},
            "metadata": {"owner": "pricing team"},
        },
        headers=admin,
    )
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["assignment_key"] == "forecast" and first["status"] == "active"
    assert first["client_id"] == "client-1" and first["domain_id"] == "south_australia" and first["service_id"] is None
    assert (first["model_id"], first["model_version"]) == ("pricing-model", "1")
    assert first["role"] == "primary" and first["settings"] == {"horizon_days": 7}
    assert first["metadata"] == {"owner": "pricing team"}
    assert first["created_at"].endswith("Z") and len(first["assignment_id"]) == 36

    r = await client.put(
        f"{D}/assignments/forecast", json={"model_id": "pricing-model", "model_version": "2"}, headers=admin
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["assignment_id"] != first["assignment_id"] and second["model_version"] == "2"
    assert second["settings"] == {} and second["metadata"] == {} and second["role"] is None

    r = await client.get(f"{D}/assignments/forecast", headers=admin)
    assert r.status_code == 200 and r.json() == second

    r = await client.get(f"{D}/assignments/forecast/revisions", headers=admin)
    assert r.status_code == 200
    history = r.json()
    assert [h["assignment_id"] for h in history] == [second["assignment_id"], first["assignment_id"]]
    assert [h["status"] for h in history] == ["active", "archived"]

    r = await client.get(f"{D}/assignments/forecast/revisions?limit=1", headers=admin)
    assert [h["assignment_id"] for h in r.json()] == [second["assignment_id"]]
    r = await client.get(
        f"{D}/assignments/forecast/revisions?limit=1&cursor={r.headers['X-Next-Cursor']}", headers=admin
    )
    assert [h["assignment_id"] for h in r.json()] == [first["assignment_id"]] and "X-Next-Cursor" not in r.headers

    stored = await revisions(session, "forecast")
    assert [(a.model_version, a.status) for a in stored] == [("1", "archived"), ("2", "active")]


async def test_list_assignments_with_status_filter(client, session, admin):
    await tenant_setup(client, session, admin)
    await assign(client, admin, key="forecast")
    await assign(client, admin, key="forecast")
    r = await client.get(f"{D}/assignments", headers=admin)
    assert r.status_code == 200
    assert sorted((a["assignment_key"], a["status"]) for a in r.json()) == [
        ("default", "active"),
        ("forecast", "active"),
        ("forecast", "archived"),
    ]
    r = await client.get(f"{D}/assignments?status=active", headers=admin)
    assert sorted(a["assignment_key"] for a in r.json()) == ["default", "forecast"]
    r = await client.get(f"{D}/assignments?status=archived", headers=admin)
    assert [a["assignment_key"] for a in r.json()] == ["forecast"]
    r = await client.get(f"{D}/assignments?status=bogus", headers=admin)
    assert r.status_code == 400
    r = await client.get(f"{D}/assignments?limit=2", headers=admin)
    assert len(r.json()) == 2
    r = await client.get(f"{D}/assignments?limit=2&cursor={r.headers['X-Next-Cursor']}", headers=admin)
    assert len(r.json()) == 1


async def test_get_and_revisions_404(client, session, admin):
    await tenant_setup(client, session, admin)
    r = await client.get(f"{D}/assignments/forecast", headers=admin)
    assert r.status_code == 404 and r.json()["success"] is False
    r = await client.get(f"{D}/assignments/forecast/revisions", headers=admin)
    assert r.status_code == 404
    r = await client.get("/v2/clients/client-1/domains/nowhere/assignments", headers=admin)
    assert r.status_code == 404


async def test_archived_status_retires_the_key(client, session, admin):
    await tenant_setup(client, session, admin)
    await assign(client, admin, key="forecast")
    r = await assign(client, admin, key="forecast", status="archived")
    assert r.json()["status"] == "archived"
    assert (await client.get(f"{D}/assignments/forecast", headers=admin)).status_code == 404
    stored = await revisions(session, "forecast")
    assert [a.status for a in stored] == ["archived", "archived"]
    r = await client.post(f"{D}/assignments/forecast/jobs", json={}, headers=admin)
    assert r.status_code == 422 and "archived" in r.json()["message"]
    # archiving a key that never existed stores an archived revision
    r = await assign(client, admin, key="later", status="archived")
    assert r.json()["status"] == "archived"
    assert (await client.get(f"{D}/assignments/later/revisions", headers=admin)).status_code == 200


async def test_invalid_model_reference_is_422_envelope(client, session, admin):
    await tenant_setup(client, session, admin)
    await make_version(session, version="broken", status="failed")
    for model_id, version in (("ghost-model", "1"), ("pricing-model", "99"), ("pricing-model", "broken")):
        r = await assign(client, admin, key="forecast", model_id=model_id, model_version=version, expect=422)
        assert r.json()["success"] is False and "invalid model reference" in r.json()["message"]
    assert await revisions(session, "forecast") == []
    # pending and training versions may be assigned
    await make_version(session, version="p", status="pending")
    await make_version(session, version="t", status="training")
    await assign(client, admin, key="forecast", model_version="p")
    await assign(client, admin, key="forecast", model_version="t")


async def test_bad_bodies_and_keys_are_400(client, session, admin):
    await tenant_setup(client, session, admin)
    bad = [
        {"model_id": "pricing-model"},
        {"model_id": "pricing-model", "model_version": 1},
        {"model_id": "pricing-model", "model_version": "1", "status": "deleted"},
        {"model_id": "pricing-model", "model_version": "1", "settings": []},
        {"model_id": "pricing-model", "model_version": "1", "service_updates": [{"service_id": "s"}]},
    ]
    for body in bad:
        assert (await client.put(f"{D}/assignments/forecast", json=body, headers=admin)).status_code == 400, body
    good = {"model_id": "pricing-model", "model_version": "1"}
    assert (await client.put(f"{D}/assignments/Forecast", json=good, headers=admin)).status_code == 400
    assert (await client.put(f"{D}/assignments/-x", json=good, headers=admin)).status_code == 400
    assert (await client.post(f"{D}/assignments", json=good, headers=admin)).status_code == 400  # key missing
    r = await client.post(f"{D}/assignments", json={**good, "assignment_key": "Bad Key"}, headers=admin)
    assert r.status_code == 400


async def test_service_updates_only_on_the_domain_default_key(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", SA)
    updates = [{"service_id": "s", "static_features": {"competitor_count": 1}}]
    r = await assign(client, admin, key="forecast", service_updates=updates, expect=422)
    assert "service_updates" in r.json()["message"] and r.json()["success"] is False
    r = await assign(client, admin, key="forecast", service_id="s", service_updates=updates, expect=422)
    assert "service_updates" in r.json()["message"]
    r = await assign(client, admin, status="archived", service_updates=updates, expect=422)
    assert "service_updates" in r.json()["message"]
    # an empty list is harmless
    await assign(client, admin, key="forecast", service_updates=[])


async def test_inactive_domain_and_suspended_client_refuse_upserts(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", SA)
    await client.patch(D, json={"status": "inactive"}, headers=admin)
    r = await assign(client, admin, key="forecast", expect=422)
    assert "not active" in r.json()["message"]
    await assign(client, admin, key="forecast", service_id="s", expect=422)
    await client.patch(D, json={"status": "active"}, headers=admin)
    await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    r = await assign(client, admin, key="forecast", expect=422)
    assert "suspended" in r.json()["message"]
    await assign(client, admin, key="forecast", service_id="s", expect=422)
    assert (await client.get(f"{D}/assignments/default", headers=admin)).status_code == 200


async def test_upsert_permissions(client, session, admin, auth):
    await tenant_setup(client, session, admin)
    body = {"model_id": "pricing-model", "model_version": "1"}
    reader = auth(scopes=["read_domains"], client_id="client-1")
    operator = auth(scopes=["init_services", "run_inference"], client_id="client-1")
    manager = auth(scopes=["manage_domains"], client_id="client-1")
    foreign = auth(scopes=["manage_domains", "read_domains"], client_id="client-9")
    assert (await client.put(f"{D}/assignments/forecast", json=body, headers=reader)).status_code == 403
    assert (await client.put(f"{D}/assignments/forecast", json=body, headers=operator)).status_code == 403
    assert (await client.put(f"{D}/assignments/forecast", json=body, headers=foreign)).status_code == 403
    assert (await client.get(f"{D}/assignments", headers=foreign)).status_code == 403
    assert (await client.put(f"{D}/assignments/forecast", json=body, headers=manager)).status_code == 200
    assert (await client.get(f"{D}/assignments/forecast", headers=reader)).status_code == 200
    assert (await client.get(f"{D}/assignments/forecast", headers=manager)).status_code == 403


async def test_service_scope_crud(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "service-1", SA)
    S = f"{D}/service/service-1"
    r = await client.post(
        f"{S}/assignments",
        json={"assignment_key": "cabin_recommendation", "model_id": "pricing-model", "model_version": "1"},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["service_id"] == "service-1" and first["assignment_key"] == "cabin_recommendation"
    r = await client.put(
        f"{S}/assignments/cabin_recommendation",
        json={"model_id": "pricing-model", "model_version": "1", "role": "b"},
        headers=admin,
    )
    second = r.json()
    assert r.status_code == 200 and second["role"] == "b"
    assert (await client.get(f"{S}/assignments/cabin_recommendation", headers=admin)).json() == second
    r = await client.get(f"{S}/assignments/cabin_recommendation/revisions", headers=admin)
    assert [a["assignment_id"] for a in r.json()] == [second["assignment_id"], first["assignment_id"]]
    r = await client.get(f"{S}/assignments?status=active", headers=admin)
    assert [a["assignment_id"] for a in r.json()] == [second["assignment_id"]]

    # scopes are separate: the domain has no cabin_recommendation key, the service no default
    assert (await client.get(f"{D}/assignments/cabin_recommendation", headers=admin)).status_code == 404
    assert (await client.get(f"{S}/assignments/default", headers=admin)).status_code == 404
    r = await client.get(f"{D}/assignments", headers=admin)
    assert [a["assignment_key"] for a in r.json()] == ["default"]

    # the same key in two services: independent active revisions
    await init_service(client, admin, "service-2", SA)
    await assign(client, admin, key="cabin_recommendation", service_id="service-2")
    assert len(await revisions(session, "cabin_recommendation", "service-1")) == 2
    assert len(await revisions(session, "cabin_recommendation", "service-2")) == 1


async def test_service_scope_unknown_service_is_404(client, session, admin):
    await tenant_setup(client, session, admin)
    S = f"{D}/service/ghost"
    body = {"model_id": "pricing-model", "model_version": "1"}
    assert (await client.put(f"{S}/assignments/forecast", json=body, headers=admin)).status_code == 404
    assert (await client.get(f"{S}/assignments", headers=admin)).status_code == 404
    assert (await client.get(f"{S}/assignments/forecast", headers=admin)).status_code == 404
    assert (await client.get(f"{S}/assignments/forecast/revisions", headers=admin)).status_code == 404


async def test_service_scoped_upsert_does_no_domain_check(client, session, admin):
    """Version 2's frozen schema would block every service in a domain upsert; in service
    scope it is simply assigned."""
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s1", SA)
    await init_service(client, admin, "s2", SA)
    await make_version(session, version="2", features=[feature("cabin", {"type": "string"}, True)])
    r = await assign(client, admin, key="forecast", model_version="2", expect=422)
    assert {b["service_id"] for b in r.json()["blocking_services"]} == {"s1", "s2"}
    r = await assign(client, admin, key="forecast", model_version="2", service_id="s1")
    assert r.json()["status"] == "active" and r.json()["model_version"] == "2"


async def test_concurrent_upserts_of_one_key_leave_exactly_one_active_revision(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s", SA)
    for version in ("2", "3", "4"):
        await make_version(session, version=version)
    for service_id in (None, "s"):
        for _round in range(3):
            results = await asyncio.gather(
                *(
                    client.put(
                        f"{D}{'' if service_id is None else '/service/' + service_id}/assignments/forecast",
                        json={"model_id": "pricing-model", "model_version": v},
                        headers=admin,
                    )
                    for v in ("1", "2", "3", "4") * 2
                )
            )
            assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
        stored = await revisions(session, "forecast", service_id)
        assert len(stored) == 24
        assert [a.status for a in stored].count("active") == 1
        # the newest revision is the active one
        assert stored[-1].status == "active"
        r = await client.get(
            f"{D}{'' if service_id is None else '/service/' + service_id}/assignments/forecast/revisions?limit=1",
            headers=admin,
        )
        assert r.json()[0]["assignment_id"] == str(stored[-1].assignment_id)


async def test_concurrent_collection_posts_of_new_keys(client, session, admin):
    await tenant_setup(client, session, admin)
    results = await asyncio.gather(
        *(
            client.post(
                f"{D}/assignments",
                json={"assignment_key": key, "model_id": "pricing-model", "model_version": "1"},
                headers=admin,
            )
            for key in ("a", "b", "a", "b", "c", "a")
        )
    )
    assert all(r.status_code == 200 for r in results)
    r = await client.get(f"{D}/assignments?status=active", headers=admin)
    assert sorted(a["assignment_key"] for a in r.json()) == ["a", "b", "c", "default"]


async def test_a_version_failing_during_an_upsert_is_never_assigned(client, session, admin, engine):
    """The version is checked "not failed" and stays so until the upsert commits: a concurrent
    status change to ``failed`` lands either before (the upsert is refused) or after."""
    await tenant_setup(client, session, admin)
    await make_version(session, version="2", status="training")
    r = await racing_uncommitted(
        engine,
        "UPDATE model_versions SET status = 'failed' WHERE model_id = 'pricing-model' AND version = '2'",
        {},
        client.put(
            f"{D}/assignments/forecast", json={"model_id": "pricing-model", "model_version": "2"}, headers=admin
        ),
    )
    assert r.status_code == 422 and "invalid model reference" in r.json()["message"], r.text
    assert await revisions(session, "forecast") == []


async def test_a_schema_frozen_during_a_default_upsert_is_the_one_checked(client, session, admin, engine):
    """Version 2 has no frozen schema when the upsert starts (the live features would govern);
    a first training job elsewhere freezes a schema onto it meanwhile. The upsert checks the
    services against the schema the version carries when it commits: here it blocks them."""
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "s1", SA)
    await make_version(session, version="2")
    frozen = [feature("route", {"type": "string"}, True), feature("cabin", {"type": "string"}, True)]
    r = await racing_uncommitted(
        engine,
        "UPDATE model_versions SET features = CAST(:f AS jsonb) WHERE model_id = 'pricing-model' AND version = '2'",
        {"f": json.dumps(frozen)},
        client.put(f"{D}/assignments/default", json={"model_id": "pricing-model", "model_version": "2"}, headers=admin),
    )
    assert r.status_code == 422, r.text
    assert r.json()["blocking_services"] == [
        {"service_id": "s1", "feature": "cabin", "value": None, "reason": "missing mandatory feature"}
    ]
    assert [a.model_version for a in await revisions(session, "default")] == ["1"]
