"""Issue 17, spec 15.1: the governing schema is a snapshot on the domain's ``default`` revision;
jobs never write a model version (training carries ``domain_features``); ``GET .../contract``;
``PUT .../features?dry_run=true``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from factories import (
    SEVEN_FEATURES,
    assign,
    create_domain,
    domain_url,
    feature,
    init_service,
    jobs_of,
    make_client,
    make_version,
    seven_features,
    stored_service,
    tenant_setup,
)
from sqlalchemy import text

from pie.dispatch.dispatcher import dispatch_until_idle
from pie.dispatch.inprocess import register

D = domain_url("client-1", "south_australia")
SA = {"route": "Adelaide to Sydney", "competitor_count": 3}
# the live edit: `route` becomes an integer in the next-train draft
ROUTE_AS_INTEGER = [feature("route", {"type": "integer"}, True)]
FARE = feature("fare", {"type": "number", "minimum": 0, "default": 99.5})


@register("test_payload_keys")
def _payload_keys(payload: dict[str, Any]) -> dict[str, Any]:
    """What the handler received: the payload's keys and its ``domain_features``."""
    return {"keys": sorted(payload), "domain_features": payload.get("domain_features")}


def iso(value: datetime) -> str:
    return value.isoformat()


async def contract(client, headers, url: str = D) -> dict[str, Any]:
    r = await client.get(f"{url}/contract", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def active_default_id(session, client_id: str = "client-1", domain_id: str = "south_australia") -> str:
    value = await session.scalar(
        text(
            "SELECT assignment_id::text FROM assignments WHERE client_id = :c AND domain_id = :d"
            " AND service_id IS NULL AND assignment_key = 'default' AND status = 'active'"
        ),
        {"c": client_id, "d": domain_id},
    )
    await session.commit()
    return value


# -- 1. the snapshot ------------------------------------------------------------------------------


async def test_a_live_edit_after_init_leaves_init_update_and_reinit_on_the_snapshot(client, session, admin):
    """Version 1 has no frozen schema: the snapshot of the live features taken when `default`
    was written governs; the next-train draft (PUT .../features) does not."""
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", SA)
    r = await client.put(f"{D}/features", json={"features": ROUTE_AS_INTEGER}, headers=admin)
    assert r.status_code == 200 and r.json() == {"features": ROUTE_AS_INTEGER}

    # update: still validated against the snapshot (the 422 "'Adelaide' is not of type 'integer'")
    r = await client.put(f"{D}/service/svc-1", json={"static_features": {"competitor_count": 4}}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["resolved_features"] == {"route": "Adelaide to Sydney", "competitor_count": 4}
    # init: the snapshot, not the draft
    await init_service(client, admin, "svc-2", {"route": "Sydney to Adelaide"})
    r = await init_service(client, admin, "svc-3", {"route": 5}, expect=422)
    assert "route" in r.json()["message"]
    r = await init_service(client, admin, "svc-4", {"route": "Sydney to Adelaide", "fare": 3}, expect=422)
    assert "fare" in r.json()["message"]
    # batch re-init: every job runs with the features resolved under the snapshot
    before = {j.job_id for j in await jobs_of(session)}
    r = await client.post(f"{D}/services/init", headers=admin)
    assert r.status_code == 202 and r.json()["dispatched_services"] == ["svc-1", "svc-2"]
    fresh = {j.service_id: j.input for j in await jobs_of(session) if j.job_id not in before}
    assert fresh == {
        "svc-1": {"route": "Adelaide to Sydney", "competitor_count": 4},
        "svc-2": {"route": "Sydney to Adelaide"},
    }
    body = await contract(client, admin)
    assert body["features"] == SEVEN_FEATURES and body["source"] == "domain_snapshot"


async def test_writing_default_again_takes_a_new_snapshot_after_the_freeze_check(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", SA)
    first = await contract(client, admin)

    # the draft the services do not satisfy: re-writing `default` (same version) is blocked
    await client.put(f"{D}/features", json={"features": ROUTE_AS_INTEGER}, headers=admin)
    r = await assign(client, admin, expect=422)
    assert r.json()["blocking_services"] == [
        {
            "service_id": "svc-1",
            "feature": "route",
            "value": "Adelaide to Sydney",
            "reason": "'Adelaide to Sydney' is not of type 'integer'",
        }
    ]
    assert await contract(client, admin) == first  # nothing written

    # a draft they satisfy rolls onto the deployed services without a new version
    await client.put(f"{D}/features", json={"features": [*seven_features(), FARE]}, headers=admin)
    revision = (await assign(client, admin)).json()
    body = await contract(client, admin)
    assert body == {
        "features": [*SEVEN_FEATURES, FARE],
        "source": "domain_snapshot",
        "model_id": "pricing-model",
        "model_version": "1",
        "assignment_id": revision["assignment_id"],
    }
    assert revision["assignment_id"] != first["assignment_id"]
    assert (await stored_service(session, "svc-1")).resolved_features == {**SA, "fare": 99.5}
    # and from now on the new snapshot governs
    r = await init_service(client, admin, "svc-2", {"route": "Sydney to Adelaide", "fare": -1}, expect=422)
    assert "fare" in r.json()["message"]


async def test_the_freeze_check_of_another_key_uses_the_snapshot_not_the_draft(client, session, admin):
    """A `forecast` key on a version without a frozen schema is checked against the governing
    snapshot: a draft the deployed services do not satisfy does not block it."""
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-1", SA)
    await client.put(f"{D}/features", json={"features": ROUTE_AS_INTEGER}, headers=admin)
    await make_version(session, version="2")
    r = await assign(client, admin, key="forecast", model_version="2")
    assert r.json()["status"] == "active"


async def test_two_tenants_sharing_a_version_without_a_frozen_schema(client, session, admin, auth):
    """client-1 trains version 1 through its `default`; client-2's contract on the same version
    stays what it was (the version's features are never written by a job)."""
    await tenant_setup(client, session, admin)  # client-1: the seven features
    await make_client(session, "client-2")
    other = domain_url("client-2", "victoria")
    victoria = [feature("route", {"type": "string"}, True), feature("zone", {"type": "integer"}, True)]
    await create_domain(client, admin, "client-2", "victoria", victoria)
    await assign(client, admin, "client-2", "victoria")
    await init_service(client, admin, "melb", {"route": "Melbourne to Geelong", "zone": 1}, "client-2", "victoria")
    before = await client.get(f"{other}/contract", headers=admin)  # checked below

    tenant_1 = auth(groups=["client:client-1"], username="alice")
    r = await client.post(f"{D}/assignments/default/jobs", json={"job_type": "training"}, headers=tenant_1)
    assert r.status_code == 202, r.text

    # client-2 keeps working under its own contract
    await init_service(client, admin, "bendigo", {"route": "Bendigo to Ballarat", "zone": 2}, "client-2", "victoria")
    r = await client.put(
        f"{other}/service/melb", json={"static_features": {"route": "Geelong to Melbourne"}}, headers=admin
    )
    assert r.status_code == 200, r.text
    r = await init_service(client, admin, "sa", {"route": "Adelaide to Sydney"}, "client-2", "victoria", expect=422)
    assert "zone" in r.json()["message"]
    version = (await client.get("/v2/models/pricing-model/versions/1", headers=admin)).json()
    assert version["features"] is None
    assert before.status_code == 200, before.text
    assert before.json()["features"] == victoria and before.json()["source"] == "domain_snapshot"
    assert await contract(client, admin, other) == before.json()


# -- 2. jobs never write model versions -------------------------------------------------------------


async def test_training_through_a_domain_assignment_carries_domain_features(client, session, admin, settings):
    handlers = {"training": {"type": "in_process", "value": "test_payload_keys"}} | {
        "inference": {"type": "in_process", "value": "test_payload_keys"}
    }
    await make_client(session, "client-1")
    await make_version(session, handlers=handlers)
    await create_domain(client, admin)
    await assign(client, admin)
    await init_service(client, admin, "svc-1", SA)
    await assign(client, admin, key="forecast", service_id="svc-1")
    S = f"{D}/service/svc-1"

    # the live draft moves on after `default` was written: the training job carries the draft
    draft = [*seven_features(), FARE]
    await client.put(f"{D}/features", json={"features": draft}, headers=admin)
    training = (await client.post(f"{D}/assignments/default/jobs", json={"job_type": "training"}, headers=admin)).json()
    inference = (await client.post(f"{D}/assignments/default/jobs", json={}, headers=admin)).json()
    service_training = (
        await client.post(f"{S}/assignments/forecast/jobs", json={"job_type": "training"}, headers=admin)
    ).json()
    await dispatch_until_idle(settings)

    async def output(job_id: str) -> dict[str, Any]:
        job = (await client.get(f"/v2/jobs/{job_id}", headers=admin)).json()
        assert job["status"] == "success", job
        return job["output"]

    out = await output(training["job_id"])
    assert out["domain_features"] == draft and "domain_features" in out["keys"]
    for job_id in (inference["job_id"], service_training["job_id"]):
        out = await output(job_id)
        assert out["domain_features"] is None and "domain_features" not in out["keys"]
    # a retry goes through the key again: it carries the live features as they are now
    later = seven_features()
    await client.put(f"{D}/features", json={"features": later}, headers=admin)
    retried = await client.post(f"/v2/jobs/{training['job_id']}/retry", headers=admin)
    assert retried.status_code == 202, retried.text
    await dispatch_until_idle(settings)
    out = await output(retried.json()["job_id"])
    assert out["domain_features"] == later
    # the version's frozen schema was not written; the domain still runs its snapshot
    version = (await client.get("/v2/models/pricing-model/versions/1", headers=admin)).json()
    assert version["features"] is None
    assert (await contract(client, admin))["features"] == SEVEN_FEATURES


async def test_a_frozen_schema_is_set_only_by_createmodelversion(client, session, admin):
    await tenant_setup(client, session, admin)
    r = await client.post(
        "/v2/models/pricing-model/new_version", json={"version": "2", "features": ROUTE_AS_INTEGER}, headers=admin
    )
    assert r.status_code == 201 and r.json()["version"]["features"] == ROUTE_AS_INTEGER
    await assign(client, admin, key="retrain", model_version="2")
    await client.put(f"{D}/features", json={"features": [feature("route", {"type": "string"}, True)]}, headers=admin)
    r = await client.post(f"{D}/assignments/retrain/jobs", json={"job_type": "training"}, headers=admin)
    assert r.status_code == 202
    assert (await client.get("/v2/models/pricing-model/versions/2", headers=admin)).json()["features"] == (
        ROUTE_AS_INTEGER
    )


# -- 3. GET .../contract ------------------------------------------------------------------------------


async def test_contract_of_a_version_with_a_frozen_schema(client, session, admin, auth):
    frozen = [feature("route", {"type": "string", "enum": ["A-B"]}, True), FARE]
    await tenant_setup(client, session, admin, version_features=frozen)
    body = await contract(client, admin)
    assert body == {
        "features": frozen,
        "source": "model_version",
        "model_id": "pricing-model",
        "model_version": "1",
        "assignment_id": await active_default_id(session),
    }
    # the live draft is something else, and does not show here
    await client.put(f"{D}/features", json={"features": ROUTE_AS_INTEGER}, headers=admin)
    assert await contract(client, admin) == body
    # a tenant reader sees its own; another tenant and a caller without read_domains do not
    assert (await client.get(f"{D}/contract", headers=auth(groups=["client:client-1"]))).status_code == 200
    assert (await client.get(f"{D}/contract", headers=auth(groups=["client:client-2"]))).status_code == 403
    r = await client.get(f"{D}/contract", headers=auth(scopes=["read_models"], client_id="client-1"))
    assert r.status_code == 403


async def test_contract_needs_an_active_default(client, session, admin):
    await make_client(session, "client-1")
    await make_version(session)
    await create_domain(client, admin)
    r = await client.get(f"{D}/contract", headers=admin)
    assert r.status_code == 422 and "no model assigned" in r.json()["message"]
    await assign(client, admin, key="forecast")
    assert (await client.get(f"{D}/contract", headers=admin)).status_code == 422
    await assign(client, admin)
    assert (await contract(client, admin))["source"] == "domain_snapshot"
    await assign(client, admin, status="archived")
    assert (await client.get(f"{D}/contract", headers=admin)).status_code == 422
    r = await client.get("/v2/clients/client-1/domains/nowhere/contract", headers=admin)
    assert r.status_code == 404


# -- 4. PUT .../features?dry_run=true -----------------------------------------------------------------


async def test_features_dry_run_lists_blocking_services_and_writes_nothing(client, session, admin):
    await tenant_setup(client, session, admin)
    await init_service(client, admin, "svc-b", {"route": "Adelaide to Sydney", "competitor_count": 7})
    await init_service(client, admin, "svc-a", {"route": "Sydney to Adelaide"})
    await init_service(client, admin, "svc-empty", {"route": "Sydney to Adelaide"})
    past = iso(datetime.now(timezone.utc) - timedelta(hours=1))
    await init_service(client, admin, "gone", {"route": "Adelaide to Sydney", "competitor_count": 19})
    await client.put(f"{D}/service/gone", json={"departure_datetime": past}, headers=admin)
    audit_rows = await session.scalar(text("SELECT count(*) FROM audit_log"))
    await session.commit()

    draft = [
        feature("route", {"type": "string", "enum": ["Adelaide to Sydney"]}, True),
        feature("competitor_count", {"type": "integer", "maximum": 5}, True),
    ]
    r = await client.put(f"{D}/features?dry_run=true", json={"features": draft}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "features": draft,
        "dry_run": True,
        "blocking_services": [
            {
                "service_id": "svc-a",
                "feature": "competitor_count",
                "value": None,
                "reason": "missing mandatory feature",
            },
            {
                "service_id": "svc-a",
                "feature": "route",
                "value": "Sydney to Adelaide",
                "reason": "'Sydney to Adelaide' is not one of ['Adelaide to Sydney']",
            },
            {
                "service_id": "svc-b",
                "feature": "competitor_count",
                "value": 7,
                "reason": "7 is greater than the maximum of 5",
            },
            {
                "service_id": "svc-empty",
                "feature": "competitor_count",
                "value": None,
                "reason": "missing mandatory feature",
            },
            {
                "service_id": "svc-empty",
                "feature": "route",
                "value": "Sydney to Adelaide",
                "reason": "'Sydney to Adelaide' is not one of ['Adelaide to Sydney']",
            },
        ],
    }
    # nothing written: not the features, not an audit row
    assert (await client.get(f"{D}/features", headers=admin)).json() == SEVEN_FEATURES
    assert await session.scalar(text("SELECT count(*) FROM audit_log")) == audit_rows
    await session.commit()

    # a draft everyone satisfies; dry_run=false is the plain PUT
    r = await client.put(f"{D}/features?dry_run=true", json={"features": [*seven_features(), FARE]}, headers=admin)
    assert r.json() == {"features": [*SEVEN_FEATURES, FARE], "dry_run": True, "blocking_services": []}
    r = await client.put(f"{D}/features?dry_run=false", json={"features": ROUTE_AS_INTEGER}, headers=admin)
    assert r.status_code == 200 and r.json() == {"features": ROUTE_AS_INTEGER}


async def test_features_dry_run_refuses_what_the_put_refuses(client, session, admin):
    await tenant_setup(client, session, admin)
    bad = [feature("route", {"type": "string"}), feature("route", {"type": "string"})]
    r = await client.put(f"{D}/features?dry_run=true", json={"features": bad}, headers=admin)
    assert r.status_code == 422 and "invalid feature definitions" in r.json()["message"]
    r = await client.put(f"{D}/features?dry_run=maybe", json={"features": []}, headers=admin)
    assert r.status_code == 400
    r = await client.put(
        "/v2/clients/client-1/domains/nowhere/features?dry_run=true", json={"features": []}, headers=admin
    )
    assert r.status_code == 404
