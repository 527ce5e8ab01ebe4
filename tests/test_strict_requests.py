"""Strict requests (spec 14.3): an unknown field in any request body, or an unknown query
parameter on any route, is a 400 naming it — found by walking the OpenAPI document, so a new
route is covered without a new test. Plus the listjobs filters."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest
from factories import IN_PROCESS_HANDLERS
from sqlalchemy import select, text
from test_access_matrix import BODIES, operations, world  # noqa: F401  (world: fixture)


def with_unknown(body):
    body = copy.deepcopy(body)
    body["zz_unknown_field"] = 1
    return body


async def test_every_body_refuses_an_unknown_field(app, client, admin, world):
    failures = []
    for op in operations(app):
        if not op.has_body:
            continue
        r = await client.request(op.method, world.url(op), json=with_unknown(BODIES[op.op_id]), headers=admin)
        if r.status_code != 400 or "zz_unknown_field" not in r.json().get("message", ""):
            failures.append(f"{op.method} {op.template} ({op.op_id}): {r.status_code} {r.text[:160]}")
    assert not failures, "\n".join(failures)


async def test_nested_unknown_fields_are_named_too(client, admin, world):
    body = {"name": "m", "description": "d", "handlers": copy.deepcopy(IN_PROCESS_HANDLERS)}
    body["handlers"]["training"]["timeout"] = 5
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 400 and "handlers.training" in r.json()["message"] and "timeout" in r.json()["message"]
    r = await client.post(
        "/v2/models",
        json={"name": "m", "description": "d", "handlers": IN_PROCESS_HANDLERS, "handler_contracts": {"inferenc": {}}},
        headers=admin,
    )
    assert r.status_code == 400 and "inferenc" in r.json()["message"]
    # free-form JSON (input, metadata, settings, static_features) keeps any key
    r = await client.post(
        "/v2/models/pricing-model/versions/1/inference", json={"input": {"anything": {"goes": 1}}}, headers=admin
    )
    assert r.status_code == 202, r.text


async def test_a_misspelt_field_never_erases_data(client, session, admin, world):
    """The issue's case: updatemodel with `handler_contract` (sic) answered 200, set
    handler_contracts to null and turned a subscription stale."""
    contracts = {"inference": {"input_schema": {"type": "object"}}}
    body = {
        "name": "pricing-model",
        "description": "d",
        "handlers": IN_PROCESS_HANDLERS,
        "handler_contracts": contracts,
    }
    assert (await client.put("/v2/models/pricing-model", json=body, headers=admin)).status_code == 200
    before = (await client.get("/v2/models/pricing-model", headers=admin)).json()
    statuses = await session.scalar(text("SELECT array_agg(status ORDER BY id) FROM event_subscriptions"))
    typo = {**{k: v for k, v in body.items() if k != "handler_contracts"}, "handler_contract": contracts}
    r = await client.put("/v2/models/pricing-model", json=typo, headers=admin)
    assert r.status_code == 400 and "handler_contract" in r.json()["message"]
    assert (await client.get("/v2/models/pricing-model", headers=admin)).json() == before
    assert await session.scalar(text("SELECT array_agg(status ORDER BY id) FROM event_subscriptions")) == statuses


async def test_every_route_refuses_an_unknown_query_parameter(app, client, admin, world):
    secured = {
        spec["operationId"]
        for methods in app.openapi()["paths"].values()
        for spec in methods.values()
        if isinstance(spec, dict) and spec.get("security")
    }
    assert "health" not in secured and "listjobs" in secured
    failures = []
    for op in operations(app):
        kwargs = {"json": BODIES[op.op_id]} if op.op_id in BODIES else {}
        r = await client.request(op.method, world.url(op) + "?foo=1", headers=admin, **kwargs)
        if r.status_code != 400 or "'foo'" not in r.json().get("message", ""):
            failures.append(f"{op.method} {op.template} ({op.op_id}): {r.status_code} {r.text[:160]}")
        if op.op_id in secured:
            # without a token the 401 still comes first
            r = await client.request(op.method, world.url(op) + "?foo=1", **kwargs)
            if r.status_code != 401:
                failures.append(f"{op.method} {op.template} ({op.op_id}) no token: {r.status_code} {r.text[:160]}")
    assert not failures, "\n".join(failures)


async def test_declared_query_parameters_and_headers_still_work(client, admin, world):
    r = await client.get("/v2/jobs?limit=1&status=pending&foo=1&bar=2", headers=admin)
    assert r.status_code == 400 and "'bar'" in r.json()["message"] and "'foo'" in r.json()["message"]
    r = await client.get("/v2/jobs?limit=1&status=pending", headers={**admin, "X-Anything": "1"})
    assert r.status_code == 200
    assert (await client.get(f"/v2/jobs/{world.a_job}?wait=0", headers=admin)).status_code == 200


async def test_listjobs_filters_by_type_and_creation_time(app, client, session, admin, world):
    r = await client.post("/v2/models/pricing-model/versions/1/inference", json={"input": {}}, headers=admin)
    inference = r.json()["inference_job_id"]
    await session.execute(
        text(
            "INSERT INTO jobs (job_type, model_id, model_version, created_at) VALUES ('training', 'pricing-model', '1', now() - interval '2 days')"
        )
    )
    await session.commit()
    training = await session.scalar(text("SELECT job_id FROM jobs WHERE job_type = 'training'"))

    async def ids(query: str) -> set[str]:
        r = await client.get(f"/v2/jobs{query}", headers=admin)
        assert r.status_code == 200, r.text
        return {j["job_id"] for j in r.json()}

    everything = await ids("")
    assert {inference, training, world.a_job, world.b_job} <= everything
    assert await ids("?job_type=training") == {training}
    assert inference in await ids("?job_type=inference") and training not in await ids("?job_type=inference")
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    assert training not in await ids(f"?created_after={yesterday}") and inference in await ids(
        f"?created_after={yesterday}"
    )
    assert await ids(f"?created_before={yesterday}") == {training}
    naive = (datetime.now(timezone.utc) - timedelta(days=1)).replace(tzinfo=None).isoformat()
    assert await ids(f"?created_before={naive}") == {training}  # no offset: UTC
    for bad in ("?job_type=retraining", "?created_after=yesterday"):
        assert (await client.get(f"/v2/jobs{bad}", headers=admin)).status_code == 400
    # documented in the OpenAPI document
    params = {p["name"] for p in app.openapi()["paths"]["/v2/jobs"]["get"]["parameters"]}
    assert {"job_type", "created_after", "created_before"} <= params


async def test_unknown_fields_are_named_before_the_fields_they_make_missing(client, admin, engine):
    r = await client.post(
        "/v2/models", json={"nam": "m", "descriptio": "", "handler": {}, "metdata": {}}, headers=admin
    )
    assert r.status_code == 400
    for misspelt in ("nam", "descriptio", "handler", "metdata"):
        assert f"unknown field '{misspelt}'" in r.json()["message"]


async def test_the_public_docs_example_bodies_have_no_unknown_field(client, admin, world):
    """The request bodies of the original doc pages (../shared/seeds) sent to this server's
    matching routes: whatever else they are, never a 400 (no unknown field)."""
    import json
    import re
    from pathlib import Path

    seeds = Path(__file__).resolve().parents[3] / "shared" / "seeds"
    if not seeds.is_dir():
        seeds = Path("/work/shared/seeds")
    if not seeds.is_dir():
        pytest.skip("the original doc pages are not available")
    sent = 0
    for page in sorted(seeds.glob("*.txt")):
        text = page.read_text()
        urls = re.findall(r"--url https://[^/]+(/v2/\S+)", text)
        bodies = re.findall(r"--data '([^']*)'", text)
        methods = re.findall(r"--request (\w+)", text)
        for url, body, method in zip(urls, bodies, methods):
            # the pages' ids, mapped onto this test world's
            url = (
                url.replace("client-1", world.params["client_id"])
                .replace("south_australia", world.params["domain_id"])
                .replace("service-1", world.params["service_id"])
                .replace("model_price_reco_v1", world.params["model_id"])
            )
            r = await client.request(method, url, json=json.loads(body), headers=admin)
            assert r.status_code != 400, f"{page.name}: {method} {url}: {r.text}"
            sent += 1
    assert sent >= 3


async def test_an_unknown_field_inside_a_handler_contract_is_refused(client, admin, session):
    """A misspelt schema name inside one action's contract (``input_shema``) is a 400 naming
    it, never a contract silently without its schema (the model is not created)."""
    body = {
        "id": "strict",
        "name": "m",
        "description": "d",
        "handlers": IN_PROCESS_HANDLERS,
        "handler_contracts": {"inference": {"input_shema": {"type": "object", "required": ["route"]}}},
    }
    r = await client.post("/v2/models", json=body, headers=admin)
    assert r.status_code == 400 and "input_shema" in r.json()["message"], r.text
    assert await session.scalar(text("SELECT count(*) FROM models")) == 0


async def test_an_unknown_field_inside_a_service_update_is_refused(client, admin, session):
    """A misspelt field of a ``service_updates`` entry of a domain ``default`` upsert
    (``merge``) is refused naming it; nothing is written (the service keeps its features, the
    assignment its version)."""
    from factories import init_service, make_version, tenant_setup

    from pie.tables.tenancy import Service

    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", {"route": "Adelaide to Sydney"})
    await make_version(session, version="2")
    updates = [{"service_id": "svc-1", "static_features": {"route": "Sydney to Adelaide"}, "merge": False}]
    r = await client.put(
        "/v2/clients/client-1/domains/south_australia/assignments/default",
        json={"model_id": "pricing-model", "model_version": "2", "service_updates": updates},
        headers=admin,
    )
    assert r.status_code == 400 and "merge" in r.json()["message"], r.text
    service = await session.scalar(
        select(Service).where(Service.service_id == "svc-1").execution_options(populate_existing=True)
    )
    assert service.provided_features == {"route": "Adelaide to Sydney"}
    assert await session.scalar(text("SELECT model_version FROM assignments WHERE assignment_key = 'default'")) == "1"
