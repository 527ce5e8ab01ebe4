"""Domains and live features (spec 5.1, 5.2)."""

from __future__ import annotations

from factories import (
    SEVEN_FEATURES,
    create_domain,
    feature,
    init_service,
    jobs_of,
    make_client,
    seven_features,
    stored_service,
    tenant_setup,
)
from sqlalchemy import func, select

from pie.tables.tenancy import Domain

BASE = "/v2/clients/client-1/domains"


async def test_create_get_list_domain(client, session, admin):
    await make_client(session)
    r = await client.post(
        BASE, json={"domain_id": "south_australia", "name": "SA", "features": SEVEN_FEATURES}, headers=admin
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["client_id"] == "client-1" and body["domain_id"] == "south_australia"
    assert body["name"] == "SA" and body["status"] == "active"
    assert body["features"] == SEVEN_FEATURES
    assert body["created_at"].endswith("Z") and body["updated_at"].endswith("Z")

    r = await client.get(f"{BASE}/south_australia", headers=admin)
    assert r.status_code == 200 and r.json() == body

    r = await client.get(BASE, headers=admin)
    assert r.status_code == 200 and r.json() == [body]


async def test_domain_id_generated_and_features_default_empty(client, session, admin):
    await make_client(session)
    r = await client.post(BASE, json={}, headers=admin)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["domain_id"] and body["features"] == [] and body["name"] is None
    r2 = await client.post(BASE, json={"name": "other"}, headers=admin)
    assert r2.status_code == 201 and r2.json()["domain_id"] != body["domain_id"]
    r = await client.get(f"{BASE}/{body['domain_id']}", headers=admin)
    assert r.status_code == 200


async def test_create_existing_domain_is_409(client, session, admin):
    await make_client(session)
    await create_domain(client, admin)
    r = await client.post(BASE, json={"domain_id": "south_australia", "features": []}, headers=admin)
    assert r.status_code == 409
    assert r.json()["success"] is False and "south_australia" in r.json()["message"]


async def test_invalid_feature_definitions_are_422_naming_the_culprit(client, session, admin):
    await make_client(session)
    cases = [
        ([feature("route", {"type": "string"}), feature("route", {"type": "integer"})], "'route'"),
        ([feature("9lives", {"type": "string"})], "9lives"),
        ([feature("bad schema", {"type": "string"})], "bad schema"),
        ([feature("count", {"type": "not-a-type"})], "'count'"),
        ([feature("count", {"type": "integer", "default": "three"})], "default"),
        ([{"name": "x"}], "json_schema"),
        (["not an object"], "#0"),
        ([feature("flag", {"type": "boolean"}) | {"mandatory": "yes"}], "mandatory"),
    ]
    for index, (features, culprit) in enumerate(cases):
        r = await client.post(BASE, json={"domain_id": f"d{index}", "features": features}, headers=admin)
        assert r.status_code == 422, (features, r.text)
        message = r.json()["message"]
        assert message.startswith("invalid feature definitions") and culprit in message, message
    session.expire_all()
    assert await session.scalar(select(func.count()).select_from(Domain)) == 0


async def test_malformed_bodies_and_ids_are_400(client, session, admin):
    await make_client(session)
    for body in ({"features": "nope"}, {"domain_id": "bad id!"}, {"name": 5}):
        r = await client.post(BASE, json=body, headers=admin)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["success"] is False
    r = await client.get(f"{BASE}/bad%20id", headers=admin)
    assert r.status_code == 400
    # Python's JSON parser accepts NaN; it is not JSON and must not reach the database
    raw = '{"features": [{"name": "x", "json_schema": {"type": "number", "default": NaN}}]}'
    r = await client.post(BASE, content=raw, headers={**admin, "Content-Type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["message"]


async def test_unknown_client_and_domain_are_404(client, session, admin):
    r = await client.get(BASE, headers=admin)
    assert r.status_code == 404
    r = await client.post(BASE, json={}, headers=admin)
    assert r.status_code == 404
    await make_client(session)
    r = await client.get(f"{BASE}/nowhere", headers=admin)
    assert r.status_code == 404 and r.json()["success"] is False
    r = await client.get(f"{BASE}/nowhere/features", headers=admin)
    assert r.status_code == 404
    r = await client.patch(f"{BASE}/nowhere", json={"name": "x"}, headers=admin)
    assert r.status_code == 404


async def test_update_domain_name_and_status(client, session, admin):
    await make_client(session)
    created = await create_domain(client, admin)
    r = await client.patch(f"{BASE}/south_australia", json={"name": "South Australia"}, headers=admin)
    assert r.status_code == 200 and r.json()["name"] == "South Australia" and r.json()["status"] == "active"
    r = await client.patch(f"{BASE}/south_australia", json={"status": "inactive"}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "inactive" and r.json()["name"] == "South Australia"
    assert r.json()["features"] == created["features"]
    r = await client.patch(f"{BASE}/south_australia", json={"status": "closed"}, headers=admin)
    assert r.status_code == 400
    r = await client.patch(f"{BASE}/south_australia", json={"status": "active"}, headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "active"


async def test_list_domains_paginates_and_is_tenant_scoped(client, session, admin, auth):
    await make_client(session)
    await make_client(session, "client-2")
    for domain_id in ("a", "b", "c"):
        await create_domain(client, admin, domain_id=domain_id, features=[])
    await create_domain(client, admin, client_id="client-2", domain_id="z", features=[])
    r = await client.get(f"{BASE}?limit=2", headers=admin)
    assert r.status_code == 200 and [d["domain_id"] for d in r.json()] == ["a", "b"]
    cursor = r.headers["X-Next-Cursor"]
    r = await client.get(f"{BASE}?limit=2&cursor={cursor}", headers=admin)
    assert [d["domain_id"] for d in r.json()] == ["c"] and "X-Next-Cursor" not in r.headers

    tenant = auth(groups=["client:client-1"], username="alice")
    r = await client.get(BASE, headers=tenant)
    assert r.status_code == 200 and len(r.json()) == 3
    r = await client.get("/v2/clients/client-2/domains", headers=tenant)
    assert r.status_code == 403
    r = await client.get("/v2/clients/client-2/domains/z", headers=tenant)
    assert r.status_code == 403


async def test_domain_permissions(client, session, admin, auth):
    await make_client(session)
    await create_domain(client, admin)
    reader = auth(scopes=["read_domains"], client_id="client-1")
    writer = auth(scopes=["manage_domains"], client_id="client-1")
    assert (await client.get(f"{BASE}/south_australia", headers=reader)).status_code == 200
    assert (await client.get(f"{BASE}/south_australia/features", headers=reader)).status_code == 200
    assert (await client.post(BASE, json={}, headers=reader)).status_code == 403
    assert (await client.patch(f"{BASE}/south_australia", json={"name": "x"}, headers=reader)).status_code == 403
    assert (
        await client.put(f"{BASE}/south_australia/features", json={"features": []}, headers=reader)
    ).status_code == 403
    assert (await client.get(f"{BASE}/south_australia", headers=writer)).status_code == 403
    assert (await client.post(BASE, json={"domain_id": "new"}, headers=writer)).status_code == 201
    other = auth(scopes=["manage_domains"], client_id="client-2")
    assert (await client.post(BASE, json={"domain_id": "x"}, headers=other)).status_code == 403
    assert (await client.get(BASE)).status_code == 401


async def test_suspended_client_refuses_domain_writes_but_reads(client, session, admin):
    await make_client(session)
    await create_domain(client, admin)
    r = await client.patch("/v2/clients/client-1", json={"status": "suspended"}, headers=admin)
    assert r.status_code == 200
    assert (await client.post(BASE, json={"domain_id": "new"}, headers=admin)).status_code == 422
    assert (await client.patch(f"{BASE}/south_australia", json={"name": "x"}, headers=admin)).status_code == 422
    r = await client.put(f"{BASE}/south_australia/features", json={"features": []}, headers=admin)
    assert r.status_code == 422 and "suspended" in r.json()["message"]
    assert (await client.get(f"{BASE}/south_australia", headers=admin)).status_code == 200
    r = await client.get(f"{BASE}/south_australia/features", headers=admin)
    assert r.status_code == 200 and r.json() == SEVEN_FEATURES


async def test_features_get_and_put(client, session, admin):
    await make_client(session)
    await create_domain(client, admin)
    r = await client.get(f"{BASE}/south_australia/features", headers=admin)
    assert r.status_code == 200 and r.json() == SEVEN_FEATURES

    new = [feature("route", {"type": "string"}, True), feature("cabin", {"type": "string", "default": "deck"})]
    r = await client.put(f"{BASE}/south_australia/features", json={"features": new}, headers=admin)
    assert r.status_code == 200 and r.json() == {"features": new}
    r = await client.get(f"{BASE}/south_australia/features", headers=admin)
    assert r.json() == new

    # mandatory defaults to false; extra keys are kept
    r = await client.put(
        f"{BASE}/south_australia/features",
        json={"features": [{"name": "x", "json_schema": {"type": "integer"}, "description": "d"}]},
        headers=admin,
    )
    assert r.status_code == 200
    assert r.json()["features"] == [
        {"name": "x", "json_schema": {"type": "integer"}, "mandatory": False, "description": "d"}
    ]


async def test_invalid_features_put_changes_nothing(client, session, admin):
    await make_client(session)
    await create_domain(client, admin)
    bad = seven_features() + [feature("route", {"type": "string"})]
    r = await client.put(f"{BASE}/south_australia/features", json={"features": bad}, headers=admin)
    assert r.status_code == 422 and "invalid feature definitions" in r.json()["message"]
    r = await client.put(f"{BASE}/south_australia/features", json={}, headers=admin)
    assert r.status_code == 400
    r = await client.get(f"{BASE}/south_australia/features", headers=admin)
    assert r.json() == SEVEN_FEATURES


async def test_features_put_is_persist_only(client, session, admin):
    """Live edits never re-resolve, re-validate or re-run existing services."""
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", {"route": "Adelaide to Sydney", "competitor_count": 3})
    before = await stored_service(session, "svc-1")
    jobs_before = len(await jobs_of(session))
    # the new live set would reject svc-1's route and adds a defaulted feature
    new = [feature("route", {"type": "integer"}, True), feature("cabin", {"type": "string", "default": "deck"})]
    r = await client.put(f"{BASE}/south_australia/features", json={"features": new}, headers=admin)
    assert r.status_code == 200
    after = await stored_service(session, "svc-1")
    assert after.provided_features == before.provided_features
    assert after.resolved_features == before.resolved_features
    assert after.updated_at == before.updated_at
    assert len(await jobs_of(session)) == jobs_before


async def test_features_put_allowed_on_inactive_domain(client, session, admin):
    await make_client(session)
    await create_domain(client, admin)
    await client.patch(f"{BASE}/south_australia", json={"status": "inactive"}, headers=admin)
    r = await client.put(f"{BASE}/south_australia/features", json={"features": []}, headers=admin)
    assert r.status_code == 200 and r.json() == {"features": []}


async def test_openapi_documents_the_tenant_operations(client):
    r = await client.get("/v2/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    domains = "/v2/clients/{client_id}/domains"
    expected = {
        ("post", domains): "createdomain",
        ("get", domains): "listdomains",
        ("get", domains + "/{domain_id}"): "getdomain",
        ("patch", domains + "/{domain_id}"): "updatedomain",
        ("get", domains + "/{domain_id}/features"): "getdomainfeatures",
        ("put", domains + "/{domain_id}/features"): "updatedomainfeatures",
        ("post", domains + "/{domain_id}/service/init"): "initdomainservice",
        ("get", domains + "/{domain_id}/services"): "listdomainservices",
        ("post", domains + "/{domain_id}/services/init"): "initalldomainservices",
        ("get", domains + "/{domain_id}/service/{service_id}"): "getdomainservice",
        ("put", domains + "/{domain_id}/service/{service_id}"): "updatedomainservice",
        ("post", domains + "/{domain_id}/assignments"): "upsertdomainmodelassignment",
        ("put", domains + "/{domain_id}/assignments/{assignment_key}"): "putdomainmodelassignment",
        ("post", domains + "/{domain_id}/assignments/{assignment_key}/jobs"): "rundomainmodelassignmentjob",
        ("post", domains + "/{domain_id}/service/{service_id}/assignments"): "upsertservicemodelassignment",
        (
            "put",
            domains + "/{domain_id}/service/{service_id}/assignments/{assignment_key}",
        ): "putservicemodelassignment",
        (
            "post",
            domains + "/{domain_id}/service/{service_id}/assignments/{assignment_key}/jobs",
        ): "runservicemodelassignmentjob",
    }
    for (method, path), operation_id in expected.items():
        assert paths[path][method]["operationId"] == operation_id
    upsert = paths[domains + "/{domain_id}/assignments/{assignment_key}"]["put"]["responses"]
    assert "AssignmentBlockedOut" in str(upsert["422"]) and "400" in upsert
    assert paths[domains + "/{domain_id}/service/init"]["post"]["responses"].keys() >= {
        "202",
        "400",
        "404",
        "409",
        "422",
    }
