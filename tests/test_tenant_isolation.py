"""Tenant isolation of EVERY read (issue 9): two tenants use the same ``domain_id``,
``service_id`` and assignment keys; each one's data carries its own marker (MARK-A / MARK-B,
platform jobs MARK-P). Walking the OpenAPI document, every tenant-scoped GET, the job reads and
the event-subscription reads answer each tenant with its own marker and never the other's.

(Deleting the tenant condition from, e.g., the service listing query makes the walk fail: the
other tenant's service with the same ids shows up.)"""

from __future__ import annotations

import re

import pytest
from factories import make_version, seven_features

A, B = "tenant-a", "tenant-b"
D = "pricing"
S = "svc-1"
MARK = {A: "MARK-A", B: "MARK-B"}
OTHER = {A: B, B: A}
ROUTE = "Adelaide to Sydney"


def human(auth, tenant: str) -> dict[str, str]:
    return auth(groups=[f"client:{tenant}"], username=f"user-of-{tenant}", subject=f"user-of-{tenant}")


async def build_tenant(client, admin, auth, tenant: str) -> dict[str, str]:
    mark = MARK[tenant]
    base = f"/v2/clients/{tenant}/domains"
    r = await client.post("/v2/clients", json={"client_id": tenant, "name": f"{mark} client"}, headers=admin)
    assert r.status_code == 201, r.text
    features = seven_features() + [
        {"name": "mark", "json_schema": {"type": "string"}, "mandatory": False, "description": mark}
    ]
    r = await client.post(base, json={"domain_id": D, "name": f"{mark} domain", "features": features}, headers=admin)
    assert r.status_code == 201, r.text
    assignment = {"model_id": "pricing-model", "model_version": "1", "metadata": {"mark": mark}}
    r = await client.put(f"{base}/{D}/assignments/default", json=assignment, headers=admin)
    assert r.status_code == 200, r.text
    r = await client.post(
        f"{base}/{D}/service/init",
        json={"service_id": S, "static_features": {"route": ROUTE, "mark": mark}},
        headers=admin,
    )
    assert r.status_code == 202, r.text
    init_job = r.json()["job_id"]
    r = await client.put(f"{base}/{D}/service/{S}/assignments/default", json=assignment, headers=admin)
    assert r.status_code == 200, r.text
    # a direct inference by the tenant's user, subscribed: a tenant job and a tenant replay subscription
    r = await client.post(
        "/v2/models/pricing-model/versions/1/inference",
        json={"input": {"mark": mark}, "subscribe": True},
        headers=human(auth, tenant),
    )
    assert r.status_code == 202, r.text
    subs = (await client.get("/v2/models/pricing-model/event-subscriptions", headers=human(auth, tenant))).json()
    (subscription,) = [s for s in subs if s["input"] == {"mark": mark}]
    return {
        "client_id": tenant,
        "domain_id": D,
        "service_id": S,
        "assignment_key": "default",
        "model_id": "pricing-model",
        "model_version": "1",
        "job_id": init_job,
        "subscription_id": subscription["id"],
    }


@pytest.fixture
async def two_tenants(client, session, admin, auth) -> dict[str, dict[str, str]]:
    await make_version(session)
    world = {t: await build_tenant(client, admin, auth, t) for t in (A, B)}
    # a platform job (admin, no client_id)
    r = await client.post(
        "/v2/models/pricing-model/versions/1/inference", json={"input": {"mark": "MARK-P"}}, headers=admin
    )
    assert r.status_code == 202, r.text
    return world


# reads of data that belongs to no tenant (the model registry's catalogue, health)
GLOBAL_READS = {
    "health",
    "listmodels",
    "getmodel",
    "listmodelversions",
    "getmodelversion",
    "listinprocesshandlers",
}
# the tenant reads this file knows; each must show the tenant its own marked row
KNOWN_READS = {
    "getclient",
    "listdomains",
    "getdomain",
    "getdomainfeatures",
    "listdomainservices",
    "getdomainservice",
    "listdomainmodelassignments",
    "getdomainmodelassignment",
    "listdomainmodelassignmentrevisions",
    "listservicemodelassignments",
    "getservicemodelassignment",
    "listservicemodelassignmentrevisions",
    "listjobs",
    "getjob",
    "listmodeleventsubscriptions",
    "getmodeleventsubscription",
}


def reads(app) -> list[tuple[str, str]]:
    """(operation id, path template) of every GET except the global ones: a read added later
    (e.g. an audit log) is walked too, and must at least never show the other tenant's rows."""
    found = []
    for path, methods in app.openapi()["paths"].items():
        spec = methods.get("get")
        if spec is not None and spec["operationId"] not in GLOBAL_READS and spec["operationId"] != "listclients":
            found.append((spec["operationId"], path))
    return found


def test_the_walk_covers_the_tenant_reads(app):
    assert {op for op, _ in reads(app)} >= KNOWN_READS


async def test_every_read_shows_each_tenant_only_its_own_rows(app, client, auth, two_tenants):
    failures = []
    for tenant in (A, B):
        params = two_tenants[tenant]
        headers = human(auth, tenant)
        for op_id, template in reads(app) + [("listclients", "/v2/clients")]:
            if not set(re.findall(r"\{(\w+)\}", template)) <= set(params):
                continue  # a later read addressed by ids this world does not have
            url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], template)
            r = await client.get(url, headers=headers)
            if r.status_code != 200 and op_id in KNOWN_READS:
                failures.append(f"{tenant} {op_id} {url}: {r.status_code} {r.text[:160]}")
                continue
            text = r.text
            if MARK[OTHER[tenant]] in text or "MARK-P" in text:
                failures.append(f"{tenant} {op_id} {url}: shows another tenant's (or a platform) row: {text[:300]}")
            elif op_id in KNOWN_READS and op_id != "getjob" and MARK[tenant] not in text:
                failures.append(f"{tenant} {op_id} {url}: its own row is missing: {text[:300]}")
        # a job listing filtered by the shared ids stays tenant-filtered
        r = await client.get(f"/v2/jobs?domain_id={D}&service_id={S}", headers=headers)
        assert r.status_code == 200 and len(r.json()) == 1 and r.json()[0]["client_id"] == tenant
    assert not failures, "\n".join(failures)


async def test_a_tenant_cannot_address_the_other_tenants_rows(app, client, auth, two_tenants):
    """Each tenant's own ids (the same in both tenants) under the other tenant's client_id: 403."""
    failures = []
    for tenant in (A, B):
        params = {**two_tenants[OTHER[tenant]]}
        for op_id, template in reads(app):
            if not set(re.findall(r"\{(\w+)\}", template)) <= set(params):
                continue
            url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], template)
            r = await client.get(url, headers=human(auth, tenant))
            if op_id not in KNOWN_READS:
                expected = {200, 403, 404}  # a read this file does not know: at least no leak
            elif op_id in ("listjobs", "listmodeleventsubscriptions"):
                expected = {200}  # no tenant in the path: filtered
            elif op_id == "getmodeleventsubscription":
                expected = {404}  # another tenant's replay subscription does not exist for this caller
            else:
                expected = {403}
            if r.status_code not in expected:
                failures.append(f"{tenant} -> {op_id} {url}: {r.status_code} {r.text[:160]}")
            if r.status_code == 200 and MARK[OTHER[tenant]] in r.text:
                failures.append(f"{tenant} -> {op_id} {url}: leaks {r.text[:200]}")
    assert not failures, "\n".join(failures)
