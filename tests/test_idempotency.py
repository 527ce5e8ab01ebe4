"""Idempotency keys (spec 14.4; issue 8, item 5): a retried POST with the same key replays the
first response and writes nothing; a different request with the key is a 422; concurrent
requests with one key produce one effect; keys expire and are purged."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from factories import init_service, tenant_setup
from sqlalchemy import text

ECHO = {"type": "in_process", "value": "echo"}
HANDLERS = {"training": ECHO, "inference": ECHO}
D = "/v2/clients/client-1/domains/south_australia"
SA = {"route": "Adelaide to Sydney"}
INFER = "/v2/models/pricing-model/versions/1/inference"


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def count(session, table: str, where: str = "TRUE") -> int:
    return (await session.execute(text(f"SELECT count(*) FROM {table} WHERE {where}"))).scalar_one()


@pytest.fixture
async def world(client, session, admin):
    await tenant_setup(client, session, admin)


async def test_a_retried_inference_replays_the_first_answer_and_creates_no_job(client, session, admin, world):
    headers = {**admin, **key()}
    first = await client.post(INFER, json={"input": {"a": 1}}, headers=headers)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    again = await client.post(INFER, json={"input": {"a": 1}}, headers=headers)
    assert again.status_code == 202
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert await count(session, "jobs", "job_type = 'inference' AND service_id IS NULL") == 1
    # without a key every POST is a new job
    for _ in range(2):
        assert (await client.post(INFER, json={"input": {"a": 1}}, headers=admin)).status_code == 202
    assert await count(session, "jobs", "job_type = 'inference' AND service_id IS NULL") == 3


async def test_the_same_key_with_another_request_is_422_and_writes_nothing(client, session, admin, world):
    headers = {**admin, **key()}
    assert (await client.post(INFER, json={"input": {"a": 1}}, headers=headers)).status_code == 202
    r = await client.post(INFER, json={"input": {"a": 2}}, headers=headers)
    assert r.status_code == 422
    assert "different request" in r.json()["message"]
    # another route is another request too
    r = await client.post("/v2/models", json={"name": "x", "description": "", "handlers": HANDLERS}, headers=headers)
    assert r.status_code == 422
    assert await count(session, "jobs", "job_type = 'inference' AND service_id IS NULL") == 1
    assert await count(session, "models") == 1


async def test_keys_belong_to_their_caller(client, session, auth, world):
    shared = key()
    one = await client.post(INFER, json={"input": {}}, headers={**auth(admin=True, subject="alice"), **shared})
    two = await client.post(INFER, json={"input": {}}, headers={**auth(admin=True, subject="bob"), **shared})
    assert one.status_code == two.status_code == 202
    assert one.json()["inference_job_id"] != two.json()["inference_job_id"]


async def test_concurrent_requests_with_one_key_make_one_job(client, session, admin, world):
    headers = {**admin, **key()}
    answers = await asyncio.gather(*(client.post(INFER, json={"input": {"n": 1}}, headers=headers) for _ in range(8)))
    assert {r.status_code for r in answers} == {202}, [r.text for r in answers]
    assert len({r.json()["inference_job_id"] for r in answers}) == 1
    assert await count(session, "jobs", "job_type = 'inference' AND service_id IS NULL") == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 7


@pytest.mark.parametrize("bad", [b"", b"x" * 256, "cl\u00e9".encode(), b"tab\there"])
async def test_malformed_keys_are_400(client, session, admin, world, bad):
    r = await client.post(INFER, json={"input": {}}, headers=[*admin.items(), (b"Idempotency-Key", bad)])
    assert r.status_code == 400
    assert "Idempotency-Key" in r.json()["message"]
    assert await count(session, "jobs", "job_type = 'inference' AND service_id IS NULL") == 0


async def test_a_failed_request_does_not_keep_its_key(client, session, admin, world):
    headers = {**admin, **key()}
    url = "/v2/models/pricing-model/versions/2/inference"
    assert (await client.post(url, json={"input": {}}, headers=headers)).status_code == 404
    r = await client.post("/v2/models/pricing-model/new_version", json={"version": "2"}, headers=admin)
    assert r.status_code == 201
    await client.post("/v2/models/pricing-model/versions/2/new_status", json={"status": "active"}, headers=admin)
    r = await client.post(url, json={"input": {}}, headers=headers)
    assert r.status_code == 202, r.text
    assert "idempotent-replayed" not in r.headers


async def test_expired_keys_are_new_and_purged(client, session, admin, world):
    headers = {**admin, **key()}
    first = await client.post(INFER, json={"input": {}}, headers=headers)
    other = await client.post(INFER, json={"input": {"o": 1}}, headers={**admin, **key()})
    assert first.status_code == other.status_code == 202
    await session.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"))
    await session.commit()
    again = await client.post(INFER, json={"input": {}}, headers=headers)
    assert again.status_code == 202 and "idempotent-replayed" not in again.headers
    assert again.json() != first.json()
    # the other expired key was purged by that request; the renewed one is kept 24 h
    rows = (await session.execute(text("SELECT expires_at - now() AS left FROM idempotency_keys"))).all()
    assert len(rows) == 1 and rows[0].left.total_seconds() > 23 * 3600


async def test_every_creating_post_replays(client, session, admin, world):
    """createclient, createdomain, createmodel, createmodelversion, createmodeleventsubscription,
    service init, batch re-init and both assignment job routes: the retry answers the same and
    writes nothing."""
    await init_service(client, admin, "s0", SA)
    r = await client.put(
        f"{D}/service/s0/assignments/forecast", json={"model_id": "pricing-model", "model_version": "1"}, headers=admin
    )
    assert r.status_code == 200, r.text
    calls = [
        ("/v2/clients", {"client_id": "client-2", "name": "Two"}, "clients"),
        ("/v2/clients/client-1/domains", {"domain_id": "other", "features": []}, "domains"),
        ("/v2/models", {"name": "gen", "description": "", "handlers": HANDLERS}, "models"),
        ("/v2/models/pricing-model/new_version", {}, "model_versions"),
        (
            "/v2/models/pricing-model/event-subscriptions",
            {
                "trigger_event": "training_complete",
                "target_model_id": "pricing-model",
                "target_action": "inference",
                "input_source": "stored",
                "input": SA,
            },
            "event_subscriptions",
        ),
        (f"{D}/service/init", {"service_id": "s1", "static_features": SA}, "jobs"),
        (f"{D}/services/init", None, "jobs"),
        (f"{D}/assignments/default/jobs", {"input": {}}, "jobs"),
        (f"{D}/service/s0/assignments/forecast/jobs", {"input": {}}, "jobs"),
    ]
    for url, body, table in calls:
        headers = {**admin, **key()}
        kwargs = {"json": body} if body is not None else {}
        first = await client.post(url, headers=headers, **kwargs)
        assert first.status_code in (201, 202), (url, first.text)
        rows = await count(session, table)
        again = await client.post(url, headers=headers, **kwargs)
        assert (again.status_code, again.content) == (first.status_code, first.content), url
        assert again.headers["idempotent-replayed"] == "true"
        assert await count(session, table) == rows, url


async def test_the_openapi_document_declares_the_header(client):
    spec = (await client.get("/v2/openapi.json")).json()
    keyed = {
        op["operationId"]
        for item in spec["paths"].values()
        for op in item.values()
        if isinstance(op, dict)
        and any(p.get("name") == "Idempotency-Key" and p["in"] == "header" for p in op.get("parameters", []))
    }
    assert keyed == {
        "createclient",
        "createdomain",
        "createmodel",
        "createmodelversion",
        "createmodeleventsubscription",
        "infermodelversion",
        "rundomainmodelassignmentjob",
        "runservicemodelassignmentjob",
        "initdomainservice",
        "initalldomainservices",
        "reinitdomainservice",
        "retryjob",
    }
    for item in spec["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and op.get("operationId") in keyed:
                assert "Idempotency-Key" in op["responses"]["422"]["description"]
