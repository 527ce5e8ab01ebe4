"""Job tenancy (spec 14.1) and machine tokens mapped to tenants through app clients (14.2)."""

from __future__ import annotations

import pytest
from factories import make_version, stored_job
from sqlalchemy import text

A, B = "sealink", "other"
INFER = "/v2/models/pricing-model/versions/1/inference"


def machine(auth, claim: str | None, *scopes: str) -> dict[str, str]:
    return auth(scopes=list(scopes or ("read_models", "run_inference", "complete_jobs")), client_id=claim)


def complete_url(job_id: str) -> str:
    return f"/v2/models/pricing-model/versions/1/jobs/{job_id}/complete"


@pytest.fixture
async def tenants(client, session, admin):
    await make_version(session)
    for tenant in (A, B):
        r = await client.post("/v2/clients", json={"client_id": tenant, "name": tenant}, headers=admin)
        assert r.status_code == 201, r.text


async def launch(client, headers, body=None) -> str:
    r = await client.post(INFER, json=body or {"input": {"x": 1}}, headers=headers)
    assert r.status_code == 202, r.text
    return r.json()["inference_job_id"]


async def test_direct_inference_jobs_record_the_callers_tenant(client, session, admin, auth, tenants):
    b_job = await launch(client, machine(auth, B), {"input": {"secret_price_floor": 123}})
    assert (await stored_job(session, b_job)).client_id == B
    human_a = auth(groups=[f"client:{A}"], username="alice")
    a_job = await launch(client, human_a)
    assert (await stored_job(session, a_job)).client_id == A
    # a machine caller without a tenant (its claim names no client) and an admin: platform jobs
    platform = await launch(client, machine(auth, "pie-worker"))
    assert (await stored_job(session, platform)).client_id is None
    assert (await stored_job(session, await launch(client, admin))).client_id is None
    # an admin may name a tenant; an unknown one is 404
    named = await launch(client, admin, {"input": {}, "client_id": B})
    assert (await stored_job(session, named)).client_id == B
    r = await client.post(INFER, json={"input": {}, "client_id": "nobody"}, headers=admin)
    assert r.status_code == 404
    # a suspended tenant launches nothing
    await client.patch(f"/v2/clients/{B}", json={"status": "suspended"}, headers=admin)
    r = await client.post(INFER, json={"input": {}}, headers=machine(auth, B))
    assert r.status_code == 422 and "suspended" in r.json()["message"]


async def test_tenant_a_can_neither_list_read_nor_complete_b_or_platform_jobs(client, session, admin, auth, tenants):
    b_job = await launch(client, machine(auth, B), {"input": {"secret_price_floor": 123}})
    platform = await launch(client, admin)
    mine = await launch(client, machine(auth, A))
    for a_caller in (machine(auth, A), auth(groups=[f"client:{A}"], username="alice")):
        listed = await client.get("/v2/jobs", headers=a_caller)
        assert listed.status_code == 200 and [j["job_id"] for j in listed.json()] == [mine]
        assert "secret_price_floor" not in listed.text
        for other in (b_job, platform):
            r = await client.get(f"/v2/jobs/{other}", headers=a_caller)
            assert r.status_code == 403 and "secret_price_floor" not in r.text
        r = await client.get(f"/v2/jobs?client_id={B}", headers=a_caller)
        assert r.status_code == 403
    # completing: tenant A's worker token may complete A's job only
    for other in (b_job, platform):
        r = await client.post(complete_url(other), json={"status": "success", "output": {}}, headers=machine(auth, A))
        assert r.status_code == 403
        assert (await stored_job(session, other)).status == "pending"
    r = await client.post(complete_url(mine), json={"status": "success", "output": {}}, headers=machine(auth, A))
    assert r.status_code == 200
    # platform jobs: admins and tenantless machine callers
    worker = machine(auth, "pie-worker")
    assert [j["job_id"] for j in (await client.get("/v2/jobs", headers=worker)).json()] == [platform]
    assert (await client.get(f"/v2/jobs/{b_job}", headers=worker)).status_code == 403
    r = await client.post(complete_url(platform), json={"status": "success", "output": {}}, headers=worker)
    assert r.status_code == 200
    assert {j["job_id"] for j in (await client.get("/v2/jobs", headers=admin)).json()} == {b_job, platform, mine}


async def test_a_multi_tenant_caller_names_a_tenant_it_can_access(client, session, admin, auth, tenants):
    both = auth(groups=[f"client:{A}", f"client:{B}"], username="carol")
    r = await client.post(INFER, json={"input": {}, "client_id": "third"}, headers=both)
    assert r.status_code == 403 and "third" in r.json()["message"]
    job = await launch(client, both, {"input": {}, "client_id": B})
    assert (await stored_job(session, job)).client_id == B
    # without client_id a caller with several tenants launches a platform job
    job = await launch(client, both, {"input": {}})
    assert (await stored_job(session, job)).client_id is None
    # a single-tenant caller naming another tenant: 403, nothing written
    before = await session.scalar(text("SELECT count(*) FROM jobs"))
    r = await client.post(INFER, json={"input": {}, "client_id": B}, headers=machine(auth, A))
    assert r.status_code == 403
    assert await session.scalar(text("SELECT count(*) FROM jobs")) == before


async def test_jobs_fired_by_subscriptions_inherit_the_tenant_of_their_trigger(client, session, admin, auth, tenants):
    # an inference_complete subscription on the model feeding its output to another inference
    r = await client.post(
        "/v2/models",
        json={
            "id": "follow",
            "name": "f",
            "description": "",
            "handlers": {
                "training": {"type": "in_process", "value": "echo"},
                "inference": {"type": "in_process", "value": "echo"},
            },
        },
        headers=admin,
    )
    assert r.status_code == 201
    await make_version(session, "follow", "1")
    r = await client.post(
        "/v2/models/pricing-model/event-subscriptions",
        json={
            "trigger_event": "inference_complete",
            "target_model_id": "follow",
            "target_action": "inference",
            "input_source": "trigger_output",
        },
        headers=admin,
    )
    assert r.status_code == 201, r.text
    b_job = await launch(client, machine(auth, B))
    r = await client.post(
        complete_url(b_job), json={"status": "success", "output": {"price": 7}}, headers=machine(auth, B)
    )
    assert r.status_code == 200, r.text
    (event,) = r.json()["triggered_events"]
    fired = await stored_job(session, event["job_id"])
    assert fired.client_id == B and fired.input == {"price": 7}
    # tenant A cannot read it; B can
    assert (await client.get(f"/v2/jobs/{fired.job_id}", headers=machine(auth, A))).status_code == 403
    assert (await client.get(f"/v2/jobs/{fired.job_id}", headers=machine(auth, B))).status_code == 200

    # a replay subscription made by subscribe: true belongs to the tenant; its replays too
    await launch(client, machine(auth, A), {"input": {"floor": 1}, "subscribe": True})
    subs_a = (await client.get("/v2/models/pricing-model/event-subscriptions", headers=machine(auth, A))).json()
    assert [s["client_id"] for s in subs_a if s["input"] == {"floor": 1}] == [A]
    subs_b = (await client.get("/v2/models/pricing-model/event-subscriptions", headers=machine(auth, B))).json()
    assert all(s["input"] != {"floor": 1} for s in subs_b)
    await session.execute(text("UPDATE model_versions SET status = 'training' WHERE model_id = 'pricing-model'"))
    await session.commit()
    r = await client.post("/v2/models/pricing-model/versions/1/new_status", json={"status": "active"}, headers=admin)
    assert r.status_code == 200, r.text
    (replay,) = [e for e in r.json()["triggered_events"] if "job_id" in e]
    assert (await stored_job(session, replay["job_id"])).client_id == A


# ---- 14.2: app clients -----------------------------------------------------------------------


async def test_a_mapped_app_client_acts_for_its_tenant_and_no_other(client, session, admin, auth, tenants):
    r = await client.patch(f"/v2/clients/{A}", json={"app_client_ids": ["4f1abcdefghij2klmnop3qrstu"]}, headers=admin)
    assert r.status_code == 200 and r.json()["app_client_ids"] == ["4f1abcdefghij2klmnop3qrstu"]
    token = auth(scopes=["read_domains", "run_inference", "read_models"], client_id="4f1abcdefghij2klmnop3qrstu")
    assert (await client.get(f"/v2/clients/{A}", headers=token)).status_code == 200
    assert (await client.get(f"/v2/clients/{B}", headers=token)).status_code == 403
    assert [c["client_id"] for c in (await client.get("/v2/clients", headers=token)).json()] == [A]
    job = await launch(client, token)
    assert (await stored_job(session, job)).client_id == A
    # a human token carrying the same app client id (its client_id claim) gets no tenant from it
    human = auth(groups=[], username="dave", client_id="4f1abcdefghij2klmnop3qrstu", scopes=["read_domains"])
    assert (await client.get(f"/v2/clients/{A}", headers=human)).status_code == 403
    # the mapping wins over a client named like the claim; the claim = client_id rule stays for
    # development tokens
    assert (await client.get(f"/v2/clients/{B}", headers=machine(auth, B, "read_domains"))).status_code == 200


async def test_two_clients_cannot_claim_the_same_app_client_id(client, session, admin, tenants):
    r = await client.post(
        "/v2/clients", json={"client_id": "third", "name": "T", "app_client_ids": ["app-1", "app-2"]}, headers=admin
    )
    assert r.status_code == 201 and r.json()["app_client_ids"] == ["app-1", "app-2"]
    r = await client.post(
        "/v2/clients", json={"client_id": "fourth", "name": "F", "app_client_ids": ["app-2"]}, headers=admin
    )
    assert r.status_code == 409 and "app-2" in r.json()["message"] and "third" in r.json()["message"]
    assert (await client.get("/v2/clients/fourth", headers=admin)).status_code == 404  # nothing written
    r = await client.patch(f"/v2/clients/{A}", json={"app_client_ids": ["app-1"]}, headers=admin)
    assert r.status_code == 409
    assert (await client.get(f"/v2/clients/{A}", headers=admin)).json()["app_client_ids"] == []
    # releasing it lets another client take it
    assert (
        await client.patch("/v2/clients/third", json={"app_client_ids": ["app-2"]}, headers=admin)
    ).status_code == 200
    r = await client.patch(f"/v2/clients/{A}", json={"app_client_ids": ["app-1"]}, headers=admin)
    assert r.status_code == 200 and r.json()["app_client_ids"] == ["app-1"]
    # only admins manage them
    r = await client.get(f"/v2/clients/{A}", headers=admin)
    assert r.json()["app_client_ids"] == ["app-1"]


async def test_the_tenant_cache_follows_a_mapping_change_at_once(
    app, client, session, admin, auth, tenants, monkeypatch
):
    """With the per-process cache on, a mapping change is seen by the next request (the cache
    is cleared when the change commits), not after the cache time."""
    monkeypatch.setattr(app.state.settings, "tenant_cache_seconds", 3600.0)
    token = auth(scopes=["read_domains"], client_id="app-x")
    assert (await client.get(f"/v2/clients/{A}", headers=token)).status_code == 403  # cached: no tenant
    assert (
        await client.patch(f"/v2/clients/{A}", json={"app_client_ids": ["app-x"]}, headers=admin)
    ).status_code == 200
    assert (await client.get(f"/v2/clients/{A}", headers=token)).status_code == 200
    assert (await client.patch(f"/v2/clients/{A}", json={"app_client_ids": []}, headers=admin)).status_code == 200
    assert (await client.get(f"/v2/clients/{A}", headers=token)).status_code == 403
